// lora_cross_gram on CUDA: X = B1ᵢᵀ·B2ᵢ of a ragged list of pairs in one launch, read in place
// (any strides and dtypes), products and sums in float64. Block (i, t, z) computes tile t of pair i
// over row slice z (cross_gram_kernel); a short batch gets several slices, summed in slice order
// by cross_gram_merge_kernel. The pair table is uploaded once per set of tensors (cached_upload.cuh).
// Replaces stack + float64 copy + batched GEMM in principal_angles.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>

#include "gradgeom/cached_upload.cuh"
#include "gradgeom/check.h"
#include "gradgeom/lora_gram_plan.h"

namespace gradgeom {
namespace {

constexpr int kThreads = 256;
constexpr int kChunk = 64;  // rows of both factors staged per step
constexpr int64_t kTargetBlocks = 2048;

struct DeviceFactor {
  const void* data;
  int64_t row_stride;
  int64_t col_stride;
  int32_t cols;
  int32_t type;  // ElemType
};

struct DeviceCrossPair {
  DeviceFactor x, y;
  int64_t rows;
  int64_t pad;
};
static_assert(sizeof(DeviceCrossPair) % sizeof(int64_t) == 0, "uploaded as int64 words");
constexpr int64_t kPairWords = sizeof(DeviceCrossPair) / sizeof(int64_t);

__device__ __forceinline__ double widen(double v) { return v; }
__device__ __forceinline__ double widen(float v) { return v; }
__device__ __forceinline__ double widen(__half v) { return __half2float(v); }
__device__ __forceinline__ double widen(__nv_bfloat16 v) { return __bfloat162float(v); }

// The element (row, col) of a factor, 0 outside it, as a Staged<T> (widened by widen() when it is
// stored to shared memory). T: the element type of every factor of the launch, kept as it is in
// registers, or void to read each factor's own type into a double (a branch per element, which
// keeps the loads from being issued together).
template <typename T>
using Staged = std::conditional_t<std::is_void_v<T>, double, T>;

template <typename T>
__device__ __forceinline__ Staged<T> load_element(const DeviceFactor& f, int64_t rows, int64_t row, int col) {
  if (row >= rows || col >= f.cols) return Staged<T>{};  // +0
  const int64_t off = row * f.row_stride + int64_t(col) * f.col_stride;
  if constexpr (!std::is_void_v<T>) {
    return static_cast<const T*>(f.data)[off];
  } else {
    switch (static_cast<ElemType>(f.type)) {
      case ElemType::kFloat64: return static_cast<const double*>(f.data)[off];
      case ElemType::kFloat32: return static_cast<const float*>(f.data)[off];
      case ElemType::kFloat16: return __half2float(static_cast<const __half*>(f.data)[off]);
      default: return __bfloat162float(static_cast<const __nv_bfloat16*>(f.data)[off]);
    }
  }
}

// Rows split into `count` slices of `rows` rows (a multiple of kChunk) along grid z; with more
// than one, block (pair, tile, z) writes its partial tile to part [pairs, tiles, count, kTw²].
struct RowSlices {
  int64_t rows;
  int64_t count;
  double* part;
};

// Block (pair, tile) computes the kTw x kTw tile (i0, j0) of X[:, i0:]ᵀ·Y[:, j0:]. Rows are staged
// kChunk at a time (the next chunk's loads in flight in registers while this one is multiplied);
// each thread owns a 2 x 2 block of the tile, and when the tile needs fewer than kThreads owners
// (kTw = 16) the kGroups thread groups each take a contiguous quarter of every chunk. The groups'
// partial tiles are added in group order at the end, so the bits do not depend on timing. Block
// (pair, tile, z) reads the rows of slice z only.
template <int kTw, typename T>
__global__ void __launch_bounds__(kThreads, kTw == 16 ? 3 : 1)
    cross_gram_kernel(const DeviceCrossPair* pairs, int64_t R, RowSlices slices, double* out) {
  constexpr int kOwners = (kTw / 2) * (kTw / 2);
  constexpr int kGroups = kThreads / kOwners;
  constexpr int kRowsPerGroup = kChunk / kGroups;
  constexpr int kLoads = kChunk * kTw / kThreads;  // staged elements per thread and factor
  constexpr int kLd = kTw + 2;                     // row stride: 16-byte rows for double2 reads
  static_assert(kThreads % kOwners == 0 && kChunk % kGroups == 0 && (kChunk * kTw) % kThreads == 0, "tiling");
  __shared__ __align__(16) double xs[kChunk * kLd];
  __shared__ __align__(16) double ys[kChunk * kLd];
  __shared__ double part[kGroups > 1 ? kGroups - 1 : 1][kTw * kTw];
  const DeviceCrossPair pr = pairs[blockIdx.x];
  const int64_t row_begin = int64_t(blockIdx.z) * slices.rows;
  if (blockIdx.z > 0 && row_begin >= pr.rows) return;  // past this pair's last slice
  const int64_t row_end = ::min(pr.rows, row_begin + slices.rows);
  const int tiles_j = (pr.y.cols + kTw - 1) / kTw;
  const int tiles = ((pr.x.cols + kTw - 1) / kTw) * tiles_j;
  if (static_cast<int>(blockIdx.y) >= tiles) return;
  const int i0 = (blockIdx.y / tiles_j) * kTw, j0 = (blockIdx.y % tiles_j) * kTw;
  const int t = threadIdx.x;
  const int owner = t % kOwners, group = t / kOwners;
  const int i = 2 * (owner / (kTw / 2)), j = 2 * (owner % (kTw / 2));  // this thread's outputs (i.., j..)
  double acc[2][2] = {{0.0, 0.0}, {0.0, 0.0}};
  Staged<T> xv[kLoads], yv[kLoads];
  auto fetch = [&](int64_t row0) {
#pragma unroll
    for (int k = 0; k < kLoads; ++k) {
      const int e = t + k * kThreads, r = e / kTw, c = e % kTw;
      xv[k] = load_element<T>(pr.x, row_end, row0 + r, i0 + c);
      yv[k] = load_element<T>(pr.y, row_end, row0 + r, j0 + c);
    }
  };
  fetch(row_begin);
  for (int64_t row0 = row_begin; row0 < row_end; row0 += kChunk) {
#pragma unroll
    for (int k = 0; k < kLoads; ++k) {
      const int e = t + k * kThreads, r = e / kTw, c = e % kTw;
      xs[r * kLd + c] = widen(xv[k]);
      ys[r * kLd + c] = widen(yv[k]);
    }
    __syncthreads();
    if (row0 + kChunk < row_end) fetch(row0 + kChunk);
#pragma unroll 4
    for (int r = group * kRowsPerGroup; r < (group + 1) * kRowsPerGroup; ++r) {
      const double2 x2 = *reinterpret_cast<const double2*>(xs + r * kLd + i);
      const double2 y2 = *reinterpret_cast<const double2*>(ys + r * kLd + j);
      acc[0][0] = fma(x2.x, y2.x, acc[0][0]);
      acc[0][1] = fma(x2.x, y2.y, acc[0][1]);
      acc[1][0] = fma(x2.y, y2.x, acc[1][0]);
      acc[1][1] = fma(x2.y, y2.y, acc[1][1]);
    }
    __syncthreads();
  }
  if (kGroups > 1) {
    if (group > 0)
#pragma unroll
      for (int a = 0; a < 2; ++a)
#pragma unroll
        for (int b = 0; b < 2; ++b) part[group - 1][(i + a) * kTw + j + b] = acc[a][b];
    __syncthreads();
    if (group > 0) return;
#pragma unroll
    for (int g = 0; g < kGroups - 1; ++g)
#pragma unroll
      for (int a = 0; a < 2; ++a)
#pragma unroll
        for (int b = 0; b < 2; ++b) acc[a][b] += part[g][(i + a) * kTw + j + b];
  }
  if (slices.count > 1) {  // this slice's tile, merged by cross_gram_merge_kernel
    double* o = slices.part + ((int64_t(blockIdx.x) * gridDim.y + blockIdx.y) * slices.count + blockIdx.z) * kTw * kTw;
#pragma unroll
    for (int a = 0; a < 2; ++a)
#pragma unroll
      for (int b = 0; b < 2; ++b) o[(i + a) * kTw + j + b] = acc[a][b];
    return;
  }
  double* o = out + int64_t(blockIdx.x) * R * R;
#pragma unroll
  for (int a = 0; a < 2; ++a)
#pragma unroll
    for (int b = 0; b < 2; ++b)
      if (i0 + i + a < pr.x.cols && j0 + j + b < pr.y.cols) o[int64_t(i0 + i + a) * R + j0 + j + b] = acc[a][b];
}

// Block (pair, tile): the sum of the pair's slices of the tile, in slice order.
__global__ void __launch_bounds__(kThreads) cross_gram_merge_kernel(const DeviceCrossPair* pairs, int64_t R, int tw,
                                                                     RowSlices slices, double* out) {
  const DeviceCrossPair pr = pairs[blockIdx.x];
  const int tiles_j = (pr.y.cols + tw - 1) / tw;
  if (static_cast<int>(blockIdx.y) >= ((pr.x.cols + tw - 1) / tw) * tiles_j) return;
  const int i0 = (blockIdx.y / tiles_j) * tw, j0 = (blockIdx.y % tiles_j) * tw;
  const int64_t count = ::max(int64_t(1), (pr.rows + slices.rows - 1) / slices.rows);
  const double* p = slices.part + (int64_t(blockIdx.x) * gridDim.y + blockIdx.y) * slices.count * tw * tw;
  double* o = out + int64_t(blockIdx.x) * R * R;
  for (int e = threadIdx.x; e < tw * tw; e += kThreads) {
    const int a = e / tw, b = e % tw;
    if (i0 + a >= pr.x.cols || j0 + b >= pr.y.cols) continue;
    double sum = p[e];
    for (int64_t z = 1; z < count; ++z) sum += p[z * tw * tw + e];
    o[int64_t(i0 + a) * R + j0 + b] = sum;
  }
}

DeviceFactor device_factor(const GramJob& g) {
  return DeviceFactor{g.data, g.row_stride, g.col_stride, static_cast<int32_t>(g.cols), static_cast<int32_t>(g.type)};
}

template <typename T>
struct TypeTag {
  using type = T;
};

// The element type all factors of the plan share, if they share one.
std::optional<ElemType> shared_type(const CrossGramPlan& plan) {
  if (plan.left.empty()) return std::nullopt;
  const ElemType t = plan.left[0].type;
  for (size_t i = 0; i < plan.left.size(); ++i)
    if (plan.left[i].type != t || plan.right[i].type != t) return std::nullopt;
  return t;
}

at::Tensor lora_cross_gram_cuda(at::TensorList B1s, at::TensorList B2s) {
  const CrossGramPlan plan = make_cross_gram_plan(B1s, B2s);
  const int64_t n = static_cast<int64_t>(B1s.size());
  const int64_t R = plan.max_rank;
  if (n == 0) return at::empty({0, 0, 0}, at::TensorOptions().dtype(at::kDouble));
  const c10::cuda::CUDAGuard guard(B1s[0].device());
  const at::TensorOptions dev = at::TensorOptions().device(B1s[0].device()).dtype(at::kDouble);
  GG_CHECK(n < (int64_t(1) << 31), "lora_cross_gram: too many pairs (", n, ")");
  bool full = true;  // every pair fills its R x R block: no zero padding needed
  for (int64_t i = 0; i < n; ++i) full = full && plan.left[i].cols == R && plan.right[i].cols == R;
  at::Tensor out = full ? at::empty({n, R, R}, dev) : at::zeros({n, R, R}, dev);
  if (R == 0) return out;
  const at::Tensor table = cached_upload_words(n * kPairWords, dev, [&](int64_t* host) {
    for (int64_t i = 0; i < n; ++i) {
      DeviceCrossPair p{device_factor(plan.left[i]), device_factor(plan.right[i]), plan.left[i].rows, 0};
      std::memcpy(host + i * kPairWords, &p, sizeof p);
    }
  });
  const int tw = R <= 16 ? 16 : 32;  // 16-wide tiles keep r <= 16 from idling three threads in four
  const int64_t tiles = ((R + tw - 1) / tw) * ((R + tw - 1) / tw);
  GG_CHECK(tiles < 65536, "lora_cross_gram: ranks too large (R = ", R, ")");
  // Short batches split their rows so that about kTargetBlocks blocks keep enough loads in flight
  // (one block streams a chunk at a time); a slice holds at least four chunks.
  int64_t max_rows = 0;
  for (int64_t i = 0; i < n; ++i) max_rows = std::max(max_rows, plan.left[i].rows);
  RowSlices slices{std::max<int64_t>(max_rows, 1), 1, nullptr};
  if (n * tiles < kTargetBlocks && max_rows > 4 * kChunk) {
    const int64_t want = std::min((kTargetBlocks + n * tiles - 1) / (n * tiles), max_rows / (4 * kChunk));
    slices.rows = ((max_rows + want - 1) / want + kChunk - 1) / kChunk * kChunk;
    slices.count = (max_rows + slices.rows - 1) / slices.rows;
  }
  at::Tensor part;
  if (slices.count > 1) {
    part = at::empty({n * tiles * slices.count * tw * tw}, dev);
    slices.part = part.data_ptr<double>();
  }
  const dim3 grid(static_cast<unsigned>(n), static_cast<unsigned>(tiles), static_cast<unsigned>(slices.count));
  const auto* dev_pairs = reinterpret_cast<const DeviceCrossPair*>(table.data_ptr<int64_t>());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto launch = [&](auto type_tag) {
    using T = typename decltype(type_tag)::type;
    if (tw == 16)
      cross_gram_kernel<16, T><<<grid, kThreads, 0, stream>>>(dev_pairs, R, slices, out.data_ptr<double>());
    else
      cross_gram_kernel<32, T><<<grid, kThreads, 0, stream>>>(dev_pairs, R, slices, out.data_ptr<double>());
  };
  const std::optional<ElemType> shared = shared_type(plan);
  if (!shared) {
    launch(TypeTag<void>{});  // mixed types: the per-element switch
  } else {
    switch (*shared) {
      case ElemType::kFloat64: launch(TypeTag<double>{}); break;
      case ElemType::kFloat32: launch(TypeTag<float>{}); break;
      case ElemType::kFloat16: launch(TypeTag<__half>{}); break;
      case ElemType::kBFloat16: launch(TypeTag<__nv_bfloat16>{}); break;
    }
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (slices.count > 1) {
    cross_gram_merge_kernel<<<dim3(static_cast<unsigned>(n), static_cast<unsigned>(tiles)), kThreads, 0, stream>>>(
        dev_pairs, R, tw, slices, out.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(gradgeom, CUDA, m) { m.impl("lora_cross_gram", &lora_cross_gram_cuda); }

}  // namespace gradgeom
