// lora_gram on the CPU. Each Gram job XᵀX (see lora_gram_plan.h) is cut into blocks of kRows
// rows; blocks run in parallel (at::parallel_for). A block gathers its rows column by column into
// a small column-major buffer (widened to fp32, fp64 for fp64 input; walking memory in the
// order the strides favour), then each 2 x 2 tile on or above the diagonal of its r x r partial
// is four dot products of buffer columns, summed in kLanes fixed lanes (SIMD without
// reassociation flags). The partials of a job are summed in block order in fp64, so the result does not
// depend on the thread count.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "gradgeom/lora_gram_plan.h"

namespace gradgeom {
namespace {

constexpr int64_t kRows = 256;  // rows per parallel block (a multiple of kLanes)
constexpr int kLanes = 16;

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

// xt[c * kRows + t] = X[row0 + t, c] for t < rows (zero up to kRows).
template <typename Acc, typename Src>
void gather(const GramJob& job, int64_t row0, int64_t rows, Acc* xt) {
  const Src* base = static_cast<const Src*>(job.data);
  const int64_t r = job.cols, rs = job.row_stride, cs = job.col_stride;
  if (rs == 1 && cs != 1) {  // X = Aᵀ of a row-major A: walk along A's rows
    for (int64_t c = 0; c < r; ++c) {
      const Src* col = base + c * cs + row0;
      for (int64_t t = 0; t < rows; ++t) xt[c * kRows + t] = widen<Acc, Src>(col[t]);
    }
  } else {
    for (int64_t t = 0; t < rows; ++t) {
      const Src* row = base + (row0 + t) * rs;
      for (int64_t c = 0; c < r; ++c) xt[c * kRows + t] = widen<Acc, Src>(row[c * cs]);
    }
  }
  for (int64_t c = 0; c < r; ++c)
    for (int64_t t = rows; t < kRows; ++t) xt[c * kRows + t] = Acc(0);
}

// out[i * r2 + j] (j >= i, even r2) = dot of buffer columns i and j, in 2 x 2 tiles: each loaded
// column feeds two products. One call per block, so the SIMD dispatch costs nothing per entry.
template <typename Acc>
__attribute__((always_inline)) inline void block_products_impl(const Acc* __restrict xt, int64_t r2,
                                                               Acc* __restrict out) {
  for (int64_t i0 = 0; i0 < r2; i0 += 2) {
    const Acc* x0 = xt + i0 * kRows;
    const Acc* x1 = x0 + kRows;
    for (int64_t j0 = i0; j0 < r2; j0 += 2) {
      const Acc* y0 = xt + j0 * kRows;
      const Acc* y1 = y0 + kRows;
      Acc a00[kLanes] = {}, a01[kLanes] = {}, a10[kLanes] = {}, a11[kLanes] = {};
      for (int64_t t = 0; t < kRows; t += kLanes) {
        for (int l = 0; l < kLanes; ++l) {
          const Acc u0 = x0[t + l], u1 = x1[t + l], v0 = y0[t + l], v1 = y1[t + l];
          a00[l] += u0 * v0;
          a01[l] += u0 * v1;
          a10[l] += u1 * v0;
          a11[l] += u1 * v1;
        }
      }
      Acc s00 = 0, s01 = 0, s10 = 0, s11 = 0;
      for (int l = 0; l < kLanes; ++l) {
        s00 += a00[l];
        s01 += a01[l];
        s10 += a10[l];
        s11 += a11[l];
      }
      out[i0 * r2 + j0] = s00;
      out[i0 * r2 + j0 + 1] = s01;
      out[(i0 + 1) * r2 + j0] = s10;
      out[(i0 + 1) * r2 + j0 + 1] = s11;
    }
  }
}

GG_LORA_SIMD_CLONES void block_products(const float* xt, int64_t r2, float* out) {
  block_products_impl<float>(xt, r2, out);
}
GG_LORA_SIMD_CLONES void block_products(const double* xt, int64_t r2, double* out) {
  block_products_impl<double>(xt, r2, out);
}

template <typename Acc, typename Src>
void block_gram(const GramJob& job, int64_t row_begin, int64_t row_end, double* partial) {
  const int64_t r = job.cols;
  const int64_t r2 = (r + 1) / 2 * 2;
  std::vector<Acc> xt(r2 * kRows, Acc(0));
  std::vector<Acc> out(r2 * r2);
  gather<Acc, Src>(job, row_begin, row_end - row_begin, xt.data());
  block_products(xt.data(), r2, out.data());
  for (int64_t i = 0; i < r; ++i)
    for (int64_t j = i; j < r; ++j) partial[i * r + j] = static_cast<double>(out[i * r2 + j]);
}

void run_block(const GramJob& job, int64_t row_begin, int64_t row_end, double* partial) {
  switch (job.type) {
    case ElemType::kFloat32: block_gram<float, float>(job, row_begin, row_end, partial); break;
    case ElemType::kFloat64: block_gram<double, double>(job, row_begin, row_end, partial); break;
    case ElemType::kFloat16: block_gram<float, c10::Half>(job, row_begin, row_end, partial); break;
    case ElemType::kBFloat16: block_gram<float, c10::BFloat16>(job, row_begin, row_end, partial); break;
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

  struct Block {
    int64_t job, row_begin, row_end, offset;
  };
  std::vector<Block> blocks;
  int64_t total = 0;
  for (int64_t j = 0; j < static_cast<int64_t>(plan.jobs.size()); ++j) {
    const GramJob& job = plan.jobs[j];
    for (int64_t b = 0; b < job.rows; b += kRows) {
      blocks.push_back({j, b, std::min(job.rows, b + kRows), total});
      total += job.cols * job.cols;
    }
  }
  std::vector<double> partials(total);
  at::parallel_for(0, static_cast<int64_t>(blocks.size()), 1, [&](int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i) {
      const Block& b = blocks[i];
      run_block(plan.jobs[b.job], b.row_begin, b.row_end, partials.data() + b.offset);
    }
  });

  double* out_b = gb.data_ptr<double>();
  double* out_a = ga.data_ptr<double>();
  for (const Block& b : blocks) {
    const GramJob& job = plan.jobs[b.job];
    const int64_t r = job.cols;
    double* out = (b.job % 2 == 0 ? out_b : out_a) + (b.job / 2) * R * R;
    const double* p = partials.data() + b.offset;
    for (int64_t i = 0; i < r; ++i)
      for (int64_t j = i; j < r; ++j) out[i * R + j] += p[i * r + j];
  }
  for (int64_t a = 0; a < n; ++a) {
    for (double* out : {out_b + a * R * R, out_a + a * R * R})
      for (int64_t i = 0; i < R; ++i)
        for (int64_t j = 0; j < i; ++j) out[i * R + j] = out[j * R + i];
  }
  return {gb, ga};
}

}  // namespace

TORCH_LIBRARY_IMPL(gradgeom, CPU, m) {
  m.impl("lora_gram", &lora_gram_cpu);
}

}  // namespace gradgeom
