// lora_gram on the CPU. Each Gram job XᵀX (see lora_gram_plan.h) is cut into blocks of kRows
// rows; blocks run in parallel (at::parallel_for), each accumulating the upper triangle of its
// r x r partial in fp32 (fp64 for fp64 input) from rows widened into a small fp32 buffer. The
// partials of a job are then summed in block order in fp64, so the result does not depend on
// the thread count.
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

constexpr int64_t kRows = 256;  // rows per parallel block
constexpr int64_t kGroup = 4;   // rows folded into one pass over the triangle

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define GG_LORA_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define GG_LORA_SIMD_CLONES
#endif

template <typename Acc>
inline Acc load_as(const GramJob& job, int64_t row, int64_t col) {
  const int64_t off = row * job.row_stride + col * job.col_stride;
  switch (job.type) {
    case ElemType::kFloat32: return static_cast<Acc>(static_cast<const float*>(job.data)[off]);
    case ElemType::kFloat64: return static_cast<Acc>(static_cast<const double*>(job.data)[off]);
    case ElemType::kFloat16: return static_cast<Acc>(static_cast<float>(static_cast<const c10::Half*>(job.data)[off]));
    case ElemType::kBFloat16:
      return static_cast<Acc>(static_cast<float>(static_cast<const c10::BFloat16*>(job.data)[off]));
  }
  return Acc(0);
}

// acc[i*r + j] += sum_t x[t*r + i] * x[t*r + j] for j >= i, over `rows` (<= kGroup) rows of x.
template <typename Acc>
__attribute__((always_inline)) inline void rank_update_impl(Acc* __restrict acc, const Acc* __restrict x, int64_t r,
                                                            int64_t rows) {
  const Acc* x0 = x;
  const Acc* x1 = x + r;
  const Acc* x2 = x + 2 * r;
  const Acc* x3 = x + 3 * r;
  for (int64_t i = 0; i < r; ++i) {
    Acc* row = acc + i * r;
    if (rows == kGroup) {
      const Acc a0 = x0[i], a1 = x1[i], a2 = x2[i], a3 = x3[i];
      for (int64_t j = i; j < r; ++j) row[j] += a0 * x0[j] + a1 * x1[j] + a2 * x2[j] + a3 * x3[j];
    } else {
      for (int64_t t = 0; t < rows; ++t) {
        const Acc* xt = x + t * r;
        const Acc a = xt[i];
        for (int64_t j = i; j < r; ++j) row[j] += a * xt[j];
      }
    }
  }
}

GG_LORA_SIMD_CLONES void rank_update(float* acc, const float* x, int64_t r, int64_t rows) {
  rank_update_impl<float>(acc, x, r, rows);
}

GG_LORA_SIMD_CLONES void rank_update(double* acc, const double* x, int64_t r, int64_t rows) {
  rank_update_impl<double>(acc, x, r, rows);
}

template <typename Acc>
void block_gram(const GramJob& job, int64_t row_begin, int64_t row_end, double* partial) {
  const int64_t r = job.cols;
  std::vector<Acc> acc(r * r, Acc(0));
  std::vector<Acc> x(kGroup * r);
  for (int64_t row = row_begin; row < row_end; row += kGroup) {
    const int64_t rows = std::min(kGroup, row_end - row);
    for (int64_t t = 0; t < rows; ++t)
      for (int64_t c = 0; c < r; ++c) x[t * r + c] = load_as<Acc>(job, row + t, c);
    rank_update(acc.data(), x.data(), r, rows);
  }
  for (int64_t i = 0; i < r * r; ++i) partial[i] = static_cast<double>(acc[i]);
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
      const GramJob& job = plan.jobs[b.job];
      if (job.type == ElemType::kFloat64)
        block_gram<double>(job, b.row_begin, b.row_end, partials.data() + b.offset);
      else
        block_gram<float>(job, b.row_begin, b.row_end, partials.data() + b.offset);
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
