// Argument checks of the batched r x r ops (sym_eigh, psd_cholesky), shared by CPU and CUDA.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include "gradgeom/check.h"

namespace gradgeom {

constexpr int64_t kSmallMatrixMaxSize = 1024;

inline void check_square_batch(const char* op, const at::Tensor& A) {
  GG_CHECK_VALUE(A.dim() == 3 && A.size(1) == A.size(2), op,
                    ": A must be a batch of square matrices [batch, n, n], got shape ", A.sizes());
  GG_CHECK_TYPE(A.scalar_type() == at::kDouble || A.scalar_type() == at::kFloat, op,
                   ": A must be float32 or float64, got ", A.scalar_type());
  GG_CHECK_VALUE(A.size(1) <= kSmallMatrixMaxSize, op, ": matrices larger than ", kSmallMatrixMaxSize, " x ",
                    kSmallMatrixMaxSize, " are not supported, got n = ", A.size(1));
}

}  // namespace gradgeom
