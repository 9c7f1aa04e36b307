// The fused elementwise steps of the Gram-route composites on CUDA (gradgeom/gram_stage.h says
// what each computes). Every operation is the one the replaced ATen kernel performs (__dmul_rn and
// __dadd_rn where a product meets a sum, so nothing is contracted into an FMA; ::max, ::min,
// ::sqrt, ::rsqrt and ::acos as ATen calls them; NaN kept by the clamps as ATen keeps it).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <limits>

#include "gradgeom/gram_stage.h"
#include "gradgeom/check.h"
#include "gradgeom/rxr_check.h"
#include "gradgeom/tridiag_eig.h"

namespace gradgeom::gram_stage {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxR = static_cast<int>(kSmallMatrixMaxSize);

// torch.clamp_min(v, lo) and torch.clamp(v, lo, hi) as their CUDA kernels compute them.
__device__ __forceinline__ double clamp_min(double v, double lo) { return isnan(v) ? v : ::max(v, lo); }
__device__ __forceinline__ double clamp(double v, double lo, double hi) { return isnan(v) ? v : ::min(::max(v, lo), hi); }

__device__ __forceinline__ int64_t per_adapter(const PerAdapter64& p, int64_t i) { return p.device ? p.device[i] : p.value; }
__device__ __forceinline__ bool per_adapter(const PerAdapterFlag& p, int64_t i) { return p.device ? p.device[i] : p.value; }

// _lora_core._ill for one adapter: its smallest structural eigenvalue of M (mu_min, with mu_first
// the largest) below the Gram route's resolution.
__device__ __forceinline__ bool below_resolution(double mu_first, double mu_min, int64_t srank, double bound,
                                                 double tol) {
  return srank > 0 && mu_first > 0 && mu_min < __dmul_rn(bound, tol);
}

__device__ __forceinline__ double cond_tol(const Adapters& ad, int64_t i) {
  return per_adapter(ad.fp64, i) ? ad.cond_tol_fp64 : ad.cond_tol_fp32;
}

// below_resolution read off adapter i's eigenvalues of M, ascending at wi [R].
__device__ __forceinline__ bool below_resolution_of(const double* wi, int R, int64_t srank, double bound,
                                                    double tol) {
  const double mu_first = srank > 0 ? clamp_min(wi[R - 1], 0.0) : 0.0;
  const double mu_min = srank > 0 ? clamp_min(wi[R - srank], 0.0) : 0.0;
  return below_resolution(mu_first, mu_min, srank, bound, tol);
}

// ‖G_B‖_F·‖G_A‖_F of one adapter (the symmetric R x R Grams at gb and ga), on thread 0 (the
// others get 0): the scale of the eigenvalue error of M (_lora_core.error_bound). Each sum of
// squares reads its lower triangle (the diagonal once, the rest twice) in this kernel's own fixed
// order (a warp takes two rows at a time, 128 columns of each per pass, every load of the pass in
// flight at once; then a shuffle tree and the warps in order), not torch.linalg.matrix_norm's;
// NaN and Inf propagate. Every thread must call it.
__device__ double error_bound(const double* gb, const double* ga, int R) {
  constexpr int kWarps = kThreads / 32;
  __shared__ double2 warp_sums[kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  double b = 0.0, a = 0.0;
  for (int i0 = warp; i0 < R; i0 += 2 * kWarps) {
    for (int j0 = 0; j0 <= i0 + kWarps && j0 < R; j0 += 128) {
      double vb[8], va[8];
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        const int i = u < 4 ? i0 : i0 + kWarps, j = j0 + lane + 32 * (u & 3);
        const bool in = i < R && j <= i;
        vb[u] = in ? gb[int64_t(i) * R + j] : 0.0;
        va[u] = in ? ga[int64_t(i) * R + j] : 0.0;
      }
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        const int i = u < 4 ? i0 : i0 + kWarps, j = j0 + lane + 32 * (u & 3);
        const double twice = j == i ? 1.0 : 2.0;  // exact: the off-diagonal entry stands for two
        b = fma(twice * vb[u], vb[u], b);
        a = fma(twice * va[u], va[u], a);
      }
    }
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    b += __shfl_down_sync(0xffffffffu, b, offset);
    a += __shfl_down_sync(0xffffffffu, a, offset);
  }
  if (lane == 0) warp_sums[warp] = make_double2(b, a);
  __syncthreads();
  if (threadIdx.x != 0) return 0.0;
  double sb = 0.0, sa = 0.0;
  for (int w = 0; w < kWarps; ++w) {
    sb += warp_sums[w].x;
    sa += warp_sums[w].y;
  }
  return ::sqrt(sb) * ::sqrt(sa);
}

__global__ void scaled_columns_kernel(const double* V, const double* lam, int64_t total, int R, double* F) {
  const int64_t RR = int64_t(R) * R;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x)
    F[e] = __dmul_rn(V[e], ::sqrt(clamp_min(lam[(e / RR) * R + e % R], 0.0)));
}

__global__ void symmetric_part_kernel(const double* x, int64_t total, int R, double* out) {
  const int64_t RR = int64_t(R) * R;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t m = e / RR;
    const int a = static_cast<int>((e % RR) / R), b = static_cast<int>(e % R);
    out[e] = __dmul_rn(__dadd_rn(x[e], x[m * RR + int64_t(b) * R + a]), 0.5);
  }
}

// Block m: matrix m. Shared: λ^-½ (0 where λ <= 0) and keep (1.0 / 0.0) per column.
__global__ void __launch_bounds__(kThreads) coefficients_kernel(const double* lam, const double* V, const double* mu,
                                                                const double* W, const double* gb, const double* ga,
                                                                int R, Adapters ad, bool flags, double* left,
                                                                double* right, int64_t* rank, double* nonfinite,
                                                                bool* ill) {
  __shared__ double inv[kMaxR];
  __shared__ double keep[kMaxR];
  const int64_t m = blockIdx.x;
  const int64_t RR = int64_t(R) * R;
  const int64_t srank = per_adapter(ad.srank, m);
  int kept = 0;
  for (int j = threadIdx.x; j < R; j += kThreads) {
    const double lb = clamp_min(lam[m * R + j], 0.0);
    inv[j] = lb > 0 ? ::rsqrt(clamp_min(lb, 1e-300)) : 0.0;
    const bool k = clamp_min(mu[m * R + (R - 1 - j)], 0.0) > 0 && j < srank;  // μ descending
    keep[j] = k ? 1.0 : 0.0;
    kept += k;
  }
  bool bad = false;
  for (int64_t e = threadIdx.x; e < RR; e += kThreads)
    bad |= isnan(__dadd_rn(__dmul_rn(gb[m * RR + e], 0.0), __dmul_rn(ga[m * RR + e], 0.0)));
  __syncthreads();
  for (int64_t e = threadIdx.x; e < RR; e += kThreads) {
    const int b = static_cast<int>(e % R);
    left[m * RR + e] = __dmul_rn(V[m * RR + e], inv[b]);
    right[m * RR + e] = __dmul_rn(W[m * RR + (e - b) + (R - 1 - b)], keep[b]);
  }
  __shared__ int total_kept;
  if (threadIdx.x == 0) total_kept = 0;
  __syncthreads();
  if (kept) atomicAdd(&total_kept, kept);
  const bool any_bad = __syncthreads_or(bad);
  const double bound = flags ? error_bound(gb + m * RR, ga + m * RR, R) : 0.0;
  if (threadIdx.x != 0) return;
  rank[m] = total_kept;
  nonfinite[m] = any_bad ? std::numeric_limits<double>::quiet_NaN() : 0.0;
  if (!flags) return;
  const double mu_first = R > 0 ? clamp_min(mu[m * R + R - 1], 0.0) : 0.0;
  const double mu_min = srank > 0 ? clamp_min(mu[m * R + (R - srank)], 0.0) : 0.0;
  ill[m] = below_resolution(mu_first, mu_min, srank, bound, cond_tol(ad, m)) ||
           (srank < per_adapter(ad.rank, m) && mu_first > 0);  // r > min(d, k): no unique basis
}

// Block i: adapter i. μ_j = max(w_{R-1-j}, 0) below the structural rank, else exactly 0.
__global__ void __launch_bounds__(kThreads) spectrum_kernel(const double* w, int R, Adapters ad, const double* gb,
                                                            const double* ga, double* sv, bool* ill) {
  const int64_t i = blockIdx.x;
  const int64_t srank = per_adapter(ad.srank, i);
  for (int j = threadIdx.x; j < R; j += kThreads)
    sv[i * R + j] = ::sqrt(j < srank ? clamp_min(w[i * R + (R - 1 - j)], 0.0) : 0.0);
  if (ill == nullptr) return;
  const int64_t RR = int64_t(R) * R;
  const double bound = error_bound(gb + i * RR, ga + i * RR, R);
  if (threadIdx.x == 0) ill[i] = below_resolution_of(w + i * R, R, srank, bound, cond_tol(ad, i));
}

// Block i: adapter i, from the tridiagonal form T = 2^-s·QᵀMQ the Householder kernels left (d, e,
// e² at tri + 3Ri, s = scale[i]), before the bisection has run: μ_min < threshold is "at least
// R - srank + 1 eigenvalues of T lie below 2^-s·threshold" and μ_first > 0 "fewer than R lie
// below 0", each one Sturm count (tridiag::sturm_counts, on e² raised to kMinE2 as the bisection
// raises it). Where step 1 wrote the eigenvalues (kDone: non-finite, zero or 1 x 1), they are
// read from w as spectrum_kernel reads them.
__global__ void __launch_bounds__(kThreads) tridiagonal_flags_kernel(const double* tri, const int* scale,
                                                                     const double* w, int R, Adapters ad,
                                                                     const double* gb, const double* ga, bool* ill) {
  __shared__ double d[kMaxR], e2[kMaxR];
  const int64_t i = blockIdx.x;
  const int64_t RR = int64_t(R) * R;
  const double* t = tri + i * 3 * int64_t(R);
  for (int j = threadIdx.x; j < R; j += kThreads) {
    d[j] = t[j];
    e2[j] = fmax(t[2 * R + j], tridiag::kMinE2);
  }
  const double bound = error_bound(gb + i * RR, ga + i * RR, R);  // its barrier publishes d and e2
  if (threadIdx.x != 0) return;
  const int64_t srank = per_adapter(ad.srank, i);
  const int s = scale[i];
  if (s == tridiag::kDone || srank <= 0) {
    ill[i] = below_resolution_of(w + i * R, R, srank, bound, cond_tol(ad, i));
    return;
  }
  const double threshold = __dmul_rn(bound, cond_tol(ad, i));
  bool below = false;
  if (threshold == INFINITY) {
    below = true;  // every finite μ_min lies below it
  } else if (threshold > 0) {  // else (0 or NaN) μ_min >= 0 never lies below it
    const double x[2] = {0.0, ldexp(threshold, -s)};
    int counts[2];
    tridiag::sturm_counts<2>(d, e2, R, x, counts);
    below = counts[0] < R && counts[1] >= R - srank + 1;
  }
  ill[i] = below;
}

// Block i: pair i. Shared: the squared angles, summed in ascending order by thread 0.
__global__ void __launch_bounds__(kThreads) angle_rows_kernel(const double* w, int K, int64_t n, const int64_t* rank,
                                                              const double* nonfinite, const bool* ill, int cols,
                                                              double* out) {
  __shared__ double sq[kMaxR];
  const int64_t i = blockIdx.x;
  const int64_t r1 = rank[i], r2 = rank[n + i];
  double* row = out + i * cols;
  for (int j = threadIdx.x; j < K; j += kThreads) {
    const double c = clamp(::sqrt(clamp_min(w[i * K + (K - 1 - j)], 0.0)), 0.0, 1.0);  // cosines descending
    const double theta = j < ::min(r1, r2) ? ::acos(c) : 0.0;
    row[j] = theta;
    sq[j] = __dmul_rn(theta, theta);
  }
  __syncthreads();
  if (threadIdx.x != 0) return;
  double sum = 0.0;
  for (int j = 0; j < K; ++j) sum = __dadd_rn(sum, sq[j]);
  row[K] = ::sqrt(sum);
  row[K + 1] = static_cast<double>(r1);
  row[K + 2] = static_cast<double>(r2);
  row[K + 3] = __dadd_rn(nonfinite[i], nonfinite[n + i]);
  if (ill != nullptr) row[K + 4] = (ill[i] || ill[n + i]) ? 1.0 : 0.0;
}

void check_batch(const char* what, const at::Tensor& t, int64_t m, int64_t R, int dims) {
  GG_CHECK(t.is_cuda() && t.scalar_type() == at::kDouble && t.is_contiguous() && t.dim() == dims && t.size(0) == m &&
               (dims < 2 || t.size(1) == R) && (dims < 3 || t.size(2) == R),
           "gram_stage: ", what, " must be a contiguous CUDA float64 batch of ", m, " (size ", R, "), got ",
           t.sizes());
}

unsigned elementwise_blocks(int64_t total) {
  return static_cast<unsigned>(std::clamp<int64_t>((total + kThreads - 1) / kThreads, 1, 8192));
}

}  // namespace

at::Tensor scaled_columns(const at::Tensor& V, const at::Tensor& lam) {
  const int64_t m = V.size(0), R = V.size(-1);
  check_batch("V", V, m, R, 3);
  check_batch("lam", lam, m, R, 2);
  const c10::cuda::CUDAGuard guard(V.device());
  at::Tensor F = at::empty_like(V);
  const int64_t total = V.numel();
  if (total == 0) return F;
  scaled_columns_kernel<<<elementwise_blocks(total), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      V.const_data_ptr<double>(), lam.const_data_ptr<double>(), total, static_cast<int>(R), F.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return F;
}

at::Tensor symmetric_part(const at::Tensor& x) {
  const int64_t m = x.size(0), R = x.size(-1);
  check_batch("x", x, m, R, 3);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty_like(x);
  const int64_t total = x.numel();
  if (total == 0) return out;
  symmetric_part_kernel<<<elementwise_blocks(total), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      x.const_data_ptr<double>(), total, static_cast<int>(R), out.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

Coefficients coefficients(const at::Tensor& lam, const at::Tensor& V, const at::Tensor& mu, const at::Tensor& W,
                          const at::Tensor& gb, const at::Tensor& ga, const Adapters& adapters, bool flags) {
  const int64_t m = V.size(0), R = V.size(-1);
  GG_CHECK(R <= kMaxR, "gram_stage: R = ", R, " above ", kMaxR);
  check_batch("V", V, m, R, 3);
  check_batch("W", W, m, R, 3);
  check_batch("gb", gb, m, R, 3);
  check_batch("ga", ga, m, R, 3);
  check_batch("lam", lam, m, R, 2);
  check_batch("mu", mu, m, R, 2);
  const c10::cuda::CUDAGuard guard(V.device());
  Coefficients c{at::empty_like(V), at::empty_like(V), at::empty({m}, V.options().dtype(at::kLong)),
                 at::empty({m}, V.options()), flags ? at::empty({m}, V.options().dtype(at::kBool)) : at::Tensor()};
  if (m == 0) return c;
  coefficients_kernel<<<static_cast<unsigned>(m), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      lam.const_data_ptr<double>(), V.const_data_ptr<double>(), mu.const_data_ptr<double>(),
      W.const_data_ptr<double>(), gb.const_data_ptr<double>(), ga.const_data_ptr<double>(), static_cast<int>(R),
      adapters, flags, c.left.data_ptr<double>(),
      c.right.data_ptr<double>(), c.rank.data_ptr<int64_t>(), c.nonfinite.data_ptr<double>(),
      flags ? c.ill.data_ptr<bool>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return c;
}

std::tuple<at::Tensor, at::Tensor> spectrum(const at::Tensor& w, const Adapters& adapters, const at::Tensor& gb,
                                            const at::Tensor& ga, bool flags) {
  const int64_t n = w.size(0), R = w.size(-1);
  check_batch("w", w, n, R, 2);
  if (flags) {
    check_batch("gb", gb, n, R, 3);
    check_batch("ga", ga, n, R, 3);
  }
  const c10::cuda::CUDAGuard guard(w.device());
  at::Tensor sv = at::empty_like(w);
  at::Tensor ill = flags ? at::empty({n}, w.options().dtype(at::kBool)) : at::Tensor();
  if (n == 0) return {sv, ill};
  GG_CHECK(n < (int64_t(1) << 31), "gram_stage: too many adapters (", n, ")");
  spectrum_kernel<<<static_cast<unsigned>(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      w.const_data_ptr<double>(), static_cast<int>(R), adapters, flags ? gb.const_data_ptr<double>() : nullptr,
      flags ? ga.const_data_ptr<double>() : nullptr, sv.data_ptr<double>(), flags ? ill.data_ptr<bool>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {sv, ill};
}

at::Tensor tridiagonal_flags(const at::Tensor& tri, const at::Tensor& scale, const at::Tensor& w,
                             const Adapters& adapters, const at::Tensor& gb, const at::Tensor& ga) {
  const int64_t n = w.size(0), R = w.size(-1);
  GG_CHECK(R <= kMaxR, "gram_stage: R = ", R, " above ", kMaxR);
  check_batch("w", w, n, R, 2);
  check_batch("gb", gb, n, R, 3);
  check_batch("ga", ga, n, R, 3);
  GG_CHECK(tri.is_cuda() && tri.scalar_type() == at::kDouble && tri.is_contiguous() && tri.dim() == 2 &&
               tri.size(0) == n && tri.size(1) == 3 * R,
           "gram_stage: tri must be a contiguous CUDA float64 [", n, ", ", 3 * R, "], got ", tri.sizes());
  GG_CHECK(scale.is_cuda() && scale.scalar_type() == at::kInt && scale.is_contiguous() && scale.numel() == n,
           "gram_stage: scale must be a contiguous CUDA int32 [", n, "], got ", scale.sizes());
  const c10::cuda::CUDAGuard guard(w.device());
  at::Tensor ill = at::empty({n}, w.options().dtype(at::kBool));
  if (n == 0) return ill;
  GG_CHECK(n < (int64_t(1) << 31), "gram_stage: too many adapters (", n, ")");
  tridiagonal_flags_kernel<<<static_cast<unsigned>(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      tri.const_data_ptr<double>(), scale.const_data_ptr<int>(), w.const_data_ptr<double>(), static_cast<int>(R),
      adapters, gb.const_data_ptr<double>(), ga.const_data_ptr<double>(), ill.data_ptr<bool>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return ill;
}

at::Tensor angle_rows(const at::Tensor& w, const at::Tensor& rank, const at::Tensor& nonfinite, const at::Tensor& ill) {
  const int64_t n = w.size(0), K = w.size(-1);
  GG_CHECK(K <= kMaxR, "gram_stage: K = ", K, " above ", kMaxR);
  check_batch("w", w, n, K, 2);
  check_batch("nonfinite", nonfinite, 2 * n, K, 1);
  GG_CHECK(rank.is_cuda() && rank.scalar_type() == at::kLong && rank.is_contiguous() && rank.numel() == 2 * n,
           "gram_stage: rank must be a contiguous CUDA int64 [", 2 * n, "], got ", rank.sizes());
  const bool flags = ill.defined();
  if (flags)
    GG_CHECK(ill.is_cuda() && ill.scalar_type() == at::kBool && ill.is_contiguous() && ill.numel() == 2 * n,
             "gram_stage: ill must be a contiguous CUDA bool [", 2 * n, "], got ", ill.sizes());
  const c10::cuda::CUDAGuard guard(w.device());
  const int64_t cols = K + (flags ? 5 : 4);
  at::Tensor out = at::empty({n, cols}, w.options());
  if (n == 0) return out;
  GG_CHECK(n < (int64_t(1) << 31), "gram_stage: too many pairs (", n, ")");
  angle_rows_kernel<<<static_cast<unsigned>(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      w.const_data_ptr<double>(), static_cast<int>(K), n, rank.const_data_ptr<int64_t>(),
      nonfinite.const_data_ptr<double>(), flags ? ill.const_data_ptr<bool>() : nullptr, static_cast<int>(cols),
      out.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace gradgeom::gram_stage
