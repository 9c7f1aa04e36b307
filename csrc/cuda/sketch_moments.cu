// sketch_moments on CUDA: one read of every gradient gives the group moments and the rotated-fold
// count-sketch (sketch_hash.h) of each group.
//
// Launch 1: one block per chunk (kSketchChunkElems group indices of one tensor). The sketch needs
// no atomics: a thread *owns* 8-bucket groups. In fold j the elements that land in bucket group q
// are the 8 consecutive positions starting at 8 * ((q - r(j)) mod k/8), so each thread walks the
// folds of its chunk, loads those 8 elements (one 16-byte load for 16-bit types when aligned;
// consecutive threads read consecutive addresses) and adds them, signed, into 8 fp32 registers.
// When k/8 < blockDim, the block splits the folds among F = blockDim / (k/8) lanes, merged in
// shared memory in lane order. The same loads feed fp32 moment accumulators (Chan merges, fp64
// block merge). Each block writes a k-float partial sketch and a moments partial.
// Launch 2: per group, each bucket's partials are summed in fp64 in a fixed order, and the moments
// partials merged. Bitwise deterministic; current stream; nothing waits for the device.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "gradgeom/cuda_reduce.cuh"
#include "gradgeom/cached_upload.cuh"
#include "gradgeom/moments.h"
#include "gradgeom/sketch_hash.h"
#include "gradgeom/sketch_plan.h"
#include "gradgeom/check.h"

namespace gradgeom {
namespace {

using namespace cuda_detail;

constexpr int kThreads = 256;

struct SketchDeviceTensor {
  const void* data;
  int64_t numel;
  int64_t offset;
  int64_t chunk_begin;
  int32_t type;
  int32_t aligned;
  int64_t pad;
};
static_assert(sizeof(SketchDeviceTensor) == 48, "SketchDeviceTensor must be 6 words");

// Elements with group index i0 .. i0+7 (i0 a multiple of 8) that lie in [begin, end).
template <typename Kind>
__device__ __forceinline__ void load8(const SketchDeviceTensor& t, int64_t i0, int64_t begin, int64_t end,
                                      typename Kind::acc (&v)[8], bool (&present)[8]) {
  using storage = typename Kind::storage;
  using acc_t = typename Kind::acc;
  const storage* base = static_cast<const storage*>(t.data);
  if (t.aligned && i0 >= begin && i0 + 8 <= end) {
    constexpr int kPer = 16 / sizeof(storage);  // elements per 16-byte vector
    union Vec {
      uint4 raw;
      storage e[kPer];
    };
    const uint4* p = reinterpret_cast<const uint4*>(base + (i0 - t.offset));
#pragma unroll
    for (int w = 0; w < 8 / kPer; ++w) {
      Vec vec;
      vec.raw = __ldg(p + w);
#pragma unroll
      for (int e = 0; e < kPer; ++e) {
        v[w * kPer + e] = Kind::widen(vec.e[e]);
        present[w * kPer + e] = true;
      }
    }
  } else {
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const int64_t i = i0 + e;
      present[e] = i >= begin && i < end;
      v[e] = present[e] ? Kind::widen(base[i - t.offset]) : acc_t(0);
    }
  }
}

template <typename Kind, int N>
__device__ __forceinline__ void add_to_moments(Moments<typename Kind::acc>& acc, const typename Kind::acc (&v)[N],
                                               const bool (&present)[N]) {
  using acc_t = typename Kind::acc;
  acc_t s = 0, ss = 0, c = 0, mx = 0, nf = 0;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const bool finite = present[i] && isfinite(v[i]);
    const acc_t y = finite ? v[i] : acc_t(0);
    s += y;
    ss += y * y;
    c += finite ? acc_t(1) : acc_t(0);
    nf += (present[i] && !finite) ? acc_t(1) : acc_t(0);
    mx = fmax(mx, fabs(y));
  }
  Moments<acc_t> b;
  b.count = c;
  b.sum = s;
  b.sumsq = ss;
  b.maxabs = mx;
  b.nonfinite = nf;
  if (c > 0) {
    const acc_t mean = s / c;
    acc_t m2 = 0;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const acc_t d = (present[i] && isfinite(v[i])) ? v[i] - mean : acc_t(0);
      m2 += d * d;
    }
    b.m2 = m2;
  }
  merge_into(acc, b);
}

// One block, one chunk. R: 8-bucket groups owned per thread (k/8 = R * blockDim when F == 1).
template <typename Kind, int R>
__device__ void chunk_sketch(const SketchDeviceTensor& t, int64_t local_chunk, const SketchHash& h, int log2k,
                             float* sk_out, Moments<double>& mom_out, float* lanes_smem) {
  using acc_t = typename Kind::acc;
  const int64_t k = int64_t(1) << log2k;
  const int g8_log2 = log2k - 3;
  const int64_t g8 = k >> 3;
  const int folds_lanes = g8 >= kThreads ? 1 : static_cast<int>(kThreads / g8);
  int64_t q[R];
  int lane;
  if (folds_lanes == 1) {
#pragma unroll
    for (int r = 0; r < R; ++r) q[r] = threadIdx.x + int64_t(r) * kThreads;
    lane = 0;
  } else {
    q[0] = threadIdx.x & (g8 - 1);
    lane = threadIdx.x >> g8_log2;
  }

  int64_t begin, end;
  {
    const int64_t block = t.offset / kSketchChunkElems + local_chunk;
    begin = max(t.offset, block * kSketchChunkElems);
    end = min(t.offset + t.numel, (block + 1) * kSketchChunkElems);
  }
  acc_t acc[R][8];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[r][e] = acc_t(0);
  Moments<acc_t> mom;

  const int64_t j_first = begin >> log2k;
  const int64_t j_last = (end - 1) >> log2k;
  for (int64_t j = j_first + lane; j <= j_last; j += folds_lanes) {
    const int64_t rotg = static_cast<int64_t>(fold_rotation_groups(h, static_cast<uint64_t>(j), g8_log2));
    const int64_t fold_base = j << log2k;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int64_t i0 = fold_base + (((q[r] - rotg) & (g8 - 1)) << 3);
      acc_t vr[8];
      bool pr[8];
      load8<Kind>(t, i0, begin, end, vr, pr);
      const uint64_t w0 = sign_word(h, static_cast<uint64_t>(i0));
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const bool negative = ((w0 + uint64_t(e) * h.a_lo) >> 63) != 0;
        const acc_t x = (pr[e] && isfinite(vr[e])) ? vr[e] : acc_t(0);
        acc[r][e] += negative ? -x : x;
      }
      add_to_moments<Kind, 8>(mom, vr, pr);
    }
  }

  if (folds_lanes == 1) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float4* dst = reinterpret_cast<float4*>(sk_out + q[r] * 8);
      dst[0] = make_float4(float(acc[r][0]), float(acc[r][1]), float(acc[r][2]), float(acc[r][3]));
      dst[1] = make_float4(float(acc[r][4]), float(acc[r][5]), float(acc[r][6]), float(acc[r][7]));
    }
  } else {
#pragma unroll
    for (int e = 0; e < 8; ++e) lanes_smem[lane * k + q[0] * 8 + e] = float(acc[0][e]);
    __syncthreads();
    for (int64_t b = threadIdx.x; b < k; b += kThreads) {
      float s = 0.f;
      for (int l = 0; l < folds_lanes; ++l) s += lanes_smem[l * k + b];
      sk_out[b] = s;
    }
  }
  mom_out = moments_cast<double>(mom);
}

// kKindMixed: the tensors' dtypes differ, switch per block (one register budget for all paths).
constexpr int kKindMixed = -1;

template <int R>
__device__ __forceinline__ void chunk_sketch_any(int type, const SketchDeviceTensor& t, int64_t local,
                                                 const SketchHash& h, int log2k, float* sk_out, Moments<double>& m,
                                                 float* smem) {
  switch (static_cast<ElemType>(type)) {
    case ElemType::kFloat32: chunk_sketch<F32, R>(t, local, h, log2k, sk_out, m, smem); break;
    case ElemType::kFloat64: chunk_sketch<F64, R>(t, local, h, log2k, sk_out, m, smem); break;
    case ElemType::kFloat16: chunk_sketch<F16, R>(t, local, h, log2k, sk_out, m, smem); break;
    case ElemType::kBFloat16: chunk_sketch<BF16, R>(t, local, h, log2k, sk_out, m, smem); break;
  }
}

// One block per chunk. KindSel: an ElemType value when every tensor has that dtype (so each
// instantiation gets its own register allocation), else kKindMixed. R: 8-bucket groups per thread.
template <int KindSel, int R>
__global__ void __launch_bounds__(kThreads) sketch_chunk_kernel(const SketchDeviceTensor* tensors, int num_tensors,
                                                                SketchHash h, int log2k, float* sk_partials,
                                                                double* mom_partials) {
  // Fold-lane merge buffer: F * k = 8 * blockDim floats whenever F > 1.
  __shared__ float lanes_smem[8 * kThreads];
  __shared__ Moments<double> scratch[kThreads / 32];
  __shared__ int owner;
  const int64_t chunk = blockIdx.x;
  if (threadIdx.x == 0) owner = find_owner(tensors, num_tensors, chunk);
  __syncthreads();
  const SketchDeviceTensor t = tensors[owner];
  const int64_t local = chunk - t.chunk_begin;
  float* sk_out = sk_partials + (chunk << log2k);
  Moments<double> m;
  if constexpr (KindSel == kKindMixed) {
    chunk_sketch_any<R>(t.type, t, local, h, log2k, sk_out, m, lanes_smem);
  } else if constexpr (KindSel == static_cast<int>(ElemType::kFloat32)) {
    chunk_sketch<F32, R>(t, local, h, log2k, sk_out, m, lanes_smem);
  } else if constexpr (KindSel == static_cast<int>(ElemType::kFloat64)) {
    chunk_sketch<F64, R>(t, local, h, log2k, sk_out, m, lanes_smem);
  } else if constexpr (KindSel == static_cast<int>(ElemType::kFloat16)) {
    chunk_sketch<F16, R>(t, local, h, log2k, sk_out, m, lanes_smem);
  } else {
    chunk_sketch<BF16, R>(t, local, h, log2k, sk_out, m, lanes_smem);
  }
  m = block_merge(m, scratch);
  if (threadIdx.x == 0) store_moments(m, mom_partials + chunk * kMomentColumns);
}

using ChunkKernel = void (*)(const SketchDeviceTensor*, int, SketchHash, int, float*, double*);

template <int R>
ChunkKernel pick_chunk_kernel(int kind_sel) {
  switch (kind_sel) {
    case static_cast<int>(ElemType::kFloat32): return sketch_chunk_kernel<static_cast<int>(ElemType::kFloat32), R>;
    case static_cast<int>(ElemType::kFloat64): return sketch_chunk_kernel<static_cast<int>(ElemType::kFloat64), R>;
    case static_cast<int>(ElemType::kFloat16): return sketch_chunk_kernel<static_cast<int>(ElemType::kFloat16), R>;
    case static_cast<int>(ElemType::kBFloat16): return sketch_chunk_kernel<static_cast<int>(ElemType::kBFloat16), R>;
    default: return sketch_chunk_kernel<kKindMixed, R>;
  }
}

ChunkKernel pick_chunk_kernel(int kind_sel, int64_t sketch_dim) {
  const int64_t g8 = sketch_dim / 8;
  if (g8 >= 4 * kThreads) return pick_chunk_kernel<4>(kind_sel);
  if (g8 >= 2 * kThreads) return pick_chunk_kernel<2>(kind_sel);
  return pick_chunk_kernel<1>(kind_sel);
}

constexpr int kBucketsPerBlock = 32;
constexpr int kChunkLanes = kThreads / kBucketsPerBlock;  // 8

// grid (num_groups, k / kBucketsPerBlock + 1). A block sums 32 buckets' partials; its 8 warps take
// the chunks round-robin (warp w: chunks first + w, first + w + 8, ...; four running sums each, so
// many loads are in flight) and the 8 warp sums are added in warp order: fixed order, deterministic.
// The last y-slice merges the moments partials.
__global__ void __launch_bounds__(kThreads) sketch_group_kernel(const float* sk_partials, const double* mom_partials,
                                                                const int64_t* group_chunk_begin, int log2k,
                                                                double* sk_out, double* mom_out) {
  __shared__ Moments<double> scratch[kThreads / 32];
  __shared__ double lane_sums[kChunkLanes][kBucketsPerBlock];
  const int64_t g = blockIdx.x;
  const int64_t k = int64_t(1) << log2k;
  const int64_t first = group_chunk_begin[g];
  const int64_t last = group_chunk_begin[g + 1];
  if (blockIdx.y + 1 < gridDim.y) {
    const int bl = threadIdx.x % kBucketsPerBlock;
    const int lane = threadIdx.x / kBucketsPerBlock;
    const int64_t b = int64_t(blockIdx.y) * kBucketsPerBlock + bl;
    double s[4] = {0.0, 0.0, 0.0, 0.0};
    if (b < k) {
      int64_t c = first + lane;
      for (; c + 3 * kChunkLanes < last; c += 4 * kChunkLanes) {
#pragma unroll
        for (int u = 0; u < 4; ++u) s[u] += static_cast<double>(sk_partials[((c + u * kChunkLanes) << log2k) + b]);
      }
      for (; c < last; c += kChunkLanes) s[0] += static_cast<double>(sk_partials[(c << log2k) + b]);
    }
    lane_sums[lane][bl] = (s[0] + s[1]) + (s[2] + s[3]);
    __syncthreads();
    if (lane == 0 && b < k) {
      double total = 0.0;
#pragma unroll
      for (int l = 0; l < kChunkLanes; ++l) total += lane_sums[l][bl];
      sk_out[g * k + b] = total;
    }
  } else {
    Moments<double> m;
    for (int64_t c = first + threadIdx.x; c < last; c += kThreads) merge_into(m, load_moments(mom_partials + c * kMomentColumns));
    m = block_merge(m, scratch);
    if (threadIdx.x == 0) store_moments(m, mom_out + g * kMomentColumns);
  }
}

std::tuple<at::Tensor, at::Tensor> sketch_moments_cuda(at::TensorList tensors, c10::IntArrayRef group_ids,
                                                       c10::IntArrayRef offsets, int64_t num_groups,
                                                       int64_t sketch_dim, int64_t seed) {
  check_sketch_args("sketch_moments", tensors, group_ids, offsets, num_groups, sketch_dim);
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  const at::TensorOptions dev = at::TensorOptions().device(tensors[0].device());
  const SketchPlan plan = make_sketch_plan(tensors, group_ids, offsets, num_groups);
  const int log2k = sketch_log2(sketch_dim);
  at::Tensor moments = at::zeros({num_groups, kMomentColumns}, dev.dtype(at::kDouble));
  at::Tensor sketch = at::zeros({num_groups, sketch_dim}, dev.dtype(at::kDouble));
  if (plan.num_chunks == 0) return {moments, sketch};
  GG_CHECK(plan.num_chunks < (int64_t(1) << 31), "sketch_moments: too many chunks (", plan.num_chunks, ")");

  // Metadata: the tensor table, then group_chunk_begin; uploaded once per distinct table.
  const int64_t num_tensors = static_cast<int64_t>(plan.tensors.size());
  const int64_t words = num_tensors * 6 + num_groups + 1;
  const at::Tensor meta = cached_upload_words(words, dev, [&](int64_t* host) {
    auto* table = reinterpret_cast<SketchDeviceTensor*>(host);
    for (int64_t i = 0; i < num_tensors; ++i) {
      const SketchPlannedTensor& p = plan.tensors[i];
      table[i] = SketchDeviceTensor{p.data, p.numel, p.offset, p.chunk_begin, p.type, p.aligned, 0};
    }
    std::copy(plan.group_chunk_begin.begin(), plan.group_chunk_begin.end(), host + num_tensors * 6);
  });

  at::Tensor sk_partials = at::empty({plan.num_chunks, sketch_dim}, dev.dtype(at::kFloat));
  at::Tensor mom_partials = at::empty({plan.num_chunks, kMomentColumns}, dev.dtype(at::kDouble));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const SketchHash h = make_sketch_hash(static_cast<uint64_t>(seed));
  int kind_sel = plan.tensors[0].type;
  for (const SketchPlannedTensor& p : plan.tensors) {
    if (p.type != kind_sel) kind_sel = kKindMixed;
  }
  pick_chunk_kernel(kind_sel, sketch_dim)<<<static_cast<unsigned>(plan.num_chunks), kThreads, 0, stream>>>(
      reinterpret_cast<const SketchDeviceTensor*>(meta.data_ptr<int64_t>()), static_cast<int>(num_tensors), h, log2k,
      sk_partials.data_ptr<float>(), mom_partials.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const dim3 grid(static_cast<unsigned>(num_groups),
                  static_cast<unsigned>((sketch_dim + kBucketsPerBlock - 1) / kBucketsPerBlock + 1));
  sketch_group_kernel<<<grid, kThreads, 0, stream>>>(sk_partials.data_ptr<float>(), mom_partials.data_ptr<double>(),
                                                     meta.data_ptr<int64_t>() + num_tensors * 6, log2k,
                                                     sketch.data_ptr<double>(), moments.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {moments, sketch};
}

}  // namespace

TORCH_LIBRARY_IMPL(gradgeom, CUDA, m) {
  m.impl("sketch_moments", &sketch_moments_cuda);
}

}  // namespace gradgeom
