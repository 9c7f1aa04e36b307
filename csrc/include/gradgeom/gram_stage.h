// The elementwise steps of the Gram-route composites on CUDA, fused (csrc/cuda/gram_stage.cu):
// lora_principal_angles keeps its matrix products (cuBLAS, through at::bmm) and sym_eigh calls,
// and four kernels replace the ATen ops between them (25 kernel launches a flagged call instead
// of 70); lora_svdvals ends in one kernel instead of up to a dozen. Each value is computed with
// the IEEE operations and device functions of the ATen kernels it replaces, in the same order, so
// the results keep the bits of the ATen statement (gradgeom._lora_core); only the Grassmann
// distance sums its squares in its own (ascending) order, a non-finite flag is the canonical NaN,
// and the flags' error bound ‖G_B‖_F·‖G_A‖_F sums its squares in its own order in the kernel that
// compares against it (two reductions and a product fewer; a flag can differ from the statement's
// only where μ_min lies within a rounding of the threshold).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

namespace gradgeom::gram_stage {

// F = V·diag(√max(λ, 0)) (_lora_core.gram_bases): V float64 [m, R, R], lam float64 [m, R], both
// contiguous on one CUDA device; returns float64 [m, R, R].
at::Tensor scaled_columns(const at::Tensor& V, const at::Tensor& lam);

// ½(X + Xᵀ) of x float64 [m, R, R] (contiguous, CUDA); returns a contiguous float64 [m, R, R].
at::Tensor symmetric_part(const at::Tensor& x);

// One value per adapter: `value` for all, or `device[i]` where `device` is not null.
struct PerAdapter64 {
  int64_t value = 0;
  const int64_t* device = nullptr;
};
struct PerAdapterFlag {
  bool value = false;
  const bool* device = nullptr;
};

struct Adapters {
  PerAdapter64 srank;  // min(d, k, r)
  PerAdapter64 rank;   // r (read only with flags)
  PerAdapterFlag fp64; // both factors float64 (read only with flags)
  double cond_tol_fp64 = 0.0, cond_tol_fp32 = 0.0;  // already rounded as the composite rounds them
};

struct Coefficients {
  at::Tensor left;       // V·diag(λ^-½ where λ > 0), float64 [m, R, R]
  at::Tensor right;      // W (columns by descending μ)·diag(keep), float64 [m, R, R]
  at::Tensor rank;       // numerical rank (kept columns), int64 [m]
  at::Tensor nonfinite;  // 0.0, or NaN where G_B or G_A holds Inf/NaN, float64 [m]
  at::Tensor ill;        // bool [m] with flags, else undefined
};

// The rest of _lora_core.gram_bases after the second eigen-decomposition: from G_B = V·diag(λ)·Vᵀ
// (lam ascending) and M = W·diag(μ)·Wᵀ (mu ascending) the two factors of T = left·right, the
// ranks, and (with flags) the ill-conditioning flags; the symmetric gb and ga (float64
// [m, R, R]) for the non-finite flag and the error bound. All contiguous on one CUDA device.
Coefficients coefficients(const at::Tensor& lam, const at::Tensor& V, const at::Tensor& mu, const at::Tensor& W,
                          const at::Tensor& gb, const at::Tensor& ga, const Adapters& adapters, bool flags);

// The end of _lora_core.gram_spectrum and the composite's lora_svdvals: from the eigenvalues w
// (float64 [n, R], ascending, contiguous CUDA) of M, the singular values √μ (float64 [n, R],
// descending, exactly 0 at and beyond each structural rank) and, with flags, the
// ill-conditioning flags (bool [n], else undefined), whose error bound is read from the
// symmetric Grams gb and ga (float64 [n, R, R], contiguous; lower triangles read, only with flags).
std::tuple<at::Tensor, at::Tensor> spectrum(const at::Tensor& w, const Adapters& adapters, const at::Tensor& gb,
                                            const at::Tensor& ga, bool flags);

// The flags of spectrum(w, ..., flags=true) before w is known: from the tridiagonal matrices the
// Householder stage of sym_eigvalsh_staged leaves (tri, scale as eigvalsh_staged.h says; R <= 1024),
// by Sturm counts at 0 and at the threshold instead of comparisons with the bisected eigenvalues.
// A flag can differ from spectrum's only where μ_min or μ_first lies within the bisection's
// tolerance of the threshold or of 0. w is read only for the matrices whose scale is
// tridiag::kDone (step 1 wrote theirs; the bisection leaves them alone). Returns bool [n].
at::Tensor tridiagonal_flags(const at::Tensor& tri, const at::Tensor& scale, const at::Tensor& w,
                             const Adapters& adapters, const at::Tensor& gb, const at::Tensor& ga);

// The composite's output rows from the eigenvalues w (float64 [n, K], ascending) of CᵀC for the n
// pairs, whose sides are adapters i and n + i of rank/nonfinite/ill ([2n]; ill may be undefined):
// float64 [n, K + 4] (+1 with ill) = angles (0 beyond min(rank1, rank2)), distance, rank1,
// rank2, nonfinite1 + nonfinite2 (, ill1 | ill2).
at::Tensor angle_rows(const at::Tensor& w, const at::Tensor& rank, const at::Tensor& nonfinite, const at::Tensor& ill);

}  // namespace gradgeom::gram_stage
