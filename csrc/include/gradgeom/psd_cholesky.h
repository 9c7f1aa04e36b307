// Pivoted Cholesky factor of a symmetric positive semi-definite matrix, shared by the CPU and
// CUDA psd_cholesky kernels (thread convention of block_ops.h; `sync` is a block barrier).
//
// Step j picks the largest remaining diagonal entry p of the Schur complement (its lower
// triangle held packed in a), writes column j of F (row-major n x n) as the scaled column p, and
// updates the remaining Schur complement. It stops when the largest remaining pivot is
// <= tol·max(diag A): F·Fᵀ = A up to that tolerance, F has as many nonzero columns as A's
// numerical rank, and a zero matrix gives F = 0. Diagonal pivoting keeps a Gram matrix that is
// singular up to rounding noise from amplifying the noise (without it, a pivot made of noise
// scales its column by 1/sqrt(noise)). F is a row-permuted lower-triangular matrix; any F with
// F·Fᵀ = A serves the spectral stage. NaN or ±Inf on the diagonal gives an all-NaN F.
//
// One barrier per step: each warp computes the whole scaled column l = a[:, p] / sqrt(piv) into
// its own row of `lcol` (no barrier needed to share it), updates its rows of the Schur
// complement, and leaves the best diagonal entry it wrote as its candidate for the next pivot;
// after the barrier every thread reduces the candidates to the same pivot. Rows not yet pivoted
// are listed in a swap-remove order, double-buffered so that the next list is written while the
// current one is read.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "gradgeom/block_ops.h"

namespace gradgeom {
namespace cholesky {

// Workspace: doubles (lcol, then candidate values) and ints (two row lists, then candidate rows
// and list positions).
GG_BLOCK_FN int64_t workspace_doubles(int64_t n, int nwarps) { return int64_t(nwarps) * n + 2 * block::kMaxWarps; }
GG_BLOCK_FN int64_t workspace_ints(int64_t n) { return 2 * n + 4 * block::kMaxWarps; }

struct Pivot {
  double value;
  int row;  // -1: none
  int pos;  // position in the row list

  // Larger value first, ties to the smaller row index.
  GG_BLOCK_FN void take_better(double v, int r, int q) {
    if (r >= 0 && (row < 0 || v > value || (v == value && r < row))) {
      value = v;
      row = r;
      pos = q;
    }
  }
};

GG_BLOCK_FN Pivot warp_best(Pivot c, int width) {
#if defined(__CUDA_ARCH__)
  for (int off = width >> 1; off > 0; off >>= 1) {
    const double v = __shfl_xor_sync(0xffffffffu, c.value, off);
    const int r = __shfl_xor_sync(0xffffffffu, c.row, off);
    const int q = __shfl_xor_sync(0xffffffffu, c.pos, off);
    c.take_better(v, r, q);
  }
#else
  (void)width;
#endif
  return c;
}

template <typename Sync>
GG_BLOCK_FN void factor(block::PackedLower a, int n, double tol, double* F, double* work, int* iwork, int tid,
                        int nthreads, Sync sync) {
  const int lanes = block::warp_lanes(nthreads);
  const int warp = tid / lanes, lane = tid - warp * lanes, nwarps = nthreads / lanes;
  double* lcol = work + int64_t(warp) * n;
  double* cand_value = work + int64_t(nwarps) * n;  // [2][kMaxWarps]
  int* list0 = iwork;  // rows not yet pivoted: list0 before even steps, list1 before odd ones
  int* list1 = iwork + n;
  int* cand_row = iwork + 2 * n;                    // [2][kMaxWarps]
  int* cand_pos = cand_row + 2 * block::kMaxWarps;  // [2][kMaxWarps]
  const int64_t size = int64_t(n) * n;

  // Every thread scans the diagonal: the same NaN flag, drop tolerance and first pivot.
  bool nan = false;
  double dmax = 0.0;
  Pivot piv{0.0, -1, -1};
  for (int i = 0; i < n; ++i) {
    const double x = a.row(i)[i];
    nan = nan || !((x - x) == 0.0);  // NaN or ±Inf
    dmax = fmax(dmax, x);
    piv.take_better(x, i, i);
  }
  const double fill = nan ? std::numeric_limits<double>::quiet_NaN() : 0.0;
  for (int64_t e = tid; e < size; e += nthreads) F[e] = fill;
  if (nan) return;
  const double drop = dmax * tol;
  for (int i = tid; i < n; i += nthreads) list0[i] = i;
  sync();

  for (int j = 0, count = n; j < n; ++j, --count) {
    if (piv.row < 0 || !(piv.value > drop)) break;  // uniform: every thread holds the same pivot
    const int p = piv.row, pos = piv.pos;
    const double d = sqrt(piv.value);
    const double inv_d = 1.0 / d;
    const int* live = (j & 1) ? list1 : list0;
    int* next = (j & 1) ? list0 : list1;
    const int last = live[count - 1];
    auto row_at = [&](int q) { return q == pos ? last : live[q]; };  // the list without p
    const int rest = count - 1;
    for (int q = lane; q < rest; q += lanes) {
      const int i = row_at(q);
      const double l = a.at(i, p) * inv_d;
      lcol[q] = l;
      if (warp == 0) {
        F[int64_t(i) * n + j] = l;
        next[q] = i;
      }
    }
    if (tid == 0) F[int64_t(p) * n + j] = d;
    block::warp_sync();

    Pivot best{0.0, -1, -1};
    for (int qi = warp; qi < rest; qi += nwarps) {
      const int i = row_at(qi);
      const double li = lcol[qi];
      for (int qk = lane; qk <= qi; qk += lanes) {
        double& x = a.at(i, row_at(qk));
        x -= li * lcol[qk];
        if (qk == qi) best.take_better(x, i, qi);
      }
    }
    best = warp_best(best, lanes);
    const int slot = (j & 1) * block::kMaxWarps;
    if (lane == 0) {
      cand_value[slot + warp] = best.value;
      cand_row[slot + warp] = best.row;
      cand_pos[slot + warp] = best.pos;
    }
    sync();
    piv = Pivot{0.0, -1, -1};
    for (int w = 0; w < nwarps; ++w) piv.take_better(cand_value[slot + w], cand_row[slot + w], cand_pos[slot + w]);
  }
}

}  // namespace cholesky
}  // namespace gradgeom
