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
// 3. Bisection on T with Sturm counts (LAPACK dstebz: Gershgorin start interval, stop when the
//    interval is below max(ulp·‖T‖, pivmin, 2ulp·|λ|)). A count is the number of sign changes in
//    the leading principal minors p_i = det(T[:i+1, :i+1] - x), from the three-term recurrence
//    p_i = (d_i - x)·p_{i-1} - e_{i-1}²·p_{i-2} (no division on the dependent path), both minors
//    rescaled every fourth step by a power of two taken from the minors two steps earlier; e² is
//    first raised to at least 2^-200 (like dstebz's pivmin, a perturbation far below ulp·‖T‖),
//    which leaves no zero minor to special-case (see kMinE2). Each thread evaluates kPoints shifts
//    at once. One pass of max(n, kPoints·nthreads) counts at evenly spaced points gives each index
//    its start interval; then groups of g lanes (g <= 4 with g·n <= nthreads) refine one index
//    each, g·kPoints points per round. No barriers; every loop is bounded.
// Error: about n·ulp·‖A‖ absolute, like LAPACK's dsyevd (small eigenvalues of a positive definite
// A are not relatively accurate, unlike Jacobi's).
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "gradgeom/block_ops.h"

namespace gradgeom {
namespace tridiag {

constexpr int kMaxRefineRounds = 128;
constexpr int kPoints = 1;  // shifts per thread and Sturm pass (more points per pass cost more fp64
                            // work than they save in rounds: measured on an H100)

GG_BLOCK_FN int grid_points(int n, int nthreads) { return n > kPoints * nthreads ? n : kPoints * nthreads; }

// Doubles of `work` eigvalsh needs; `iwork` needs grid_points(n, nthreads) ints.
GG_BLOCK_FN int64_t workspace_doubles(int64_t n) { return 6 * n + 2 * block::kMaxWarps; }

// 2^-e for the binary exponent e of |x| (x finite; 2^1023 for zero and subnormals).
GG_BLOCK_FN double inverse_power_of_two(double x) {
  uint64_t bits;
  memcpy(&bits, &x, sizeof bits);
  const int e = static_cast<int>((bits >> 52) & 0x7ff) - 1023;
  const uint64_t inv = static_cast<uint64_t>(1023 - e) << 52;
  double f;
  memcpy(&f, &inv, sizeof f);
  return f;
}

// 1 if a and b have different sign bits, else 0.
GG_BLOCK_FN int sign_change(double a, double b) {
  uint64_t ba, bb;
  memcpy(&ba, &a, sizeof ba);
  memcpy(&bb, &b, sizeof bb);
  return static_cast<int>((ba ^ bb) >> 63);
}

// Lower bound bisect() puts on the squared off-diagonal entries of the scaled T (||T|| >= 1/2):
// it moves no eigenvalue by more than 2^-100, and with it the leading minors can never vanish
// twice in a row, so the larger of two neighbours shrinks by at most about 2^-210 every other
// step (and grows by at most about n^2 a step). sturm_counts therefore needs no zero test, and
// rescaling every fourth step by a power of two taken from the pair two steps earlier keeps
// every minor far inside the normal range: the scaling is exact and changes no sign.
constexpr double kMinE2 = 0x1p-200;

// One step of the recurrence for K shifts: p <- (d_i - x)·p - e2_{i-1}·pm, counting sign changes.
template <int K>
GG_BLOCK_FN void sturm_step(double di, double ei, const double* x, double* p, double* pm, int* counts) {
  for (int u = 0; u < K; ++u) {
    const double pn = fma(di - x[u], p[u], -(ei * pm[u]));
    counts[u] += sign_change(pn, p[u]);
    pm[u] = p[u];
    p[u] = pn;
  }
}

// counts[u] = number of eigenvalues of T (diagonal d, squared off-diagonal e2 >= kMinE2) below
// x[u], for K shifts at once (see the file comment). A minor that is exactly zero counts as
// positive: with e2 > 0 its neighbours have opposite signs, so it adds one sign change either way.
// Four steps per iteration; the scale applied after steps 4, 8, ... comes from the minors of steps
// 2, 6, ..., so that forming it stays off the chain of dependent multiply-adds (H100, one matrix
// per SM: 20 % less time per Sturm pass than scaling by the newest pair; the same counts).
template <int K>
GG_BLOCK_FN void sturm_counts(const double* d, const double* e2, int n, const double* x, int* counts) {
  double pm[K], p[K], f[K];
  for (int u = 0; u < K; ++u) {
    p[u] = d[0] - x[u];
    pm[u] = 1.0;
    counts[u] = sign_change(p[u], 1.0);
  }
  int i = 1;
  for (; i + 3 < n; i += 4) {
    sturm_step<K>(d[i], e2[i - 1], x, p, pm, counts);
    sturm_step<K>(d[i + 1], e2[i], x, p, pm, counts);
    for (int u = 0; u < K; ++u) f[u] = inverse_power_of_two(fmax(fabs(p[u]), fabs(pm[u])));
    sturm_step<K>(d[i + 2], e2[i + 1], x, p, pm, counts);
    sturm_step<K>(d[i + 3], e2[i + 2], x, p, pm, counts);
    for (int u = 0; u < K; ++u) {
      p[u] *= f[u];
      pm[u] *= f[u];
    }
  }
  for (; i < n; ++i) sturm_step<K>(d[i], e2[i - 1], x, p, pm, counts);
}

// Point t of `parts` - 1 evenly spaced interior points of [lo, lo + width] (inv_parts = 1/parts).
GG_BLOCK_FN double section(double lo, double width, int t, double inv_parts) {
  return lo + width * (static_cast<double>(t) * inv_parts);
}

// The scale exponent that says step 1 has written every eigenvalue.
constexpr int kDone = -(1 << 30);

// Step 1's opening, shared by every Householder kernel, for a matrix whose largest |entry| is
// amax (+Inf when one is not finite): kDone when it is non-finite, zero or 1 x 1, with this
// thread's share of its eigenvalues written to w (NaN, zeros, or a00 for a finite 1 x 1 matrix);
// else the binary exponent e of amax (frexp), so that 2^-e scales max |a_ij| into [0.5, 1).
GG_BLOCK_FN int scale_exponent(double amax, int n, double a00, double* w, int tid, int nthreads) {
  if (amax < INFINITY && amax != 0.0 && n != 1) {
    int e = 0;
    frexp(amax, &e);
    return e;
  }
  const double fill = !(amax < INFINITY) ? std::numeric_limits<double>::quiet_NaN() : (n == 1 ? a00 : 0.0);
  for (int j = tid; j < n; j += nthreads) w[j] = fill;
  return kDone;
}

// Workspace layout (doubles of `work`): col0, col1, p, d, e, e2 (n each), then the per-warp
// partials sig_part and dot_part (kMaxWarps each).

// Step 1: scans `a`; if it is non-finite, zero or 1 x 1, writes w and returns kDone; else scales
// it by 2^-e in place, leaves its column 0 and the per-warp partials of that column's squared norm
// below the subdiagonal in the workspace, and returns e.
template <typename Sync>
GG_BLOCK_FN int scale(block::PackedLower a, int n, double* work, double* w, int tid, int nthreads, Sync sync) {
  const int lanes = block::warp_lanes(nthreads);
  const int warp = tid / lanes, lane = tid - warp * lanes, nwarps = nthreads / lanes;
  double* col0 = work;  // col0 / col1: column k below the diagonal for even / odd k
  double* sig_part = work + 6 * n;
  double* dot_part = sig_part + block::kMaxWarps;

  // Scan: max |a_ij|, +Inf standing for "some entry is not finite".
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
  const int scale_exp = scale_exponent(amax, n, a.row(0)[0], w, tid, nthreads);
  if (scale_exp == kDone) return kDone;
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
  return scale_exp;
}

// The Householder reflector H = I - tau·v·vᵀ with H·x = beta·e_1 for x = (alpha, x_2, ...) and
// sigma = Σ_{i>=2} x_i²: v = (x - beta·e_1)·inv, inv = 1/(alpha - beta). For sigma = 0 (x already
// reduced) tau = inv = 0 and beta = alpha: H = I.
struct Reflector {
  double alpha, beta, tau, inv;
};
GG_BLOCK_FN Reflector reflector(double alpha, double sigma) {
  Reflector h{alpha, alpha, 0.0, 0.0};
  if (sigma > 0.0) {
    h.beta = -copysign(sqrt(alpha * alpha + sigma), alpha);
    h.tau = (h.beta - alpha) / h.beta;
    h.inv = 1.0 / (alpha - h.beta);
  }
  return h;
}

// Step 2: reduces the scaled matrix to tridiagonal form: d, e and e2 = e² in the workspace.
template <typename Sync>
GG_BLOCK_FN void tridiagonalize(block::PackedLower a, int n, double* work, int tid, int nthreads, Sync sync) {
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
  double acc = 0.0;
  for (int k = 0; k + 2 < n; ++k) {
    const double* xk = (k & 1) ? col1 : col0;
    double* xnext = (k & 1) ? col0 : col1;
    double sigma = 0.0;
    for (int q = 0; q < nwarps; ++q) sigma += sig_part[q];
    const Reflector h = reflector(xk[k + 1], sigma);
    const double beta = h.beta, tau = h.tau, inv = h.inv;
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

}

// Step 3: eigenvalues of T (d, e, e2 of the workspace), times 2^scale_exp, into w ascending; K
// shifts per thread and Sturm pass (iwork holds grid_points(n, nthreads) >= max(n, K·nthreads) ints).
template <int K, typename Sync>
GG_BLOCK_FN void bisect(int n, double* work, int* iwork, double* w, int scale_exp, int tid, int nthreads, Sync sync) {
  double* p = work + 2 * n;
  double* d = work + 3 * n;
  double* e = work + 4 * n;
  double* e2 = work + 5 * n;
  // Every thread derives the same bounds from d and e.
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
  sync();  // every thread has read e2 for the bounds
  for (int i = tid; i + 1 < n; i += nthreads) e2[i] = fmax(e2[i], kMinE2);
  sync();

  const int grid = n > K * nthreads ? n : K * nthreads;
  const double inv_grid = 1.0 / static_cast<double>(grid + 1);
  int* counts = iwork;
  for (int t0 = tid * K; t0 < grid; t0 += nthreads * K) {
    double x[K];
    int c[K];
    for (int u = 0; u < K; ++u) x[u] = section(lower, upper - lower, t0 + u + 1, inv_grid);
    sturm_counts<K>(d, e2, n, x, c);
    for (int u = 0; u < K; ++u)
      if (t0 + u < grid) counts[t0 + u] = c[u];
  }
  sync();

  int g = 1;
  while (g < 4 && 2 * g * n <= nthreads) g *= 2;
  const int ngroups = nthreads / g, group = tid / g, member = tid - group * g;
  const int points = g * K;  // per round: `points` + 1 parts
  const double inv_parts = 1.0 / static_cast<double>(points + 1);
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
    double lo = glo == 0 ? lower : section(lower, upper - lower, glo, inv_grid);
    double hi = ghi == grid + 1 ? upper : section(lower, upper - lower, ghi, inv_grid);
    for (int round = 0; round < kMaxRefineRounds; ++round) {
      const double width = hi - lo;
      if (!(width > fmax(abstol, 2.0 * ulp * fmax(fabs(lo), fabs(hi))))) break;
      double x[K];
      int c[K];
      for (int u = 0; u < K; ++u) x[u] = section(lo, width, member * K + u + 1, inv_parts);
      sturm_counts<K>(d, e2, n, x, c);
      int mine = points;  // this lane's first point whose count exceeds j
      for (int u = K - 1; u >= 0; --u)
        if (c[u] > j) mine = member * K + u;
      int first = mine;
      for (int t = 0; t < g; ++t) {
        const int other = block::group_get(mine, t, g, tid);
        first = other < first ? other : first;
      }
      const double new_lo = first == 0 ? lo : section(lo, width, first, inv_parts);
      const double new_hi = first == points ? hi : section(lo, width, first + 1, inv_parts);
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


// Eigenvalues of the matrix in `a` (destroyed) into w[0..n), ascending.
template <typename Sync>
GG_BLOCK_FN void eigvalsh(block::PackedLower a, int n, double* work, int* iwork, double* w, int tid, int nthreads,
                          Sync sync) {
  if (n <= 0) return;
  const int scale_exp = scale(a, n, work, w, tid, nthreads, sync);
  if (scale_exp == kDone) return;
  tridiagonalize(a, n, work, tid, nthreads, sync);
  bisect<kPoints>(n, work, iwork, w, scale_exp, tid, nthreads, sync);
}

}  // namespace tridiag
}  // namespace gradgeom
