// Argument checks of sym_eigh, shared by the CPU and CUDA implementations.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace gradgeom {

constexpr int64_t kSymEighMaxSize = 1024;

inline void check_sym_eigh_input(const at::Tensor& A) {
  TORCH_CHECK_VALUE(A.dim() == 3 && A.size(1) == A.size(2),
                    "sym_eigh: A must be a batch of square matrices [batch, n, n], got shape ", A.sizes());
  TORCH_CHECK_TYPE(A.scalar_type() == at::kDouble || A.scalar_type() == at::kFloat,
                   "sym_eigh: A must be float32 or float64, got ", A.scalar_type());
  TORCH_CHECK_VALUE(A.size(1) <= kSymEighMaxSize, "sym_eigh: matrices larger than ", kSymEighMaxSize,
                    " x ", kSymEighMaxSize, " are not supported, got n = ", A.size(1));
}

}  // namespace gradgeom
