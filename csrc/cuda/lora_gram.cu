// lora_gram on CUDA. One launch computes, for every Gram job XᵀX (lora_gram_plan.h), every
// 64 x 64 tile on or above the diagonal of its r x r result, over every split of its rows:
// the block stages a chunk of rows of the two column panels in shared memory (widened to fp32,
// or fp64 for fp64 input) and each thread accumulates a 4 x 4 register tile. A narrow diagonal
// tile (r <= 16 or <= 32) stages 128 or 64 rows per chunk instead of 32, with a 1 x 1 or 2 x 2
// register tile per thread. Partials are written per
// split in fp64; a second launch sums each entry's splits in split order and writes the padded
// [n, R, R] outputs. No atomics: bitwise deterministic. Current stream, no host synchronisation.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <tuple>
#include <vector>

#include "gradgeom/cuda_reduce.cuh"
#include "gradgeom/device_upload.h"
#include "gradgeom/lora_gram_plan.h"
#include "gradgeom/check.h"

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
  int32_t pad0;
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

// Block (adapter, factor): out[adapter][i][j] = sum over splits, zero outside r x r.
__global__ void __launch_bounds__(kThreads) gram_merge_kernel(const DeviceGramJob* jobs, const double* partials,
                                                              int64_t R, double* out_b, double* out_a) {
  const int64_t adapter = blockIdx.x;
  const int factor = blockIdx.y;
  const DeviceGramJob job = jobs[2 * adapter + factor];
  const int64_t r = job.cols;
  double* out = (factor == 0 ? out_b : out_a) + adapter * R * R;
  for (int64_t e = threadIdx.x; e < R * R; e += kThreads) {
    const int64_t i = e / R;
    const int64_t j = e - i * R;
    double v = 0.0;
    if (i < r && j < r) {
      const double* p = partials + job.partial_offset + i * r + j;
      for (int s = 0; s < job.splits; ++s) v += p[int64_t(s) * r * r];
    }
    out[e] = v;
  }
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
  const at::TensorOptions dev = at::TensorOptions().device(Bs[0].device());
  at::Tensor gb = at::empty({n, R, R}, dev.dtype(at::kDouble));
  at::Tensor ga = at::empty({n, R, R}, dev.dtype(at::kDouble));
  if (R == 0) return {gb, ga};

  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, Bs[0].device().index()));
  const int64_t num_jobs = static_cast<int64_t>(plan.jobs.size());
  int64_t base_units = 0;
  for (const GramJob& j : plan.jobs) {
    const int64_t tiles = (j.cols + kTile - 1) / kTile;
    base_units += j.rows > 0 ? tiles * (tiles + 1) / 2 : 0;
  }
  // Split rows until there are enough blocks to fill the GPU a few times over.
  const int64_t want_splits = std::max<int64_t>(1, (int64_t(8) * sms + base_units - 1) / std::max<int64_t>(base_units, 1));

  std::vector<DeviceGramJob> jobs(num_jobs);
  std::vector<DeviceGramUnit> units;
  int64_t partial_total = 0;
  for (int64_t j = 0; j < num_jobs; ++j) {
    const GramJob& g = plan.jobs[j];
    const int64_t splits = g.rows == 0 ? 0
        : std::min<int64_t>(want_splits, (g.rows + kMinSplitRows - 1) / kMinSplitRows);
    const int64_t per_split = splits == 0 ? 0 : (g.rows + splits - 1) / splits;
    GG_CHECK(splits < (int64_t(1) << 31), "lora_gram: too many row splits");
    jobs[j] = DeviceGramJob{g.data, g.rows, g.row_stride, g.col_stride, partial_total, static_cast<int32_t>(g.cols),
                            static_cast<int32_t>(g.type), static_cast<int32_t>(splits), 0, per_split};
    partial_total += splits * g.cols * g.cols;
    const int32_t tiles = static_cast<int32_t>((g.cols + kTile - 1) / kTile);
    for (int32_t s = 0; s < splits; ++s)
      for (int32_t ti = 0; ti < tiles; ++ti)
        for (int32_t tj = ti; tj < tiles; ++tj) units.push_back(DeviceGramUnit{static_cast<int32_t>(j), s, ti, tj});
  }
  GG_CHECK(units.size() < (size_t(1) << 31), "lora_gram: too many work units (", units.size(), ")");

  const int64_t job_words = num_jobs * 8;
  const int64_t words = job_words + static_cast<int64_t>(units.size()) * 2;
  const at::Tensor meta = upload_words(words, dev, [&](int64_t* host) {
    std::memcpy(host, jobs.data(), job_words * sizeof(int64_t));
    if (!units.empty()) std::memcpy(host + job_words, units.data(), units.size() * sizeof(DeviceGramUnit));
  });
  const auto* dev_jobs = reinterpret_cast<const DeviceGramJob*>(meta.data_ptr<int64_t>());
  const auto* dev_units = reinterpret_cast<const DeviceGramUnit*>(meta.data_ptr<int64_t>() + job_words);

  at::Tensor partials = at::empty({std::max<int64_t>(partial_total, 1)}, dev.dtype(at::kDouble));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (!units.empty()) {
    gram_units_kernel<<<static_cast<unsigned>(units.size()), kThreads, 0, stream>>>(dev_jobs, dev_units,
                                                                                   partials.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  GG_CHECK(n < (int64_t(1) << 31), "lora_gram: too many adapters (", n, ")");
  gram_merge_kernel<<<dim3(static_cast<unsigned>(n), 2), kThreads, 0, stream>>>(
      dev_jobs, partials.data_ptr<double>(), R, gb.data_ptr<double>(), ga.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {gb, ga};
}

}  // namespace

TORCH_LIBRARY_IMPL(gradgeom, CUDA, m) {
  m.impl("lora_gram", &lora_gram_cuda);
}

}  // namespace gradgeom
