// Parallel cyclic Jacobi eigen-solver for one real symmetric matrix, shared by the CPU and CUDA
// sym_eigh kernels (the CPU runs it with one "thread", a CUDA block with all of its threads).
//
// The matrix a is m x m (m even; an odd problem is padded with a zero row and column, which no
// rotation ever touches), row-major with leading dimension ld. A sweep visits every pair (p, q)
// once, in m - 1 steps of the round-robin tournament ordering: within one step the m/2 pairs
// are disjoint, so their rotations commute and are applied together. A step is two phases:
// (1) each pair computes its rotation (c, s) that zeroes a[p][q]; (2) every 2x2 block
// (rows p1,q1; cols p2,q2) becomes J1ᵀ·block·J2, and the eigenvector matrix v (if any) becomes
// v·J. A pair is skipped when |a_pq| <= eps·sqrt(|a_pp a_qq|) (the relative test of Demmel and
// Veselić), and the solver stops after the first sweep that rotates nothing.
//
// `sync` is a barrier between phases (__syncthreads on the GPU, nothing on the CPU). Every
// thread runs the same loop bounds, so the control flow around the barriers is uniform.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define GG_JACOBI_FN __host__ __device__ __forceinline__
#else
#define GG_JACOBI_FN inline
#endif

namespace gradgeom {
namespace jacobi {

constexpr int kMaxSweeps = 60;

// Pair k (0 <= k < m/2) of round-robin step `step` (0 <= step < m - 1).
GG_JACOBI_FN void tournament_pair(int m, int step, int k, int& p, int& q) {
  const int n = m - 1;
  if (k == 0) {
    p = step;
    q = n;
  } else {
    p = (step + k) % n;
    q = (step - k + n) % n;
  }
  if (p > q) {
    const int t = p;
    p = q;
    q = t;
  }
}

// Rotation that zeroes the (p, q) entry of [[app, apq], [apq, aqq]]; false when skipped.
GG_JACOBI_FN bool rotation(double app, double aqq, double apq, double& c, double& s) {
  constexpr double kEps = 2.220446049250313e-16;
  const double mag = fabs(apq);
  if (mag == 0.0 || mag <= kEps * sqrt(fabs(app) * fabs(aqq))) {
    c = 1.0;
    s = 0.0;
    return false;
  }
  const double theta = (aqq - app) / (2.0 * apq);
  const double at = fabs(theta);
  double t = at < 1e150 ? 1.0 / (at + sqrt(1.0 + at * at)) : 0.5 / at;
  if (theta < 0) t = -t;
  c = 1.0 / sqrt(1.0 + t * t);
  s = t * c;
  return true;
}

// rot holds 4 * (m/2) doubles (c, s, p, q per pair); flag is one int visible to every thread.
template <typename Sync>
GG_JACOBI_FN void solve(double* a, int ld, double* v, int m, double* rot, int* flag, int tid, int nthreads,
                        Sync sync) {
  const int half = m / 2;
  for (int sweep = 0; sweep < kMaxSweeps; ++sweep) {
    if (tid == 0) *flag = 0;
    sync();
    for (int step = 0; step < m - 1; ++step) {
      for (int k = tid; k < half; k += nthreads) {
        int p, q;
        tournament_pair(m, step, k, p, q);
        double c, s;
        if (rotation(a[p * ld + p], a[q * ld + q], a[p * ld + q], c, s)) *flag = 1;
        rot[4 * k] = c;
        rot[4 * k + 1] = s;
        rot[4 * k + 2] = p;
        rot[4 * k + 3] = q;
      }
      sync();
      const int blocks = half * half;
      for (int b = tid; b < blocks; b += nthreads) {
        const int k1 = b / half;
        const int k2 = b - k1 * half;
        const double c1 = rot[4 * k1], s1 = rot[4 * k1 + 1];
        const double c2 = rot[4 * k2], s2 = rot[4 * k2 + 1];
        if (s1 == 0.0 && s2 == 0.0) continue;
        const int p1 = static_cast<int>(rot[4 * k1 + 2]), q1 = static_cast<int>(rot[4 * k1 + 3]);
        const int p2 = static_cast<int>(rot[4 * k2 + 2]), q2 = static_cast<int>(rot[4 * k2 + 3]);
        const double xpp = a[p1 * ld + p2], xpq = a[p1 * ld + q2];
        const double xqp = a[q1 * ld + p2], xqq = a[q1 * ld + q2];
        // Rows: J1ᵀ·X.
        const double ypp = c1 * xpp - s1 * xqp, ypq = c1 * xpq - s1 * xqq;
        const double yqp = s1 * xpp + c1 * xqp, yqq = s1 * xpq + c1 * xqq;
        // Columns: Y·J2.
        double zpp = c2 * ypp - s2 * ypq, zpq = s2 * ypp + c2 * ypq;
        double zqp = c2 * yqp - s2 * yqq, zqq = s2 * yqp + c2 * yqq;
        if (k1 == k2) {
          zpq = 0.0;
          zqp = 0.0;
        }
        a[p1 * ld + p2] = zpp;
        a[p1 * ld + q2] = zpq;
        a[q1 * ld + p2] = zqp;
        a[q1 * ld + q2] = zqq;
      }
      if (v != nullptr) {
        const int updates = m * half;
        for (int u = tid; u < updates; u += nthreads) {
          const int i = u / half;
          const int k = u - i * half;
          const double c = rot[4 * k], s = rot[4 * k + 1];
          if (s == 0.0) continue;
          const int p = static_cast<int>(rot[4 * k + 2]), q = static_cast<int>(rot[4 * k + 3]);
          const double vp = v[i * ld + p], vq = v[i * ld + q];
          v[i * ld + p] = c * vp - s * vq;
          v[i * ld + q] = s * vp + c * vq;
        }
      }
      sync();
    }
    const int rotated = *flag;
    sync();
    if (rotated == 0) break;
  }
}

// Position of eigenvalue i in ascending order among the first n diagonal entries (ties by index).
GG_JACOBI_FN int ascending_rank(const double* a, int ld, int n, int i) {
  const double w = a[i * ld + i];
  int rank = 0;
  for (int j = 0; j < n; ++j) {
    const double x = a[j * ld + j];
    rank += (x < w || (x == w && j < i)) ? 1 : 0;
  }
  return rank;
}

}  // namespace jacobi
}  // namespace gradgeom
