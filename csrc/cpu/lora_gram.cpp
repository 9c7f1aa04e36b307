// lora_gram on the CPU. Each Gram job XᵀX (see lora_gram_plan.h) is cut into blocks of kRows
// rows; whole jobs run in parallel (at::parallel_for) when there are at least two per thread,
// else their blocks do. A block gathers its rows into a small row-major buffer (widened to fp32,
// fp64 for fp64 input; walking memory in the order the strides favour, columns zero-padded to a
// multiple of kTileCols; the buffers are kept by the thread from block to block), then
// accumulates each register tile on or above the diagonal of its r x r partial over the rows in
// order, as outer products (SIMD across the tile's columns, no reassociation), a slice of rows
// that fits the L1 cache at a time. The partials of a job are summed in block order in fp64, so
// the result does not depend on the thread count.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <tuple>
#include <vector>

#include "gradgeom/lora_gram_plan.h"

namespace gradgeom {
namespace {

constexpr int64_t kRows = 256;  // rows per parallel block
constexpr int kTileRows = 8;    // register tile of a block's Gram: kTileRows x kTileCols entries
constexpr int kTileCols = 16;
constexpr int64_t kSliceBytes = 16 << 10;  // rows of the block buffer walked per pass over the tiles

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define GG_LORA_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define GG_LORA_SIMD_CLONES
#endif

template <typename Acc, typename Src>
inline Acc widen(Src v) {
  return static_cast<Acc>(static_cast<float>(v));
}
template <>
inline double widen<double, double>(double v) {
  return v;
}

// Rows of a block buffer with rp columns that fill about kSliceBytes (the part kept in L1).
template <typename Acc>
inline int64_t slice_rows(int64_t rp) {
  return std::max<int64_t>(8, kSliceBytes / (std::max<int64_t>(rp, 1) * static_cast<int64_t>(sizeof(Acc))));
}

// xt[t * rp + c] = X[row0 + t, c] for t < rows, c < r (the other columns of xt stay zero).
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

// kTileCols lanes of Acc (GCC/Clang vector extension: one zmm of floats, two of doubles).
typedef float FloatLanes __attribute__((vector_size(kTileCols * sizeof(float))));
typedef double DoubleLanes __attribute__((vector_size(kTileCols * sizeof(double))));

// kTileRows x (kPanels * kTileCols) entries of out from rows [t0, t1) of xt, starting from zero
// (t0 == 0) or from what out holds.
template <int kPanels, typename Acc, typename Lanes>
__attribute__((always_inline)) inline void tile_products(const Acc* __restrict xt, int64_t t0, int64_t t1,
                                                         int64_t rp, int64_t i0, int64_t j0, Acc* __restrict out) {
  Lanes acc[kPanels][kTileRows] = {};
  if (t0 > 0)
    for (int p = 0; p < kPanels; ++p)
      for (int a = 0; a < kTileRows; ++a)
        std::memcpy(&acc[p][a], out + (i0 + a) * rp + j0 + p * kTileCols, sizeof(Lanes));
#pragma GCC unroll 4
  for (int64_t t = t0; t < t1; ++t) {
    const Acc* x = xt + t * rp;
    Lanes v[kPanels];
    for (int p = 0; p < kPanels; ++p) std::memcpy(&v[p], x + j0 + p * kTileCols, sizeof(Lanes));
    for (int a = 0; a < kTileRows; ++a) {
      if constexpr (kPanels == 1) {
        acc[0][a] += x[i0 + a] * v[0];  // the broadcast stays a memory operand of the FMA
      } else {
        const Acc xa = x[i0 + a];
        for (int p = 0; p < kPanels; ++p) acc[p][a] += xa * v[p];
      }
    }
  }
  for (int p = 0; p < kPanels; ++p)
    for (int a = 0; a < kTileRows; ++a)
      std::memcpy(out + (i0 + a) * rp + j0 + p * kTileCols, &acc[p][a], sizeof(Lanes));
}

// out[i * rp + j] = Σ_t xt[t][i]·xt[t][j] over the block's rows t < rows, in row order, for i < r
// (rounded up to kTileRows) in the kTileRows x kTileCols tiles that reach the diagonal or lie
// above it: outer products of each row with itself, two tiles side by side where they fit, so
// one loaded value of a row feeds 2 x kTileCols products. The rows go in slices of about
// kSliceBytes, each slice through every tile while it sits in L1 (a tile's sums wait in out
// between slices: the same operations in the same order as one pass). One call per block, so the
// SIMD dispatch costs nothing per entry.
template <typename Acc, typename Lanes>
__attribute__((always_inline)) inline void block_products_impl(const Acc* __restrict xt, int64_t rows, int64_t r,
                                                               int64_t rp, Acc* __restrict out) {
  const int64_t slice = slice_rows<Acc>(rp);
  for (int64_t t0 = 0; t0 < rows; t0 += slice) {
    const int64_t t1 = std::min(rows, t0 + slice);
    for (int64_t i0 = 0; i0 < r; i0 += kTileRows) {
      int64_t j0 = i0 / kTileCols * kTileCols;
      for (; j0 + 2 * kTileCols <= rp; j0 += 2 * kTileCols) tile_products<2, Acc, Lanes>(xt, t0, t1, rp, i0, j0, out);
      if (j0 < rp) tile_products<1, Acc, Lanes>(xt, t0, t1, rp, i0, j0, out);
    }
  }
}

GG_LORA_SIMD_CLONES void block_products(const float* xt, int64_t rows, int64_t r, int64_t rp, float* out) {
  block_products_impl<float, FloatLanes>(xt, rows, r, rp, out);
}
GG_LORA_SIMD_CLONES void block_products(const double* xt, int64_t rows, int64_t r, int64_t rp, double* out) {
  block_products_impl<double, DoubleLanes>(xt, rows, r, rp, out);
}

// A thread's block buffers for one accumulation type, kept from block to block: xt is zeroed
// only when r changes (gather writes the same columns of every block; rows past a short block's
// end are never read).
template <typename Acc>
struct BlockBuffers {
  int64_t r = -1;
  int64_t rp = 0;
  std::vector<Acc> xt;   // [kRows, rp] row-major
  std::vector<Acc> out;  // [rp, rp]

  void fit(int64_t cols) {
    if (cols == r) return;
    r = cols;
    rp = (r + kTileCols - 1) / kTileCols * kTileCols;
    xt.assign(kRows * rp, Acc(0));
    out.resize(rp * rp);
  }
};

struct ThreadBuffers {
  BlockBuffers<float> f32;
  BlockBuffers<double> f64;
};

template <typename Acc, typename Src>
void block_gram(const GramJob& job, int64_t row_begin, int64_t row_end, double* partial, BlockBuffers<Acc>& buf) {
  const int64_t r = job.cols;
  buf.fit(r);
  const int64_t rows = row_end - row_begin;
  gather<Acc, Src>(job, row_begin, rows, buf.rp, buf.xt.data());
  block_products(buf.xt.data(), rows, r, buf.rp, buf.out.data());
  for (int64_t i = 0; i < r; ++i)
    for (int64_t j = i; j < r; ++j) partial[i * r + j] = static_cast<double>(buf.out[i * buf.rp + j]);
}

void run_block(const GramJob& job, int64_t row_begin, int64_t row_end, double* partial, ThreadBuffers& bufs) {
  switch (job.type) {
    case ElemType::kFloat32: block_gram<float, float>(job, row_begin, row_end, partial, bufs.f32); break;
    case ElemType::kFloat64: block_gram<double, double>(job, row_begin, row_end, partial, bufs.f64); break;
    case ElemType::kFloat16: block_gram<float, c10::Half>(job, row_begin, row_end, partial, bufs.f32); break;
    case ElemType::kBFloat16: block_gram<float, c10::BFloat16>(job, row_begin, row_end, partial, bufs.f32); break;
  }
}

std::tuple<at::Tensor, at::Tensor> lora_gram_cpu(at::TensorList Bs, at::TensorList As) {
  const LoraGramPlan plan = make_lora_gram_plan(Bs, As);
  const int64_t n = plan.num_adapters;
  const int64_t R = plan.max_rank;
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  at::Tensor gb = at::zeros({n, R, R}, opts);
  at::Tensor ga = at::zeros({n, R, R}, opts);
  if (n == 0 || R == 0) return {gb, ga};

  double* out_b = gb.data_ptr<double>();
  double* out_a = ga.data_ptr<double>();
  const int64_t num_jobs = static_cast<int64_t>(plan.jobs.size());
  auto job_out = [&](int64_t j) { return (j % 2 == 0 ? out_b : out_a) + (j / 2) * R * R; };
  // Adds block partial p (r x r, upper triangle) of job j to its output, in fp64.
  auto add_partial = [&](int64_t j, const double* p) {
    const int64_t r = plan.jobs[j].cols;
    double* out = job_out(j);
    for (int64_t i = 0; i < r; ++i)
      for (int64_t k = i; k < r; ++k) out[i * R + k] += p[i * r + k];
  };
  if (num_jobs >= 2 * at::get_num_threads()) {
    // Enough jobs to share out: each thread runs whole jobs, adding their blocks in order.
    at::parallel_for(0, num_jobs, 1, [&](int64_t first, int64_t last) {
      ThreadBuffers bufs;
      std::vector<double> partial;
      for (int64_t j = first; j < last; ++j) {
        const GramJob& job = plan.jobs[j];
        partial.resize(job.cols * job.cols);
        for (int64_t b = 0; b < job.rows; b += kRows) {
          run_block(job, b, std::min(job.rows, b + kRows), partial.data(), bufs);
          add_partial(j, partial.data());
        }
      }
    });
  } else {
    // Few jobs: blocks run in parallel, then their partials are added in block order.
    struct Block {
      int64_t job, row_begin, row_end, offset;
    };
    std::vector<Block> blocks;
    int64_t total = 0;
    for (int64_t j = 0; j < num_jobs; ++j) {
      const GramJob& job = plan.jobs[j];
      for (int64_t b = 0; b < job.rows; b += kRows) {
        blocks.push_back({j, b, std::min(job.rows, b + kRows), total});
        total += job.cols * job.cols;
      }
    }
    std::vector<double> partials(total);
    at::parallel_for(0, static_cast<int64_t>(blocks.size()), 1, [&](int64_t first, int64_t last) {
      ThreadBuffers bufs;
      for (int64_t i = first; i < last; ++i) {
        const Block& b = blocks[i];
        run_block(plan.jobs[b.job], b.row_begin, b.row_end, partials.data() + b.offset, bufs);
      }
    });
    for (const Block& b : blocks) add_partial(b.job, partials.data() + b.offset);
  }
  for (int64_t a = 0; a < n; ++a) {
    for (double* out : {out_b + a * R * R, out_a + a * R * R})
      for (int64_t i = 0; i < R; ++i)
        for (int64_t j = 0; j < i; ++j) out[i * R + j] = out[j * R + i];
  }
  return {gb, ga};
}

// Per pair of symmetric matrices, their lower triangles: row by row, the products below the
// diagonal in four interleaved fp64 partials (column index mod 4), the diagonal in a fifth; then
// 2·((p0 + p1) + (p2 + p3)) + diagonal. The same bits for any thread count.
at::Tensor gram_fro_cpu(const at::Tensor& gb, const at::Tensor& ga) {
  check_gram_pair("gram_fro", gb, ga);
  const at::Tensor x = gb.contiguous(), y = ga.contiguous();
  const int64_t n = x.size(0), R = x.size(1);
  at::Tensor out = at::empty({n}, x.options());
  const double* px = x.data_ptr<double>();
  const double* py = y.data_ptr<double>();
  double* po = out.data_ptr<double>();
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(R * R, 1));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      double acc[4] = {0.0, 0.0, 0.0, 0.0};
      double diag = 0.0;
      for (int64_t i = 0; i < R; ++i) {
        const double* u = px + (b * R + i) * R;
        const double* v = py + (b * R + i) * R;
        for (int64_t j = 0; j < i; ++j) acc[j & 3] += u[j] * v[j];
        diag += u[i] * v[i];
      }
      const double s = 2.0 * ((acc[0] + acc[1]) + (acc[2] + acc[3])) + diag;
      po[b] = std::sqrt(s < 0.0 ? 0.0 : s);  // NaN stays NaN
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(gradgeom, CPU, m) {
  m.impl("lora_gram", &lora_gram_cpu);
  m.impl("gram_fro", &gram_fro_cpu);
}

}  // namespace gradgeom
