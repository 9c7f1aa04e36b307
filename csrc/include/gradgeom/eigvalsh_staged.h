// sym_eigh's eigenvalues on CUDA with a look at the tridiagonal stage (csrc/cuda/rxr_solvers.cu):
// for lora_svdvals, which reads its ill-conditioning flags off the tridiagonal matrices and copies
// them to the host before the bisection (early_flags.h).
#pragma once

#include <ATen/core/Tensor.h>

#include <functional>

namespace gradgeom {

// Called once the launches that write every matrix's tridiagonal form are queued on the current
// stream, before the bisection's launch: tri float64 [m, 3n] (rows d, e, e² of T = 2^-s·QᵀAQ),
// scale int32 [m] (the exponent s, or tridiag::kDone where step 1 of tridiag_eig.h has written
// the matrix's eigenvalues to w already), w float64 [m, n] (the eigenvalues, ascending, once the
// bisection is done).
using TridiagonalHook = std::function<void(const at::Tensor& tri, const at::Tensor& scale, const at::Tensor& w)>;

// The eigenvalues of sym_eigh(A, vectors=False), float64 [m, n] ascending, the same bits, for a
// contiguous float64 CUDA batch a64 [m, n, n] (lower triangles read). Where the solver for this n
// reduces to tridiagonal form in a launch of its own (33 <= n <= 128) and m > 0, calls `hook` once
// as above; otherwise (one fused kernel) never calls it.
at::Tensor sym_eigvalsh_staged(const at::Tensor& a64, const TridiagonalHook& hook);

}  // namespace gradgeom
