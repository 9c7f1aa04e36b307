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
    GramJob jb;
    jb.data = B.data_ptr();
    jb.rows = B.size(0);
    jb.cols = B.size(1);
    jb.row_stride = B.stride(0);
    jb.col_stride = B.stride(1);
    jb.type = elem_type_of(B.scalar_type());
    GramJob ja;
    ja.data = A.data_ptr();
    ja.rows = A.size(1);
    ja.cols = A.size(0);
    ja.row_stride = A.stride(1);
    ja.col_stride = A.stride(0);
    ja.type = elem_type_of(A.scalar_type());
    plan.jobs.push_back(jb);
    plan.jobs.push_back(ja);
    plan.max_rank = std::max<int64_t>(plan.max_rank, B.size(1));
  }
  return plan;
}

}  // namespace gradgeom
