// The batched r x r ops on CUDA, one block per matrix, fp64, lower triangle read.
// - sym_eigh without vectors: Householder tridiagonalisation + bisection (tridiag_eig.h).
//   For 32 < n <= 64 the matrix lives in registers (tridiag_tile.cuh, 256 threads), for
//   64 < n <= 96 packed in shared memory with two threads per row (tridiag_rows.cuh, two
//   matrices per SM), for 96 < n <= 128 in registers again, a row chunk per thread
//   (tridiag_regs.cuh, 512 threads, one matrix per SM); the bisection runs in a second launch on
//   the tridiagonal matrices, where two matrices share an SM (for the matrices of the reduction's
//   full waves, in spare blocks of its last partial wave's launch). Otherwise one kernel works on the
//   packed lower triangle, two barriers per Householder step; shared memory holds the workspace
//   and as many trailing rows of the packed matrix as fit (all of it up to n = 232 on an H100);
//   the leading rows of larger matrices live in a global workspace, and they are the first to
//   drop out of the shrinking trailing matrix.
// - sym_eigh with vectors: the parallel cyclic Jacobi solver of jacobi.h. The matrix and the
//   eigenvectors live in shared memory when they fit the block's opt-in limit (n <= 64 on an
//   H100), else in a global workspace that stays L2-resident.
// - psd_cholesky: psd_cholesky.h; for n <= 128 blocked, a panel of columns between trailing
//   updates (cholesky_panel.cuh, the same F bit for bit, two matrices per SM), otherwise on the
//   packed lower triangle, one barrier per pivot step (in shared memory up to n = 223 on an H100;
//   global above).
// Avoids cuSOLVER's batched syevj cliff at n > 32.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <mutex>
#include <tuple>
#include <vector>

#include "gradgeom/block_ops.h"
#include "gradgeom/check.h"
#include "gradgeom/cholesky_panel.cuh"
#include "gradgeom/eigvalsh_staged.h"
#include "gradgeom/jacobi.h"
#include "gradgeom/psd_cholesky.h"
#include "gradgeom/rxr_check.h"
#include "gradgeom/tile_matrix.cuh"
#include "gradgeom/tridiag_eig.h"
#include "gradgeom/tridiag_regs.cuh"
#include "gradgeom/tridiag_rows.cuh"
#include "gradgeom/tridiag_tile.cuh"

namespace gradgeom {
namespace {

struct BlockSync {
  __host__ __device__ void operator()() const {
#ifdef __CUDA_ARCH__
    __syncthreads();
#endif
  }
};

constexpr int kBisectThreads = 128;  // one lane per eigenvalue at n = 128: 147 against 155 us for 256 (H100)

// A barrier across the kBisectThreads threads of group `group` (0 .. kMaxBisectGroups - 1) of a
// larger block: named barrier group + 1 (0 is __syncthreads'). Literal ids, so that the kernels
// reserve five barriers, not all sixteen.
constexpr int kMaxBisectGroups = 4;
struct GroupSync {
  int group;
  __device__ void operator()() const {
    static_assert(kBisectThreads == 128 && kMaxBisectGroups == 4, "the literal barrier operands below");
    switch (group) {
      case 0: asm volatile("bar.sync 1, 128;" ::: "memory"); break;
      case 1: asm volatile("bar.sync 2, 128;" ::: "memory"); break;
      case 2: asm volatile("bar.sync 3, 128;" ::: "memory"); break;
      default: asm volatile("bar.sync 4, 128;" ::: "memory"); break;
    }
  }
};

__global__ void sym_eigh_kernel(const double* in, int n, int m, int ld, bool use_smem, double* work_a,
                                double* work_v, double* w_out, double* v_out) {
  extern __shared__ double smem[];
  __shared__ int flag;
  const int64_t b = blockIdx.x;
  const int tid = threadIdx.x;
  const int nthreads = blockDim.x;
  const int64_t size = int64_t(m) * ld;
  double* rot = smem;
  double* a = use_smem ? smem + 2 * m : work_a + b * size;
  double* v = use_smem ? a + size : work_v + b * size;
  const double* src = in + b * int64_t(n) * n;
  for (int64_t e = tid; e < size; e += nthreads) {
    const int i = static_cast<int>(e / ld);
    const int j = static_cast<int>(e - int64_t(i) * ld);
    double x = 0.0;
    if (i < n && j < n) x = i >= j ? src[int64_t(i) * n + j] : src[int64_t(j) * n + i];
    a[e] = x;
    v[e] = (i == j) ? 1.0 : 0.0;
  }
  __syncthreads();
  jacobi::solve(a, ld, v, m, rot, &flag, tid, nthreads, BlockSync{});
  __syncthreads();
  for (int i = tid; i < n; i += nthreads) {
    const int k = jacobi::ascending_rank(a, ld, n, i);
    w_out[b * n + k] = a[int64_t(i) * ld + i];
    for (int row = 0; row < n; ++row) v_out[(b * n + row) * n + k] = v[int64_t(row) * ld + i];
  }
}

// Shared memory: tridiag workspace, rows [split, n) of the packed matrix, then the grid counts.
// kMaxThreads: the block size it is launched with at most (256 leaves room for 128 registers).
template <int kMaxThreads>
__global__ void __launch_bounds__(kMaxThreads, 2)
    sym_eigvalsh_kernel(const double* in, int n, int split, double* head_work, double* w_out) {
  extern __shared__ double smem[];
  const int64_t b = blockIdx.x;
  const int64_t head_size = block::packed_size(split);
  double* tail = smem + tridiag::workspace_doubles(n);
  int* iwork = reinterpret_cast<int*>(tail + (block::packed_size(n) - head_size));
  const block::PackedLower a{head_work + b * head_size, tail, split};
  block::load_lower(in + b * int64_t(n) * n, n, a, threadIdx.x, blockDim.x);
  __syncthreads();
  tridiag::eigvalsh(a, n, smem, iwork, w_out + b * n, threadIdx.x, blockDim.x, BlockSync{});
}

// Bisection of tridiagonal matrix b that the tile, rows or regs kernel left (d, e, e2 at tri), by
// kBisectThreads threads (tid = 0 .. kBisectThreads - 1, `sync` their barrier); smem: the
// bisection's workspace, bisect_smem_bytes(n).
template <typename Sync>
__device__ void bisect_matrix(const double* tri, const int* scale, int n, double* w_out, int64_t b, double* smem,
                              int tid, Sync sync) {
  const int e = scale[b];
  if (e == tridiag::kDone) return;  // the eigenvalues are written already
  int* iwork = reinterpret_cast<int*>(smem + tridiag::workspace_doubles(n));
  const double* t = tri + b * 3 * int64_t(n);
  for (int i = tid; i < 3 * n; i += kBisectThreads) smem[3 * n + i] = t[i];  // d, e, e2
  sync();
  tridiag::bisect<tridiag::kPoints>(n, smem, iwork, w_out + b * n, e, tid, kBisectThreads, sync);
}

__host__ __device__ inline int64_t bisect_smem_bytes(int n) {
  return (tridiag::workspace_doubles(n) * int64_t(sizeof(double)) +
          tridiag::grid_points(n, kBisectThreads) * int64_t(sizeof(int)) + 15) / 16 * 16;
}

__global__ void __launch_bounds__(kBisectThreads, 2)
    tridiag_bisect_kernel(const double* tri, const int* scale, int n, double* w_out) {
  extern __shared__ double smem[];
  bisect_matrix(tri, scale, n, w_out, blockIdx.x, smem, threadIdx.x, BlockSync{});
}

// One launch of a reduction kernel: blocks 0 .. count - 1 reduce matrices first .. first + count - 1;
// any further blocks bisect matrices 0 .. bisect_count - 1 (reduced by an earlier launch), one
// per group of kBisectThreads threads in the first per_block groups of each block, on the SMs a
// partial last wave leaves idle.
struct ReduceLaunch {
  int64_t first = 0, count = 0, bisect_count = 0;
  int per_block = 1;
  int64_t blocks() const { return count + (bisect_count + per_block - 1) / per_block; }
};

// Whether this block is one of the launch's bisection blocks (which then did its bisections).
__device__ bool bisected_instead(const ReduceLaunch& rl, const double* tri, const int* scale, int n, double* w_out,
                                 double* smem) {
  if (blockIdx.x < rl.count) return false;
  const int group = threadIdx.x / kBisectThreads;
  const int64_t b = (blockIdx.x - rl.count) * rl.per_block + group;
  if (group < rl.per_block && b < rl.bisect_count)
    bisect_matrix(tri, scale, n, w_out, b, smem + group * (bisect_smem_bytes(n) / int64_t(sizeof(double))),
                  threadIdx.x % kBisectThreads, GroupSync{group});
  return true;
}

// The Householder reduction for 33 <= n <= 64 on a register tile (tile_matrix.cuh, tile::Matrix64),
// for 64 < n <= 96 on the packed triangle with two threads per row (tridiag_rows.cuh), for
// 96 < n <= 128 with the matrix in registers (tridiag_regs.cuh); the bisection runs in a second
// launch for all three.
static_assert(tile::Matrix64::NP < tridiag::kRegsMinN && tridiag::kRegsMinN - 1 <= tridiag::kRowsMaxN,
              "the rows kernel covers every n between the tile and register kernels");
bool use_tile(int64_t n) { return n >= 33 && n <= tile::Matrix64::NP; }
bool use_rows(int64_t n) { return n > tile::Matrix64::NP && n < tridiag::kRegsMinN; }
bool use_regs(int64_t n) { return n >= tridiag::kRegsMinN && n <= tridiag::kRegsMaxN; }

template <class M>
__global__ void __launch_bounds__(M::kThreads, M::kMinBlocks)
    tridiag_tile_kernel(const double* in, int n, double* tri, int* scale, double* w_out, ReduceLaunch rl) {
  extern __shared__ double smem[];
  if (bisected_instead(rl, tri, scale, n, w_out, smem)) return;
  const int64_t b = rl.first + blockIdx.x;
  M A(threadIdx.x);
  A.load_lower(in + b * int64_t(n) * n, n);
  tridiag::tridiag_tile(A, n, smem, tri + b * 3 * int64_t(n), scale + b, w_out + b * n, threadIdx.x);
}

__global__ void __launch_bounds__(tridiag::kRegsThreads, 1)
    tridiag_regs_kernel(const double* in, int n, double* tri, int* scale, double* w_out, ReduceLaunch rl) {
  extern __shared__ __align__(16) double smem[];  // its vectors are read as double2
  if (bisected_instead(rl, tri, scale, n, w_out, smem)) return;
  const int64_t b = rl.first + blockIdx.x;
  tridiag::tridiag_regs(in + b * int64_t(n) * n, n, smem, tri + b * 3 * int64_t(n), scale + b, w_out + b * n);
}

__global__ void __launch_bounds__(tridiag::kRowsThreads, 2)
    tridiag_rows_kernel(const double* in, int n, double* tri, int* scale, double* w_out, ReduceLaunch rl) {
  extern __shared__ double smem[];
  if (bisected_instead(rl, tri, scale, n, w_out, smem)) return;
  const int64_t b = rl.first + blockIdx.x;
  tridiag::tridiag_rows(in + b * int64_t(n) * n, n, smem, tri + b * 3 * int64_t(n), scale + b, w_out + b * n);
}

__global__ void __launch_bounds__(cholesky::kPanelThreads, 2)
    psd_cholesky_panel_kernel(const double* in, int n, double tol, double* F) {
  extern __shared__ __align__(16) double smem[];  // the panel rows are read as double2
  const int64_t b = blockIdx.x;
  cholesky::factor_panel(in + b * int64_t(n) * n, n, tol, F + b * int64_t(n) * n, smem);
}

// Threads per matrix: measured on an H100 (224 matrices), 256 beat 512 for the eigenvalue and
// Cholesky kernels up to n = 128 (two blocks share an SM; each is bound by latency).
int block_threads(int64_t n) { return n <= 32 ? 128 : (n <= 128 ? 256 : 512); }
int jacobi_threads(int64_t n) { return n <= 32 ? 128 : (n <= 64 ? 256 : 512); }

// Opt-in dynamic shared memory per block, less room for static shared memory.
int64_t smem_budget(const at::Tensor& A) {
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, A.device().index()));
  return optin - 1024;
}

// A fact about `kernel` on the current device that costs a driver call, for the key (a, b):
// make(device) runs once per kernel, key and device; each call site (Make type) has its cache.
template <typename Make>
int64_t kernel_fact(const void* kernel, int64_t a, int64_t b, Make make) {
  struct Entry {
    const void* kernel;
    int device;
    int64_t a, b, value;
  };
  static std::mutex mutex;
  static std::vector<Entry> cache;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const std::lock_guard<std::mutex> lock(mutex);
  for (const Entry& e : cache)
    if (e.kernel == kernel && e.device == device && e.a == a && e.b == b) return e.value;
  cache.push_back(Entry{kernel, device, a, b, make(device)});
  return cache.back().value;
}

// Lets `kernel` launch with `bytes` of dynamic shared memory: above the default 48 KB, its limit
// is raised to all the device's opt-in shared memory less the kernel's static shared memory, once
// per kernel and device (the driver calls cost ~5 us of host time).
template <typename Kernel>
void allow_smem(Kernel kernel, int64_t bytes) {
  if (bytes <= 48 * 1024) return;
  kernel_fact(reinterpret_cast<const void*>(kernel), 0, 0, [&](int device) {
    int optin = 0;
    cudaFuncAttributes attrs{};
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attrs, kernel));
    const int limit = optin - static_cast<int>(attrs.sharedSizeBytes);
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, limit));
    return int64_t(limit);
  });
}

// Blocks of `kernel` launched with (threads, smem bytes) that fit on one SM of the current device
// at once, and its SMs.
struct Residency {
  int64_t per_sm = 0, sms = 0;
};
Residency residency(const void* kernel, int threads, int64_t smem) {
  Residency r;
  r.per_sm = kernel_fact(kernel, threads, smem, [&](int) {
    int per_sm = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, static_cast<size_t>(smem)));
    return int64_t(per_sm);
  });
  r.sms = kernel_fact(nullptr, 0, 0, [](int device) {
    int sms = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    return int64_t(sms);
  });
  return r;
}

// Bisections a tail launch's spare SM takes on: three share an SM's fp64 pipe about as fast as
// the tail reduces at n = 128 (an H100: four took 217 us against the tail's 178); the others wait
// for the last launch, beside the tail's own.
constexpr int64_t kSpareBisectsPerSM = 3;

// The reduction to tridiagonal form by `kernel` (threads, smem bytes; it writes tri and scale),
// then the bisection. When the reduction takes more than one wave of blocks and the last is
// partial, it runs as two launches, the full waves and then the tail, and the tail's launch
// carries extra blocks that bisect the full waves' matrices on the SMs the tail leaves idle (one
// launch: a bisection on a side stream could take every SM first, each block leaving too few
// registers for a regs-kernel block, and hold the tail back by a whole bisection, as seen on an
// H100). Each matrix goes through the same reduction and bisection code either way, so the bits
// do not change. `hook` (may be null) runs between the reductions and the bisection's launch.
template <typename Kernel>
void eigvalsh_two_launches(const at::Tensor& a64, at::Tensor& w, Kernel kernel, int threads, int64_t smem,
                           const TridiagonalHook* hook) {
  const int64_t batch = a64.size(0);
  const int n = static_cast<int>(a64.size(1));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor tri = at::empty({batch, 3 * n}, a64.options());
  at::Tensor scale = at::empty({batch}, a64.options().dtype(at::kInt));
  GG_CHECK(threads % kBisectThreads == 0 && threads <= kMaxBisectGroups * kBisectThreads,
           "sym_eigh: reduction blocks of ", threads, " threads");
  const int groups = threads / kBisectThreads;
  const int64_t tail_smem = std::max<int64_t>(smem, groups * bisect_smem_bytes(n));
  allow_smem(kernel, tail_smem);
  auto reduce = [&](const ReduceLaunch& rl, int64_t bytes) {
    kernel<<<static_cast<unsigned>(rl.blocks()), threads, static_cast<size_t>(bytes), stream>>>(
        a64.data_ptr<double>(), n, tri.data_ptr<double>(), scale.data_ptr<int>(), w.data_ptr<double>(), rl);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  auto bisect = [&](int64_t first, int64_t count) {
    tridiag_bisect_kernel<<<static_cast<unsigned>(count), kBisectThreads, static_cast<size_t>(bisect_smem_bytes(n)),
                            stream>>>(tri.data_ptr<double>() + first * 3 * n, scale.data_ptr<int>() + first, n,
                                      w.data_ptr<double>() + first * n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  const Residency res = residency(reinterpret_cast<const void*>(kernel), threads, smem);
  const int64_t wave = res.per_sm * res.sms;
  const int64_t tail = wave > 0 ? batch % wave : 0;
  auto tridiagonal_ready = [&] {
    if (hook != nullptr) (*hook)(tri, scale, w);
  };
  if (batch <= wave || tail == 0) {
    reduce(ReduceLaunch{0, batch, 0, 1}, smem);
    tridiagonal_ready();
    bisect(0, batch);
    return;
  }
  const int64_t head = batch - tail;
  const int per_block = static_cast<int>(std::clamp<int64_t>(kSpareBisectsPerSM / res.per_sm, 1, groups));
  const int64_t early = std::min(head, (wave - tail) * per_block);  // bisected beside the tail
  reduce(ReduceLaunch{0, head, 0, 1}, smem);
  reduce(ReduceLaunch{head, tail, early, per_block}, tail_smem);
  tridiagonal_ready();
  bisect(early, batch - early);
}

// `hook` (may be null) is called only where the reduction to tridiagonal form has a launch of its
// own (eigvalsh_two_launches); the one fused kernel of the other sizes never calls it.
void eigvalsh_cuda(const at::Tensor& a64, at::Tensor& w, const TridiagonalHook* hook) {
  const int64_t batch = a64.size(0);
  const int n = static_cast<int>(a64.size(1));
  if (use_tile(n)) {
    using M = tile::Matrix64;
    return eigvalsh_two_launches(a64, w, tridiag_tile_kernel<M>, M::kThreads,
                                 tridiag::tile_workspace_doubles<M>() * int64_t(sizeof(double)), hook);
  }
  if (use_rows(n))
    return eigvalsh_two_launches(a64, w, tridiag_rows_kernel, tridiag::kRowsThreads, tridiag::rows_smem_bytes(n),
                                 hook);
  if (use_regs(n))
    return eigvalsh_two_launches(a64, w, tridiag_regs_kernel, tridiag::kRegsThreads, tridiag::regs_smem_bytes(n),
                                 hook);
  const int threads = block_threads(n);
  constexpr int64_t kDouble = sizeof(double);
  const int64_t fixed = tridiag::workspace_doubles(n) * kDouble + tridiag::grid_points(n, threads) * int64_t(sizeof(int));
  const int64_t budget = smem_budget(a64) - fixed;
  int split = 0;
  while (split < n && (block::packed_size(n) - block::packed_size(split)) * kDouble > budget) ++split;
  const int64_t dyn = fixed + (block::packed_size(n) - block::packed_size(split)) * kDouble;
  const auto kernel = threads <= 256 ? sym_eigvalsh_kernel<256> : sym_eigvalsh_kernel<512>;
  allow_smem(kernel, dyn);
  at::Tensor head;
  if (split > 0) head = at::empty({batch, block::packed_size(split)}, a64.options());
  kernel<<<static_cast<unsigned>(batch), threads, static_cast<size_t>(dyn), c10::cuda::getCurrentCUDAStream()>>>(
      a64.data_ptr<double>(), n, split, split > 0 ? head.data_ptr<double>() : nullptr, w.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// sym_eigh, with `hook` passed to eigvalsh_cuda when only eigenvalues are asked for.
std::tuple<at::Tensor, at::Tensor> sym_eigh_impl(const at::Tensor& A, bool vectors, const TridiagonalHook* hook) {
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
  if (!vectors) {
    eigvalsh_cuda(a64, w, hook);
    return {w, V};
  }

  const int m = static_cast<int>(n + (n % 2));
  const int ld = m + 1;  // odd stride: the columns of a 2x2 block fall in different banks
  const int64_t mat_bytes = int64_t(m) * ld * static_cast<int64_t>(sizeof(double));
  const int64_t rot_bytes = 2 * int64_t(m) * static_cast<int64_t>(sizeof(double));
  const int64_t smem_bytes = rot_bytes + 2 * mat_bytes;
  const bool use_smem = smem_bytes <= smem_budget(A);
  const int64_t dyn_bytes = use_smem ? smem_bytes : rot_bytes;
  allow_smem(sym_eigh_kernel, dyn_bytes);
  at::Tensor work_a, work_v;
  if (!use_smem) {
    work_a = at::empty({batch, m, ld}, opts);
    work_v = at::empty({batch, m, ld}, opts);
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  sym_eigh_kernel<<<static_cast<unsigned>(batch), jacobi_threads(m), static_cast<size_t>(dyn_bytes), stream>>>(
      a64.data_ptr<double>(), static_cast<int>(n), m, ld, use_smem, use_smem ? nullptr : work_a.data_ptr<double>(),
      use_smem ? nullptr : work_v.data_ptr<double>(), w.data_ptr<double>(), V.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {w, V};
}

std::tuple<at::Tensor, at::Tensor> sym_eigh_cuda(const at::Tensor& A, bool vectors) {
  return sym_eigh_impl(A, vectors, /*hook=*/nullptr);
}

// Shared memory: cholesky doubles workspace, the packed matrix (when it fits), the ints workspace.
template <int kMaxThreads>
__global__ void __launch_bounds__(kMaxThreads, 2)
    psd_cholesky_kernel(const double* in, int n, double tol, bool use_smem, double* work, double* F) {
  extern __shared__ double smem[];
  const int64_t b = blockIdx.x;
  const int64_t work_doubles = cholesky::workspace_doubles(n, blockDim.x / 32);
  const int64_t size = block::packed_size(n);
  double* packed = use_smem ? smem + work_doubles : work + b * size;
  int* iwork = reinterpret_cast<int*>(smem + work_doubles + (use_smem ? size : 0));
  const block::PackedLower a{packed, packed, n};
  block::load_lower(in + b * int64_t(n) * n, n, a, threadIdx.x, blockDim.x);
  __syncthreads();
  cholesky::factor(a, n, tol, F + b * int64_t(n) * n, smem, iwork, threadIdx.x, blockDim.x, BlockSync{});
}

void psd_cholesky_panel_cuda(const at::Tensor& a64, double tol, at::Tensor& F) {
  const int n = static_cast<int>(a64.size(1));
  const int64_t bytes = cholesky::panel_smem_bytes(n);
  allow_smem(psd_cholesky_panel_kernel, bytes);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  psd_cholesky_panel_kernel<<<static_cast<unsigned>(a64.size(0)), cholesky::kPanelThreads, static_cast<size_t>(bytes),
                              stream>>>(a64.data_ptr<double>(), n, tol, F.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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
  if (n <= cholesky::kPanelMaxN) {
    psd_cholesky_panel_cuda(a64, tol, F);
    return F;
  }
  const int threads = block_threads(n);
  constexpr int64_t kDouble = sizeof(double);
  const int64_t fixed = cholesky::workspace_doubles(n, threads / 32) * kDouble +
                        cholesky::workspace_ints(n) * int64_t(sizeof(int));
  const int64_t mat_bytes = block::packed_size(n) * kDouble;
  const bool use_smem = fixed + mat_bytes <= smem_budget(A);
  const int64_t dyn = fixed + (use_smem ? mat_bytes : 0);
  const auto kernel = threads <= 256 ? psd_cholesky_kernel<256> : psd_cholesky_kernel<512>;
  allow_smem(kernel, dyn);
  at::Tensor work;
  if (!use_smem) work = at::empty({batch, block::packed_size(n)}, a64.options());
  kernel<<<static_cast<unsigned>(batch), threads, static_cast<size_t>(dyn), c10::cuda::getCurrentCUDAStream()>>>(
      a64.data_ptr<double>(), n, tol, use_smem, use_smem ? nullptr : work.data_ptr<double>(), F.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return F;
}

}  // namespace

at::Tensor sym_eigvalsh_staged(const at::Tensor& a64, const TridiagonalHook& hook) {
  GG_CHECK(a64.is_cuda() && a64.scalar_type() == at::kDouble && a64.is_contiguous(),
           "sym_eigvalsh_staged: a64 must be a contiguous CUDA float64 batch");
  return std::get<0>(sym_eigh_impl(a64, /*vectors=*/false, &hook));
}

TORCH_LIBRARY_IMPL(gradgeom, CUDA, m) {
  m.impl("sym_eigh", &sym_eigh_cuda);
  m.impl("psd_cholesky", &psd_cholesky_cuda);
}

}  // namespace gradgeom
