// Micro-benchmark of the one-block-per-matrix r x r kernels (no torch, builds in seconds): times
// the shipping tridiag::eigvalsh, its phases (scale + Householder; bisection with 1, 2 or 4 shifts
// per thread) and cholesky::factor on a batch of random SPD matrices, at 128 and 256 threads.
//
//   nvcc -O3 -std=c++17 -arch=sm_90 --expt-relaxed-constexpr -Icsrc/include bench/micro/rxr_micro.cu -o build/rxr_micro
//   build/rxr_micro [batch] [n]
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "gradgeom/psd_cholesky.h"
#include "gradgeom/tridiag_eig.h"

#define CK(x)                                                                              \
  do {                                                                                     \
    cudaError_t e_ = (x);                                                                  \
    if (e_ != cudaSuccess) {                                                               \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(1);                                                                        \
    }                                                                                      \
  } while (0)

using namespace gradgeom;

struct Sync {
  __device__ void operator()() const { __syncthreads(); }
};

// ---- kernels -----------------------------------------------------------------------------------
__global__ void __launch_bounds__(256, 2) eig_header(const double* in, int n, double* w) {
  extern __shared__ double smem[];
  double* tail = smem + tridiag::workspace_doubles(n);
  int* iwork = reinterpret_cast<int*>(tail + block::packed_size(n));
  const block::PackedLower a{tail, tail, 0};
  block::load_lower(in + blockIdx.x * int64_t(n) * n, n, a, threadIdx.x, blockDim.x);
  __syncthreads();
  tridiag::eigvalsh(a, n, smem, iwork, w + blockIdx.x * n, threadIdx.x, blockDim.x, Sync{});
}

// Phases of the shipping eigvalsh: scale + Householder, and bisection alone (T = the input's
// diagonal and subdiagonal).
__global__ void __launch_bounds__(256, 2) eig_house(const double* in, int n, double* w) {
  extern __shared__ double smem[];
  double* tail = smem + tridiag::workspace_doubles(n);
  const block::PackedLower a{tail, tail, 0};
  block::load_lower(in + blockIdx.x * int64_t(n) * n, n, a, threadIdx.x, blockDim.x);
  __syncthreads();
  const int e = tridiag::scale(a, n, smem, w + blockIdx.x * n, threadIdx.x, blockDim.x, Sync{});
  if (e == tridiag::kDone) return;
  tridiag::tridiagonalize(a, n, smem, threadIdx.x, blockDim.x, Sync{});
  for (int i = threadIdx.x; i < n; i += blockDim.x) w[blockIdx.x * n + i] = smem[3 * n + i];
}

template <int K>
__global__ void __launch_bounds__(256, 2) eig_bisect(const double* in, int n, double* w) {
  extern __shared__ double smem[];
  int* iwork = reinterpret_cast<int*>(smem + tridiag::workspace_doubles(n) + block::packed_size(n));
  const double* src = in + blockIdx.x * int64_t(n) * n;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    smem[3 * n + i] = src[i * n + i];
    if (i + 1 < n) {
      smem[4 * n + i] = src[(i + 1) * n + i];
      smem[5 * n + i] = smem[4 * n + i] * smem[4 * n + i];
    }
  }
  __syncthreads();
  tridiag::bisect<K>(n, smem, iwork, w + blockIdx.x * n, 0, threadIdx.x, blockDim.x, Sync{});
}

__global__ void __launch_bounds__(256, 2) chol_header(const double* in, int n, double tol, double* F) {
  extern __shared__ double smem[];
  const int64_t work_doubles = cholesky::workspace_doubles(n, blockDim.x / 32);
  double* packed = smem + work_doubles;
  int* iwork = reinterpret_cast<int*>(packed + block::packed_size(n));
  const block::PackedLower a{packed, packed, n};
  block::load_lower(in + blockIdx.x * int64_t(n) * n, n, a, threadIdx.x, blockDim.x);
  __syncthreads();
  cholesky::factor(a, n, tol, F + blockIdx.x * int64_t(n) * n, smem, iwork, threadIdx.x, blockDim.x, Sync{});
}

// ---- host --------------------------------------------------------------------------------------
static unsigned long long rng = 88172645463325252ull;
static double urand() {
  rng ^= rng << 13;
  rng ^= rng >> 7;
  rng ^= rng << 17;
  return (rng >> 11) * (1.0 / 9007199254740992.0);
}

// SPD matrices X·diag(s)·Xᵀ with s spread over 1 .. 1e-6 (like a Gram of a trained factor).
static std::vector<double> make_batch(int batch, int n) {
  std::vector<double> out(size_t(batch) * n * n), X(size_t(n) * n);
  for (int b = 0; b < batch; ++b) {
    for (auto& x : X) x = urand() * 2 - 1;
    double* A = out.data() + size_t(b) * n * n;
    for (int i = 0; i < n; ++i)
      for (int j = 0; j <= i; ++j) {
        double s = 0;
        for (int k = 0; k < n; ++k) s += X[i * n + k] * X[j * n + k] * std::pow(1e-6, double(k) / n);
        A[i * n + j] = A[j * n + i] = s;
      }
  }
  return out;
}

template <typename Launch>
static float time_ms(Launch launch, int reps = 20) {
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  launch();
  CK(cudaGetLastError());
  CK(cudaDeviceSynchronize());
  std::vector<float> t;
  for (int rep = 0; rep < 5; ++rep) {
    CK(cudaEventRecord(a));
    for (int i = 0; i < reps; ++i) launch();
    CK(cudaEventRecord(b));
    CK(cudaEventSynchronize(b));
    float ms = 0;
    CK(cudaEventElapsedTime(&ms, a, b));
    t.push_back(ms / reps);
  }
  CK(cudaGetLastError());
  std::sort(t.begin(), t.end());
  return t[2];
}

// Largest |Σ w - trace(A)| / (n·max |w|) over the batch: a cheap check that every eigenvalue
// was written and is in place.
static double trace_error(const std::vector<double>& w, const std::vector<double>& A, int batch, int n) {
  double worst = 0;
  for (int b = 0; b < batch; ++b) {
    double tr = 0, sum = 0, big = 0;
    for (int i = 0; i < n; ++i) {
      tr += A[(size_t(b) * n + i) * n + i];
      sum += w[size_t(b) * n + i];
      big = std::max(big, std::fabs(w[size_t(b) * n + i]));
    }
    const double err = std::fabs(sum - tr) / (n * (big > 0 ? big : 1));
    worst = std::isnan(err) ? INFINITY : std::max(worst, err);
  }
  return worst;
}

int main(int argc, char** argv) {
  const int batch = argc > 1 ? std::atoi(argv[1]) : 224;
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  setvbuf(stdout, nullptr, _IONBF, 0);
  std::printf("# %s, %d SMs, batch %d\n", prop.name, prop.multiProcessorCount, batch);
  const int only_n = argc > 2 ? std::atoi(argv[2]) : 0;
  for (int n : {16, 32, 64, 128}) {
    if (only_n && n != only_n) continue;
    std::vector<double> h = make_batch(batch, n);
    double *in, *w, *F;
    CK(cudaMalloc(&in, h.size() * 8));
    CK(cudaMalloc(&w, size_t(batch) * n * 8));
    CK(cudaMalloc(&F, h.size() * 8));
    CK(cudaMemcpy(in, h.data(), h.size() * 8, cudaMemcpyHostToDevice));
    std::vector<double> got(size_t(batch) * n);
    for (int threads : {128, 256}) {
      const size_t smem = tridiag::workspace_doubles(n) * 8 + block::packed_size(n) * 8 +
                          std::max(n, 4 * threads) * 4;  // room for the K = 4 grid
      CK(cudaFuncSetAttribute(eig_header, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
      CK(cudaFuncSetAttribute(eig_house, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
      CK(cudaFuncSetAttribute(eig_bisect<1>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
      CK(cudaFuncSetAttribute(eig_bisect<2>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
      CK(cudaFuncSetAttribute(eig_bisect<4>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
      const float t1 = time_ms([&] { eig_header<<<batch, threads, smem>>>(in, n, w); });
      CK(cudaMemcpy(got.data(), w, got.size() * 8, cudaMemcpyDeviceToHost));
      const float th = time_ms([&] { eig_house<<<batch, threads, smem>>>(in, n, w); });
      const float tb1 = time_ms([&] { eig_bisect<1><<<batch, threads, smem>>>(in, n, w); });
      const float tb2 = time_ms([&] { eig_bisect<2><<<batch, threads, smem>>>(in, n, w); });
      const float tb4 = time_ms([&] { eig_bisect<4><<<batch, threads, smem>>>(in, n, w); });
      std::printf("n=%4d thr=%4d   phases: householder %8.1f us, bisection K=1 %8.1f K=2 %8.1f K=4 %8.1f us\n", n,
                  threads, th * 1e3, tb1 * 1e3, tb2 * 1e3, tb4 * 1e3);
      const size_t csmem = cholesky::workspace_doubles(n, threads / 32) * 8 + block::packed_size(n) * 8 +
                           cholesky::workspace_ints(n) * 4;
      CK(cudaFuncSetAttribute(chol_header, cudaFuncAttributeMaxDynamicSharedMemorySize, int(csmem)));
      const float tc = time_ms([&] { chol_header<<<batch, threads, csmem>>>(in, n, 1e-14, F); });
      std::printf("n=%4d thr=%4d eigvalsh %8.1f us (trace error %.1e)   cholesky %8.1f us\n", n, threads, t1 * 1e3,
                  trace_error(got, h, batch, n), tc * 1e3);
    }
    CK(cudaFree(in));
    CK(cudaFree(w));
    CK(cudaFree(F));
  }
  return 0;
}
