// lora_gram on the CPU: each Gram job XᵀX (see lora_gram_plan.h) in blocks of rows
// (cpu_gram_blocks.h), widened to fp32 (fp64 for fp64 input); a block accumulates the register
// tiles that reach its r x r partial's diagonal or lie above it.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "gradgeom/cpu_gram_blocks.h"
#include "gradgeom/lora_gram_plan.h"

namespace gradgeom {
namespace {

using namespace cpu_gram;

// out[i * rp + j] = Σ_t xt[t][i]·xt[t][j] over the block's rows t < rows, in row order, for i < r
// (rounded up to kTileRows) in the tiles that reach the diagonal or lie above it. The rows go in
// slices of about kSliceBytes, each slice through every tile while it sits in L1 (a tile's sums
// wait in out between slices: the same operations in the same order as one pass). One call per
// block, so the SIMD dispatch costs nothing per entry.
template <typename Acc, typename Lanes>
__attribute__((always_inline)) inline void block_products_impl(const Acc* __restrict xt, int64_t rows, int64_t r,
                                                               int64_t rp, Acc* __restrict out) {
  const int64_t slice = slice_rows<Acc>(rp);
  for (int64_t t0 = 0; t0 < rows; t0 += slice) {
    const int64_t t1 = std::min(rows, t0 + slice);
    for (int64_t i0 = 0; i0 < r; i0 += kTileRows)
      band_products<Acc, Lanes>(xt, rp, xt, rp, t0, t1, i0, i0 / kTileCols * kTileCols, out);
  }
}

GG_LORA_SIMD_CLONES void block_products(const float* xt, int64_t rows, int64_t r, int64_t rp, float* out) {
  block_products_impl<float, FloatLanes>(xt, rows, r, rp, out);
}
GG_LORA_SIMD_CLONES void block_products(const double* xt, int64_t rows, int64_t r, int64_t rp, double* out) {
  block_products_impl<double, DoubleLanes>(xt, rows, r, rp, out);
}

template <typename Acc>
struct GramBuffer {
  BlockBuffer<Acc> in;
  std::vector<Acc> out;  // [rp, rp]
};

struct ThreadBuffers {
  GramBuffer<float> f32;
  GramBuffer<double> f64;
};

// The upper triangle of the block's r x r partial, row-major, into partial.
template <typename Acc>
void block_gram(const GramJob& job, int64_t row_begin, int64_t row_end, double* partial, GramBuffer<Acc>& buf) {
  const int64_t r = job.cols;
  buf.in.fit(r);
  const int64_t rp = buf.in.rp;
  buf.out.resize(rp * rp);
  const int64_t rows = row_end - row_begin;
  gather_any<Acc>(job, row_begin, rows, rp, buf.in.xt.data());
  block_products(buf.in.xt.data(), rows, r, rp, buf.out.data());
  for (int64_t i = 0; i < r; ++i)
    for (int64_t j = i; j < r; ++j) partial[i * r + j] = static_cast<double>(buf.out[i * rp + j]);
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
  auto job_out = [&](int64_t j) { return (j % 2 == 0 ? out_b : out_a) + (j / 2) * R * R; };
  for_blocks_in_order<ThreadBuffers>(
      static_cast<int64_t>(plan.jobs.size()), [&](int64_t j) { return plan.jobs[j].rows; },
      [&](int64_t j) { return plan.jobs[j].cols * plan.jobs[j].cols; },
      [&](int64_t j, int64_t row_begin, int64_t row_end, double* partial, ThreadBuffers& bufs) {
        const GramJob& job = plan.jobs[j];
        if (job.type == ElemType::kFloat64)
          block_gram<double>(job, row_begin, row_end, partial, bufs.f64);
        else
          block_gram<float>(job, row_begin, row_end, partial, bufs.f32);
      },
      [&](int64_t j, const double* p) {  // the block's upper triangle into job j's output, in fp64
        const int64_t r = plan.jobs[j].cols;
        double* out = job_out(j);
        for (int64_t i = 0; i < r; ++i)
          for (int64_t k = i; k < r; ++k) out[i * R + k] += p[i * r + k];
      });
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
