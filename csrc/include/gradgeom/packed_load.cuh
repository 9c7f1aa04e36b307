// Loading a matrix's lower triangle into a packed triangle in shared memory, for the
// one-block-per-matrix kernels that read it there (cholesky_panel.cuh, tridiag_rows.cuh,
// tridiag_regs.cuh).
#pragma once

#include <cmath>
#include <cstdint>

#include "gradgeom/block_ops.h"

namespace gradgeom {
namespace block {

// Entry (t, k), k <= t, of a packed lower triangle (row-major; n <= 1024 keeps it in an int).
__host__ __device__ __forceinline__ int packed_at(int t, int k) { return t * (t + 1) / 2 + k; }

// Doubles of an n x n packed triangle, rounded up to even so that buffers placed after it stay
// 16-byte aligned (the kernels read them as double2).
__host__ __device__ constexpr int64_t packed_doubles_even(int n) { return (int64_t(n) * (n + 1) / 2 + 1) & ~int64_t(1); }

// Copies the lower triangle of the row-major n x n src into the packed triangle A with NT threads,
// eight global loads in flight per thread (one at a time leaves each waiting on memory), and
// returns the largest |entry| this thread copied (+Inf if one of them is not finite).
template <int NT>
__device__ double load_packed_lower(const double* src, int n, double* A, int tid) {
  const int nn = n * n;
  double amax = 0.0;
  for (int base = 0; base < nn; base += 8 * NT) {
    double x[8];
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      const int q = base + u * NT + tid;
      x[u] = q < nn ? src[q] : 0.0;
    }
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      const int q = base + u * NT + tid;
      const int i = q / n, k = q - i * n;
      if (q < nn && k <= i) {
        A[packed_at(i, k)] = x[u];
        amax = (x[u] - x[u] == 0.0) ? fmax(amax, fabs(x[u])) : INFINITY;
      }
    }
  }
  return amax;
}

// load_packed_lower, then the largest |entry| over the whole block (+Inf for a non-finite one), the
// same on every thread. Contains a __syncthreads; warp_part: NT / 32 doubles of shared memory.
template <int NT>
__device__ double load_packed_lower_max(const double* src, int n, double* A, double* warp_part, int tid) {
  double amax = load_packed_lower<NT>(src, n, A, tid);
  amax = warp_max(amax, 32);
  if ((tid & 31) == 0) warp_part[tid >> 5] = amax;
  __syncthreads();
  amax = 0.0;
  for (int q = 0; q < NT / 32; ++q) amax = fmax(amax, warp_part[q]);
  return amax;
}

}  // namespace block
}  // namespace gradgeom
