// lora_cross_gram on the CPU: B1ᵢᵀ·B2ᵢ of every pair read in place (any strides and dtypes), in
// blocks of rows (cpu_gram_blocks.h) widened to fp64, products and sums in fp64 as on CUDA
// (csrc/cuda/lora_cross_gram.cu). No stacked or widened copy of the factors.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <vector>

#include "gradgeom/cpu_gram_blocks.h"
#include "gradgeom/lora_gram_plan.h"

namespace gradgeom {
namespace {

using namespace cpu_gram;

// out[i * yp + j] = Σ_t x[t][i]·y[t][j] over the block's rows t < rows, in row order, for i < p
// (rounded up to kTileRows) and j < yp, a slice of rows that fits L1 at a time.
GG_LORA_SIMD_CLONES void cross_block_products(const double* x, int64_t xp, const double* y, int64_t yp, int64_t rows,
                                              int64_t p, double* out) {
  const int64_t slice = slice_rows<double>(xp + yp);
  for (int64_t t0 = 0; t0 < rows; t0 += slice) {
    const int64_t t1 = std::min(rows, t0 + slice);
    for (int64_t i0 = 0; i0 < p; i0 += kTileRows)
      band_products<double, DoubleLanes>(x, xp, y, yp, t0, t1, i0, 0, out);
  }
}

struct CrossBuffers {
  BlockBuffer<double> left, right;
  std::vector<double> out;  // [left.rp, right.rp]
};

at::Tensor lora_cross_gram_cpu(at::TensorList B1s, at::TensorList B2s) {
  const CrossGramPlan plan = make_cross_gram_plan(B1s, B2s);
  const int64_t n = static_cast<int64_t>(B1s.size());
  const int64_t R = plan.max_rank;
  at::Tensor out = at::zeros({n, R, R}, at::TensorOptions().dtype(at::kDouble));
  if (n == 0 || R == 0) return out;
  double* po = out.data_ptr<double>();
  for_blocks_in_order<CrossBuffers>(
      n,
      [&](int64_t i) {  // an empty product has no blocks
        return plan.left[i].cols > 0 && plan.right[i].cols > 0 ? plan.left[i].rows : int64_t(0);
      },
      [&](int64_t i) { return plan.left[i].cols * plan.right[i].cols; },
      [&](int64_t i, int64_t row_begin, int64_t row_end, double* partial, CrossBuffers& bufs) {
        const GramJob &x = plan.left[i], &y = plan.right[i];
        bufs.left.fit(x.cols);
        bufs.right.fit(y.cols);
        const int64_t xp = bufs.left.rp, yp = bufs.right.rp, rows = row_end - row_begin;
        bufs.out.resize(xp * yp);
        gather_any<double>(x, row_begin, rows, xp, bufs.left.xt.data());
        gather_any<double>(y, row_begin, rows, yp, bufs.right.xt.data());
        cross_block_products(bufs.left.xt.data(), xp, bufs.right.xt.data(), yp, rows, x.cols, bufs.out.data());
        for (int64_t a = 0; a < x.cols; ++a)
          for (int64_t b = 0; b < y.cols; ++b) partial[a * y.cols + b] = bufs.out[a * yp + b];
      },
      [&](int64_t i, const double* partial) {
        const int64_t p = plan.left[i].cols, q = plan.right[i].cols;
        double* o = po + i * R * R;
        for (int64_t a = 0; a < p; ++a)
          for (int64_t b = 0; b < q; ++b) o[a * R + b] += partial[a * q + b];
      });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(gradgeom, CPU, m) { m.impl("lora_cross_gram", &lora_cross_gram_cpu); }

}  // namespace gradgeom
