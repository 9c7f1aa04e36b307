// Eigenvalues of one real symmetric matrix, shared by the CPU and CUDA sym_eigh kernels when no
// eigenvectors are asked for (thread convention of block_ops.h; `sync` is a barrier across the
// nthreads threads: __syncthreads on the GPU, nothing on the CPU).
//
// 1. Scan the lower triangle: a non-finite entry gives all-NaN eigenvalues, a zero matrix all
//    zeros; otherwise scale by 2^-e so that max |a_ij| lies in [0.5, 1) (exact, and no sum of
//    squares below can overflow or underflow to a wrong reflector).
// 2. Householder reduction to tridiagonal form T = QᵀAQ (LAPACK dsytd2, lower). Step k reflects
//    x = A[k+1:, k] onto beta·e_1 with H = I - tau·v·vᵀ and updates the trailing matrix:
//    p = tau·A22·v, w = p - (tau/2)(vᵀp)·v, A22 -= v·wᵀ + w·vᵀ. Two barriers per step: one after
//    p (and its per-warp vᵀp partials), one after the rank-2 update, which also leaves the next
//    column and the per-warp partials of its squared norm.
// 3. Bisection on T with Sturm counts (LAPACK dstebz/dlaebz: pivmin safeguard against zero
//    pivots, Gershgorin start interval, stop when the interval is below max(ulp·‖T‖, pivmin,
//    2ulp·|λ|)). One pass of max(n, nthreads) counts at evenly spaced points gives each index
//    its start interval; then groups of g lanes (g <= 4 with g·n <= nthreads) refine one index
//    each, g points per round. No barriers; every loop is bounded.
// Error: about n·ulp·‖A‖ absolute, like LAPACK's dsyevd (small eigenvalues of a positive definite
// A are not relatively accurate, unlike Jacobi's).
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <limits>

#include "gradgeom/block_ops.h"

namespace gradgeom {
namespace tridiag {

constexpr int kMaxRefineRounds = 128;

GG_BLOCK_FN int grid_points(int n, int nthreads) { return n > nthreads ? n : nthreads; }

// Doubles of `work` eigvalsh needs; `iwork` needs grid_points(n, nthreads) ints.
GG_BLOCK_FN int64_t workspace_doubles(int64_t n) { return 6 * n + 2 * block::kMaxWarps; }

// Number of eigenvalues of T (diagonal d, squared off-diagonal e2) that are <= x.
GG_BLOCK_FN int sturm_count(const double* d, const double* e2, int n, double x, double pivmin) {
  double q = d[0] - x;
  if (fabs(q) < pivmin) q = -pivmin;
  int count = q <= 0.0 ? 1 : 0;
  for (int i = 1; i < n; ++i) {
    q = d[i] - e2[i - 1] / q - x;
    if (fabs(q) < pivmin) q = -pivmin;
    count += q <= 0.0 ? 1 : 0;
  }
  return count;
}

// Point t of `parts` - 1 evenly spaced interior points of [lo, lo + width].
GG_BLOCK_FN double section(double lo, double width, int t, int parts) {
  return lo + width * (static_cast<double>(t) / static_cast<double>(parts));
}

// Eigenvalues of the matrix in `a` (destroyed) into w[0..n), ascending.
template <typename Sync>
GG_BLOCK_FN void eigvalsh(block::PackedLower a, int n, double* work, int* iwork, double* w, int tid, int nthreads,
                          Sync sync) {
  if (n <= 0) return;
  const int lanes = block::warp_lanes(nthreads);
  const int warp = tid / lanes, lane = tid - warp * lanes, nwarps = nthreads / lanes;
  double* col0 = work;  // col0 / col1: column k below the diagonal for even / odd k
  double* col1 = work + n;
  double* p = work + 2 * n;
  double* d = work + 3 * n;
  double* e = work + 4 * n;
  double* e2 = work + 5 * n;
  double* sig_part = work + 6 * n;
  double* dot_part = sig_part + block::kMaxWarps;

  // 1. Scan: max |a_ij|, +Inf standing for "some entry is not finite".
  double amax = 0.0;
  for (int i = warp; i < n; i += nwarps) {
    const double* r = a.row(i);
    for (int j = lane; j <= i; j += lanes) {
      const double x = r[j];
      amax = (x - x == 0.0) ? fmax(amax, fabs(x)) : INFINITY;
    }
  }
  amax = block::warp_max(amax, lanes);
  if (lane == 0) dot_part[warp] = amax;
  sync();
  amax = 0.0;
  for (int q = 0; q < nwarps; ++q) amax = fmax(amax, dot_part[q]);
  if (!(amax < INFINITY) || amax == 0.0 || n == 1) {
    const double fill = amax < INFINITY ? 0.0 : std::numeric_limits<double>::quiet_NaN();
    for (int j = tid; j < n; j += nthreads) w[j] = (n == 1 && amax < INFINITY) ? a.row(0)[0] : fill;
    return;
  }
  int scale_exp = 0;
  frexp(amax, &scale_exp);
  double acc = 0.0;
  for (int i = warp; i < n; i += nwarps) {
    double* r = a.row(i);
    for (int j = lane; j <= i; j += lanes) {
      const double x = ldexp(r[j], -scale_exp);
      r[j] = x;
      if (j == 0 && i >= 1) col0[i] = x;
      if (j == 0 && i >= 2) acc += x * x;
    }
  }
  acc = block::group_sum(acc, lanes);
  if (lane == 0) sig_part[warp] = acc;
  sync();

  // 2. Householder steps.
  for (int k = 0; k + 2 < n; ++k) {
    const double* xk = (k & 1) ? col1 : col0;
    double* xnext = (k & 1) ? col0 : col1;
    double sigma = 0.0;
    for (int q = 0; q < nwarps; ++q) sigma += sig_part[q];
    const double alpha = xk[k + 1];
    double beta = alpha, tau = 0.0, inv = 0.0;
    if (sigma > 0.0) {
      beta = -copysign(sqrt(alpha * alpha + sigma), alpha);
      tau = (beta - alpha) / beta;
      inv = 1.0 / (alpha - beta);
    }
    if (tid == 0) {
      d[k] = a.row(k)[k];
      e[k] = beta;
      e2[k] = beta * beta;
    }
    auto v = [&](int j) { return j == k + 1 ? 1.0 : xk[j] * inv; };

    // p = tau·A22·v: `parts` lanes per row (a power of two), rows over the block.
    const int m = n - k - 1;
    int parts = 1;
    while (parts < lanes && 2 * parts * m <= nthreads) parts *= 2;
    const int rows_per_pass = nthreads / parts;
    const int part = tid & (parts - 1);
    double dot = 0.0;
    for (int r0 = 0; r0 < m; r0 += rows_per_pass) {
      const int i = k + 1 + r0 + tid / parts;
      double s = 0.0;
      if (i < n) {
        const double* ri = a.row(i);
        for (int j = k + 1 + part; j < n; j += parts) s += (j <= i ? ri[j] : a.row(j)[i]) * v(j);
      }
      s = block::group_sum(s, parts);
      if (i < n && part == 0) {
        const double pi = tau * s;
        p[i] = pi;
        dot += v(i) * pi;
      }
    }
    dot = block::group_sum(dot, lanes);
    if (lane == 0) dot_part[warp] = dot;
    sync();

    // A22 -= v·wᵀ + w·vᵀ (lower triangle): rows over warps, columns over lanes.
    dot = 0.0;
    for (int q = 0; q < nwarps; ++q) dot += dot_part[q];
    const double half_tau_dot = 0.5 * tau * dot;
    acc = 0.0;
    for (int i = k + 1 + warp; i < n; i += nwarps) {
      double* ri = a.row(i);
      const double vi = v(i), wi = p[i] - half_tau_dot * vi;
      for (int j = k + 1 + lane; j <= i; j += lanes) {
        const double vj = v(j), wj = p[j] - half_tau_dot * vj;
        const double x = ri[j] - (vi * wj + wi * vj);
        ri[j] = x;
        if (j == k + 1 && i >= k + 2) {
          xnext[i] = x;
          if (i >= k + 3) acc += x * x;
        }
      }
    }
    acc = block::group_sum(acc, lanes);
    if (lane == 0) sig_part[warp] = acc;
    sync();
  }
  if (tid == 0) {
    d[n - 2] = a.row(n - 2)[n - 2];
    d[n - 1] = a.row(n - 1)[n - 1];
    e[n - 2] = a.row(n - 1)[n - 2];
    e2[n - 2] = e[n - 2] * e[n - 2];
  }
  sync();

  // 3. Bisection. Every thread derives the same bounds from d and e.
  constexpr double ulp = DBL_EPSILON;
  double e2max = 0.0, lower = d[0], upper = d[0];
  for (int i = 0; i < n; ++i) {
    const double r = (i > 0 ? fabs(e[i - 1]) : 0.0) + (i + 1 < n ? fabs(e[i]) : 0.0);
    lower = fmin(lower, d[i] - r);
    upper = fmax(upper, d[i] + r);
    if (i + 1 < n) e2max = fmax(e2max, e2[i]);
  }
  const double pivmin = DBL_MIN * fmax(1.0, e2max);
  const double tnorm = fmax(fabs(lower), fabs(upper));
  const double pad = 2.1 * tnorm * ulp * n + 4.2 * pivmin;
  lower -= pad;
  upper += pad;
  const double abstol = fmax(ulp * tnorm, pivmin);

  const int grid = grid_points(n, nthreads);
  int* counts = iwork;
  for (int t = tid; t < grid; t += nthreads) counts[t] = sturm_count(d, e2, n, section(lower, upper - lower, t + 1, grid + 1), pivmin);
  sync();

  int g = 1;
  while (g < 4 && 2 * g * n <= nthreads) g *= 2;
  const int ngroups = nthreads / g, group = tid / g, member = tid - group * g;
  double* mids = p;
  for (int j0 = 0; j0 < n; j0 += ngroups) {
    const int j = j0 + group;
    if (j >= n) continue;
    // Invariant: count(lo) <= j < count(hi), the grid ends counting 0 and n.
    int glo = 0, ghi = grid + 1;
    while (ghi - glo > 1) {
      const int mid = (glo + ghi) / 2;
      if (counts[mid - 1] <= j)
        glo = mid;
      else
        ghi = mid;
    }
    double lo = glo == 0 ? lower : section(lower, upper - lower, glo, grid + 1);
    double hi = ghi == grid + 1 ? upper : section(lower, upper - lower, ghi, grid + 1);
    for (int round = 0; round < kMaxRefineRounds; ++round) {
      const double width = hi - lo;
      if (!(width > fmax(abstol, 2.0 * ulp * fmax(fabs(lo), fabs(hi))))) break;
      const int c = sturm_count(d, e2, n, section(lo, width, member + 1, g + 1), pivmin);
      int first = g;  // first of the g points whose count exceeds j
      for (int t = g - 1; t >= 0; --t)
        if (block::group_get(c, t, g, tid) > j) first = t;
      const double new_lo = first == 0 ? lo : section(lo, width, first, g + 1);
      const double new_hi = first == g ? hi : section(lo, width, first + 1, g + 1);
      lo = new_lo;
      hi = new_hi;
    }
    if (member == 0) mids[j] = 0.5 * (lo + hi);
  }
  sync();
  // Converged intervals of a cluster may overlap: sort the midpoints (ties by index).
  for (int j = tid; j < n; j += nthreads) {
    const double x = mids[j];
    int rank = 0;
    for (int i = 0; i < n; ++i) rank += (mids[i] < x || (mids[i] == x && i < j)) ? 1 : 0;
    w[rank] = ldexp(x, scale_exp);
  }
}

}  // namespace tridiag
}  // namespace gradgeom
