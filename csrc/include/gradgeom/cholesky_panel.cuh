// The pivoted Cholesky factor of psd_cholesky.h, blocked (LAPACK dpstrf): one CUDA block of 128
// threads per matrix (n <= 128), the packed lower triangle in shared memory (86 KB at n = 128, so
// two matrices share an SM). Same pivots and the same fma sequence on every entry as
// psd_cholesky.h, so the same F bit for bit (finite input).
//
// The unblocked kernel updates the whole Schur complement after every column. Here a column only
// touches its own column, and the trailing matrix is updated once per panel of kPanel columns:
//  * Rows and columns are kept in pivot order: step j swaps positions j and q (the pivot's)
//    symmetrically, so the Schur complement is positions [j, n).
//  * Thread t holds position t: the Schur complement's diagonal there (d_t -= l_t² each step) and
//    its original row. Each step: the warps' best candidates (larger d, then smaller original
//    row), one barrier, the swap, one barrier, and column j: a_tj - Σ_{c < j - j0} L[t][c]·L[j][c]
//    over the panel's earlier columns (the matrix is current up to the panel start j0), scaled
//    by 1/√d_j.
//  * The trailing update subtracts the panel's columns in order, one fma each: the sequence the
//    unblocked kernel applies to every entry.
// Measured on an H100 (224 matrices, bench/micro/rxr_micro.cu): n = 128 in 155 µs against
// 361 µs for the register-tile kernel it replaced (which needed a whole SM per matrix).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "gradgeom/packed_load.cuh"
#include "gradgeom/psd_cholesky.h"  // Pivot

namespace gradgeom {
namespace cholesky {

// Orders doubles as unsigned integers: larger value, larger key (finite values and infinities).
__device__ __forceinline__ unsigned long long ordered_key(double x) {
  const unsigned long long bits = static_cast<unsigned long long>(__double_as_longlong(x));
  return (bits >> 63) ? ~bits : bits | 0x8000000000000000ull;
}
__device__ __forceinline__ double from_ordered_key(unsigned long long key) {
  const unsigned long long bits = (key >> 63) ? key & 0x7fffffffffffffffull : ~key;
  return __longlong_as_double(static_cast<long long>(bits));
}

constexpr int kPanelThreads = 128;    // thread t: position t
constexpr int kPanelMaxN = 128;
constexpr int kPanel = 16;            // columns per panel
constexpr int kPanelLd = kPanel + 2;  // row stride of the panel's columns (16-byte rows)

// Shared memory factor_panel needs, in bytes: two blocks per SM up to n = 128 on an H100.
__host__ __device__ constexpr int64_t panel_smem_bytes(int n) {
  return (block::packed_doubles_even(n) + int64_t(n) * kPanelLd + n + 2 * (kPanelThreads / 32)) * int64_t(sizeof(double)) +
         (int64_t(n) + 4 * (kPanelThreads / 32)) * int64_t(sizeof(int));
}

// The best (larger value, then smaller key row; row -1: none) over the warp; the position comes
// from the lane holding the winner.
__device__ __forceinline__ Pivot warp_best_pos(Pivot c) {
  const unsigned long long key = c.row >= 0 ? ordered_key(c.value) : 0ull;
  const unsigned hi = __reduce_max_sync(0xffffffffu, static_cast<unsigned>(key >> 32));
  const unsigned lo =
      __reduce_max_sync(0xffffffffu, static_cast<unsigned>(key >> 32) == hi ? static_cast<unsigned>(key) : 0u);
  const unsigned long long best = (static_cast<unsigned long long>(hi) << 32) | lo;
  const int best_row = __reduce_min_sync(0xffffffffu, (c.row >= 0 && key == best) ? c.row : 0x7fffffff);
  const unsigned holder = __ballot_sync(0xffffffffu, c.row == best_row && c.row >= 0);
  const int pos = __shfl_sync(0xffffffffu, c.pos, holder ? __ffs(holder) - 1 : 0);
  if (best_row == 0x7fffffff) return Pivot{0.0, -1, -1};
  return Pivot{from_ordered_key(best), best_row, pos};
}

// F (row-major n x n, global) of the n x n matrix whose lower triangle is in the row-major src,
// n <= kPanelMaxN, blockDim.x == kPanelThreads. smem: panel_smem_bytes(n) bytes.
__device__ void factor_panel(const double* src, int n, double tol, double* F, double* smem) {
  constexpr int NW = kPanelThreads / 32;
  const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
  double* A = smem;                                // packed lower triangle, positions in pivot order
  double* L = A + block::packed_doubles_even(n);  // [n][kPanelLd]: the panel's columns
  double* pub_dg = L + int64_t(n) * kPanelLd;      // [n]: the diagonal, published each step
  double* cand_value = pub_dg + n;                 // [2][NW]
  int* pub_perm = reinterpret_cast<int*>(cand_value + 2 * NW);  // [n]
  int* cand_row = pub_perm + n;                                  // [2][NW]
  int* cand_pos = cand_row + 2 * NW;                             // [2][NW]

  block::load_packed_lower<kPanelThreads>(src, n, A, t);
  // Thread t holds position t: the Schur complement's diagonal there and its original row.
  const bool mine = t < n;
  double dg = mine ? src[int64_t(t) * n + t] : 0.0;
  int perm = t;
  {
    const bool bad = mine && !((dg - dg) == 0.0);  // NaN or ±Inf
    double m = dg;
    m = block::warp_max(m, 32);
    const bool any_bad = __any_sync(0xffffffffu, bad);
    if (lane == 0) {
      cand_value[warp] = m;
      cand_row[warp] = any_bad;
    }
  }
  __syncthreads();
  bool nan = false;
  double dmax = 0.0;
  for (int w = 0; w < NW; ++w) {
    nan = nan || cand_row[w] != 0;
    dmax = fmax(dmax, cand_value[w]);
  }
  const double fill = nan ? std::numeric_limits<double>::quiet_NaN() : 0.0;
  const int64_t size = int64_t(n) * n;
  for (int64_t e = t; e < size; e += kPanelThreads) F[e] = fill;
  if (nan) return;
  const double drop = dmax * tol;
  __syncthreads();  // the scan's partials before the candidates reuse them

  bool stop = false;
  for (int j0 = 0; j0 < n && !stop; j0 += kPanel) {
    const int jend = j0 + kPanel < n ? j0 + kPanel : n;
    for (int j = j0; j < jend; ++j) {
      const int c = j - j0;
      const int slot = (j & 1) * NW;  // double-buffered: a warp one step ahead writes the other half
      const Pivot wb = warp_best_pos((t >= j && mine) ? Pivot{dg, perm, t} : Pivot{0.0, -1, -1});
      if (lane == 0) {
        cand_value[slot + warp] = wb.value;
        cand_row[slot + warp] = wb.row;
        cand_pos[slot + warp] = wb.pos;
      }
      if (mine) {
        pub_dg[t] = dg;
        pub_perm[t] = perm;
      }
      __syncthreads();
      Pivot piv{0.0, -1, -1};
      for (int w = 0; w < NW; ++w) piv.take_better(cand_value[slot + w], cand_row[slot + w], cand_pos[slot + w]);
      if (piv.row < 0 || !(piv.value > drop)) {  // uniform: every thread holds the same pivot
        stop = true;
        break;
      }
      const int q = piv.pos;
      const double d = sqrt(piv.value);
      const double inv_d = 1.0 / d;
      if (q != j) {
        // Swap positions j < q in the trailing lower triangle (LAPACK dpstf2): column j below j
        // up to q with row q, column j below q with column q; (q, j) stays. Thread t: one pair.
        int x = -1, y = -1;
        if (t > j && t < q) {
          x = block::packed_at(t, j);
          y = block::packed_at(q, t);
        } else if (t > q && t < n) {
          x = block::packed_at(t, j);
          y = block::packed_at(t, q);
        } else if (t == q) {
          x = block::packed_at(j, j);
          y = block::packed_at(q, q);
        }
        if (x >= 0) {
          const double a = A[x], b = A[y];
          A[x] = b;
          A[y] = a;
        }
        if (t < c) {
          const double a = L[q * kPanelLd + t], b = L[j * kPanelLd + t];
          L[q * kPanelLd + t] = b;
          L[j * kPanelLd + t] = a;
        }
        if (t == q) {
          dg = pub_dg[j];
          perm = pub_perm[j];
        } else if (t == j) {
          dg = piv.value;
          perm = piv.row;
        }
        __syncthreads();
      }
      // Column j below the diagonal; the pivot row gets d.
      if (t > j && mine) {
        const double* lt = L + t * kPanelLd;
        const double* lj = L + j * kPanelLd;
        double v = A[block::packed_at(t, j)];
        for (int cc = 0; cc < c; ++cc) v = fma(-lt[cc], lj[cc], v);
        const double l = v * inv_d;
        L[t * kPanelLd + c] = l;
        dg = fma(-l, l, dg);
        F[int64_t(perm) * n + j] = l;
      } else if (t == j) {
        L[j * kPanelLd + c] = d;
        F[int64_t(perm) * n + j] = d;
      }
    }
    if (stop) break;  // uniform; no trailing update after the last pivot
    __syncthreads();  // the panel's columns
    const int done = jend;
    if (done >= n) break;
    // Trailing update of the lower triangle: positions [done, n), the panel's columns in order.
    if (t < n - done) {  // thread: one row; the columns' panel rows are broadcast
      const int r_pos = done + t;
      double lt[kPanel];
#pragma unroll
      for (int cc = 0; cc < kPanel; ++cc) lt[cc] = L[r_pos * kPanelLd + cc];
      double* r = A + block::packed_at(r_pos, 0);
      for (int k = done; k <= r_pos; k += 4) {  // four entries loaded before their updates
        double a[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) a[u] = r[min(k + u, r_pos)];
#pragma unroll
        for (int cc = 0; cc < kPanel / 2; ++cc) {
#pragma unroll
          for (int u = 0; u < 4; ++u) {
            const double2 l2 = reinterpret_cast<const double2*>(L + min(k + u, r_pos) * kPanelLd)[cc];
            a[u] = fma(-lt[2 * cc], l2.x, a[u]);
            a[u] = fma(-lt[2 * cc + 1], l2.y, a[u]);
          }
        }
#pragma unroll
        for (int u = 0; u < 4; ++u)
          if (k + u <= r_pos) r[k + u] = a[u];
      }
    }
    __syncthreads();
  }
}

}  // namespace cholesky
}  // namespace gradgeom
