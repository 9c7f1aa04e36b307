// Householder tridiagonalisation (steps 1 and 2 of tridiag_eig.h) of one real symmetric matrix
// with 96 < n <= 128, the whole matrix in registers: one CUDA block of 512 threads per matrix
// (128 registers each, one block per SM). Thread (t, q) holds row t's columns 32q .. 32q + 31 of
// the full symmetric matrix, so no thread ever reads another's entries; warp w owns chunk
// q = w / 4 of rows 32·(w % 4) .. + 31, and whole warps skip the chunks and rows already reduced.
//
// Step k (v = (x - beta·e_1)/(alpha - beta) from x = A[k+1:, k], tau = (beta - alpha)/beta):
//  1. every live warp: s_q[t] = Σ_{j in q} A[t, j]·v_j and its share of vᵀAv; the warps holding
//     column k + 1 copy it as it is before the update; barrier;
//  2. warp 0 alone: w = tau·Σ_q s_q - (tau²/2)(vᵀAv)·v; barrier;
//  3. every live warp: A -= v·wᵀ + w·vᵀ in registers; meanwhile warp 0 forms column k + 1 after
//     the update from the copy (the same bits as its owners' registers), and from it d[k + 1],
//     step k + 1's reflector, v and tau; barrier.
// The scalar work (reflector, w) runs once per step in warp 0 instead of in every warp: 16 warps
// repeating it kept the fp64 pipe busy (n = 128: 422 µs that way, 351 µs now). Measured on an
// H100 (224 matrices, bench/micro/rxr_micro.cu, Householder alone): n = 128 in 351 µs against
// 464 µs for tridiag_rows.cuh (two matrices per SM there), n = 100 288 against 304 µs, n = 97
// 284 against 284 µs, n = 96 244 against 257 µs, n = 65 178 against 140 µs. A step costs about
// 1.4 µs, most of it the latency chain (warp reductions, reflector, barriers): a 16-warp version
// without warp 0's role took 325 µs at n = 128 with the matrix arithmetic removed, 422 µs with it.
#pragma once

#include <cmath>
#include <cstdint>

#include "gradgeom/packed_load.cuh"
#include "gradgeom/tridiag_eig.h"

namespace gradgeom {
namespace tridiag {

constexpr int kRegsThreads = 512;
constexpr int kRegsMinN = 97;
constexpr int kRegsMaxN = 128;
constexpr int kRegsCols = 32;  // columns per thread
constexpr int kRegsWarps = kRegsThreads / 32;
static_assert(kRegsWarps == 16, "the vᵀAv sum below adds 16 warp partials");

// Shared memory tridiag_regs needs, in bytes.
__host__ __device__ constexpr int64_t regs_smem_bytes(int n) {
  return (block::packed_doubles_even(n) + 2 * kRegsMaxN /*v*/ + kRegsMaxN /*w*/ + kRegsMaxN /*column*/ +
          4 * kRegsMaxN /*s*/ + 2 * kRegsWarps /*vᵀAv, max*/ + 2 /*tau*/) *
         int64_t(sizeof(double));
}

// a[i] for a warp-uniform i: one indirect branch, no dynamically indexed (local-memory) array.
__device__ __forceinline__ double regs_pick(const double (&a)[kRegsCols], int i) {
  double val = 0.0;
  switch (i) {
#define GG_REGS_CASE(c) \
  case c:               \
    val = a[c];         \
    break;
    GG_REGS_CASE(0) GG_REGS_CASE(1) GG_REGS_CASE(2) GG_REGS_CASE(3) GG_REGS_CASE(4) GG_REGS_CASE(5)
    GG_REGS_CASE(6) GG_REGS_CASE(7) GG_REGS_CASE(8) GG_REGS_CASE(9) GG_REGS_CASE(10) GG_REGS_CASE(11)
    GG_REGS_CASE(12) GG_REGS_CASE(13) GG_REGS_CASE(14) GG_REGS_CASE(15) GG_REGS_CASE(16) GG_REGS_CASE(17)
    GG_REGS_CASE(18) GG_REGS_CASE(19) GG_REGS_CASE(20) GG_REGS_CASE(21) GG_REGS_CASE(22) GG_REGS_CASE(23)
    GG_REGS_CASE(24) GG_REGS_CASE(25) GG_REGS_CASE(26) GG_REGS_CASE(27) GG_REGS_CASE(28) GG_REGS_CASE(29)
    GG_REGS_CASE(30) GG_REGS_CASE(31)
#undef GG_REGS_CASE
  }
  return val;
}

// Warp 0's part between steps: given column kk of the current matrix (col[u] = entry lane + 32u,
// zero past n), writes d[kk] and, when a step kk follows (kk + 2 < n), its reflector: e[kk],
// e2[kk], v (zero up to row kk) and tau.
__device__ __forceinline__ void regs_prepare(int kk, int n, const double (&col)[4], int lane, double* v, double* tau,
                                             double* d_out, double* e_out, double* e2_out) {
  double sigma = 0.0, alpha = 0.0;
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    const int t = lane + 32 * u;
    if (t == kk) d_out[kk] = col[u];
    if (t == kk + 1) alpha = col[u];
    if (t >= kk + 2) sigma = fma(col[u], col[u], sigma);
  }
  if (kk + 2 >= n) return;
  sigma = block::group_sum(sigma, 32);
  alpha = block::group_sum(alpha, 32);  // one lane holds it, the others add zeros
  const Reflector hh = reflector(alpha, sigma);
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    const int t = lane + 32 * u;
    v[t] = t == kk + 1 ? (hh.alpha - hh.beta) * hh.inv : (t > kk + 1 ? col[u] * hh.inv : 0.0);
  }
  if (lane == 0) {
    *tau = hh.tau;
    e_out[kk] = hh.beta;
    e2_out[kk] = hh.beta * hh.beta;
  }
}

// Steps 1 and 2 for the n x n matrix whose lower triangle is in the row-major src (n <= 128,
// blockDim.x == kRegsThreads): the tridiagonal matrix (d, e, e2 [n] each) into tri [3n] and the
// scale exponent into *scale; or, for a non-finite, zero or 1 x 1 matrix, the eigenvalues into w
// and kDone into *scale. smem: regs_smem_bytes(n) bytes, 16-byte aligned.
__device__ void tridiag_regs(const double* src, int n, double* smem, double* tri, int* scale, double* w) {
  constexpr int NW = kRegsWarps;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int q = warp >> 2;
  const int t = 32 * (warp & 3) + lane;  // this thread's row
  const int c0 = kRegsCols * q;          // and its first column
  if (n <= 0) return;
  double* P = smem;                            // packed lower triangle, read once
  double* vbuf = P + block::packed_doubles_even(n);  // [2][128]: v of even / odd steps
  double* wsh = vbuf + 2 * kRegsMaxN;          // [128]
  double* col = wsh + kRegsMaxN;               // [128]: column k + 1 before step k's update
  double* s_part = col + kRegsMaxN;            // [4][128]: s_q
  double* dot_part = s_part + 4 * kRegsMaxN;   // [NW]
  double* amax_part = dot_part + NW;           // [NW]
  double* tau_buf = amax_part + NW;            // [2]
  double* d_out = tri;
  double* e_out = tri + n;
  double* e2_out = tri + 2 * n;

  for (int i = tid; i < kRegsMaxN; i += kRegsThreads) col[i] = 0.0;  // rows no warp copies stay 0
  const double amax = block::load_packed_lower_max<kRegsThreads>(src, n, P, amax_part, tid);
  const int scale_exp = scale_exponent(amax, n, P[0], w, tid, kRegsThreads);
  if (scale_exp == kDone) {
    if (tid == 0) *scale = kDone;
    return;
  }

  double a[kRegsCols];
#pragma unroll
  for (int i = 0; i < kRegsCols; ++i) {
    const int j = c0 + i;
    a[i] = (t < n && j < n) ? ldexp(P[t >= j ? block::packed_at(t, j) : block::packed_at(j, t)], -scale_exp) : 0.0;
  }
  if (warp == 0) {  // step 0's reflector from column 0
    double c[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int r = lane + 32 * u;
      c[u] = r < n ? ldexp(P[block::packed_at(r, 0)], -scale_exp) : 0.0;
    }
    regs_prepare(0, n, c, lane, vbuf, tau_buf, d_out, e_out, e2_out);
  }
  __syncthreads();

  const int q_last = (n - 1) / kRegsCols;  // chunks past it are padding
  const bool rows_exist = t - lane < n;
  for (int k = 0; k + 2 < n; ++k) {
    const double* v = vbuf + (k & 1) * kRegsMaxN;
    const int q_first = (k + 1) / kRegsCols;  // chunks before it are reduced
    const bool live = rows_exist && t - lane + 32 > k + 1 && q >= q_first && q <= q_last;
    const int c1 = k + 1;  // the column warp 0 prepares for step k + 1
    const bool holder = c1 / kRegsCols == q;
    double vt = 0.0, dot = 0.0;
    if (live) {
      vt = v[t];
      double acc[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
#pragma unroll
      for (int i = 0; i < kRegsCols; i += 2) {
        const double2 v2 = *reinterpret_cast<const double2*>(v + c0 + i);
        acc[i & 7] = fma(a[i], v2.x, acc[i & 7]);
        acc[(i + 1) & 7] = fma(a[i + 1], v2.y, acc[(i + 1) & 7]);
      }
      const double s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
      s_part[q * kRegsMaxN + t] = s;
      dot = vt * s;
      if (holder) col[t] = regs_pick(a, c1 - c0);
    }
    dot = block::group_sum(dot, 32);
    if (lane == 0) dot_part[warp] = dot;
    __syncthreads();

    if (warp == 0) {  // w = tau·p - (tau²/2)(vᵀAv)·v, zero outside rows k + 1 .. n - 1
      const double2* d2 = reinterpret_cast<const double2*>(dot_part);
      const double2 d0 = d2[0], d1 = d2[1], d2_ = d2[2], d3 = d2[3], d4 = d2[4], d5 = d2[5], d6 = d2[6], d7 = d2[7];
      const double vav = (((d0.x + d0.y) + (d1.x + d1.y)) + ((d2_.x + d2_.y) + (d3.x + d3.y))) +
                         (((d4.x + d4.y) + (d5.x + d5.y)) + ((d6.x + d6.y) + (d7.x + d7.y)));
      const double tau = tau_buf[k & 1];
      const double c = 0.5 * tau * (tau * vav);
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int j = lane + 32 * u;
        double s[4];
#pragma unroll
        for (int qq = 0; qq < 4; ++qq) s[qq] = (qq >= q_first && qq <= q_last) ? s_part[qq * kRegsMaxN + j] : 0.0;
        const double p = ((s[0] + s[1]) + s[2]) + s[3];
        wsh[j] = (j > k && j < n) ? fma(-c, v[j], tau * p) : 0.0;
      }
    }
    __syncthreads();

    if (live) {
      const double wt = wsh[t];
#pragma unroll
      for (int i = 0; i < kRegsCols; i += 2) {
        const double2 v2 = *reinterpret_cast<const double2*>(v + c0 + i);
        const double2 w2 = *reinterpret_cast<const double2*>(wsh + c0 + i);
        a[i] = fma(-vt, w2.x, fma(-wt, v2.x, a[i]));
        a[i + 1] = fma(-vt, w2.y, fma(-wt, v2.y, a[i + 1]));
      }
    }
    if (warp == 0) {  // column c1 after the update, then step c1's reflector
      const double vc = v[c1], wc = wsh[c1];
      double nc[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int j = lane + 32 * u;
        nc[u] = (j > k && j < n) ? fma(-v[j], wc, fma(-wsh[j], vc, col[j])) : 0.0;
      }
      regs_prepare(c1, n, nc, lane, vbuf + ((k + 1) & 1) * kRegsMaxN, tau_buf + ((k + 1) & 1), d_out, e_out, e2_out);
    }
    __syncthreads();
  }
  // The last 2 x 2 block from its owners' registers: e[n-2] = A[n-1, n-2], d[n-1] = A[n-1, n-1].
  if (n >= 2 && t == n - 1) {
#pragma unroll
    for (int i = 0; i < kRegsCols; ++i) {
      if (c0 + i == n - 2) {
        e_out[n - 2] = a[i];
        e2_out[n - 2] = a[i] * a[i];
      }
      if (c0 + i == n - 1) d_out[n - 1] = a[i];
    }
  }
  if (tid == 0) *scale = scale_exp;
}

}  // namespace tridiag
}  // namespace gradgeom
