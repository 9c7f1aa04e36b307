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
// lower-triangular matrix; any F with F·Fᵀ = A serves the spectral stage. NaN or ±Inf on the
// diagonal gives an all-NaN F.
#pragma once

#include <cmath>
#include <limits>

#include "gradgeom/jacobi.h"

namespace gradgeom {
namespace cholesky {

// Position in live[0..count) of the largest diagonal entry (ties: the smaller row index) ->
// scratch[0] (-1 if count == 0) and its value -> scratch[1]. GPU: warp 0 with shuffles
// (blockDim >= 32); CPU: serial. Both give the same pivot.
GG_JACOBI_FN void pick_pivot(const double* a, int ld, const double* live, int count, double* scratch, int tid) {
#if defined(__CUDA_ARCH__)
  if (tid < 32) {
    int pos = -1, idx = 0;
    double best = 0.0;
    for (int q = tid; q < count; q += 32) {
      const int i = static_cast<int>(live[q]);
      const double x = a[i * ld + i];
      if (pos < 0 || x > best || (x == best && i < idx)) {
        pos = q;
        idx = i;
        best = x;
      }
    }
    for (int offset = 16; offset > 0; offset >>= 1) {
      const int opos = __shfl_down_sync(0xffffffffu, pos, offset);
      const int oidx = __shfl_down_sync(0xffffffffu, idx, offset);
      const double v = __shfl_down_sync(0xffffffffu, best, offset);
      if (opos >= 0 && (pos < 0 || v > best || (v == best && oidx < idx))) {
        pos = opos;
        idx = oidx;
        best = v;
      }
    }
    if (tid == 0) {
      scratch[0] = pos;
      scratch[1] = best;
    }
  }
#else
  if (tid == 0) {
    int pos = -1, idx = 0;
    double best = 0.0;
    for (int q = 0; q < count; ++q) {
      const int i = static_cast<int>(live[q]);
      const double x = a[i * ld + i];
      if (pos < 0 || x > best || (x == best && i < idx)) {
        pos = q;
        idx = i;
        best = x;
      }
    }
    scratch[0] = pos;
    scratch[1] = best;
  }
#endif
}

// scratch: 2 + n doubles visible to every thread (pivot position, pivot value, then the list of
// rows not yet pivoted, in a swap-remove order both devices share).
template <typename Sync>
GG_JACOBI_FN void factor(double* a, int ld, int n, double tol, double* F, double* scratch, int tid, int nthreads,
                         Sync sync) {
  double* live = scratch + 2;
  for (int i = tid; i < n; i += nthreads) live[i] = i;
  for (int e = tid; e < n * n; e += nthreads) F[e] = 0.0;
  if (tid == 0) {
    double m = 0.0;
    bool nan = false;
    for (int i = 0; i < n; ++i) {
      const double x = a[i * ld + i];
      nan = nan || !((x - x) == 0.0);  // NaN or ±Inf
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
    sync();
    return;
  }
  int count = n;
  for (int j = 0; j < n; ++j) {
    pick_pivot(a, ld, live, count, scratch, tid);
    sync();
    const int pos = static_cast<int>(scratch[0]);
    const double piv = scratch[1];
    if (pos < 0 || !(piv > drop)) break;  // uniform: every thread read the same values
    const int p = static_cast<int>(live[pos]);
    const double d = sqrt(piv);
    for (int q = tid; q < count; q += nthreads) {
      const int i = static_cast<int>(live[q]);
      double l = d;
      if (i != p) {
        l = a[i * ld + p] / d;
        a[i * ld + p] = l;
      }
      F[i * n + j] = l;
    }
    sync();
    if (tid == 0) live[pos] = live[count - 1];
    --count;
    sync();
    // Rows of the Schur complement over thread groups, columns over the lanes of a group
    // (nthreads is 1 or a multiple of 32).
    const int lanes = nthreads < 32 ? nthreads : 32;
    const int group = tid / lanes, lane = tid - group * lanes, groups = nthreads / lanes;
    for (int qi = group; qi < count; qi += groups) {
      const int i = static_cast<int>(live[qi]);
      const double lip = a[i * ld + p];
      for (int qk = lane; qk < count; qk += lanes) {
        const int k = static_cast<int>(live[qk]);
        a[i * ld + k] -= lip * a[k * ld + p];
      }
    }
    sync();
  }
}

}  // namespace cholesky
}  // namespace gradgeom
