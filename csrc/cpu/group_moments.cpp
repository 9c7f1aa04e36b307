// group_moments on the CPU: chunks in parallel (at::parallel_for), then a fixed-order merge of
// each group's chunk partials, so the result does not depend on the thread count.
//
// Inside a chunk, values are taken in batches of kBatch. With AVX2 (checked at run time), bf16,
// fp16 and fp32 are read in place: pass one sums x and max |x|; a non-finite sum sends the batch
// to a masked pass that counts NaN/Inf; pass two, over the same L1-resident batch, sums
// (x - mean)^2. Without AVX2, portable scalar code does the same in float64. Batches merge into
// the chunk's float64 accumulator with Chan's formula.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif

#include "gradgeom/moments.h"
#include "gradgeom/tensor_list_plan.h"

namespace gradgeom {
namespace {

constexpr int64_t kBatch = 4096;

template <typename T>
struct Bits;
template <>
struct Bits<float> {
  using type = uint32_t;
  static constexpr uint32_t kExponent = 0x7f800000u;
};
template <>
struct Bits<double> {
  using type = uint64_t;
  static constexpr uint64_t kExponent = 0x7ff0000000000000ull;
};

template <typename T>
inline bool is_finite_bits(T v) {
  typename Bits<T>::type b;
  std::memcpy(&b, &v, sizeof(T));
  return (b & Bits<T>::kExponent) != Bits<T>::kExponent;
}

// Portable path: any element type, compiler-optimised scalar code.
template <typename T>
Moments<double> batch_moments_portable(const T* x, int64_t n) {
  double s = 0, ss = 0, c = 0, mx = 0, nf = 0;
  for (int64_t i = 0; i < n; ++i) {
    const T v = x[i];
    if (is_finite_bits(v)) {
      const double y = static_cast<double>(v);
      s += y;
      ss += y * y;
      c += 1;
      mx = std::max(mx, std::fabs(y));
    } else {
      nf += 1;
    }
  }
  Moments<double> m;
  m.count = c;
  m.sum = s;
  m.sumsq = ss;
  m.maxabs = mx;
  m.nonfinite = nf;
  if (c > 0) {
    const double mean = s / c;
    double m2 = 0;
    for (int64_t i = 0; i < n; ++i) {
      if (is_finite_bits(x[i])) {
        const double d = static_cast<double>(x[i]) - mean;
        m2 += d * d;
      }
    }
    m.m2 = m2;
  }
  return m;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define GG_HAVE_AVX2_PATH 1

__attribute__((target("avx2,fma"))) inline float hsum(__m256 v) {
  const __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 pair = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  return _mm_cvtss_f32(_mm_add_ss(pair, _mm_shuffle_ps(pair, pair, 1)));
}

__attribute__((target("avx2,fma"))) inline float hmax(__m256 v) {
  const __m128 lo = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 pair = _mm_max_ps(lo, _mm_movehl_ps(lo, lo));
  return _mm_cvtss_f32(_mm_max_ss(pair, _mm_shuffle_ps(pair, pair, 1)));
}

// float32 batch with AVX2, masking every element: count, sums and max over finite values only.
__attribute__((target("avx2,fma"))) Moments<double> batch_moments_masked_avx2(const float* x, int64_t n) {
  const __m256i abs_mask = _mm256_set1_epi32(0x7fffffff);
  const __m256i inf_bits = _mm256_set1_epi32(0x7f800000);
  const __m256 one = _mm256_set1_ps(1.0f);
  __m256 s = _mm256_setzero_ps(), ss = _mm256_setzero_ps(), c = _mm256_setzero_ps(), mx = _mm256_setzero_ps();
  const int64_t full = n - n % 8;
  for (int64_t i = 0; i < full; i += 8) {
    const __m256i b = _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i)), abs_mask);
    const __m256 finite = _mm256_castsi256_ps(_mm256_cmpgt_epi32(inf_bits, b));
    const __m256 y = _mm256_and_ps(_mm256_loadu_ps(x + i), finite);
    s = _mm256_add_ps(s, y);
    ss = _mm256_fmadd_ps(y, y, ss);
    c = _mm256_add_ps(c, _mm256_and_ps(finite, one));
    mx = _mm256_max_ps(mx, _mm256_castsi256_ps(_mm256_and_si256(_mm256_castps_si256(y), abs_mask)));
  }
  Moments<double> m = batch_moments_portable(x + full, n - full);
  Moments<double> v;
  v.count = hsum(c);
  v.sum = hsum(s);
  v.sumsq = hsum(ss);
  v.maxabs = hmax(mx);
  v.nonfinite = static_cast<double>(full) - v.count;
  if (v.count > 0) {
    const float mean_r = static_cast<float>(v.sum / v.count);
    const __m256 mean = _mm256_set1_ps(mean_r);
    __m256 m2 = _mm256_setzero_ps();
    for (int64_t i = 0; i < full; i += 8) {
      const __m256i b = _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i)), abs_mask);
      const __m256 finite = _mm256_castsi256_ps(_mm256_cmpgt_epi32(inf_bits, b));
      const __m256 d = _mm256_and_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), mean), finite);
      m2 = _mm256_fmadd_ps(d, d, m2);
    }
    const double shift = v.sum / v.count - static_cast<double>(mean_r);
    v.m2 = std::max(0.0, static_cast<double>(hsum(m2)) - v.count * shift * shift);
  }
  merge_into(v, m);
  return v;
}

#define GG_AVX2_INLINE __attribute__((target("avx2,fma,f16c"), always_inline)) inline

// Loaders: 8 elements of a storage type as 8 float32 lanes, and one element as a float.
struct F32Loader {
  using T = float;
  GG_AVX2_INLINE static __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
  GG_AVX2_INLINE static float one(const float* p) { return *p; }
};
struct BF16Loader {
  using T = uint16_t;
  GG_AVX2_INLINE static __m256 load8(const uint16_t* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  GG_AVX2_INLINE static float one(const uint16_t* p) {
    const uint32_t bits = static_cast<uint32_t>(*p) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof(float));
    return f;
  }
};
struct F16Loader {
  using T = uint16_t;
  GG_AVX2_INLINE static __m256 load8(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  GG_AVX2_INLINE static float one(const uint16_t* p) {
    return _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(*p)));
  }
};

// One batch with AVX2, read straight from its storage type. Pass one sums x and max |x| in four
// independent lane sets; a non-finite element makes the sum non-finite, and only then is the
// batch widened into `scratch` and re-read with masks. Pass two (L1-resident) sums
// (x - mean)^2; the sum of squares follows as M2 + n * mean^2.
template <class L>
__attribute__((target("avx2,fma,f16c"))) Moments<double> batch_moments_avx2(const typename L::T* x, int64_t n,
                                                                         float* scratch) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  __m256 m0 = s0, m1 = s0, m2 = s0, m3 = s0;
  const int64_t full32 = n - n % 32;
  for (int64_t i = 0; i < full32; i += 32) {
    const __m256 a = L::load8(x + i), b = L::load8(x + i + 8);
    const __m256 c = L::load8(x + i + 16), d = L::load8(x + i + 24);
    s0 = _mm256_add_ps(s0, a);
    s1 = _mm256_add_ps(s1, b);
    s2 = _mm256_add_ps(s2, c);
    s3 = _mm256_add_ps(s3, d);
    m0 = _mm256_max_ps(m0, _mm256_and_ps(a, abs_mask));
    m1 = _mm256_max_ps(m1, _mm256_and_ps(b, abs_mask));
    m2 = _mm256_max_ps(m2, _mm256_and_ps(c, abs_mask));
    m3 = _mm256_max_ps(m3, _mm256_and_ps(d, abs_mask));
  }
  float sum = hsum(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
  float mx = hmax(_mm256_max_ps(_mm256_max_ps(m0, m1), _mm256_max_ps(m2, m3)));
  for (int64_t i = full32; i < n; ++i) {
    const float v = L::one(x + i);
    sum += v;
    mx = std::max(mx, std::fabs(v));
  }
  // max_ps drops NaN operands, so a NaN shows only in the sum; an Inf shows in both.
  if (!std::isfinite(sum) || !std::isfinite(mx)) {
    if constexpr (std::is_same_v<L, F32Loader>) {
      return batch_moments_masked_avx2(x, n);
    } else {
      const int64_t full8 = n - n % 8;
      for (int64_t i = 0; i < full8; i += 8) _mm256_storeu_ps(scratch + i, L::load8(x + i));
      for (int64_t i = full8; i < n; ++i) scratch[i] = L::one(x + i);
      return batch_moments_masked_avx2(scratch, n);
    }
  }

  const float mean_r = sum / static_cast<float>(n);
  const __m256 mean = _mm256_set1_ps(mean_r);
  __m256 q0 = _mm256_setzero_ps(), q1 = q0, q2 = q0, q3 = q0;
  for (int64_t i = 0; i < full32; i += 32) {
    const __m256 a = _mm256_sub_ps(L::load8(x + i), mean);
    const __m256 b = _mm256_sub_ps(L::load8(x + i + 8), mean);
    const __m256 c = _mm256_sub_ps(L::load8(x + i + 16), mean);
    const __m256 d = _mm256_sub_ps(L::load8(x + i + 24), mean);
    q0 = _mm256_fmadd_ps(a, a, q0);
    q1 = _mm256_fmadd_ps(b, b, q1);
    q2 = _mm256_fmadd_ps(c, c, q2);
    q3 = _mm256_fmadd_ps(d, d, q3);
  }
  double m2_r = hsum(_mm256_add_ps(_mm256_add_ps(q0, q1), _mm256_add_ps(q2, q3)));
  for (int64_t i = full32; i < n; ++i) {
    const double dv = static_cast<double>(L::one(x + i)) - mean_r;
    m2_r += dv * dv;
  }
  Moments<double> v;
  v.count = static_cast<double>(n);
  v.sum = sum;
  v.maxabs = mx;
  const double mean_exact = v.sum / v.count;
  const double shift = mean_exact - static_cast<double>(mean_r);
  v.m2 = std::max(0.0, m2_r - v.count * shift * shift);
  v.sumsq = v.m2 + v.count * mean_exact * mean_exact;
  return v;
}

bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c");
  return has;
}
#else
bool cpu_has_avx2() { return false; }
#endif

void widen(const uint16_t* bf16_bits, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t bits = static_cast<uint32_t>(bf16_bits[i]) << 16;
    std::memcpy(out + i, &bits, sizeof(float));
  }
}

void widen(const c10::Half* src, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(src[i]);
}

Moments<double> batch_moments(const PlannedTensor& t, int64_t b, int64_t n, float* buf) {
#ifdef GG_HAVE_AVX2_PATH
  if (cpu_has_avx2()) {
    switch (t.type) {
      case ElemType::kFloat32: return batch_moments_avx2<F32Loader>(static_cast<const float*>(t.data) + b, n, buf);
      case ElemType::kBFloat16: return batch_moments_avx2<BF16Loader>(static_cast<const uint16_t*>(t.data) + b, n, buf);
      case ElemType::kFloat16: return batch_moments_avx2<F16Loader>(static_cast<const uint16_t*>(t.data) + b, n, buf);
      case ElemType::kFloat64: break;
    }
  }
#endif
  switch (t.type) {
    case ElemType::kFloat32: return batch_moments_portable(static_cast<const float*>(t.data) + b, n);
    case ElemType::kFloat64: return batch_moments_portable(static_cast<const double*>(t.data) + b, n);
    case ElemType::kBFloat16: widen(static_cast<const uint16_t*>(t.data) + b, buf, n); break;
    case ElemType::kFloat16: widen(static_cast<const c10::Half*>(t.data) + b, buf, n); break;
  }
  return batch_moments_portable(buf, n);
}

Moments<double> range_moments(const PlannedTensor& t, int64_t begin, int64_t end) {
  Moments<double> acc;
  float buf[kBatch];
  for (int64_t b = begin; b < end; b += kBatch) merge_into(acc, batch_moments(t, b, std::min(kBatch, end - b), buf));
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
