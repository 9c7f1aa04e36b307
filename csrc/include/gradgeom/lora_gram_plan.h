// Host-side plan shared by the CPU and CUDA lora_gram kernels.
//
// Adapter i has B_i [d_i, r_i] and A_i [r_i, k_i]. The op needs two r_i x r_i Gram matrices,
// B_iᵀB_i and A_i·A_iᵀ = (A_iᵀ)ᵀ(A_iᵀ). Both are "column Grams" XᵀX of a strided matrix X [m, r]
// whose element (row, col) sits at data + row * row_stride + col * col_stride: X = B_i, or
// X = A_iᵀ read through swapped strides. So any 2-D view (transposed, sliced, expanded) is read
// in place, without a contiguous copy. Job 2i is B_i, job 2i+1 is A_iᵀ.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "gradgeom/tensor_list_plan.h"
#include "gradgeom/check.h"

namespace gradgeom {

struct GramJob {
  const void* data = nullptr;
  int64_t rows = 0;        // m: d for B, k for A
  int64_t cols = 0;        // r
  int64_t row_stride = 0;  // in elements
  int64_t col_stride = 0;
  ElemType type = ElemType::kFloat32;
};

struct LoraGramPlan {
  std::vector<GramJob> jobs;  // 2 * num_adapters
  int64_t num_adapters = 0;
  int64_t max_rank = 0;       // R: the outputs are [num_adapters, R, R], zero-padded
};

// The job XᵀX for a 2-D factor t read in place: X's rows run along t's dimension dim_rows and
// its columns along the other one (dim_rows = 1 makes X = tᵀ).
inline GramJob gram_job(const at::Tensor& t, int dim_rows) {
  const int dim_cols = 1 - dim_rows;
  GramJob job;
  job.data = t.const_data_ptr();
  job.rows = t.size(dim_rows);
  job.cols = t.size(dim_cols);
  job.row_stride = t.stride(dim_rows);
  job.col_stride = t.stride(dim_cols);
  job.type = elem_type_of(t.scalar_type());
  return job;
}

inline LoraGramPlan make_lora_gram_plan(const at::TensorList& Bs, const at::TensorList& As) {
  GG_CHECK_VALUE(Bs.size() == As.size(), "lora_gram: Bs and As must have the same length, got ", Bs.size(),
                    " B factors and ", As.size(), " A factors");
  LoraGramPlan plan;
  plan.num_adapters = static_cast<int64_t>(Bs.size());
  plan.jobs.reserve(2 * Bs.size());
  for (size_t i = 0; i < Bs.size(); ++i) {
    const at::Tensor& B = Bs[i];
    const at::Tensor& A = As[i];
    GG_CHECK_VALUE(B.defined() && A.defined(), "lora_gram: Bs[", i, "] and As[", i, "] must be tensors, not None");
    GG_CHECK_VALUE(B.dim() == 2, "lora_gram: Bs[", i, "] must be 2-D [d, r], got shape ", B.sizes());
    GG_CHECK_VALUE(A.dim() == 2, "lora_gram: As[", i, "] must be 2-D [r, k], got shape ", A.sizes());
    GG_CHECK_VALUE(B.size(1) == A.size(0), "lora_gram: inner dimension r differs for adapter ", i,
                      ": Bs[", i, "] has shape ", B.sizes(), " (r = ", B.size(1), ") but As[", i,
                      "] has shape ", A.sizes(), " (r = ", A.size(0), ")");
    for (const at::Tensor* t : {&B, &A}) {
      const char* which = t == &B ? "Bs" : "As";
      GG_CHECK_TYPE(is_supported_float(t->scalar_type()), "lora_gram: ", which, "[", i, "] has dtype ",
                       t->scalar_type(), "; expected float32, float64, float16 or bfloat16");
      GG_CHECK_VALUE(t->device() == Bs[0].device(), "lora_gram: all factors must be on one device: ", which,
                        "[", i, "] is on ", t->device(), " but Bs[0] is on ", Bs[0].device());
    }
    plan.jobs.push_back(gram_job(B, /*dim_rows=*/0));  // BᵀB: X = B
    plan.jobs.push_back(gram_job(A, /*dim_rows=*/1));  // A·Aᵀ: X = Aᵀ
    plan.max_rank = std::max<int64_t>(plan.max_rank, B.size(1));
  }
  return plan;
}

// lora_cross_gram's pairs: X = B1s[i] and Y = B2s[i] read in place (row i of both is row i of
// the factor), checked; max_rank is R = max(p_i, q_i).
struct CrossGramPlan {
  std::vector<GramJob> left, right;
  int64_t max_rank = 0;
};

inline CrossGramPlan make_cross_gram_plan(const at::TensorList& B1s, const at::TensorList& B2s) {
  GG_CHECK_VALUE(B1s.size() == B2s.size(), "lora_cross_gram: B1s and B2s must have the same length, got ", B1s.size(),
                 " and ", B2s.size());
  CrossGramPlan plan;
  plan.left.reserve(B1s.size());
  plan.right.reserve(B2s.size());
  for (size_t i = 0; i < B1s.size(); ++i) {
    for (const at::TensorList* list : {&B1s, &B2s}) {
      const char* which = list == &B1s ? "B1s" : "B2s";
      const at::Tensor& t = (*list)[i];
      GG_CHECK_VALUE(t.defined(), "lora_cross_gram: ", which, "[", i, "] must be a tensor, not None");
      GG_CHECK_VALUE(t.dim() == 2, "lora_cross_gram: ", which, "[", i, "] must be 2-D [d, r], got shape ", t.sizes());
      GG_CHECK_TYPE(is_supported_float(t.scalar_type()), "lora_cross_gram: ", which, "[", i, "] has dtype ",
                    t.scalar_type(), "; expected float32, float64, float16 or bfloat16");
      GG_CHECK_VALUE(t.device() == B1s[0].device(), "lora_cross_gram: all factors must be on one device: ", which, "[",
                     i, "] is on ", t.device(), " but B1s[0] is on ", B1s[0].device());
    }
    GG_CHECK_VALUE(B1s[i].size(0) == B2s[i].size(0), "lora_cross_gram: pair ", i,
                   ": the factors must have the same number of rows d, got B1s[", i, "] ", B1s[i].sizes(), " and B2s[",
                   i, "] ", B2s[i].sizes());
    plan.left.push_back(gram_job(B1s[i], /*dim_rows=*/0));
    plan.right.push_back(gram_job(B2s[i], /*dim_rows=*/0));
    plan.max_rank = std::max({plan.max_rank, B1s[i].size(1), B2s[i].size(1)});
  }
  return plan;
}

// gram_fro's arguments: two float64 batches of square matrices of one shape [n, R, R], one device.
inline void check_gram_pair(const char* op, const at::Tensor& gb, const at::Tensor& ga) {
  GG_CHECK_VALUE(gb.dim() == 3 && gb.size(1) == gb.size(2), op,
                 ": gb must be a batch of square Gram matrices [n, R, R], got shape ", gb.sizes());
  GG_CHECK_VALUE(ga.sizes() == gb.sizes(), op, ": ga must have gb's shape ", gb.sizes(), ", got ", ga.sizes());
  GG_CHECK_TYPE(gb.scalar_type() == at::kDouble && ga.scalar_type() == at::kDouble, op,
                ": gb and ga must be float64, got ", gb.scalar_type(), " and ", ga.scalar_type());
  GG_CHECK_VALUE(ga.device() == gb.device(), op, ": gb and ga must be on one device, got ", gb.device(), " and ",
                 ga.device());
}

}  // namespace gradgeom
