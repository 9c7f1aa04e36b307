// lora_gram on CUDA. Every Gram job XᵀX (lora_gram_plan.h) is split along X's rows; each split
// is one work unit, and units take one of two paths:
//  * tensor cores (mma_gram.cuh, mma_gram_wide.cuh for r > 64): fp16/bf16 factors with r <= 128
//    and one unit stride (B [d, r] or A [r, k] row-major, or either stored transposed), on sm_80+:
//    the whole r x r Gram of the split per block. For r > 64 with 16-byte aligned lines on
//    Hopper, where the build has sm_90a code, wgmma_gram.cuh instead (the same bits);
//  * CUDA cores (everything else): one 64 x 64 tile on or above the diagonal per block; the block
//    stages a chunk of rows of the two column panels in shared memory (widened to fp32, or fp64
//    for fp64 input) and each thread accumulates a register tile (4 x 4; 1 x 1 or 2 x 2 for a
//    narrow diagonal tile, which stages more rows per chunk instead).
// Partials are written per split in fp64; a last launch sums each entry's splits in split order
// and writes the padded [n, R, R] outputs. No atomics: bitwise deterministic. Current stream,
// no host synchronisation.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>
#include <tuple>
#include <vector>

#include "gradgeom/check.h"
#include "gradgeom/cuda_reduce.cuh"
#include "gradgeom/cached_upload.cuh"
#include "gradgeom/lora_gram_plan.h"
#include "gradgeom/mma_gram.cuh"
#include "gradgeom/mma_gram_wide.cuh"
#include "gradgeom/stream_lru.h"
#include "gradgeom/wgmma_gram.cuh"

namespace gradgeom {
namespace {

using namespace cuda_detail;

constexpr int kThreads = 256;
constexpr int kTile = 64;        // output tile edge
constexpr int kChunk = 32;       // rows staged per chunk for a full-width panel
constexpr int kPanel = 2176;     // panel elements: max over widths w of (kChunk*kTile/w)*(w+1)
constexpr int64_t kMinSplitRows = 256;

struct DeviceGramJob {
  const void* data;
  int64_t rows;
  int64_t row_stride;
  int64_t col_stride;
  int64_t partial_offset;  // in doubles; splits * cols * cols entries follow
  int32_t cols;
  int32_t type;
  int32_t splits;
  int32_t mma;  // 0: CUDA-core path; else W | layout << 8 (tensor-core path, mma_gram.cuh)
  int64_t rows_per_split;
};
static_assert(sizeof(DeviceGramJob) == 64, "DeviceGramJob must be 8 words");

struct DeviceGramUnit {
  int32_t job;
  int32_t split;
  int32_t ti;
  int32_t tj;
};
static_assert(sizeof(DeviceGramUnit) == 16, "DeviceGramUnit must be 2 words");

// Panel geometry of one unit: `width` columns padded to wpad in {16, 32, 64}, `rows` per chunk,
// `stride` elements per staged row.
struct PanelShape {
  int wpad;
  int rows;
  int stride;
};

__device__ __forceinline__ PanelShape panel_shape(int width) {
  const int wpad = width <= 16 ? 16 : (width <= 32 ? 32 : kTile);
  return PanelShape{wpad, kChunk * kTile / wpad, wpad + 1};
}

template <typename Kind>
__device__ __forceinline__ void stage_panel(const DeviceGramJob& job, int64_t row0, int64_t rows_left, int col0,
                                            const PanelShape& ps, typename Kind::acc* panel) {
  using acc_t = typename Kind::acc;
  using storage = typename Kind::storage;
  const storage* base = static_cast<const storage*>(job.data);
  const int width = min(kTile, job.cols - col0);
  const int height = rows_left < ps.rows ? static_cast<int>(rows_left) : ps.rows;
  for (int e = threadIdx.x; e < ps.rows * ps.wpad; e += kThreads) {
    int row, col;
    if (job.col_stride == 1) {  // consecutive threads walk along a row of X
      row = e / ps.wpad;
      col = e - row * ps.wpad;
    } else {  // consecutive threads walk down a column of X (a row of A)
      col = e / ps.rows;
      row = e - col * ps.rows;
    }
    acc_t v = acc_t(0);
    if (row < height && col < width)
      v = Kind::widen(base[(row0 + row) * job.row_stride + int64_t(col0 + col) * job.col_stride]);
    panel[row * ps.stride + col] = v;
  }
}

// A 16 x 16 grid of threads covers the wpad x wpad tile; each thread owns a kTm x kTm register
// tile (kTm = wpad / 16), so a narrow panel does 1 or 4 products per staged row, not 16.
template <typename Kind, int kTm>
__device__ void unit_gram_tiles(const DeviceGramJob& job, const DeviceGramUnit& u, const PanelShape& ps,
                                typename Kind::acc* panel_i, typename Kind::acc* panel_j, double* partials) {
  using acc_t = typename Kind::acc;
  const int tx = threadIdx.x % 16;
  const int ty = threadIdx.x / 16;
  const int64_t row_begin = int64_t(u.split) * job.rows_per_split;
  const int64_t row_end = min(job.rows, row_begin + job.rows_per_split);
  acc_t acc[kTm][kTm] = {};
  for (int64_t row0 = row_begin; row0 < row_end; row0 += ps.rows) {
    stage_panel<Kind>(job, row0, row_end - row0, u.ti * kTile, ps, panel_i);
    if (u.ti != u.tj) stage_panel<Kind>(job, row0, row_end - row0, u.tj * kTile, ps, panel_j);
    __syncthreads();
#pragma unroll 4
    for (int t = 0; t < ps.rows; ++t) {
      acc_t xi[kTm], xj[kTm];
#pragma unroll
      for (int a = 0; a < kTm; ++a) {
        xi[a] = panel_i[t * ps.stride + ty + 16 * a];
        xj[a] = panel_j[t * ps.stride + tx + 16 * a];
      }
#pragma unroll
      for (int a = 0; a < kTm; ++a)
#pragma unroll
        for (int b = 0; b < kTm; ++b) acc[a][b] += xi[a] * xj[b];
    }
    __syncthreads();
  }
  const int64_t r = job.cols;
  double* out = partials + job.partial_offset + int64_t(u.split) * r * r;
#pragma unroll
  for (int a = 0; a < kTm; ++a) {
#pragma unroll
    for (int b = 0; b < kTm; ++b) {
      const int64_t i = int64_t(u.ti) * kTile + ty + 16 * a;
      const int64_t j = int64_t(u.tj) * kTile + tx + 16 * b;
      if (i < r && j < r) {
        out[i * r + j] = static_cast<double>(acc[a][b]);
        if (u.ti != u.tj) out[j * r + i] = static_cast<double>(acc[a][b]);
      }
    }
  }
}

template <typename Kind>
__device__ void unit_gram(const DeviceGramJob& job, const DeviceGramUnit& u, unsigned char* smem, double* partials) {
  using acc_t = typename Kind::acc;
  acc_t* panel_i = reinterpret_cast<acc_t*>(smem);
  acc_t* panel_j = u.ti == u.tj ? panel_i : panel_i + kPanel;
  // Off-diagonal tiles pair a full panel with another: full width. A diagonal tile may be narrow.
  const PanelShape ps = panel_shape(u.ti == u.tj ? min(kTile, job.cols - u.ti * kTile) : kTile);
  switch (ps.wpad) {
    case 16: unit_gram_tiles<Kind, 1>(job, u, ps, panel_i, panel_j, partials); break;
    case 32: unit_gram_tiles<Kind, 2>(job, u, ps, panel_i, panel_j, partials); break;
    default: unit_gram_tiles<Kind, 4>(job, u, ps, panel_i, panel_j, partials); break;
  }
}

__global__ void __launch_bounds__(kThreads) gram_units_kernel(const DeviceGramJob* jobs, const DeviceGramUnit* units,
                                                              double* partials) {
  __shared__ __align__(16) unsigned char smem[2 * kPanel * sizeof(double)];
  const DeviceGramUnit u = units[blockIdx.x];
  const DeviceGramJob job = jobs[u.job];
  switch (static_cast<ElemType>(job.type)) {
    case ElemType::kFloat32: unit_gram<F32>(job, u, smem, partials); break;
    case ElemType::kFloat64: unit_gram<F64>(job, u, smem, partials); break;
    case ElemType::kFloat16: unit_gram<F16>(job, u, smem, partials); break;
    case ElemType::kBFloat16: unit_gram<BF16>(job, u, smem, partials); break;
  }
}

// Job DeviceGramJob::mma code: bits 0-7 W, bits 8-15 layout, bit 16 "direct": the job has one
// split, whose Gram goes straight into the [n, R, R] output instead of the partials; bit 17:
// 4-byte copies, bit 18: 2-byte loads (mma_gram::Job::copy_bytes).
constexpr int32_t kDirect = 1 << 16;
constexpr int32_t kCopy4 = 1 << 17;
constexpr int32_t kCopy2 = 1 << 18;

// The tensor-core kernels' view of unit u of job: its rows, copies and output (straight into the
// [n, R, R] Gram for a direct job, else the split's fp64 partial).
__device__ __forceinline__ mma_gram::Job unit_job(const DeviceGramUnit& u, const DeviceGramJob& job, double* partials,
                                                  int64_t R, double* out_b, double* out_a) {
  const int64_t begin = int64_t(u.split) * job.rows_per_split;
  mma_gram::Job mj{static_cast<const uint16_t*>(job.data), begin, min(job.rows, begin + job.rows_per_split),
                   job.row_stride, job.col_stride, job.cols, nullptr, job.cols,
                   (job.mma & kCopy2) ? 2 : ((job.mma & kCopy4) ? 4 : 16)};
  if (job.mma & kDirect) {
    mj.out = ((u.job & 1) ? out_a : out_b) + int64_t(u.job / 2) * R * R;
    mj.ld = R;
  } else {
    mj.out = partials + job.partial_offset + int64_t(u.split) * job.cols * job.cols;
  }
  return mj;
}

template <bool kWide>
__global__ void __launch_bounds__(mma_gram::Ring<kWide>::kThreads, kWide ? 1 : 2)
    gram_mma_kernel(const DeviceGramJob* jobs, const DeviceGramUnit* units, double* partials, int64_t R,
                    double* out_b, double* out_a) {
  extern __shared__ __align__(16) unsigned char mma_smem[];
  const DeviceGramUnit u = units[blockIdx.x];
  const DeviceGramJob job = jobs[u.job];
  const mma_gram::Job mj = unit_job(u, job, partials, R, out_b, out_a);
  const int width = job.mma & 0xff;
  const int layout = (job.mma >> 8) & 0xff;
  const bool bf16 = static_cast<ElemType>(job.type) == ElemType::kBFloat16;
  if (kWide) {
    if (bf16)
      mma_gram::gram_wide_any<true>(layout, mj, mma_smem);
    else
      mma_gram::gram_wide_any<false>(layout, mj, mma_smem);
  } else {
    if (bf16)
      mma_gram::gram_narrow<true>(layout, width, mj, mma_smem);
    else
      mma_gram::gram_narrow<false>(layout, width, mj, mma_smem);
  }
}

// The W = 128 units with 16-byte copies on wgmma (wgmma_gram.cuh), where this build has sm_90a
// code. Elsewhere the body is empty and the launch bound is 32 threads: the host reads that bound
// back (cudaFuncGetAttributes) to know whether the loaded binary can run the kernel.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define GRADGEOM_WGMMA_BOUND 512
#else
#define GRADGEOM_WGMMA_BOUND 32
#endif
static_assert(wgmma_gram::kThreads == 512, "GRADGEOM_WGMMA_BOUND");
__global__ void __launch_bounds__(GRADGEOM_WGMMA_BOUND, 1)
    gram_wgmma_kernel(const DeviceGramJob* jobs, const DeviceGramUnit* units, double* partials, int64_t R,
                      double* out_b, double* out_a) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ __align__(16) unsigned char wgmma_smem[];
  const DeviceGramUnit u = units[blockIdx.x];
  const DeviceGramJob job = jobs[u.job];
  const mma_gram::Job mj = unit_job(u, job, partials, R, out_b, out_a);  // 16-byte copies: routed so
  const bool bf16 = static_cast<ElemType>(job.type) == ElemType::kBFloat16;
  if (((job.mma >> 8) & 0xff) == mma_gram::kColumns) {
    if (bf16)
      wgmma_gram::gram<mma_gram::kColumns, true>(mj, wgmma_smem);
    else
      wgmma_gram::gram<mma_gram::kColumns, false>(mj, wgmma_smem);
  } else if (bf16) {
    wgmma_gram::gram<mma_gram::kRows, true>(mj, wgmma_smem);
  } else {
    wgmma_gram::gram<mma_gram::kRows, false>(mj, wgmma_smem);
  }
#endif
}

// Block b merges job merge_jobs[b]: out[adapter][i][j] = sum over its splits, for i, j < r
// (the rest of the output is zero-initialised by the host when some r < R).
__global__ void __launch_bounds__(kThreads) gram_merge_kernel(const DeviceGramJob* jobs, const int32_t* merge_jobs,
                                                              const double* partials, int64_t R, double* out_b,
                                                              double* out_a) {
  const int32_t j = merge_jobs[blockIdx.x];
  const DeviceGramJob job = jobs[j];
  const int64_t r = job.cols;
  double* out = ((j & 1) ? out_a : out_b) + int64_t(j / 2) * R * R;
  for (int64_t e = threadIdx.x; e < r * r; e += kThreads) {
    const int64_t i = e / r;
    const double* p = partials + job.partial_offset + e;
    double v = 0.0;
    for (int s = 0; s < job.splits; ++s) v += p[int64_t(s) * r * r];
    out[i * R + (e - i * r)] = v;
  }
}

// Per-device facts read once: SM count, whether the tensor-core path can run (sm_80+) and whether
// the loaded binary has the wgmma kernel for this device (sm_90a code on a 9.0 device).
struct DeviceFacts {
  int sms;
  bool mma;
  bool wgmma;
};

DeviceFacts device_facts(int device) {
  static std::array<std::atomic<int>, 64> cache{};  // sms | mma << 16 | wgmma << 17, 0 = unknown
  const bool cached = device >= 0 && device < static_cast<int>(cache.size());
  int word = cached ? cache[device].load(std::memory_order_relaxed) : 0;
  if (word == 0) {
    int sms = 0, major = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    if (major >= 8) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(gram_mma_kernel<false>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          mma_gram::Ring<false>::kSmemBytes));
      C10_CUDA_CHECK(cudaFuncSetAttribute(gram_mma_kernel<true>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          mma_gram::Ring<true>::kSmemBytes));
    }
    bool wgmma = false;
    if (major == 9) {
      cudaFuncAttributes attr{};
      const cudaError_t got = cudaFuncGetAttributes(&attr, gram_wgmma_kernel);
      if (got != cudaSuccess) {
        (void)cudaGetLastError();  // no code for this device in the binary: not an error here
      } else if (attr.maxThreadsPerBlock == wgmma_gram::kThreads) {
        C10_CUDA_CHECK(cudaFuncSetAttribute(gram_wgmma_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            wgmma_gram::kSmemBytes));
        wgmma = true;
      }
    }
    word = std::max(sms, 1) | (major >= 8 ? 1 << 16 : 0) | (wgmma ? 1 << 17 : 0);
    if (cached) cache[device].store(word, std::memory_order_relaxed);
  }
  return DeviceFacts{word & 0xffff, ((word >> 16) & 1) != 0, ((word >> 17) & 1) != 0};
}

// The tensor-core path code of a job (DeviceGramJob::mma), or 0 when it must take CUDA cores.
int32_t mma_path(const GramJob& g) {
  if (g.type != ElemType::kFloat16 && g.type != ElemType::kBFloat16) return 0;
  if (g.cols < 1 || g.cols > 128 || g.rows == 0) return 0;
  // X's contiguous lines (columns for kColumns, rows for kRows) start every `line` elements.
  int32_t layout;
  int64_t line;
  if (g.row_stride == 1 && g.cols > 1) {
    layout = mma_gram::kColumns;
    line = g.col_stride;
  } else if (g.col_stride == 1) {
    layout = mma_gram::kRows;
    line = g.row_stride;
  } else {
    return 0;
  }
  const auto address = reinterpret_cast<uintptr_t>(g.data);
  int32_t copies;
  if (address % 16 == 0 && line % 8 == 0)
    copies = 0;
  else if (address % 4 == 0 && line % 2 == 0)
    copies = kCopy4;
  else
    copies = kCopy2;
  const int32_t width = g.cols <= 16 ? 16 : (g.cols <= 32 ? 32 : (g.cols <= 64 ? 64 : 128));
  return width | layout << 8 | copies;
}

// What the launches of one factor list need, derived from its plan alone: the device metadata
// (jobs, CUDA-core units, tensor-core units, merge list; int32 pairs per word) and the counts.
struct LaunchPlan {
  at::Tensor meta;  // int64 words on the device, read-only (may be shared with other calls)
  int64_t job_words = 0, unit_words = 0, mma_words = 0;
  int64_t units = 0, narrow = 0, wide = 0, wgmma = 0, merges = 0;
  int64_t partial_total = 0;  // doubles of fp64 partials the split jobs write
  bool padded = false;        // some output entry is written by no kernel: zero-initialise
};

LaunchPlan make_launch_plan(const LoraGramPlan& plan, const DeviceFacts& facts, const at::TensorOptions& dev) {
  const int64_t R = plan.max_rank;
  const int64_t num_jobs = static_cast<int64_t>(plan.jobs.size());
  LaunchPlan lp;
  std::vector<int32_t> path(num_jobs);
  int64_t base_units = 0;
  for (int64_t j = 0; j < num_jobs; ++j) {
    const GramJob& g = plan.jobs[j];
    path[j] = facts.mma ? mma_path(g) : 0;
    const int64_t tiles = (g.cols + kTile - 1) / kTile;
    base_units += g.rows == 0 ? 0 : (path[j] ? 1 : tiles * (tiles + 1) / 2);
    lp.padded = lp.padded || g.rows == 0 || g.cols < R;
  }
  // Split rows until there are enough blocks to fill the GPU a few times over.
  const int64_t want_splits =
      std::max<int64_t>(1, (int64_t(8) * facts.sms + base_units - 1) / std::max<int64_t>(base_units, 1));

  std::vector<DeviceGramJob> jobs(num_jobs);
  std::vector<DeviceGramUnit> units, mma_units, wide_units, wgmma_units;
  mma_units.reserve(num_jobs);
  wide_units.reserve(num_jobs);
  wgmma_units.reserve(num_jobs);
  std::vector<int32_t> merge_jobs;
  // The split of the previous job, reused for a job of the same rows, cols and path (the usual
  // case: adapters of one model share shapes), which saves five 64-bit divisions a job.
  int64_t memo_rows = -1, memo_cols = -1, per_split = 0, splits = 0;
  int32_t memo_path = -1;
  for (int64_t j = 0; j < num_jobs; ++j) {
    const GramJob& g = plan.jobs[j];
    if (g.rows != memo_rows || g.cols != memo_cols || path[j] != memo_path) {
      // A split is a whole number of staged chunks: kMinSplitRows rows (CUDA cores), or one
      // chunk of 8192 / W rows (tensor cores) and at least 32·r rows, so that a split's fp64
      // partial (8·r² bytes, written and read back) stays small next to its 2·r·rows bytes of input.
      int64_t grain = kMinSplitRows;
      if (path[j]) {
        const int64_t chunk = mma_gram::kChunkElems / (path[j] & 0xff);
        grain = (32 * g.cols + chunk - 1) / chunk * chunk;
      }
      const int64_t grains = (g.rows + grain - 1) / grain;
      const int64_t want = std::min<int64_t>(want_splits, grains);
      per_split = want == 0 ? 0 : (grains + want - 1) / want * grain;
      splits = per_split == 0 ? 0 : (g.rows + per_split - 1) / per_split;
      GG_CHECK(splits < (int64_t(1) << 31), "lora_gram: too many row splits");
      memo_rows = g.rows;
      memo_cols = g.cols;
      memo_path = path[j];
    }
    const bool direct = path[j] && splits == 1;
    jobs[j] = DeviceGramJob{g.data, g.rows, g.row_stride, g.col_stride, lp.partial_total, static_cast<int32_t>(g.cols),
                            static_cast<int32_t>(g.type), static_cast<int32_t>(splits),
                            path[j] | (direct ? kDirect : 0), per_split};
    if (splits > 0 && !direct) {
      lp.partial_total += splits * g.cols * g.cols;
      merge_jobs.push_back(static_cast<int32_t>(j));
    }
    const int32_t tiles = path[j] ? 1 : static_cast<int32_t>((g.cols + kTile - 1) / kTile);
    const bool wide = (path[j] & 0xff) == 128;
    const bool on_wgmma = wide && facts.wgmma && (path[j] & (kCopy4 | kCopy2)) == 0;
    std::vector<DeviceGramUnit>& into =
        path[j] ? (on_wgmma ? wgmma_units : (wide ? wide_units : mma_units)) : units;
    for (int32_t s = 0; s < splits; ++s)
      for (int32_t ti = 0; ti < tiles; ++ti)
        for (int32_t tj = ti; tj < tiles; ++tj) into.push_back(DeviceGramUnit{static_cast<int32_t>(j), s, ti, tj});
  }
  const size_t total_units = units.size() + mma_units.size() + wide_units.size() + wgmma_units.size();
  GG_CHECK(total_units < (size_t(1) << 31), "lora_gram: too many work units (", total_units, ")");
  lp.units = static_cast<int64_t>(units.size());
  lp.narrow = static_cast<int64_t>(mma_units.size());
  lp.wide = static_cast<int64_t>(wide_units.size());
  lp.wgmma = static_cast<int64_t>(wgmma_units.size());
  lp.merges = static_cast<int64_t>(merge_jobs.size());
  mma_units.insert(mma_units.end(), wide_units.begin(), wide_units.end());  // narrow, wide, then wgmma
  mma_units.insert(mma_units.end(), wgmma_units.begin(), wgmma_units.end());

  // One upload (reused while the factors stay in place).
  lp.job_words = num_jobs * 8;
  lp.unit_words = 2 * lp.units;
  lp.mma_words = 2 * (lp.narrow + lp.wide + lp.wgmma);
  const int64_t merge_words = (lp.merges + 1) / 2;
  lp.meta = cached_upload_words(lp.job_words + lp.unit_words + lp.mma_words + merge_words, dev, [&](int64_t* host) {
    std::memcpy(host, jobs.data(), lp.job_words * sizeof(int64_t));
    if (!units.empty()) std::memcpy(host + lp.job_words, units.data(), units.size() * sizeof(DeviceGramUnit));
    if (!mma_units.empty())
      std::memcpy(host + lp.job_words + lp.unit_words, mma_units.data(), mma_units.size() * sizeof(DeviceGramUnit));
    if (!merge_jobs.empty())
      std::memcpy(host + lp.job_words + lp.unit_words + lp.mma_words, merge_jobs.data(),
                  merge_jobs.size() * sizeof(int32_t));
  });
  return lp;
}

bool same_jobs(const std::vector<GramJob>& a, const std::vector<GramJob>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    const GramJob& x = a[i];
    const GramJob& y = b[i];
    if (x.data != y.data || x.rows != y.rows || x.cols != y.cols || x.row_stride != y.row_stride ||
        x.col_stride != y.col_stride || x.type != y.type)
      return false;
  }
  return true;
}

// make_launch_plan with a cache: the same factors in the same places (the usual case: the same
// adapters every step) on the same device and stream get the launch plan of an earlier call back,
// checked job by job, without rebuilding and comparing its metadata words. Entries are read-only
// and replaced only by calls on their own stream, like cached_upload_words' entries.
LaunchPlan cached_launch_plan(const LoraGramPlan& plan, const DeviceFacts& facts, const at::TensorOptions& dev) {
  // Never destroyed: no CUDA frees after the runtime shuts down.
  static auto* cache = new StreamLru<std::vector<GramJob>, LaunchPlan>(/*capacity=*/16);
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None)
    return make_launch_plan(plan, facts, dev);  // the graph must own its metadata
  const int device = dev.device().index();
  const int64_t stream = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)).id();
  auto same = [&](const std::vector<GramJob>& jobs) { return same_jobs(jobs, plan.jobs); };
  if (auto hit = cache->find(device, stream, same)) return *hit;
  LaunchPlan fresh = make_launch_plan(plan, facts, dev);
  cache->insert(device, stream, plan.jobs, fresh);
  return fresh;
}

std::tuple<at::Tensor, at::Tensor> lora_gram_cuda(at::TensorList Bs, at::TensorList As) {
  const LoraGramPlan plan = make_lora_gram_plan(Bs, As);
  const int64_t n = plan.num_adapters;
  const int64_t R = plan.max_rank;
  if (n == 0) {
    const auto cpu = at::TensorOptions().dtype(at::kDouble);
    return {at::empty({0, 0, 0}, cpu), at::empty({0, 0, 0}, cpu)};
  }
  const c10::cuda::CUDAGuard guard(Bs[0].device());
  const at::TensorOptions dev = at::TensorOptions().device(Bs[0].device()).dtype(at::kDouble);
  GG_CHECK(static_cast<int64_t>(plan.jobs.size()) < (int64_t(1) << 31), "lora_gram: too many adapters (", n, ")");
  if (R == 0) return {at::zeros({n, 0, 0}, dev), at::zeros({n, 0, 0}, dev)};
  const LaunchPlan lp = cached_launch_plan(plan, device_facts(Bs[0].device().index()), dev);
  at::Tensor gb = lp.padded ? at::zeros({n, R, R}, dev) : at::empty({n, R, R}, dev);
  at::Tensor ga = lp.padded ? at::zeros({n, R, R}, dev) : at::empty({n, R, R}, dev);

  const int64_t* words_dev = lp.meta.data_ptr<int64_t>();
  const auto* dev_jobs = reinterpret_cast<const DeviceGramJob*>(words_dev);
  const auto* dev_units = reinterpret_cast<const DeviceGramUnit*>(words_dev + lp.job_words);
  const auto* dev_mma_units = reinterpret_cast<const DeviceGramUnit*>(words_dev + lp.job_words + lp.unit_words);
  const auto* dev_merge = reinterpret_cast<const int32_t*>(words_dev + lp.job_words + lp.unit_words + lp.mma_words);

  at::Tensor partials;  // only split jobs write partials
  if (lp.partial_total > 0) partials = at::empty({lp.partial_total}, dev);
  double* const part = lp.partial_total > 0 ? partials.data_ptr<double>() : nullptr;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  double* const out_b = gb.data_ptr<double>();
  double* const out_a = ga.data_ptr<double>();
  if (lp.narrow > 0) {
    using Ring = mma_gram::Ring<false>;
    gram_mma_kernel<false><<<static_cast<unsigned>(lp.narrow), Ring::kThreads, Ring::kSmemBytes, stream>>>(
        dev_jobs, dev_mma_units, part, R, out_b, out_a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (lp.wide > 0) {
    using Ring = mma_gram::Ring<true>;
    gram_mma_kernel<true><<<static_cast<unsigned>(lp.wide), Ring::kThreads, Ring::kSmemBytes, stream>>>(
        dev_jobs, dev_mma_units + lp.narrow, part, R, out_b, out_a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (lp.wgmma > 0) {
    gram_wgmma_kernel<<<static_cast<unsigned>(lp.wgmma), wgmma_gram::kThreads, wgmma_gram::kSmemBytes, stream>>>(
        dev_jobs, dev_mma_units + lp.narrow + lp.wide, part, R, out_b, out_a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (lp.units > 0) {
    gram_units_kernel<<<static_cast<unsigned>(lp.units), kThreads, 0, stream>>>(dev_jobs, dev_units, part);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (lp.merges > 0) {
    gram_merge_kernel<<<static_cast<unsigned>(lp.merges), kThreads, 0, stream>>>(dev_jobs, dev_merge, part, R, out_b,
                                                                                out_a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {gb, ga};
}

// gram_fro: one block per pair of symmetric matrices, their lower triangles read. Warp w takes
// rows w, w + kFroWarps, ...; lane l adds x_ij·y_ij (doubled off the diagonal, exactly) for
// j = l, l + 32, ... <= i, in order; the block adds the lanes' sums by fixed shuffle trees.
constexpr int kFroThreads = 1024;
constexpr int kFroWarps = kFroThreads / 32;

__global__ void __launch_bounds__(kFroThreads, 2)
    gram_fro_kernel(const double* __restrict__ gb, const double* __restrict__ ga, int64_t R, double* out) {
  __shared__ double warp_sums[kFroWarps];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t base = int64_t(blockIdx.x) * R * R;
  double acc = 0.0;
  const int rows = static_cast<int>(R);
#pragma unroll 1
  for (int i = warp; i < rows; i += kFroWarps) {
    const double* x = gb + base + int64_t(i) * R;
    const double* y = ga + base + int64_t(i) * R;
#pragma unroll 4
    for (int j = lane; j <= i; j += 32) {
      const double xj = __ldg(x + j);
      acc = fma(j < i ? 2.0 * xj : xj, __ldg(y + j), acc);
    }
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);
  if (lane == 0) warp_sums[warp] = acc;
  __syncthreads();
  if (warp == 0) {
    acc = warp_sums[lane];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);
    if (lane == 0) out[blockIdx.x] = sqrt(acc < 0.0 ? 0.0 : acc);  // NaN stays NaN
  }
}

at::Tensor gram_fro_cuda(const at::Tensor& gb, const at::Tensor& ga) {
  check_gram_pair("gram_fro", gb, ga);
  const c10::cuda::CUDAGuard guard(gb.device());
  const at::Tensor x = gb.contiguous(), y = ga.contiguous();
  const int64_t n = x.size(0);
  at::Tensor out = at::empty({n}, x.options());
  GG_CHECK(n < (int64_t(1) << 31), "gram_fro: too many matrices (", n, ")");
  if (n == 0) return out;
  gram_fro_kernel<<<static_cast<unsigned>(n), kFroThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      x.data_ptr<double>(), y.data_ptr<double>(), x.size(1), out.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(gradgeom, CUDA, m) {
  m.impl("lora_gram", &lora_gram_cuda);
  m.impl("gram_fro", &gram_fro_cuda);
}

}  // namespace gradgeom
