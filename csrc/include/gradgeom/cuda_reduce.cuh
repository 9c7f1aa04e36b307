// Device helpers shared by the CUDA kernels: element loads/conversions and a deterministic
// block-wide merge of Moments<double> (fixed shuffle pattern, no atomics).
#pragma once

#include <cuda_fp16.h>

#include <cstdint>

#include "gradgeom/moments.h"
#include "gradgeom/tensor_list_plan.h"

namespace gradgeom {
namespace cuda_detail {

// Element kinds: storage type in memory, accumulation type, and conversion.
struct F32 {
  using storage = float;
  using acc = float;
  static __device__ __forceinline__ float widen(float x) { return x; }
};
struct F64 {
  using storage = double;
  using acc = double;
  static __device__ __forceinline__ double widen(double x) { return x; }
};
struct F16 {
  using storage = uint16_t;
  using acc = float;
  static __device__ __forceinline__ float widen(uint16_t x) { return __half2float(__ushort_as_half(x)); }
};
struct BF16 {
  using storage = uint16_t;
  using acc = float;
  static __device__ __forceinline__ float widen(uint16_t x) {
    return __uint_as_float(static_cast<uint32_t>(x) << 16);
  }
};

// Same layout as PlannedTensor, flattened to 4 int64 words for the device.
struct DeviceTensor {
  const void* data;
  int64_t numel;
  int64_t chunk_begin;
  int32_t head;
  int32_t type;
};
static_assert(sizeof(DeviceTensor) == 32, "DeviceTensor must be 4 words");

// Index of the entry that owns global chunk `chunk`, in a table of entries (anything with a
// `chunk_begin` field) ordered by chunk_begin.
template <typename Entry>
__device__ __forceinline__ int find_owner(const Entry* ts, int num_tensors, int64_t chunk) {
  int lo = 0, hi = num_tensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (ts[mid].chunk_begin <= chunk) lo = mid; else hi = mid - 1;
  }
  return lo;
}

__device__ __forceinline__ Moments<double> shfl_down(const Moments<double>& m, int offset) {
  Moments<double> r;
  r.count = __shfl_down_sync(0xffffffffu, m.count, offset);
  r.sum = __shfl_down_sync(0xffffffffu, m.sum, offset);
  r.sumsq = __shfl_down_sync(0xffffffffu, m.sumsq, offset);
  r.m2 = __shfl_down_sync(0xffffffffu, m.m2, offset);
  r.maxabs = __shfl_down_sync(0xffffffffu, m.maxabs, offset);
  r.nonfinite = __shfl_down_sync(0xffffffffu, m.nonfinite, offset);
  return r;
}

// Merges every thread's value; the result is valid in thread 0. blockDim.x must be a multiple of
// 32 and at most 1024. `scratch` holds blockDim.x / 32 entries.
__device__ __forceinline__ Moments<double> block_merge(Moments<double> m, Moments<double>* scratch) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const Moments<double> other = shfl_down(m, offset);
    merge_into(m, other);
  }
  if (lane == 0) scratch[warp] = m;
  __syncthreads();
  if (warp == 0) {
    const int warps = blockDim.x >> 5;
    m = lane < warps ? scratch[lane] : Moments<double>();
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      const Moments<double> other = shfl_down(m, offset);
      merge_into(m, other);
    }
  }
  return m;
}

}  // namespace cuda_detail
}  // namespace gradgeom
