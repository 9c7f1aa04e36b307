// The pivoted Cholesky factor of psd_cholesky.h with the Schur complement held in a register tile
// (tile_matrix.cuh), one CUDA block per matrix. Same pivots, same operations on every entry, so
// the same F bit for bit (finite input); see psd_cholesky.h for the method and the stopping rule.
// Written, like tridiag_tile.cuh, for few instructions per step: the update has no conditions,
// the pivot column and the diagonal are picked by warp-uniform branches, and the next pivot comes
// from the warp's integer reduction units.
//
// Step j: the owners of pivot column p publish l = a[:, p] / sqrt(a[p, p]) (0 on rows already
// pivoted) in shared memory and write column j of F, one barrier; every thread subtracts l·lᵀ
// from its whole tile (no branches: l = 0 leaves pivoted rows and columns unchanged), the one
// diagonal owner of each row group leaves its best candidate (double-buffered), one barrier, and
// every warp reduces the candidates to the same next pivot (lanes_best).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "gradgeom/block_ops.h"
#include "gradgeom/psd_cholesky.h"
#include "gradgeom/tile_matrix.cuh"
#include "gradgeom/tridiag_tile.cuh"  // NoProbe

namespace gradgeom {
namespace cholesky {

// Doubles of shared workspace factor_tile needs: the pivot column, then the row groups'
// candidates (values, then rows as ints), double-buffered.
template <class M>
constexpr int tile_workspace_doubles() {
  return M::NP + 4 * M::TR;
}

// Orders doubles as unsigned integers: larger value, larger key (finite values and infinities).
__device__ __forceinline__ unsigned long long ordered_key(double x) {
  const unsigned long long bits = static_cast<unsigned long long>(__double_as_longlong(x));
  return (bits >> 63) ? ~bits : bits | 0x8000000000000000ull;
}
__device__ __forceinline__ double from_ordered_key(unsigned long long key) {
  const unsigned long long bits = (key >> 63) ? key & 0x7fffffffffffffffull : ~key;
  return __longlong_as_double(static_cast<long long>(bits));
}

// The best of the N <= 32 candidates of value/row (row -1: none) by take_better's order (larger
// value, then smaller row), found by the warp's reduction units: the same pivot in every thread.
// Values that compare equal as doubles but differ in sign (±0) are ordered by sign here; no
// pivot of value 0 is ever taken (it never exceeds the drop tolerance).
template <int N>
__device__ __forceinline__ Pivot lanes_best(const double* value, const int* row) {
  static_assert(N <= 32, "one candidate per lane");
  const int lane = threadIdx.x & 31;
  const int r = lane < N ? row[lane] : -1;
  const unsigned long long key = r >= 0 ? ordered_key(value[lane]) : 0ull;
  const unsigned hi = __reduce_max_sync(0xffffffffu, static_cast<unsigned>(key >> 32));
  const unsigned lo =
      __reduce_max_sync(0xffffffffu, static_cast<unsigned>(key >> 32) == hi ? static_cast<unsigned>(key) : 0u);
  const unsigned long long best = (static_cast<unsigned long long>(hi) << 32) | lo;
  const int best_row = __reduce_min_sync(0xffffffffu, (r >= 0 && key == best) ? r : 0x7fffffff);
  if (best_row == 0x7fffffff) return Pivot{0.0, -1, -1};
  return Pivot{from_ordered_key(best), best_row, 0};
}

template <class M, class Probe = tridiag::NoProbe>
__device__ void factor_tile(M& A, int n, double tol, double* F, double* work, int tid, Probe&& probe = Probe{}) {
  constexpr int RI = M::RI, TR = M::TR, TC = M::TC;
  constexpr int kGroups = TR / TC;  // the diagonal entry of row r + TR·a is in column block kGroups·a + r / TC
  static_assert(RI <= 32, "the done mask is 32-bit");
  static_assert(TR % TC == 0 && TR <= 32, "row groups: a multiple of TC, one candidate per lane");
  double* lcol = work;  // also the diagonal before the first step
  double* cand_value = work + M::NP;  // [2][TR]
  int* cand_row = reinterpret_cast<int*>(cand_value + 2 * TR);  // [2][TR]
  const bool diag_owner = A.c == A.r % TC;  // one thread per row group
  const int group = A.r / TC;               // uniform across a warp
  // The diagonal entries of the thread's rows (meaningful for diagonal owners).
  auto diagonal = [&](double (&dg)[RI]) {
#pragma unroll
    for (int a = 0; a < RI; ++a) dg[a] = A.x[a][kGroups * a];
#pragma unroll
    for (int q = 1; q < kGroups; ++q)
      if (group == q) {
#pragma unroll
        for (int a = 0; a < RI; ++a) dg[a] = A.x[a][kGroups * a + q];
      }
  };

  if (diag_owner) {
    double dg[RI];
    diagonal(dg);
#pragma unroll
    for (int a = 0; a < RI; ++a)
      if (A.row(a) < n) lcol[A.row(a)] = dg[a];
  }
  __syncthreads();
  // Every thread scans the diagonal: the same NaN flag, drop tolerance and first pivot.
  bool nan = false;
  double dmax = 0.0;
  Pivot piv{0.0, -1, -1};
  for (int i = 0; i < n; ++i) {
    const double x = lcol[i];
    nan = nan || !((x - x) == 0.0);  // NaN or ±Inf
    dmax = fmax(dmax, x);
    piv.take_better(x, i, i);
  }
  const double fill = nan ? std::numeric_limits<double>::quiet_NaN() : 0.0;
  const int64_t size = int64_t(n) * n;
  for (int64_t e = tid; e < size; e += M::kThreads) F[e] = fill;
  if (nan) return;
  const double drop = dmax * tol;
  __syncthreads();  // the fill before the columns, the diagonal scan before lcol is reused

  unsigned row_done = 0;  // bit a: row A.row(a) pivoted
  for (int j = 0; j < n; ++j) {
    if (piv.row < 0 || !(piv.value > drop)) break;  // uniform: every thread holds the same pivot
    const int p = piv.row;
    const double d = sqrt(piv.value);
    const double inv_d = 1.0 / d;
#pragma unroll
    for (int a = 0; a < RI; ++a)
      if (A.row(a) == p) row_done |= 1u << a;
    // The owners of column p publish l (0 on rows already pivoted, p included) and column j of F.
    if (A.c == p % TC) {
      const int bp = p / TC;  // uniform: a branch per column block, no run-time index into the tile
#pragma unroll
      for (int b = 0; b < M::CJ; ++b) {
        if (b != bp) continue;
#pragma unroll
        for (int a = 0; a < RI; ++a) {
          const int i = A.row(a);
          const bool live = !((row_done >> a) & 1u) && i < n;
          const double l = live ? A.x[a][b] * inv_d : 0.0;
          lcol[i] = l;
          if (live) F[int64_t(i) * n + j] = l;
        }
      }
    }
    if (tid == 0) F[int64_t(p) * n + j] = d;
    probe(0);
    __syncthreads();
    probe(1);

    // Schur complement: x -= l_i·l_k everywhere (l = 0 leaves pivoted rows and columns as they are).
    double lr[RI];
#pragma unroll
    for (int a = 0; a < RI; ++a) lr[a] = lcol[A.row(a)];
#pragma unroll
    for (int b = 0; b < M::CJ; ++b) {
      const double lk = lcol[A.col(b)];
#pragma unroll
      for (int a = 0; a < RI; ++a) A.x[a][b] -= lr[a] * lk;
    }
    probe(2);
    const int slot = (j & 1) * TR;  // double-buffered: the next step writes the other half
    if (diag_owner) {
      double dg[RI];
      diagonal(dg);
      Pivot best{0.0, -1, -1};
#pragma unroll
      for (int a = 0; a < RI; ++a)
        if (!((row_done >> a) & 1u) && A.row(a) < n) best.take_better(dg[a], A.row(a), 0);
      cand_value[slot + A.r] = best.value;
      cand_row[slot + A.r] = best.row;
    }
    probe(3);
    __syncthreads();
    probe(4);
    piv = lanes_best<TR>(cand_value + slot, cand_row + slot);
    probe(5);
  }
}

}  // namespace cholesky
}  // namespace gradgeom
