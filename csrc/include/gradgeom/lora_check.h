// Argument checks of the ops that take lists of LoRA factors (lora_gram, lora_fro,
// lora_svdvals), shared by CPU and CUDA. `op` names the op in messages.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "gradgeom/check.h"
#include "gradgeom/tensor_list_plan.h"

namespace gradgeom {

// Bs[i]: [d_i, r_i] and As[i]: [r_i, k_i], supported float dtypes, all on Bs[0]'s device.
inline void check_lora_factors(const char* op, const at::TensorList& Bs, const at::TensorList& As) {
  GG_CHECK_VALUE(Bs.size() == As.size(), op, ": Bs and As must have the same length, got ", Bs.size(),
                 " B factors and ", As.size(), " A factors");
  for (size_t i = 0; i < Bs.size(); ++i) {
    const at::Tensor& B = Bs[i];
    const at::Tensor& A = As[i];
    GG_CHECK_VALUE(B.defined() && A.defined(), op, ": Bs[", i, "] and As[", i, "] must be tensors, not None");
    GG_CHECK_VALUE(B.dim() == 2, op, ": Bs[", i, "] must be 2-D [d, r], got shape ", B.sizes());
    GG_CHECK_VALUE(A.dim() == 2, op, ": As[", i, "] must be 2-D [r, k], got shape ", A.sizes());
    GG_CHECK_VALUE(B.size(1) == A.size(0), op, ": inner dimension r differs for adapter ", i, ": Bs[", i,
                   "] has shape ", B.sizes(), " (r = ", B.size(1), ") but As[", i, "] has shape ", A.sizes(),
                   " (r = ", A.size(0), ")");
    for (const at::Tensor* t : {&B, &A}) {
      const char* which = t == &B ? "Bs" : "As";
      GG_CHECK_TYPE(is_supported_float(t->scalar_type()), op, ": ", which, "[", i, "] has dtype ",
                    t->scalar_type(), "; expected float32, float64, float16 or bfloat16");
      GG_CHECK_VALUE(t->device() == Bs[0].device(), op, ": all factors must be on one device: ", which, "[", i,
                     "] is on ", t->device(), " but Bs[0] is on ", Bs[0].device());
    }
  }
}

}  // namespace gradgeom
