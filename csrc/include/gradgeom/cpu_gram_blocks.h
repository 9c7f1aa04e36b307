// The CPU Gram kernels' building blocks: csrc/cpu/lora_gram.cpp (XᵀX) and
// csrc/cpu/lora_cross_gram.cpp (XᵀY). A job's rows are cut into blocks of kRows. A block gathers
// its rows into small row-major buffers (widened to the accumulation type, walking memory in the
// order the strides favour, columns zero-padded to a multiple of kTileCols; the buffers are kept
// by the thread from block to block), then accumulates register tiles of its partial product
// over the rows in order, as outer products (SIMD across a tile's columns, no reassociation), a
// slice of rows that fits the L1 cache at a time. The partials of a job are summed in block
// order in fp64 (for_blocks_in_order), so the result does not depend on the thread count.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "gradgeom/lora_gram_plan.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define GG_LORA_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define GG_LORA_SIMD_CLONES
#endif

namespace gradgeom::cpu_gram {

constexpr int64_t kRows = 256;  // rows per parallel block
constexpr int kTileRows = 8;    // register tile of a block's product: kTileRows x kTileCols entries
constexpr int kTileCols = 16;
constexpr int64_t kSliceBytes = 16 << 10;  // rows of the block buffers walked per pass over the tiles

// kTileCols lanes of Acc (GCC/Clang vector extension: one zmm of floats, two of doubles).
typedef float FloatLanes __attribute__((vector_size(kTileCols * sizeof(float))));
typedef double DoubleLanes __attribute__((vector_size(kTileCols * sizeof(double))));

template <typename Acc, typename Src>
inline Acc widen(Src v) {
  return static_cast<Acc>(static_cast<float>(v));
}
template <>
inline double widen<double, double>(double v) {
  return v;
}

inline int64_t padded_cols(int64_t cols) { return (cols + kTileCols - 1) / kTileCols * kTileCols; }

// Rows of block buffers with `width` columns in all that fill about kSliceBytes (the part kept in L1).
template <typename Acc>
inline int64_t slice_rows(int64_t width) {
  return std::max<int64_t>(8, kSliceBytes / (std::max<int64_t>(width, 1) * static_cast<int64_t>(sizeof(Acc))));
}

// xt[t * rp + c] = X[row0 + t, c] for t < rows, c < job.cols (the other columns of xt are not written).
template <typename Acc, typename Src>
void gather(const GramJob& job, int64_t row0, int64_t rows, int64_t rp, Acc* xt) {
  const Src* base = static_cast<const Src*>(job.data);
  const int64_t r = job.cols, rs = job.row_stride, cs = job.col_stride;
  if (rs == 1 && cs != 1) {  // X = Aᵀ of a row-major A: walk along A's rows, for a slice of xt at a time
    const int64_t slice = slice_rows<Acc>(rp);
    for (int64_t t0 = 0; t0 < rows; t0 += slice) {
      const int64_t t1 = std::min(rows, t0 + slice);
      for (int64_t c = 0; c < r; ++c) {
        const Src* col = base + c * cs + row0;
        for (int64_t t = t0; t < t1; ++t) xt[t * rp + c] = widen<Acc, Src>(col[t]);
      }
    }
  } else {
    for (int64_t t = 0; t < rows; ++t) {
      const Src* row = base + (row0 + t) * rs;
      for (int64_t c = 0; c < r; ++c) xt[t * rp + c] = widen<Acc, Src>(row[c * cs]);
    }
  }
}

// gather for the job's own element type.
template <typename Acc>
void gather_any(const GramJob& job, int64_t row0, int64_t rows, int64_t rp, Acc* xt) {
  switch (job.type) {
    case ElemType::kFloat32: gather<Acc, float>(job, row0, rows, rp, xt); break;
    case ElemType::kFloat64: gather<Acc, double>(job, row0, rows, rp, xt); break;
    case ElemType::kFloat16: gather<Acc, c10::Half>(job, row0, rows, rp, xt); break;
    case ElemType::kBFloat16: gather<Acc, c10::BFloat16>(job, row0, rows, rp, xt); break;
  }
}

// out[(i0 + a) * ldo + j0 + c] over a < kTileRows, c < kPanels * kTileCols: Σ_t x[t][i0 + a]·y[t][j0 + c]
// over rows [t0, t1) of x (row stride xs) and y (row stride ys), starting from zero (t0 == 0) or
// from what out holds. x and y may be the same buffer.
template <int kPanels, typename Acc, typename Lanes>
__attribute__((always_inline)) inline void tile_products(const Acc* __restrict x, int64_t xs, const Acc* __restrict y,
                                                         int64_t ys, int64_t t0, int64_t t1, int64_t i0, int64_t j0,
                                                         Acc* __restrict out, int64_t ldo) {
  Lanes acc[kPanels][kTileRows] = {};
  if (t0 > 0)
    for (int p = 0; p < kPanels; ++p)
      for (int a = 0; a < kTileRows; ++a)
        std::memcpy(&acc[p][a], out + (i0 + a) * ldo + j0 + p * kTileCols, sizeof(Lanes));
#pragma GCC unroll 4
  for (int64_t t = t0; t < t1; ++t) {
    const Acc* xr = x + t * xs;
    Lanes v[kPanels];
    for (int p = 0; p < kPanels; ++p) std::memcpy(&v[p], y + t * ys + j0 + p * kTileCols, sizeof(Lanes));
    for (int a = 0; a < kTileRows; ++a) {
      if constexpr (kPanels == 1) {
        acc[0][a] += xr[i0 + a] * v[0];  // the broadcast stays a memory operand of the FMA
      } else {
        const Acc xa = xr[i0 + a];
        for (int p = 0; p < kPanels; ++p) acc[p][a] += xa * v[p];
      }
    }
  }
  for (int p = 0; p < kPanels; ++p)
    for (int a = 0; a < kTileRows; ++a)
      std::memcpy(out + (i0 + a) * ldo + j0 + p * kTileCols, &acc[p][a], sizeof(Lanes));
}

// The tiles of row band i0 (kTileRows rows of out) from column j_begin to yp (a multiple of
// kTileCols), two side by side where they fit, so one loaded value of x feeds 2 x kTileCols products.
template <typename Acc, typename Lanes>
__attribute__((always_inline)) inline void band_products(const Acc* __restrict x, int64_t xs, const Acc* __restrict y,
                                                         int64_t yp, int64_t t0, int64_t t1, int64_t i0,
                                                         int64_t j_begin, Acc* __restrict out) {
  int64_t j0 = j_begin;
  for (; j0 + 2 * kTileCols <= yp; j0 += 2 * kTileCols)
    tile_products<2, Acc, Lanes>(x, xs, y, yp, t0, t1, i0, j0, out, yp);
  if (j0 < yp) tile_products<1, Acc, Lanes>(x, xs, y, yp, t0, t1, i0, j0, out, yp);
}

// A thread's block buffer for one accumulation type, kept from block to block: xt is zeroed
// only when the column count changes (gather writes the same columns of every block; rows past a
// short block's end are never read).
template <typename Acc>
struct BlockBuffer {
  int64_t cols = -1;
  int64_t rp = 0;
  std::vector<Acc> xt;  // [kRows, rp] row-major

  void fit(int64_t c) {
    if (c == cols) return;
    cols = c;
    rp = padded_cols(c);
    xt.assign(kRows * rp, Acc(0));
  }
};

// Calls block(j, row_begin, row_end, partial, buffers) for the row blocks (kRows) of jobs
// 0 <= j < num_jobs (rows_of(j) rows; partials of partial_size(j) doubles; buffers: a Buffers
// kept per thread) and add(j, partial) on each block's partial, in block order within a job:
// whole jobs per thread when there are at least two a thread, else the blocks in parallel and
// their partials added in order afterwards. The same additions in the same order either way.
template <typename Buffers, typename RowsOf, typename SizeOf, typename Block, typename Add>
void for_blocks_in_order(int64_t num_jobs, const RowsOf& rows_of, const SizeOf& partial_size, const Block& block,
                         const Add& add) {
  if (num_jobs >= 2 * at::get_num_threads()) {
    at::parallel_for(0, num_jobs, 1, [&](int64_t first, int64_t last) {
      Buffers buffers;
      std::vector<double> partial;
      for (int64_t j = first; j < last; ++j) {
        const int64_t rows = rows_of(j);
        partial.resize(partial_size(j));
        for (int64_t b = 0; b < rows; b += kRows) {
          block(j, b, std::min(rows, b + kRows), partial.data(), buffers);
          add(j, partial.data());
        }
      }
    });
    return;
  }
  struct Span {
    int64_t job, row_begin, row_end, offset;
  };
  std::vector<Span> spans;
  int64_t total = 0;
  for (int64_t j = 0; j < num_jobs; ++j) {
    const int64_t rows = rows_of(j);
    for (int64_t b = 0; b < rows; b += kRows) {
      spans.push_back({j, b, std::min(rows, b + kRows), total});
      total += partial_size(j);
    }
  }
  std::vector<double> partials(total);
  at::parallel_for(0, static_cast<int64_t>(spans.size()), 1, [&](int64_t first, int64_t last) {
    Buffers buffers;
    for (int64_t i = first; i < last; ++i) {
      const Span& s = spans[i];
      block(s.job, s.row_begin, s.row_end, partials.data() + s.offset, buffers);
    }
  });
  for (const Span& s : spans) add(s.job, partials.data() + s.offset);
}

}  // namespace gradgeom::cpu_gram
