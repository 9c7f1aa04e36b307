// Tolerances of the Gram route of gradgeom.lora, defined once: the native composite
// (lora_composite.cpp) uses them and Python reads them through gradgeom::_lora_tolerances.
// "fp64" adapters have both factors float64 (Grams accumulated in fp64), "fp32" all others.
#pragma once

#include <vector>

namespace gradgeom {

// Pivoted Cholesky of G_B stops at pivots below CHOL_TOL·max(diag G_B): about the rounding
// noise of the Gram matrix (pivots made of noise would amplify it).
constexpr double kCholTolFp32 = 1e-6;
constexpr double kCholTolFp64 = 1e-14;
// An adapter is "ill-conditioned" for the Gram route when its smallest structural eigenvalue
// of M falls below COND_TOL·‖G_B‖_F·‖G_A‖_F (the eigenvalue error of M is about u·that
// product, u the accumulation precision). Below it, σ_min would carry more than ~1 % relative
// error. The comparison uses these values rounded to float32.
constexpr double kCondTolFp32 = 1e-4;
constexpr double kCondTolFp64 = 1e-10;

// {CHOL_TOL_FP32, CHOL_TOL_FP64, COND_TOL_FP32, COND_TOL_FP64}, the order Python reads them in.
inline std::vector<double> lora_tolerances() { return {kCholTolFp32, kCholTolFp64, kCondTolFp32, kCondTolFp64}; }

}  // namespace gradgeom
