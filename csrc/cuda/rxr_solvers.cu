// The batched r x r ops on CUDA, one block per matrix, fp64. psd_cholesky runs psd_cholesky.h
// (in shared memory for n <= 128). sym_eigh runs the parallel cyclic Jacobi solver of jacobi.h. The matrix (and the eigenvectors, when asked for) live in shared memory when they fit
// the block's opt-in limit (n <= 128 for eigenvalues, n <= 64 with vectors on an H100), else in
// a global workspace that stays L2-resident. Avoids cuSOLVER's batched syevj cliff at n > 32.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <tuple>

#include "gradgeom/jacobi.h"
#include "gradgeom/psd_cholesky.h"
#include "gradgeom/rxr_check.h"
#include "gradgeom/check.h"

namespace gradgeom {
namespace {

struct BlockSync {
  __host__ __device__ void operator()() const {
#ifdef __CUDA_ARCH__
    __syncthreads();
#endif
  }
};

__global__ void sym_eigh_kernel(const double* in, int n, int m, int ld, bool vectors, bool use_smem, double* work_a,
                                double* work_v, double* w_out, double* v_out) {
  extern __shared__ double smem[];
  __shared__ int flag;
  const int64_t b = blockIdx.x;
  const int tid = threadIdx.x;
  const int nthreads = blockDim.x;
  const int64_t size = int64_t(m) * ld;
  double* rot = smem;
  double* a = use_smem ? smem + 2 * m : work_a + b * size;
  double* v = vectors ? (use_smem ? a + size : work_v + b * size) : nullptr;
  const double* src = in + b * int64_t(n) * n;
  for (int64_t e = tid; e < size; e += nthreads) {
    const int i = static_cast<int>(e / ld);
    const int j = static_cast<int>(e - int64_t(i) * ld);
    double x = 0.0;
    if (i < n && j < n) x = i >= j ? src[int64_t(i) * n + j] : src[int64_t(j) * n + i];
    a[e] = x;
    if (vectors) v[e] = (i == j) ? 1.0 : 0.0;
  }
  __syncthreads();
  jacobi::solve(a, ld, v, m, rot, &flag, tid, nthreads, BlockSync{});
  __syncthreads();
  for (int i = tid; i < n; i += nthreads) {
    const int k = jacobi::ascending_rank(a, ld, n, i);
    w_out[b * n + k] = a[int64_t(i) * ld + i];
    if (vectors)
      for (int row = 0; row < n; ++row) v_out[(b * n + row) * n + k] = v[int64_t(row) * ld + i];
  }
}

std::tuple<at::Tensor, at::Tensor> sym_eigh_cuda(const at::Tensor& A, bool vectors) {
  check_square_batch("sym_eigh", A);
  const c10::cuda::CUDAGuard guard(A.device());
  const at::Tensor a64 = A.to(at::kDouble).contiguous();
  const int64_t batch = a64.size(0);
  const int64_t n = a64.size(1);
  const auto opts = a64.options();
  const double nan = std::numeric_limits<double>::quiet_NaN();
  at::Tensor w = at::full({batch, n}, nan, opts);
  at::Tensor V = vectors ? at::full({batch, n, n}, nan, opts) : at::empty({0}, opts);
  if (batch == 0 || n == 0) return {w, V};
  GG_CHECK(batch < (int64_t(1) << 31), "sym_eigh: batch too large (", batch, ")");

  const int m = static_cast<int>(n + (n % 2));
  const int ld = m + 1;  // odd stride: the columns of a 2x2 block fall in different banks
  const int64_t mat_bytes = int64_t(m) * ld * static_cast<int64_t>(sizeof(double));
  const int64_t rot_bytes = 2 * int64_t(m) * static_cast<int64_t>(sizeof(double));
  const int64_t smem_bytes = rot_bytes + (vectors ? 2 : 1) * mat_bytes;
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, A.device().index()));
  const bool use_smem = smem_bytes <= optin - 1024;  // leave room for the static flag
  const int64_t dyn_bytes = use_smem ? smem_bytes : rot_bytes;
  if (dyn_bytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(sym_eigh_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(dyn_bytes)));
  at::Tensor work_a, work_v;
  if (!use_smem) {
    work_a = at::empty({batch, m, ld}, opts);
    if (vectors) work_v = at::empty({batch, m, ld}, opts);
  }
  const int threads = m <= 32 ? 128 : (m <= 64 ? 256 : 512);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  sym_eigh_kernel<<<static_cast<unsigned>(batch), threads, static_cast<size_t>(dyn_bytes), stream>>>(
      a64.data_ptr<double>(), static_cast<int>(n), m, ld, vectors, use_smem,
      use_smem ? nullptr : work_a.data_ptr<double>(), (use_smem || !vectors) ? nullptr : work_v.data_ptr<double>(),
      w.data_ptr<double>(), vectors ? V.data_ptr<double>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {w, V};
}

__global__ void psd_cholesky_kernel(const double* in, int n, int ld, double tol, bool use_smem, double* work,
                                    double* F) {
  extern __shared__ double smem[];
  const int64_t b = blockIdx.x;
  double* scratch = smem;  // 2 + n doubles
  double* a = use_smem ? smem + 2 + n : work + b * int64_t(n) * ld;
  const double* src = in + b * int64_t(n) * n;
  for (int e = threadIdx.x; e < n * n; e += blockDim.x) {
    const int i = e / n;
    const int k = e - i * n;
    a[i * ld + k] = i >= k ? src[e] : src[k * n + i];  // lower triangle, mirrored
  }
  __syncthreads();
  cholesky::factor(a, ld, n, tol, F + b * int64_t(n) * n, scratch, threadIdx.x, blockDim.x, BlockSync{});
}

at::Tensor psd_cholesky_cuda(const at::Tensor& A, double tol) {
  check_square_batch("psd_cholesky", A);
  const c10::cuda::CUDAGuard guard(A.device());
  const at::Tensor a64 = A.to(at::kDouble).contiguous();
  at::Tensor F = at::empty_like(a64);
  const int64_t batch = a64.size(0);
  const int n = static_cast<int>(a64.size(1));
  if (batch == 0 || n == 0) return F;
  GG_CHECK(batch < (int64_t(1) << 31), "psd_cholesky: batch too large (", batch, ")");
  const int ld = n + 1;
  const int64_t scratch_bytes = (2 + int64_t(n)) * static_cast<int64_t>(sizeof(double));
  const int64_t mat_bytes = int64_t(n) * ld * static_cast<int64_t>(sizeof(double));
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, A.device().index()));
  const bool use_smem = scratch_bytes + mat_bytes <= optin - 1024;
  const int64_t dyn = scratch_bytes + (use_smem ? mat_bytes : 0);
  if (dyn > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(psd_cholesky_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(dyn)));
  at::Tensor work;
  if (!use_smem) work = at::empty({batch, n, ld}, a64.options());
  const int threads = n <= 32 ? 128 : (n <= 64 ? 256 : 512);
  psd_cholesky_kernel<<<static_cast<unsigned>(batch), threads, static_cast<size_t>(dyn),
                        c10::cuda::getCurrentCUDAStream()>>>(a64.data_ptr<double>(), n, ld, tol, use_smem,
                                                             use_smem ? nullptr : work.data_ptr<double>(),
                                                             F.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return F;
}

}  // namespace

TORCH_LIBRARY_IMPL(gradgeom, CUDA, m) {
  m.impl("sym_eigh", &sym_eigh_cuda);
  m.impl("psd_cholesky", &psd_cholesky_cuda);
}

}  // namespace gradgeom
