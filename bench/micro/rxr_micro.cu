// Micro-benchmark of the one-block-per-matrix r x r kernels (no torch, builds in seconds): times
// the packed kernels (tridiag::eigvalsh, its phases: scale + Householder, bisection with 1, 2 or
// 4 shifts per thread; cholesky::factor) at 128 and 256 threads, and against them the kernels
// that ship for n <= 128: the blocked Cholesky (cholesky_panel.cuh: whether F is the same bit
// for bit), the register-tile Householder for 32 < n <= 64 (tridiag_tile.cuh + the bisection
// launch, at 128/256/512 threads, and per-phase cycle counts of one step via ClockProbe) and the
// rows Householder for 64 < n <= 128 (tridiag_rows.cuh, shipping up to n = 96) and the register
// Householder for 64 < n <= 128 (tridiag_regs.cuh, shipping from n = 97): times and eigenvalue
// differences.
//
//   nvcc -O3 -std=c++17 -arch=sm_90 --expt-relaxed-constexpr -Icsrc/include bench/micro/rxr_micro.cu -o build/rxr_micro
//   build/rxr_micro [batch] [n]
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "gradgeom/cholesky_panel.cuh"
#include "gradgeom/psd_cholesky.h"
#include "gradgeom/tridiag_eig.h"
#include "gradgeom/tridiag_regs.cuh"
#include "gradgeom/tridiag_rows.cuh"
#include "gradgeom/tridiag_tile.cuh"

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

__global__ void __launch_bounds__(cholesky::kPanelThreads, 2) chol_panel(const double* in, int n, double tol, double* F) {
  extern __shared__ __align__(16) double smem[];  // the panel rows are read as double2
  cholesky::factor_panel(in + blockIdx.x * int64_t(n) * n, n, tol, F + blockIdx.x * int64_t(n) * n, smem);
}

__global__ void __launch_bounds__(tridiag::kRowsThreads, 2) house_rows(const double* in, int n, double* tri, int* scale, double* w) {
  extern __shared__ double smem[];
  tridiag::tridiag_rows(in + blockIdx.x * int64_t(n) * n, n, smem, tri + blockIdx.x * 3 * int64_t(n), scale + blockIdx.x,
                        w + blockIdx.x * n);
}

__global__ void __launch_bounds__(tridiag::kRegsThreads, 1) house_regs(const double* in, int n, double* tri, int* scale, double* w) {
  extern __shared__ __align__(16) double smem[];
  tridiag::tridiag_regs(in + blockIdx.x * int64_t(n) * n, n, smem, tri + blockIdx.x * 3 * int64_t(n), scale + blockIdx.x,
                        w + blockIdx.x * n);
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

// Largest |w - w_ref| / max |w_ref| over each matrix of the batch (+Inf for a NaN).
static double max_relative_diff(const std::vector<double>& w, const std::vector<double>& w_ref, int batch, int n) {
  double worst = 0;
  for (int b = 0; b < batch; ++b) {
    double big = 0;
    for (int i = 0; i < n; ++i) big = std::max(big, std::fabs(w_ref[size_t(b) * n + i]));
    for (int i = 0; i < n; ++i) {
      const double e = std::fabs(w[size_t(b) * n + i] - w_ref[size_t(b) * n + i]) / big;
      worst = std::isnan(e) ? INFINITY : std::max(worst, e);
    }
  }
  return worst;
}

// ---- register-tile kernels (tile_matrix.cuh) ---------------------------------------------------
template <class M>
__global__ void __launch_bounds__(M::kThreads, M::kMinBlocks) house_tile(const double* in, int n, double* tri, int* scale, double* w) {
  extern __shared__ double smem[];
  M A(threadIdx.x);
  A.load_lower(in + blockIdx.x * int64_t(n) * n, n);
  tridiag::tridiag_tile(A, n, smem, tri + blockIdx.x * 3 * int64_t(n), scale + blockIdx.x, w + blockIdx.x * n, threadIdx.x);
}

// Bisection of the tile and rows kernels' tridiagonal matrices (the shipping second launch runs 128
// threads).
template <int kThreads>
__global__ void __launch_bounds__(kThreads, kThreads <= 256 ? 2 : 1) tri_bisect(const double* tri, const int* scale, int n, double* w) {
  extern __shared__ double smem[];
  const int e = scale[blockIdx.x];
  if (e == tridiag::kDone) return;
  int* iwork = reinterpret_cast<int*>(smem + tridiag::workspace_doubles(n));
  const double* t = tri + blockIdx.x * 3 * int64_t(n);
  for (int i = threadIdx.x; i < 3 * n; i += blockDim.x) smem[3 * n + i] = t[i];
  __syncthreads();
  tridiag::bisect<tridiag::kPoints>(n, smem, iwork, w + blockIdx.x * n, e, threadIdx.x, blockDim.x, Sync{});
}

// Cycle counts per phase of every step, summed over the steps in registers (the phase is a
// constant at every call), written out by thread `who` of block 0 at the end.
struct ClockProbe {
  long long sum[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  long long last = 0;
  __device__ ClockProbe() {
#ifdef __CUDA_ARCH__
    last = clock64();
#endif
  }
  __device__ __forceinline__ void operator()(int phase) {
#ifdef __CUDA_ARCH__
    const long long t = clock64();
    sum[phase] += t - last;
    last = t;
#endif
  }
  __device__ void flush(long long* acc, int who) const {
    if (blockIdx.x == 0 && threadIdx.x == who)
      for (int i = 0; i < 8; ++i) acc[i] = sum[i];
  }
};

template <class M>
__global__ void __launch_bounds__(M::kThreads, M::kMinBlocks) house_probe(const double* in, int n, double* w, long long* acc, int who) {
  extern __shared__ double smem[];
  M A(threadIdx.x);
  A.load_lower(in + blockIdx.x * int64_t(n) * n, n);
  const tridiag::TileWork<M> ws{smem};
  const int e = tridiag::scale_tile(A, n, ws, w + blockIdx.x * n, threadIdx.x);
  if (e == tridiag::kDone) return;
  ClockProbe probe;
  tridiag::tridiagonalize_tile(A, n, ws, threadIdx.x, probe);
  probe.flush(acc, who);
}

template <class M>
static void probe_case(const double* in, double* w, double* F, int batch, int n) {
  const size_t esmem = tridiag::tile_workspace_doubles<M>() * 8;
  long long* acc;
  CK(cudaMalloc(&acc, 16 * 8));
  for (int who : {0, M::kThreads - 1}) {
    for (int kind = 0; kind < 1; ++kind) {
      CK(cudaMemset(acc, 0, 16 * 8));
      house_probe<M><<<batch, M::kThreads, esmem>>>(in, n, w, acc, who);
      CK(cudaDeviceSynchronize());
      long long h[16];
      CK(cudaMemcpy(h, acc, sizeof h, cudaMemcpyDeviceToHost));
      const int phases = kind == 0 ? 8 : 6;
      long long total = 0;
      for (int i = 0; i < phases; ++i) total += h[i];
      std::printf("n=%4d probe %s thread %3d: cycles per step %6lld =", n, kind == 0 ? "householder" : "cholesky   ", who,
                  total / n);
      for (int i = 0; i < phases; ++i) std::printf(" %5lld", h[i] / n);
      std::printf("\n");
    }
  }
  CK(cudaFree(acc));
}

template <class M>
static void tile_case(const double* in, double* w, double* F, int batch, int n, const std::vector<double>& h,
                      const std::vector<double>& w_ref) {
  const size_t esmem = tridiag::tile_workspace_doubles<M>() * 8;
  const size_t bsmem = tridiag::workspace_doubles(n) * 8 + tridiag::grid_points(n, 256) * 4;
  std::vector<double> got(size_t(batch) * n);
  double* tri;
  int* scale;
  CK(cudaMalloc(&tri, size_t(batch) * 3 * n * 8));
  CK(cudaMalloc(&scale, size_t(batch) * 4));
  const float te = time_ms([&] {
    house_tile<M><<<batch, M::kThreads, esmem>>>(in, n, tri, scale, w);
    tri_bisect<128><<<batch, 128, bsmem>>>(tri, scale, n, w);
  });
  CK(cudaMemcpy(got.data(), w, got.size() * 8, cudaMemcpyDeviceToHost));
  const double werr = max_relative_diff(got, w_ref, batch, n);
  const float th = time_ms([&] { house_tile<M><<<batch, M::kThreads, esmem>>>(in, n, tri, scale, w); });
  for (int bt : {128, 256, 512}) {
    const size_t bs = tridiag::workspace_doubles(n) * 8 + tridiag::grid_points(n, bt) * 4;
    const float tb = time_ms([&] {
      if (bt == 128) tri_bisect<128><<<batch, 128, bs>>>(tri, scale, n, w);
      if (bt == 256) tri_bisect<256><<<batch, 256, bs>>>(tri, scale, n, w);
      if (bt == 512) tri_bisect<512><<<batch, 512, bs>>>(tri, scale, n, w);
    });
    std::vector<double> wb(size_t(batch) * n);
    CK(cudaMemcpy(wb.data(), w, wb.size() * 8, cudaMemcpyDeviceToHost));
    double diff = 0;
    for (size_t i = 0; i < wb.size(); ++i) diff = std::max(diff, std::fabs(wb[i] - got[i]));
    std::printf("n=%4d tile bisection %3d threads %8.1f us (max diff vs 128: %.1e)\n", n, bt, tb * 1e3, diff);
  }
  CK(cudaFree(tri));
  CK(cudaFree(scale));
  std::printf("n=%4d TILE NP=%d thr=%4d eigvalsh %8.1f us (householder %8.1f, trace err %.1e, max |w-w_old|/|w|max %.1e)"
              "\n",
              n, M::NP, M::kThreads, te * 1e3, th * 1e3, trace_error(got, h, batch, n), werr);
}

// The two-threads-per-row Householder kernel (tridiag_rows.cuh; ships for 64 < n <= 96) and the
// register one (tridiag_regs.cuh; ships for 96 < n <= 128), each with the bisection launch,
// against the packed kernel's eigenvalues w_ref.
static void rows_case(const double* in, double* w, int batch, int n, const std::vector<double>& h,
                      const std::vector<double>& w_ref) {
  const size_t bsmem = tridiag::workspace_doubles(n) * 8 + tridiag::grid_points(n, 256) * 4;
  double* tri;
  int* scale;
  CK(cudaMalloc(&tri, size_t(batch) * 3 * n * 8));
  CK(cudaMalloc(&scale, size_t(batch) * 4));
  std::vector<double> wr(size_t(batch) * n);
  // One Householder kernel alone and with the bisection after it, checked against w_ref.
  auto reduction_case = [&](const char* label, auto kernel, int threads, int smem) {
    CK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    const float th = time_ms([&] { kernel<<<batch, threads, smem>>>(in, n, tri, scale, w); });
    const float te = time_ms([&] {
      kernel<<<batch, threads, smem>>>(in, n, tri, scale, w);
      tri_bisect<128><<<batch, 128, bsmem>>>(tri, scale, n, w);
    });
    CK(cudaMemcpy(wr.data(), w, wr.size() * 8, cudaMemcpyDeviceToHost));
    std::printf("n=%4d %s eigvalsh %8.1f us (householder %8.1f, trace err %.1e, max |w-w_old|/|w|max %.1e, smem %d B)\n",
                n, label, te * 1e3, th * 1e3, trace_error(wr, h, batch, n), max_relative_diff(wr, w_ref, batch, n), smem);
  };
  reduction_case("ROWS", house_rows, tridiag::kRowsThreads, int(tridiag::rows_smem_bytes(n)));
  reduction_case("REGS", house_regs, tridiag::kRegsThreads, int(tridiag::regs_smem_bytes(n)));
  CK(cudaFree(tri));
  CK(cudaFree(scale));
}

int main(int argc, char** argv) {
  const int batch = argc > 1 ? std::atoi(argv[1]) : 224;
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  setvbuf(stdout, nullptr, _IONBF, 0);
  std::printf("# %s, %d SMs, batch %d\n", prop.name, prop.multiProcessorCount, batch);
  const int only_n = argc > 2 ? std::atoi(argv[2]) : 0;
  for (int n : {16, 32, 33, 48, 64, 65, 96, 97, 100, 127, 128}) {
    if (only_n && n != only_n) continue;
    std::vector<double> h = make_batch(batch, n);
    double *in, *w, *F;
    CK(cudaMalloc(&in, h.size() * 8));
    CK(cudaMalloc(&w, size_t(batch) * n * 8));
    CK(cudaMalloc(&F, h.size() * 8));
    CK(cudaMemcpy(in, h.data(), h.size() * 8, cudaMemcpyHostToDevice));
    std::vector<double> got(size_t(batch) * n);
    std::vector<double> w_ref, F_ref(h.size());
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
      if (threads == 256) {
        w_ref = got;
        CK(cudaMemcpy(F_ref.data(), F, F_ref.size() * 8, cudaMemcpyDeviceToHost));
      }
      std::printf("n=%4d thr=%4d eigvalsh %8.1f us (trace error %.1e)   cholesky %8.1f us\n", n, threads, t1 * 1e3,
                  trace_error(got, h, batch, n), tc * 1e3);
    }
    {
      const int psmem = int(cholesky::panel_smem_bytes(n));
      CK(cudaFuncSetAttribute(chol_panel, cudaFuncAttributeMaxDynamicSharedMemorySize, psmem));
      const float tp = time_ms([&] { chol_panel<<<batch, cholesky::kPanelThreads, psmem>>>(in, n, 1e-14, F); });
      std::vector<double> Fp(F_ref.size());
      CK(cudaMemcpy(Fp.data(), F, Fp.size() * 8, cudaMemcpyDeviceToHost));
      size_t pdiff = 0;
      for (size_t i = 0; i < Fp.size(); ++i) pdiff += std::memcmp(&Fp[i], &F_ref[i], 8) != 0;
      std::printf("n=%4d PANEL cholesky %8.1f us (%zu entries differ from the packed kernel, smem %d B)\n", n, tp * 1e3,
                  pdiff, psmem);
    }
    if (n > 32 && n <= 64) {
      tile_case<tile::Matrix64>(in, w, F, batch, n, h, w_ref);
      probe_case<tile::Matrix64>(in, w, F, batch, n);
    }
    if (n > 64 && n <= 128) rows_case(in, w, batch, n, h, w_ref);
    CK(cudaFree(in));
    CK(cudaFree(w));
    CK(cudaFree(F));
  }
  return 0;
}
