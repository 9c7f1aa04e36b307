// sketch_moments on the CPU: one pass over every gradient gives the group moments (same columns
// as group_moments) and the rotated-fold count-sketch of each group (see sketch_hash.h).
//
// Chunks run in parallel (at::parallel_for); each writes its own moments partial and a float64
// partial sketch; a fixed-order pass then merges each group's partials in chunk order, so the
// bits do not depend on the thread count. Inside a chunk, each fold segment (at most k elements)
// is widened to a buffer once and feeds both the moment lanes and the sketch.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <tuple>
#include <vector>

#include "gradgeom/moments.h"
#include "gradgeom/sketch_hash.h"
#include "gradgeom/sketch_plan.h"

namespace gradgeom {
namespace {

constexpr int kLanes = 16;

// Moments of a buffer of n values (non-finite ones counted apart), two passes over the buffer;
// kLanes independent lanes so the compiler emits SIMD code.
template <typename T>
Moments<double> buffer_moments(const T* x, int64_t n) {
  T s[kLanes] = {}, ss[kLanes] = {}, c[kLanes] = {}, mx[kLanes] = {}, nf[kLanes] = {};
  const int64_t full = n - n % kLanes;
  auto add = [&](int l, T v) {
    const bool finite = (v - v) == T(0);
    const T y = finite ? v : T(0);
    s[l] += y;
    ss[l] += y * y;
    c[l] += finite ? T(1) : T(0);
    nf[l] += finite ? T(0) : T(1);
    const T a = std::fabs(y);
    mx[l] = a > mx[l] ? a : mx[l];
  };
  for (int64_t i = 0; i < full; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) add(l, x[i + l]);
  }
  for (int64_t i = full; i < n; ++i) add(0, x[i]);
  Moments<double> m;
  for (int l = 0; l < kLanes; ++l) {
    m.count += c[l];
    m.sum += s[l];
    m.sumsq += ss[l];
    m.nonfinite += nf[l];
    m.maxabs = mx[l] > m.maxabs ? static_cast<double>(mx[l]) : m.maxabs;
  }
  if (m.count > 0) {
    const T mean = static_cast<T>(m.sum / m.count);
    T m2[kLanes] = {};
    auto dev = [&](int l, T v) {
      const T d = (v - v) == T(0) ? v - mean : T(0);
      m2[l] += d * d;
    };
    for (int64_t i = 0; i < full; i += kLanes) {
      for (int l = 0; l < kLanes; ++l) dev(l, x[i + l]);
    }
    for (int64_t i = full; i < n; ++i) dev(0, x[i]);
    double total = 0;
    for (int l = 0; l < kLanes; ++l) total += m2[l];
    const double shift = m.sum / m.count - static_cast<double>(mean);
    m.m2 = total - m.count * shift * shift;
    if (m.m2 < 0) m.m2 = 0;
  }
  return m;
}

// sk[bucket0 + e] += sign(i0 + e) * x[e] for e < n (finite x only). The sign words of a fold
// differ by a_lo from one element to the next: folds never straddle a multiple of 2^32.
template <typename T>
void add_signed_run(const T* x, int64_t n, uint64_t word0, uint64_t a_lo, double* sk) {
  uint64_t w = word0;
  for (int64_t e = 0; e < n; ++e, w += a_lo) {
    const T v = x[e];
    const T y = (v - v) == T(0) ? v : T(0);
    const double sign = 1.0 - 2.0 * static_cast<double>(w >> 63);
    sk[e] += sign * static_cast<double>(y);
  }
}

// Loads elements [begin, begin + n) of a tensor into `out`, widened to T.
template <typename T>
void load_values(const SketchPlannedTensor& t, int64_t begin, int64_t n, T* out) {
  switch (static_cast<ElemType>(t.type)) {
    case ElemType::kFloat32: {
      const float* p = static_cast<const float*>(t.data) + begin;
      for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(p[i]);
      break;
    }
    case ElemType::kFloat64: {
      const double* p = static_cast<const double*>(t.data) + begin;
      for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(p[i]);
      break;
    }
    case ElemType::kBFloat16: {
      const uint16_t* p = static_cast<const uint16_t*>(t.data) + begin;
      for (int64_t i = 0; i < n; ++i) {
        const uint32_t bits = static_cast<uint32_t>(p[i]) << 16;
        float f;
        std::memcpy(&f, &bits, sizeof(float));
        out[i] = static_cast<T>(f);
      }
      break;
    }
    case ElemType::kFloat16: {
      const c10::Half* p = static_cast<const c10::Half*>(t.data) + begin;
      for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(static_cast<float>(p[i]));
      break;
    }
  }
}

// One chunk: moments into `mom`, sketch contributions added to `sk` (k doubles, zeroed by caller).
template <typename T>
Moments<double> chunk_sketch(const SketchPlannedTensor& t, int64_t begin, int64_t end, int64_t k, int log2k,
                             const SketchHash& h, std::vector<T>& buf, double* sk) {
  Moments<double> acc;
  const int g8_log2 = log2k - 3;
  const uint64_t kmask = static_cast<uint64_t>(k - 1);
  for (int64_t a = begin; a < end;) {
    const int64_t fold = a >> log2k;
    const int64_t b = std::min(end, (fold + 1) << log2k);
    const int64_t n = b - a;
    load_values<T>(t, a - t.offset, n, buf.data());
    merge_into(acc, buffer_moments<T>(buf.data(), n));
    const uint64_t rot = fold_rotation_groups(h, static_cast<uint64_t>(fold), g8_log2) << 3;
    // Positions p < k - rot go to bucket p + rot, the rest wrap to p + rot - k.
    const int64_t p0 = a & static_cast<int64_t>(kmask);
    const int64_t split = std::min<int64_t>(n, std::max<int64_t>(0, k - static_cast<int64_t>(rot) - p0));
    const uint64_t w0 = sign_word(h, static_cast<uint64_t>(a));
    add_signed_run<T>(buf.data(), split, w0, h.a_lo, sk + ((p0 + rot) & kmask));
    if (split < n) {
      add_signed_run<T>(buf.data() + split, n - split, w0 + static_cast<uint64_t>(split) * h.a_lo, h.a_lo,
                        sk + ((p0 + split + rot) & kmask));
    }
    a = b;
  }
  return acc;
}

std::tuple<at::Tensor, at::Tensor> sketch_moments_cpu(at::TensorList tensors, c10::IntArrayRef group_ids,
                                                      c10::IntArrayRef offsets, int64_t num_groups,
                                                      int64_t sketch_dim, int64_t seed) {
  check_sketch_args("sketch_moments", tensors, group_ids, offsets, num_groups, sketch_dim);
  const SketchPlan plan = make_sketch_plan(tensors, group_ids, offsets, num_groups);
  const int64_t k = sketch_dim;
  const int log2k = sketch_log2(k);
  const SketchHash h = make_sketch_hash(static_cast<uint64_t>(seed));

  std::vector<int64_t> chunk_owner(plan.num_chunks);
  for (size_t i = 0; i < plan.tensors.size(); ++i) {
    const int64_t last = i + 1 < plan.tensors.size() ? plan.tensors[i + 1].chunk_begin : plan.num_chunks;
    for (int64_t c = plan.tensors[i].chunk_begin; c < last; ++c) chunk_owner[c] = static_cast<int64_t>(i);
  }

  std::vector<Moments<double>> mom_partials(plan.num_chunks);
  std::vector<double> sk_partials(static_cast<size_t>(plan.num_chunks * k), 0.0);
  at::parallel_for(0, plan.num_chunks, 1, [&](int64_t first, int64_t last) {
    std::vector<float> fbuf;
    std::vector<double> dbuf;
    for (int64_t c = first; c < last; ++c) {
      const SketchPlannedTensor& t = plan.tensors[chunk_owner[c]];
      int64_t begin, end;
      sketch_chunk_range(t.offset, t.numel, c - t.chunk_begin, begin, end);
      double* sk = sk_partials.data() + c * k;
      if (static_cast<ElemType>(t.type) == ElemType::kFloat64) {
        dbuf.resize(k);
        mom_partials[c] = chunk_sketch<double>(t, begin, end, k, log2k, h, dbuf, sk);
      } else {
        fbuf.resize(k);
        mom_partials[c] = chunk_sketch<float>(t, begin, end, k, log2k, h, fbuf, sk);
      }
    }
  });

  const at::TensorOptions f64 = at::TensorOptions().dtype(at::kDouble);
  at::Tensor moments = at::zeros({num_groups, kMomentColumns}, f64);
  at::Tensor sketch = at::zeros({num_groups, k}, f64);
  double* mo = moments.data_ptr<double>();
  double* so = sketch.data_ptr<double>();
  for (int64_t g = 0; g < num_groups; ++g) {
    Moments<double> acc;
    double* row = so + g * k;
    for (int64_t c = plan.group_chunk_begin[g]; c < plan.group_chunk_begin[g + 1]; ++c) {
      merge_into(acc, mom_partials[c]);
      const double* part = sk_partials.data() + c * k;
      for (int64_t b = 0; b < k; ++b) row[b] += part[b];
    }
    store_moments(acc, mo + g * kMomentColumns);
  }
  return {moments, sketch};
}

}  // namespace

TORCH_LIBRARY_IMPL(gradgeom, CPU, m) {
  m.impl("sketch_moments", &sketch_moments_cpu);
}

}  // namespace gradgeom
