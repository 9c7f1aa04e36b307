// group_moments on the CPU: chunks in parallel (at::parallel_for), then a fixed-order merge of
// each group's chunk partials, so the result does not depend on the thread count.
//
// Inside a chunk, values are taken in batches of kBatch: pass one gathers count, sum, sum of
// squares, max |x| and the non-finite count in kLanes independent lanes (the compiler turns the
// lane loops into SIMD code); pass two, over the same L1-resident batch, gathers M2 around the
// batch mean. Batches merge into the chunk's float64 accumulator with Chan's formula.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "gradgeom/moments.h"
#include "gradgeom/tensor_list_plan.h"

namespace gradgeom {
namespace {

constexpr int kLanes = 16;
constexpr int64_t kBatch = 256;

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define GG_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define GG_SIMD_CLONES
#endif

template <typename T>
__attribute__((always_inline)) inline Moments<double> batch_moments_impl(const T* x, int64_t n) {
  T s[kLanes] = {}, ss[kLanes] = {}, c[kLanes] = {}, mx[kLanes] = {}, nf[kLanes] = {};
  const int64_t full = n - n % kLanes;
  for (int64_t i = 0; i < full; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const T v = x[i + l];
      const bool finite = (v - v) == T(0);  // false for +-Inf and NaN
      const T y = finite ? v : T(0);
      s[l] += y;
      ss[l] += y * y;
      c[l] += finite ? T(1) : T(0);
      nf[l] += finite ? T(0) : T(1);
      const T a = std::fabs(y);
      mx[l] = a > mx[l] ? a : mx[l];
    }
  }
  for (int64_t i = full; i < n; ++i) {
    const T v = x[i];
    const bool finite = (v - v) == T(0);
    const T y = finite ? v : T(0);
    s[0] += y;
    ss[0] += y * y;
    c[0] += finite ? T(1) : T(0);
    nf[0] += finite ? T(0) : T(1);
    const T a = std::fabs(y);
    mx[0] = a > mx[0] ? a : mx[0];
  }
  Moments<double> m;
  for (int l = 0; l < kLanes; ++l) {
    m.count += c[l];
    m.sum += s[l];
    m.sumsq += ss[l];
    m.nonfinite += nf[l];
    m.maxabs = mx[l] > m.maxabs ? mx[l] : m.maxabs;
  }
  if (m.count > 0) {
    const T mean = static_cast<T>(m.sum / m.count);
    T m2[kLanes] = {};
    for (int64_t i = 0; i < full; i += kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        const T v = x[i + l];
        const T d = (v - v) == T(0) ? v - mean : T(0);
        m2[l] += d * d;
      }
    }
    for (int64_t i = full; i < n; ++i) {
      const T v = x[i];
      const T d = (v - v) == T(0) ? v - mean : T(0);
      m2[0] += d * d;
    }
    // Exact correction for rounding of the batch mean: M2 = sum (x-mean_r)^2 - n (mean - mean_r)^2.
    double m2_total = 0;
    for (int l = 0; l < kLanes; ++l) m2_total += m2[l];
    const double shift = m.sum / m.count - static_cast<double>(mean);
    m.m2 = m2_total - m.count * shift * shift;
    if (m.m2 < 0) m.m2 = 0;
  }
  return m;
}

GG_SIMD_CLONES Moments<double> batch_moments(const float* x, int64_t n) {
  return batch_moments_impl<float>(x, n);
}

GG_SIMD_CLONES Moments<double> batch_moments(const double* x, int64_t n) {
  return batch_moments_impl<double>(x, n);
}

GG_SIMD_CLONES void widen(const uint16_t* bf16_bits, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t bits = static_cast<uint32_t>(bf16_bits[i]) << 16;
    std::memcpy(out + i, &bits, sizeof(float));
  }
}

GG_SIMD_CLONES void widen(const c10::Half* src, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(src[i]);
}

Moments<double> range_moments(const PlannedTensor& t, int64_t begin, int64_t end) {
  Moments<double> acc;
  float buf[kBatch];
  for (int64_t b = begin; b < end; b += kBatch) {
    const int64_t n = std::min(kBatch, end - b);
    Moments<double> part;
    switch (t.type) {
      case ElemType::kFloat32:
        part = batch_moments(static_cast<const float*>(t.data) + b, n);
        break;
      case ElemType::kFloat64:
        part = batch_moments(static_cast<const double*>(t.data) + b, n);
        break;
      case ElemType::kBFloat16:
        widen(static_cast<const uint16_t*>(t.data) + b, buf, n);
        part = batch_moments(buf, n);
        break;
      case ElemType::kFloat16:
        widen(static_cast<const c10::Half*>(t.data) + b, buf, n);
        part = batch_moments(buf, n);
        break;
    }
    merge_into(acc, part);
  }
  return acc;
}

at::Tensor group_moments_cpu(at::TensorList tensors, c10::IntArrayRef group_ids, int64_t num_groups) {
  check_tensor_list("group_moments", tensors, group_ids, num_groups);
  const TensorListPlan plan = make_plan(tensors, group_ids, num_groups, /*align_head=*/false);

  std::vector<int64_t> chunk_owner(plan.num_chunks);
  for (size_t i = 0; i < plan.tensors.size(); ++i) {
    const int64_t end = i + 1 < plan.tensors.size() ? plan.tensors[i + 1].chunk_begin : plan.num_chunks;
    for (int64_t c = plan.tensors[i].chunk_begin; c < end; ++c) chunk_owner[c] = static_cast<int64_t>(i);
  }

  std::vector<Moments<double>> partials(plan.num_chunks);
  at::parallel_for(0, plan.num_chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      const PlannedTensor& t = plan.tensors[chunk_owner[c]];
      const int64_t local = c - t.chunk_begin;
      const int64_t begin = local * kChunkElems;
      const int64_t end = std::min(t.numel, begin + kChunkElems);
      partials[c] = range_moments(t, begin, end);
    }
  });

  at::Tensor out = at::zeros({num_groups, kMomentColumns}, at::TensorOptions().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  for (int64_t g = 0; g < num_groups; ++g) {
    Moments<double> acc;
    for (int64_t c = plan.group_chunk_begin[g]; c < plan.group_chunk_begin[g + 1]; ++c) merge_into(acc, partials[c]);
    store_moments(acc, o + g * kMomentColumns);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(gradgeom, CPU, m) {
  m.impl("group_moments", &group_moments_cpu);
}

}  // namespace gradgeom
