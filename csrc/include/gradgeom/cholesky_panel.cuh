// The pivoted Cholesky factor of psd_cholesky.h, blocked (LAPACK dpstrf): one CUDA block of 128
// threads per matrix (n <= 128), the packed lower triangle in shared memory (86 KB at n = 128, so
// two matrices share an SM). Same pivots and the same fma sequence on every entry as
// psd_cholesky.h, so the same F bit for bit (finite input).
//
// The unblocked kernel updates the whole Schur complement after every column. Here a column only
// touches its own column, and the trailing matrix is updated once per panel of kPanel columns:
//  * Rows and columns are kept in pivot order: step j swaps positions j and q (the pivot's)
//    symmetrically, so the Schur complement is positions [j, n). The panel's columns L are kept
//    by original row, so the swap never moves them.
//  * Thread t holds position t: the Schur complement's diagonal there and its original row.
//  * One block barrier a step. Before it, each warp publishes its best candidate (larger d, then
//    smaller original row) as one 16-byte record. After it, every thread reduces the four records
//    to the same pivot, swaps the one pair of A that holds its own A[t, j] (no other thread reads
//    that pair in the step), and forms column j: a_tj - Σ_{c < j - j0} L[t][c]·L[j][c] over the
//    panel's earlier columns (the matrix is current up to the panel start j0), scaled by 1/√d_j.
//  * The trailing update subtracts the panel's columns in order, one fma each: the sequence the
//    unblocked kernel applies to every entry.
// Measured on an H100 (224 SPD matrices of n = 128, the previous version timed beside it; both
// give the same F bit for bit): 139 µs, against 160 µs with two barriers a step, the candidates
// reduced field by field and the whole matrix loaded eight doubles at a time; 361 µs for the
// register-tile kernel before that (a whole SM per matrix). bench/micro/rxr_micro.cu times it.
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
  return (block::packed_doubles_even(n) + int64_t(n) * kPanelLd + 2 * int64_t(n)) * int64_t(sizeof(double)) +
         2 * (kPanelThreads / 32) * int64_t(sizeof(uint4)) + 3 * int64_t(n) * int64_t(sizeof(int));
}

// Whether candidate record a (key lo, key hi, original row, position) beats b: the larger key,
// then the smaller row. "None" has key 0, below every diagonal value.
__device__ __forceinline__ bool record_better(uint4 a, uint4 b) {
  const unsigned long long ka = (static_cast<unsigned long long>(a.y) << 32) | a.x;
  const unsigned long long kb = (static_cast<unsigned long long>(b.y) << 32) | b.x;
  return ka > kb || (ka == kb && static_cast<int>(a.z) < static_cast<int>(b.z));
}

// F (row-major n x n, global) of the n x n matrix whose lower triangle is in the row-major src,
// n <= kPanelMaxN, blockDim.x == kPanelThreads. smem: panel_smem_bytes(n) bytes, 16-byte aligned.
__device__ void factor_panel(const double* src, int n, double tol, double* F, double* smem) {
  constexpr int NW = kPanelThreads / 32;
  const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
  double* A = smem;                                // packed lower triangle, positions in pivot order
  double* L = A + block::packed_doubles_even(n);  // [n][kPanelLd]: the panel's columns, by original row
  double* pub_dg = L + int64_t(n) * kPanelLd;      // [2][n]: the diagonal by position, published each step
  uint4* cand_rec = reinterpret_cast<uint4*>(pub_dg + 2 * n);  // [2][NW]: key lo, key hi, row, position
  double* cand_value = reinterpret_cast<double*>(cand_rec);     // [NW], before the steps: the diagonal scan
  int* cand_row = reinterpret_cast<int*>(cand_value + NW);       // [NW], the same
  int* pub_perm = reinterpret_cast<int*>(cand_rec + 2 * NW);    // [2][n]: the original row by position
  int* row_at = pub_perm + 2 * n;                               // [n]: the same at the panel's end

  block::copy_lower_async(src, n, A, t, kPanelThreads);
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
  block::copy_async_wait();
  __syncthreads();  // the diagonal scan's partials and the copied triangle
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
      // Double-buffered: a thread one step ahead writes the other half.
      const int slot = (j & 1) * NW;
      double* dg_now = pub_dg + (j & 1) * n;
      int* perm_now = pub_perm + (j & 1) * n;
      // The warp's candidate (larger key, then smaller original row), as one 16-byte record
      // written by the lane holding it (lane 0 writes "none": key 0).
      const bool cand = t >= j && mine;
      const unsigned long long key = cand ? ordered_key(dg) : 0ull;
      const unsigned hi = __reduce_max_sync(0xffffffffu, static_cast<unsigned>(key >> 32));
      const unsigned lo =
          __reduce_max_sync(0xffffffffu, static_cast<unsigned>(key >> 32) == hi ? static_cast<unsigned>(key) : 0u);
      const bool top = cand && key == ((static_cast<unsigned long long>(hi) << 32) | lo);
      const int best_row = __reduce_min_sync(0xffffffffu, top ? perm : 0x7fffffff);
      const bool holder = top && perm == best_row;
      if (holder || (best_row == 0x7fffffff && lane == 0))
        cand_rec[slot + warp] = make_uint4(lo, hi, static_cast<unsigned>(best_row), static_cast<unsigned>(t));
      if (mine) {
        dg_now[t] = dg;
        perm_now[t] = perm;
      }
      __syncthreads();  // the step's only barrier
      // The block's pivot: the best of the four records, read at once, by a branch-free tree.
      // The order is take_better's (psd_cholesky.h) wherever the pivot is above drop: only ±0 differ.
      uint4 rec[NW];
#pragma unroll
      for (int w = 0; w < NW; ++w) rec[w] = cand_rec[slot + w];
      const uint4 best = record_better(rec[1], rec[0]) ? rec[1] : rec[0];
      const uint4 best2 = record_better(rec[3], rec[2]) ? rec[3] : rec[2];
      const uint4 top_rec = record_better(best2, best) ? best2 : best;
      const unsigned long long top_key = (static_cast<unsigned long long>(top_rec.y) << 32) | top_rec.x;
      const Pivot piv{top_key ? from_ordered_key(top_key) : 0.0, top_key ? static_cast<int>(top_rec.z) : -1,
                      static_cast<int>(top_rec.w)};
      if (piv.row < 0 || !(piv.value > drop)) {  // uniform: every thread holds the same pivot
        stop = true;
        break;
      }
      const int q = piv.pos;
      if (q != j) {
        // Swap positions j < q in the trailing lower triangle (LAPACK dpstf2): column j below j
        // up to q with row q, column j below q with column q; (q, j) stays. Thread t swaps one
        // pair, which holds its own A[t, j]: no other thread reads the pair this step, so no
        // barrier follows. L is kept by original row and needs no swap.
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
        if (t == q) {
          dg = dg_now[j];
          perm = perm_now[j];
        } else if (t == j) {
          dg = piv.value;
          perm = piv.row;
        }
      }
      const double d = sqrt(piv.value);
      const double inv_d = 1.0 / d;
      // Column j below the diagonal; the pivot row gets d.
      if (t > j && mine) {
        const double* lt = L + perm * kPanelLd;
        const double* lj = L + piv.row * kPanelLd;
        double v = A[block::packed_at(t, j)];
#pragma unroll
        for (int cc = 0; cc < kPanel - 1; ++cc)  // unrolled and predicated: one basic block
          if (cc < c) v = fma(-lt[cc], lj[cc], v);
        const double l = v * inv_d;
        L[perm * kPanelLd + c] = l;
        dg = fma(-l, l, dg);
        F[int64_t(perm) * n + j] = l;
      } else if (t == j) {
        L[piv.row * kPanelLd + c] = d;
        F[int64_t(piv.row) * n + j] = d;
      }
    }
    if (stop) break;  // uniform; no trailing update after the last pivot
    if (mine) row_at[t] = perm;
    __syncthreads();  // the panel's columns and row_at
    const int done = jend;
    if (done >= n) break;
    // Trailing update of the lower triangle: positions [done, n), the panel's columns in order.
    if (t < n - done) {  // thread: one row; the columns' panel rows are broadcast
      const int r_pos = done + t;
      double lt[kPanel];
      const double* lr = L + row_at[r_pos] * kPanelLd;
#pragma unroll
      for (int cc = 0; cc < kPanel; ++cc) lt[cc] = lr[cc];
      double* r = A + block::packed_at(r_pos, 0);
      for (int k = done; k <= r_pos; k += 4) {  // four entries loaded before their updates
        double a[4];
        const double2* lk[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          a[u] = r[min(k + u, r_pos)];
          lk[u] = reinterpret_cast<const double2*>(L + row_at[min(k + u, r_pos)] * kPanelLd);
        }
#pragma unroll
        for (int cc = 0; cc < kPanel / 2; ++cc) {
#pragma unroll
          for (int u = 0; u < 4; ++u) {
            const double2 l2 = lk[u][cc];
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
