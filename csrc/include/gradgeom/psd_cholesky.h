// Pivoted Cholesky factor of a symmetric positive semi-definite matrix, shared by the CPU and
// CUDA psd_cholesky kernels (same thread/barrier convention as jacobi.h).
//
// Step j picks the largest remaining diagonal entry p of the Schur complement (held in a, full
// symmetric storage, leading dimension ld), writes column j of F (row-major n x n, leading
// dimension n) as the scaled column p, and updates the remaining Schur complement. It stops
// when the largest remaining pivot is <= tol·max(diag A): F·Fᵀ = A up to that tolerance, F has
// as many nonzero columns as A's numerical rank, and a zero matrix gives F = 0. Diagonal
// pivoting keeps a Gram matrix that is singular up to rounding noise from amplifying the noise
// (without it, a pivot made of noise scales its column by 1/sqrt(noise)). F is a row-permuted
// lower-triangular matrix; any F with F·Fᵀ = A serves the spectral stage. NaN on the diagonal
// gives an all-NaN F.
#pragma once

#include <cmath>
#include <limits>

#include "gradgeom/jacobi.h"

namespace gradgeom {
namespace cholesky {

// Largest diagonal entry among the unused rows (ties: the smaller index) -> scratch[0] (index,
// -1 if none) and scratch[1] (value). GPU: warp 0 with shuffles (blockDim >= 32); CPU: serial.
GG_JACOBI_FN void pick_pivot(const double* a, int ld, int n, const double* used, double* scratch, int tid) {
#if defined(__CUDA_ARCH__)
  if (tid < 32) {
    int p = -1;
    double best = 0.0;
    for (int i = tid; i < n; i += 32) {
      const double x = a[i * ld + i];
      if (used[i] == 0.0 && (p < 0 || x > best)) {
        p = i;
        best = x;
      }
    }
    for (int offset = 16; offset > 0; offset >>= 1) {
      const int q = __shfl_down_sync(0xffffffffu, p, offset);
      const double v = __shfl_down_sync(0xffffffffu, best, offset);
      if (q >= 0 && (p < 0 || v > best || (v == best && q < p))) {
        p = q;
        best = v;
      }
    }
    if (tid == 0) {
      scratch[0] = p;
      scratch[1] = best;
    }
  }
#else
  if (tid == 0) {
    int p = -1;
    double best = 0.0;
    for (int i = 0; i < n; ++i) {
      const double x = a[i * ld + i];
      if (used[i] == 0.0 && (p < 0 || x > best)) {
        p = i;
        best = x;
      }
    }
    scratch[0] = p;
    scratch[1] = best;
  }
#endif
}

// scratch: 2 + n doubles visible to every thread (pivot index, pivot value, "used" marks).
template <typename Sync>
GG_JACOBI_FN void factor(double* a, int ld, int n, double tol, double* F, double* scratch, int tid, int nthreads,
                         Sync sync) {
  double* used = scratch + 2;
  for (int i = tid; i < n; i += nthreads) used[i] = 0.0;
  if (tid == 0) {
    double m = 0.0;
    bool nan = false;
    for (int i = 0; i < n; ++i) {
      const double x = a[i * ld + i];
      nan = nan || (x != x);
      m = fmax(m, x);
    }
    scratch[0] = nan ? 1.0 : 0.0;
    scratch[1] = m * tol;
  }
  sync();
  const bool has_nan = scratch[0] != 0.0;
  const double drop = scratch[1];
  sync();
  if (has_nan) {
    for (int e = tid; e < n * n; e += nthreads) F[e] = std::numeric_limits<double>::quiet_NaN();
    return;
  }
  int j = 0;
  for (; j < n; ++j) {
    pick_pivot(a, ld, n, used, scratch, tid);
    sync();
    const int p = static_cast<int>(scratch[0]);
    const double piv = scratch[1];
    if (!(piv > drop)) break;  // uniform: every thread read the same values
    const double d = sqrt(piv);
    for (int i = tid; i < n; i += nthreads) {
      double l = 0.0;
      if (i == p) {
        l = d;
      } else if (used[i] == 0.0) {
        l = a[i * ld + p] / d;
        a[i * ld + p] = l;
      }
      F[i * n + j] = l;
    }
    sync();
    for (int e = tid; e < n * n; e += nthreads) {
      const int i = e / n;
      const int k = e - i * n;
      if (i != p && k != p && used[i] == 0.0 && used[k] == 0.0) a[i * ld + k] -= a[i * ld + p] * a[k * ld + p];
    }
    sync();
    if (tid == 0) used[p] = 1.0;
    sync();
  }
  for (int e = tid; e < n * (n - j); e += nthreads) {
    const int i = e / (n - j);
    F[i * n + j + (e - i * (n - j))] = 0.0;
  }
  sync();
}

}  // namespace cholesky
}  // namespace gradgeom
