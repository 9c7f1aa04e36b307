// Moment accumulators shared by the CPU and CUDA kernels.
//
// A Moments<T> holds, over the finite elements seen so far: count, sum, sum of squares, M2 =
// sum((x - mean)^2), max |x|; and the number of non-finite elements (counted, never summed).
// Two accumulators merge with Chan et al.'s pairwise formula, so M2 never comes from
// sum(x^2) - n * mean^2.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define GG_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define GG_HOST_DEVICE inline
#endif

namespace gradgeom {

// Column order of every [num_groups, 6] moments tensor.
enum MomentColumn : int {
  kCount = 0,
  kSum = 1,
  kSumSq = 2,
  kM2 = 3,
  kMaxAbs = 4,
  kNonFinite = 5,
};
constexpr int kMomentColumns = 6;

template <typename T>
struct Moments {
  T count = 0;
  T sum = 0;
  T sumsq = 0;
  T m2 = 0;
  T maxabs = 0;
  T nonfinite = 0;
};

template <typename T>
GG_HOST_DEVICE T gg_max(T a, T b) {
  return a > b ? a : b;
}

// a <- a (+) b, Chan's parallel update of the second central moment.
template <typename T>
GG_HOST_DEVICE void merge_into(Moments<T>& a, const Moments<T>& b) {
  if (b.count > 0) {
    if (a.count > 0) {
      const T n = a.count + b.count;
      const T delta = b.sum / b.count - a.sum / a.count;
      a.m2 += b.m2 + delta * delta * (a.count / n) * b.count;
      a.count = n;
    } else {
      a.m2 = b.m2;
      a.count = b.count;
    }
    a.sum += b.sum;
    a.sumsq += b.sumsq;
    a.maxabs = gg_max(a.maxabs, b.maxabs);
  }
  a.nonfinite += b.nonfinite;
}

template <typename To, typename From>
GG_HOST_DEVICE Moments<To> moments_cast(const Moments<From>& m) {
  Moments<To> r;
  r.count = static_cast<To>(m.count);
  r.sum = static_cast<To>(m.sum);
  r.sumsq = static_cast<To>(m.sumsq);
  r.m2 = static_cast<To>(m.m2);
  r.maxabs = static_cast<To>(m.maxabs);
  r.nonfinite = static_cast<To>(m.nonfinite);
  return r;
}

template <typename T>
GG_HOST_DEVICE void store_moments(const Moments<T>& m, double* out) {
  out[kCount] = static_cast<double>(m.count);
  out[kSum] = static_cast<double>(m.sum);
  out[kSumSq] = static_cast<double>(m.sumsq);
  out[kM2] = static_cast<double>(m.m2);
  out[kMaxAbs] = static_cast<double>(m.maxabs);
  out[kNonFinite] = static_cast<double>(m.nonfinite);
}

GG_HOST_DEVICE Moments<double> load_moments(const double* in) {
  Moments<double> m;
  m.count = in[kCount];
  m.sum = in[kSum];
  m.sumsq = in[kSumSq];
  m.m2 = in[kM2];
  m.maxabs = in[kMaxAbs];
  m.nonfinite = in[kNonFinite];
  return m;
}

}  // namespace gradgeom
