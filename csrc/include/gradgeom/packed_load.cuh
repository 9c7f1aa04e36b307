// Loading a matrix's lower triangle into a packed triangle in shared memory, for the
// one-block-per-matrix kernels that keep it there (cholesky_panel.cuh, tridiag_rows.cuh).
#pragma once

#include <cmath>
#include <cstdint>

namespace gradgeom {
namespace block {

// Entry (t, k), k <= t, of a packed lower triangle (row-major; n <= 1024 keeps it in an int).
__host__ __device__ __forceinline__ int packed_at(int t, int k) { return t * (t + 1) / 2 + k; }

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

}  // namespace block
}  // namespace gradgeom
