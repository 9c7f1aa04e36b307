// Householder tridiagonalisation of one real symmetric matrix held in a register tile
// (tile_matrix.cuh), one CUDA block per matrix: steps 1 and 2 of tridiag_eig.h (scale, reduce)
// with the trailing matrix in registers. The result (d, e, e2 and the scale exponent) goes to
// global memory, and the bisection of tridiag_eig.h runs in its own kernel, where more matrices
// share an SM.
//
// A step is bound by instruction issue (16 warps per SM, every thread running the same step), so
// it is written to issue few instructions per tile entry: no per-entry conditions, only
// warp-uniform branches over column blocks; the vectors are zero outside (k, n) so that finished
// rows and columns and the padding take no masks.
//  * The product with the new reflector starts before the reflector is known: with x the column
//    below the diagonal (x[k+1] = alpha), c = A[:, k+1], beta = -sign(alpha)·‖x‖ and
//    v = (x - beta·e_{k+1}) / (alpha - beta), tau·inv = -1/beta, so p = tau·A·v = c - (A·x)/beta.
//  * The update uses v = inv·x̃, x̃ = x with x̃[k+1] = alpha - beta (its own buffer, so the
//    matrix-vector product can read x meanwhile).
//  * The owners of columns k + 1 and k + 2 (one column block, uniform) publish the next x, x̃
//    and c, with zeros outside their live range.
// Both triangles are updated; their rounding may differ by an ulp, within the method's backward
// error (x and c are always read below the diagonal).
#pragma once

#include <cmath>
#include <cstdint>

#include "gradgeom/block_ops.h"
#include "gradgeom/tile_matrix.cuh"
#include "gradgeom/tridiag_eig.h"

namespace gradgeom {
namespace tridiag {

// Phase marks for the micro-benchmark's cycle counts (bench/micro/rxr_micro.cu); no-ops here.
struct NoProbe {
  __device__ void operator()(int) const {}
};

// Shared workspace of the tile reduction, in doubles: x, x̃ and c double-buffered, p (NP each),
// d, e, e2 (NP each), the per-warp partials.
template <class M>
constexpr int tile_workspace_doubles() {
  return 10 * M::NP + 2 * block::kMaxWarps;
}

// Sum of v[0..N) as a balanced tree: the same bits in every thread.
template <int N>
__device__ __forceinline__ double tree_sum(const double* v) {
  double t[N];
#pragma unroll
  for (int q = 0; q < N; ++q) t[q] = v[q];
#pragma unroll
  for (int w = 1; w < N; w *= 2)
#pragma unroll
    for (int q = 0; q + w < N; q += 2 * w) t[q] += t[q + w];
  return t[0];
}

template <class M>
struct TileWork {
  static constexpr int NP = M::NP;
  double* base;
  __device__ double* xm(int k) const { return base + (k & 1) * NP; }        // x for step k
  __device__ double* xu(int k) const { return base + (2 + (k & 1)) * NP; }  // x̃ for step k
  __device__ double* c(int k) const { return base + (4 + (k & 1)) * NP; }   // column k + 1
  __device__ double* p() const { return base + 6 * NP; }
  __device__ double* d() const { return base + 7 * NP; }
  __device__ double* e() const { return base + 8 * NP; }
  __device__ double* e2() const { return base + 9 * NP; }
  __device__ double* sig_part() const { return base + 10 * NP; }
  __device__ double* dot_part() const { return base + 10 * NP + block::kMaxWarps; }
};

// Step 1 of tridiag_eig.h on the tile: kDone (w written) for a non-finite, zero or 1 x 1 matrix;
// else scales the tile by 2^-e, publishes step 0's x, x̃ and c, d[0] and the per-warp partials of
// Σ x_i² over i >= 2, and returns e.
template <class M>
__device__ int scale_tile(M& A, int n, TileWork<M> ws, double* w, int tid) {
  constexpr int kWarps = M::kThreads / 32;
  const int warp = tid / 32, lane = tid % 32;
  double* dot_part = ws.dot_part();

  double amax = 0.0;
#pragma unroll
  for (int a = 0; a < M::RI; ++a)
#pragma unroll
    for (int b = 0; b < M::CJ; ++b) {
      const double x = A.x[a][b];  // the padding is zero
      amax = (x - x == 0.0) ? fmax(amax, fabs(x)) : INFINITY;
    }
  amax = block::warp_max(amax, 32);
  if (lane == 0) dot_part[warp] = amax;
  __syncthreads();
  amax = 0.0;
  for (int q = 0; q < kWarps; ++q) amax = fmax(amax, dot_part[q]);
  // Entry (0, 0) is thread 0's x[0][0], the one thread that writes w[0].
  const int scale_exp = scale_exponent(amax, n, A.x[0][0], w, tid, M::kThreads);
  if (scale_exp == kDone) return kDone;
  double acc = 0.0;
#pragma unroll
  for (int a = 0; a < M::RI; ++a)
#pragma unroll
    for (int b = 0; b < M::CJ; ++b) {
      const double x = ldexp(A.x[a][b], -scale_exp);
      A.x[a][b] = x;
      const int i = A.row(a), j = A.col(b);
      if (j == 0) {
        const double xi = i >= 1 ? x : 0.0;
        ws.xm(0)[i] = xi;
        ws.xu(0)[i] = xi;
        if (i >= 2) acc += x * x;
        if (i == 0) ws.d()[0] = x;
      }
      if (j == 1) ws.c(0)[i] = x;
    }
  acc = block::group_sum(acc, 32);
  if (lane == 0) ws.sig_part()[warp] = acc;
  __syncthreads();
  return scale_exp;
}

// Step 2 on the tile (n >= 2): d, e and e2 = e² of the tridiagonal matrix in ws.
template <class M, class Probe = NoProbe>
__device__ void tridiagonalize_tile(M& A, int n, TileWork<M> ws, int tid, Probe&& probe = Probe{}) {
  constexpr int RI = M::RI, CJ = M::CJ, TC = M::TC, kWarps = M::kThreads / 32;
  static_assert(RI <= TC, "lane c publishes row c's sum");
  static_assert((kWarps & (kWarps - 1)) == 0, "tree sums over a power-of-two number of warps");
  const int warp = tid / 32, lane = tid % 32;
  double* p = ws.p();
  double* d = ws.d();
  double* sig_part = ws.sig_part();
  double* dot_part = ws.dot_part();
  // Rows this lane publishes p for: row c of its group (lanes c >= RI publish nothing).
  const int i_mine = A.c < RI ? A.row(A.c) : -1;

  for (int k = 0; k + 2 < n; ++k) {
    const double* xm = ws.xm(k);
    double* xu = ws.xu(k);
    const double* ck = ws.c(k);
    probe(0);

    // s = A·x on this thread's rows, over the live column blocks (x is 0 outside (k, n)).
    double s[RI];
#pragma unroll
    for (int a = 0; a < RI; ++a) s[a] = 0.0;
#pragma unroll
    for (int b = 0; b < CJ; ++b) {
      if (TC * b + TC - 1 <= k || TC * b >= n) continue;  // uniform
      const double xj = xm[A.col(b)];
#pragma unroll
      for (int a = 0; a < RI; ++a) s[a] = fma(A.x[a][b], xj, s[a]);
    }
    const double sigma = tree_sum<kWarps>(sig_part);
    const double alpha = xm[k + 1];
    // The reflector (all 0 when x is already reduced: then v = 0 and the step changes nothing).
    double beta = alpha, tau = 0.0, inv = 0.0, rb = 0.0;
    if (sigma > 0.0) {
      beta = -copysign(sqrt(alpha * alpha + sigma), alpha);
      rb = 1.0 / beta;
      inv = 1.0 / (alpha - beta);
      tau = (beta - alpha) * rb;
    }
    if (tid == 0) {
      ws.e()[k] = beta;
      ws.e2()[k] = beta * beta;
      xu[k + 1] = alpha - beta;
    }
#pragma unroll
    for (int off = TC >> 1; off > 0; off >>= 1)
#pragma unroll
      for (int a = 0; a < RI; ++a) s[a] += __shfl_xor_sync(0xffffffffu, s[a], off);
    probe(1);

    // p_i = c_i - s_i / beta for the lane's row (0 outside (k, n)), and vᵀp. The row's sum is
    // picked by 0/1 weights: a chain of selects would be turned into a run-time index into s,
    // which moves s to local memory.
    double mine = 0.0;
#pragma unroll
    for (int a = 0; a < RI; ++a) mine = fma(A.c == a ? 1.0 : 0.0, s[a], mine);
    double dot = 0.0;
    if (i_mine >= 0) {
      const bool live = i_mine > k && i_mine < n;
      const double pi = live ? ck[i_mine] - mine * rb : 0.0;
      const double vi = (i_mine == k + 1 ? alpha - beta : xm[i_mine]) * inv;
      p[i_mine] = pi;
      dot = vi * pi;
    }
#pragma unroll
    for (int off = 1; off < RI; off <<= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);
#pragma unroll
    for (int off = TC; off < 32; off <<= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);
    if (lane == 0) dot_part[warp] = dot;
    probe(2);
    __syncthreads();
    probe(3);

    // A -= v·wᵀ + w·vᵀ, v = inv·x̃, w = p - (tau/2)(vᵀp)·v: both 0 outside (k, n).
    const double half_tau_dot = 0.5 * tau * tree_sum<kWarps>(dot_part);
    double vr[RI], wr[RI];
#pragma unroll
    for (int a = 0; a < RI; ++a) {
      vr[a] = xu[A.row(a)] * inv;
      wr[a] = p[A.row(a)] - half_tau_dot * vr[a];
    }
    probe(4);
    // The update and, in the same pass, the publication of the next step's x = x̃ (column k + 1
    // from row k + 2, zero elsewhere), its squared norm below row k + 2, d[k + 1], and c = column
    // k + 2. Both columns are live; their block index is uniform, their owners one lane per row
    // group.
    double acc = 0.0;
    const int b1 = (k + 1) / TC, b2 = (k + 2) / TC;
    const bool own1 = A.c == (k + 1) % TC, own2 = A.c == (k + 2) % TC;
#pragma unroll
    for (int b = 0; b < CJ; ++b) {
      if (TC * b + TC - 1 <= k || TC * b >= n) continue;  // uniform
      const double vj = xu[A.col(b)] * inv;
      const double wj = p[A.col(b)] - half_tau_dot * vj;
#pragma unroll
      for (int a = 0; a < RI; ++a) A.x[a][b] = fma(-vr[a], wj, fma(-wr[a], vj, A.x[a][b]));
      if (b == b1 && own1) {
        double* xm_next = ws.xm(k + 1);
        double* xu_next = ws.xu(k + 1);
#pragma unroll
        for (int a = 0; a < RI; ++a) {
          const int i = A.row(a);
          const double x = (i >= k + 2 && i < n) ? A.x[a][b] : 0.0;
          xm_next[i] = x;
          xu_next[i] = x;
          acc = fma(x, i >= k + 3 ? x : 0.0, acc);
          if (i == k + 1) d[k + 1] = A.x[a][b];
        }
      }
      if (b == b2 && own2) {
        double* c_next = ws.c(k + 1);
#pragma unroll
        for (int a = 0; a < RI; ++a) c_next[A.row(a)] = A.x[a][b];
      }
    }
    probe(5);
    // Column k + 1's owners in a warp are the lanes (k + 1) % TC + TC·g.
#pragma unroll
    for (int off = TC; off < 32; off <<= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (lane == (k + 1) % TC) sig_part[warp] = acc;
    probe(6);
    __syncthreads();
    probe(7);
  }
  // The last 2 x 2 block (d[n - 2] is already written: by the last step, or by scale_tile).
#pragma unroll
  for (int a = 0; a < RI; ++a)
#pragma unroll
    for (int b = 0; b < CJ; ++b) {
      const int i = A.row(a), j = A.col(b);
      if (i == n - 1 && j == n - 1) d[n - 1] = A.x[a][b];
      if (i == n - 1 && j == n - 2) {
        ws.e()[n - 2] = A.x[a][b];
        ws.e2()[n - 2] = A.x[a][b] * A.x[a][b];
      }
    }
  __syncthreads();
}

// Steps 1 and 2 for the tile's n x n matrix (destroyed): the tridiagonal matrix (d, e, e2 [n] each)
// into tri [3n], and the scale exponent into *scale; or, for a non-finite, zero or 1 x 1 matrix,
// the eigenvalues into w and kDone into *scale. smem: tile_workspace_doubles<M>() doubles of
// shared memory.
template <class M>
__device__ void tridiag_tile(M& A, int n, double* smem, double* tri, int* scale, double* w, int tid) {
  if (n <= 0) return;
  const TileWork<M> ws{smem};
  const int scale_exp = scale_tile(A, n, ws, w, tid);
  if (tid == 0) *scale = scale_exp;
  if (scale_exp == kDone) return;
  tridiagonalize_tile(A, n, ws, tid);
  for (int i = tid; i < n; i += M::kThreads) {
    tri[i] = ws.d()[i];
    if (i + 1 < n) {
      tri[n + i] = ws.e()[i];
      tri[2 * n + i] = ws.e2()[i];
    }
  }
}

}  // namespace tridiag
}  // namespace gradgeom
