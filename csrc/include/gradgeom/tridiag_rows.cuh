// Householder tridiagonalisation (steps 1 and 2 of tridiag_eig.h) of one real symmetric matrix
// with n <= 128, one CUDA block of 256 threads per matrix, the packed lower triangle in shared
// memory (66 KB at n = 128, so two matrices share an SM). Row t belongs to two threads, one for
// its even and one for its odd columns.
//
// Step k (x = A[k+1:, k], v = (x - beta·e_1)/(alpha - beta), tau = (beta - alpha)/beta):
//  * p_t = tau·(A·v)_t for t > k: row t's own entries (packed row t, up to the diagonal) and the
//    column below it (entry t of each later row), with v from the published x (x̃ = x except at
//    k + 1, where the difference is one term);
//  * the rank-2 update A -= v·wᵀ + w·vᵀ (w = p - (tau/2)(vᵀp)·v) of row t's lower part, which
//    also publishes row t's entry of the next x and the partials of its squared norm.
// Two barriers per step; loads go in batches of kBatch ahead of their arithmetic (a store between
// them would serialise the loop on shared-memory latency). The result (d, e, e2 and the scale
// exponent) goes to global memory for the bisection. Measured on an H100 (224 matrices,
// bench/micro/rxr_micro.cu): n = 128 in 463 µs against 525 µs for the register tile it replaced
// there (a whole SM per matrix), n = 100 in 304 against 402 µs; the tile stays faster up to 64.
#pragma once

#include <cmath>
#include <cstdint>

#include "gradgeom/packed_load.cuh"
#include "gradgeom/tridiag_eig.h"

namespace gradgeom {
namespace tridiag {

constexpr int kRowsThreads = 256;
constexpr int kRowLanes = 2;  // threads per row: even and odd columns
constexpr int kRowsMaxN = 128;
constexpr int kBatch = 8;  // shared-memory loads in flight per thread

// Shared memory tridiag_rows needs, in bytes.
__host__ __device__ constexpr int64_t rows_smem_bytes(int n) {
  return (int64_t(n) * (n + 1) / 2 + 6 * int64_t(n) + 4 * (kRowsThreads / 32)) * int64_t(sizeof(double));
}

// Steps 1 and 2 for the n x n matrix whose lower triangle is in the row-major src (n <= 128,
// blockDim.x == kRowsThreads): the tridiagonal matrix (d, e, e2 [n] each) into tri [3n] and the
// scale exponent into *scale; or, for a non-finite, zero or 1 x 1 matrix, the eigenvalues into
// w and kDone into *scale. smem: rows_smem_bytes(n) bytes.
__device__ void tridiag_rows(const double* src, int n, double* smem, double* tri, int* scale, double* w) {
  constexpr int NW = kRowsThreads / 32;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int t = tid / kRowLanes, h = tid % kRowLanes;  // row t, columns of parity h
  if (n <= 0) return;
  double* A = smem;
  double* xbuf = A + int64_t(n) * (n + 1) / 2;  // [2][n]: x for even / odd k
  double* p = xbuf + 2 * n;                     // [n]
  double* d = p + n;                            // [n]
  double* e = d + n;                            // [n]
  double* e2 = e + n;                           // [n]
  double* sig_part = e2 + n;                    // [NW]
  double* dot_part = sig_part + NW;             // [NW]
  double* amax_part = dot_part + NW;            // [NW]

  // The lower triangle and its largest |entry| (+Inf for a non-finite one).
  const double amax = block::load_packed_lower_max<kRowsThreads>(src, n, A, amax_part, tid);
  const int scale_exp = scale_exponent(amax, n, A[0], w, tid, kRowsThreads);
  if (scale_exp == kDone) {
    if (tid == 0) *scale = kDone;
    return;
  }
  const int packed = n * (n + 1) / 2;
  for (int q = tid; q < packed; q += kRowsThreads) A[q] = ldexp(A[q], -scale_exp);
  __syncthreads();

  const bool mine = t < n;
  const double* row = A + block::packed_at(mine ? t : 0, 0);
  // x for step 0 (column 0 below the diagonal), its squared norm below row 1, and d[0].
  {
    double acc = 0.0;
    if (mine && h == 0 && t >= 1) {
      const double x = row[0];
      xbuf[t] = x;
      if (t >= 2) acc = x * x;
    }
    if (tid == 0) d[0] = A[0];
    acc = block::group_sum(acc, 32);
    if (lane == 0) sig_part[warp] = acc;
  }
  __syncthreads();

  for (int k = 0; k + 2 < n; ++k) {
    const double* x = xbuf + (k & 1) * n;
    double* x_next = xbuf + ((k + 1) & 1) * n;
    double sigma = 0.0;
    for (int q = 0; q < NW; ++q) sigma += sig_part[q];
    const Reflector hh = reflector(x[k + 1], sigma);
    const double alpha = hh.alpha, beta = hh.beta, tau = hh.tau, inv = hh.inv;
    if (tid == 0) {
      e[k] = beta;
      e2[k] = beta * beta;
    }
    // s = A·x̃ on row t (x̃ = x with alpha - beta at k + 1), p = tau·inv·s, and vᵀp.
    const bool live = mine && t > k;
    double dot = 0.0;
    if (live) {
      // Batches of kBatch loads before their fmas (shared-memory latency; the row part and the
      // column below the diagonal together are n - k - 1 entries on every live row).
      double acc4[4] = {0.0, 0.0, 0.0, 0.0};
      for (int j = k + 1 + h; j <= t; j += kBatch * kRowLanes) {
        double a[kBatch], xv[kBatch];
#pragma unroll
        for (int u = 0; u < kBatch; ++u) {
          const int jj = j + kRowLanes * u;
          const bool in = jj <= t;
          a[u] = in ? row[jj] : 0.0;
          xv[u] = in ? x[jj] : 0.0;
        }
#pragma unroll
        for (int u = 0; u < kBatch; ++u) acc4[u & 3] = fma(a[u], xv[u], acc4[u & 3]);
      }
      for (int j = t + 1 + h; j < n; j += kBatch * kRowLanes) {
        double a[kBatch], xv[kBatch];
#pragma unroll
        for (int u = 0; u < kBatch; ++u) {
          const int jj = j + kRowLanes * u;
          const bool in = jj < n;
          a[u] = in ? A[block::packed_at(jj, t)] : 0.0;
          xv[u] = in ? x[jj] : 0.0;
        }
#pragma unroll
        for (int u = 0; u < kBatch; ++u) acc4[u & 3] = fma(a[u], xv[u], acc4[u & 3]);
      }
      double s = (acc4[0] + acc4[2]) + (acc4[1] + acc4[3]);
      s += __shfl_xor_sync(__activemask(), s, 1);  // the other parity (the same bits in both)
      s = fma(row[k + 1], -beta, s);               // x̃ - x: alpha - beta - alpha at k + 1
      const double pt = tau * inv * s;
      if (h == 0) {
        p[t] = pt;
        const double vt = (t == k + 1 ? alpha - beta : x[t]) * inv;
        dot = vt * pt;
      }
    }
    dot = block::group_sum(dot, 32);
    if (lane == 0) dot_part[warp] = dot;
    __syncthreads();

    // A -= v·wᵀ + w·vᵀ on row t's lower part; publish the next x (column k + 1 below row k + 1).
    double half_tau_dot = 0.0;
    for (int q = 0; q < NW; ++q) half_tau_dot += dot_part[q];
    half_tau_dot *= 0.5 * tau;
    double acc = 0.0;
    if (live) {
      double* r = A + block::packed_at(t, 0);
      const double vt = (t == k + 1 ? alpha - beta : x[t]) * inv;
      const double wt = p[t] - half_tau_dot * vt;
      for (int j = k + 1 + h; j <= t; j += kBatch * kRowLanes) {
        double a[kBatch], xv[kBatch], pv[kBatch];
#pragma unroll
        for (int u = 0; u < kBatch; ++u) {
          const int jj = j + kRowLanes * u <= t ? j + kRowLanes * u : t;  // a repeat, not stored
          a[u] = r[jj];
          xv[u] = jj == k + 1 ? alpha - beta : x[jj];
          pv[u] = p[jj];
        }
#pragma unroll
        for (int u = 0; u < kBatch; ++u) {
          const double vj = xv[u] * inv;
          const double wj = pv[u] - half_tau_dot * vj;
          a[u] = fma(-vt, wj, fma(-wt, vj, a[u]));
        }
#pragma unroll
        for (int u = 0; u < kBatch; ++u)
          if (j + kRowLanes * u <= t) r[j + kRowLanes * u] = a[u];
      }
      if (h == 0 && t == k + 1) d[k + 1] = r[k + 1];  // column k + 1 is parity 0's
      if (h == 0 && t >= k + 2) {
        const double xn = r[k + 1];
        x_next[t] = xn;
        if (t >= k + 3) acc = xn * xn;
      }
    }
    acc = block::group_sum(acc, 32);
    if (lane == 0) sig_part[warp] = acc;
    __syncthreads();
  }
  if (tid == 0) {
    if (n >= 2) {
      e[n - 2] = A[block::packed_at(n - 1, n - 2)];
      e2[n - 2] = e[n - 2] * e[n - 2];
      d[n - 1] = A[block::packed_at(n - 1, n - 1)];
    }
    *scale = scale_exp;
  }
  __syncthreads();
  for (int i = tid; i < n; i += kRowsThreads) {
    tri[i] = d[i];
    if (i + 1 < n) {
      tri[n + i] = e[i];
      tri[2 * n + i] = e2[i];
    }
  }
}

}  // namespace tridiag
}  // namespace gradgeom
