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

// Starts copying the lower triangle of the row-major n x n src (8-byte aligned) into the packed
// triangle A in shared memory with nthreads threads, all of a thread's 8-byte copies in flight at
// once (cp.async, sm_80+): warp w copies rows w, w + nwarps, ... Only the lower triangle's bytes
// are read. Complete with copy_async_wait, then a barrier.
__device__ __forceinline__ void copy_lower_async(const double* src, int n, double* A, int tid, int nthreads) {
  const int lane = tid & 31, nwarps = nthreads >> 5;
  for (int i = tid >> 5; i < n; i += nwarps)
    for (int k = lane; k <= i; k += 32) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
      const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(A + packed_at(i, k)));
      asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(dst), "l"(src + int64_t(i) * n + k) : "memory");
#else
      A[packed_at(i, k)] = src[int64_t(i) * n + k];
#endif
    }
}

// Waits for this thread's copies of copy_lower_async.
__device__ __forceinline__ void copy_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

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
