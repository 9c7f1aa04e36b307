// group_moments on CUDA: one launch per element type present (one for the usual single-dtype list) computes a Moments partial for every chunk of every tensor
// (16-byte vector loads, a scalar head/tail, fp32 per-thread accumulation, fp64 block merge);
// a second launch merges each group's partials in chunk order. No atomics: bitwise
// deterministic. Everything runs on the current stream and nothing waits for the device.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "gradgeom/cuda_reduce.cuh"
#include "gradgeom/cached_upload.cuh"
#include "gradgeom/moments.h"
#include "gradgeom/tensor_list_plan.h"
#include "gradgeom/check.h"

namespace gradgeom {
namespace {

using namespace cuda_detail;

constexpr int kThreads = 256;
constexpr int kUnroll = 4;

// Per-thread running state, in the chunk's shifted frame d = x - shift (fp32 for 16/32-bit inputs).
template <typename acc_t>
struct Running {
  acc_t n = 0;      // finite elements
  acc_t mean = 0;   // mean of d
  acc_t m2 = 0;     // sum of (d - mean)^2
  acc_t maxabs = 0; // max |x|
  acc_t nonfinite = 0;
};

// Chan merge of a batch (nb elements, mean mb, M2 m2b) into the running state.
template <typename acc_t>
__device__ __forceinline__ void merge_batch(Running<acc_t>& r, acc_t nb, acc_t mb, acc_t m2b) {
  const acc_t n = r.n + nb;
  const acc_t frac = nb / n;
  const acc_t delta = mb - r.mean;
  r.mean += delta * frac;
  r.m2 += m2b + delta * delta * r.n * frac;
  r.n = n;
}

// N values, all present. Fast path: no element tests; a non-finite element makes the batch sum
// non-finite, and only then are the elements examined one by one.
template <typename acc_t, int N>
__device__ __forceinline__ void add_full_batch(Running<acc_t>& r, const acc_t (&x)[N], acc_t shift) {
  acc_t s = 0, batch_max = 0;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    s += x[i] - shift;
    batch_max = fmax(batch_max, fabs(x[i]));
  }
  if (isfinite(s)) {
    r.maxabs = fmax(r.maxabs, batch_max);
    const acc_t mb = s * (acc_t(1) / acc_t(N));
    acc_t m2b = 0;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const acc_t d = (x[i] - shift) - mb;
      m2b += d * d;
    }
    merge_batch(r, acc_t(N), mb, m2b);
    return;
  }
  // Rare: some element is NaN/Inf (or the batch sum overflowed): test the elements one by one.
  acc_t c = 0, sf = 0, mx = 0;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const bool finite = isfinite(x[i]);
    c += finite ? acc_t(1) : acc_t(0);
    sf += finite ? x[i] - shift : acc_t(0);
    mx = finite ? fmax(mx, fabs(x[i])) : mx;
  }
  r.nonfinite += acc_t(N) - c;
  r.maxabs = fmax(r.maxabs, mx);
  if (c > 0) {
    const acc_t mb = sf / c;
    acc_t m2b = 0;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const acc_t d = isfinite(x[i]) ? (x[i] - shift) - mb : acc_t(0);
      m2b += d * d;
    }
    merge_batch(r, c, mb, m2b);
  }
}

template <typename acc_t>
__device__ __forceinline__ void add_one(Running<acc_t>& r, acc_t x, acc_t shift) {
  if (isfinite(x)) {
    r.maxabs = fmax(r.maxabs, fabs(x));
    merge_batch(r, acc_t(1), x - shift, acc_t(0));
  } else {
    r.nonfinite += 1;
  }
}

template <typename acc_t>
__device__ __forceinline__ Moments<double> to_moments(const Running<acc_t>& r, acc_t shift) {
  Moments<double> m;
  m.count = r.n;
  m.nonfinite = r.nonfinite;
  m.maxabs = r.maxabs;
  if (r.n > 0) {
    const double mean = static_cast<double>(r.mean) + static_cast<double>(shift);
    m.sum = mean * r.n;
    m.m2 = r.m2;
    m.sumsq = m.m2 + mean * mean * r.n;
  }
  return m;
}

template <typename Kind>
__device__ Moments<double> chunk_moments(const DeviceTensor& t, int64_t local_chunk) {
  using storage = typename Kind::storage;
  using acc_t = typename Kind::acc;
  constexpr int kVec = 16 / sizeof(storage);
  union Vec {
    uint4 raw;
    storage e[kVec];
  };

  const storage* base = static_cast<const storage*>(t.data);
  const int64_t body_begin = t.head + local_chunk * kChunkElems;
  const int64_t body_end = min(t.numel, body_begin + kChunkElems);
  const int64_t body_len = body_end > body_begin ? body_end - body_begin : 0;
  const int64_t nvec = body_len / kVec;
  const uint4* vec_base = reinterpret_cast<const uint4*>(base + body_begin);

  // Work relative to one value of the chunk: fp32 sums of x - shift keep their digits even when
  // the mean is large against the spread.
  const int64_t first_elem = local_chunk == 0 ? 0 : body_begin;
  acc_t shift = Kind::widen(base[first_elem]);
  shift = isfinite(shift) ? shift : acc_t(0);

  Running<acc_t> r;
  constexpr int64_t kStride = int64_t(kThreads) * kUnroll;
  const int64_t full_rounds_end = nvec - nvec % kStride;
  for (int64_t first = threadIdx.x; first < full_rounds_end; first += kStride) {
    Vec loaded[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) loaded[u].raw = __ldg(vec_base + first + int64_t(u) * kThreads);
    acc_t x[kUnroll * kVec];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int j = 0; j < kVec; ++j) x[u * kVec + j] = Kind::widen(loaded[u].e[j]);
    }
    add_full_batch(r, x, shift);
  }
  for (int64_t v = full_rounds_end + threadIdx.x; v < nvec; v += kThreads) {
    Vec loaded;
    loaded.raw = __ldg(vec_base + v);
    acc_t x[kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j) x[j] = Kind::widen(loaded.e[j]);
    add_full_batch(r, x, shift);
  }

  // Scalars: the unaligned head (first chunk only) and the tail shorter than one vector.
  const int64_t tail_begin = body_begin + nvec * kVec;
  const int64_t n_tail = body_end > tail_begin ? body_end - tail_begin : 0;
  const int64_t n_head = local_chunk == 0 ? t.head : 0;
  for (int64_t i = threadIdx.x; i < n_head + n_tail; i += kThreads) {
    const int64_t pos = i < n_head ? i : tail_begin + (i - n_head);
    add_one(r, Kind::widen(base[pos]), shift);
  }
  return to_moments(r, shift);
}

// One instantiation per element type, so each gets the registers its own loop needs (a single
// kernel switching over four types pays for the widest one). A launch covers every chunk; blocks
// whose tensor has another type leave at once. Lists of one dtype, the usual case, take one launch.
template <typename Kind, int kMinBlocks>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    chunk_partials_kernel(const DeviceTensor* tensors, int num_tensors, ElemType type, double* partials) {
  __shared__ Moments<double> scratch[kThreads / 32];
  __shared__ int owner;
  const int64_t chunk = blockIdx.x;
  if (threadIdx.x == 0) owner = find_owner(tensors, num_tensors, chunk);
  __syncthreads();
  const DeviceTensor t = tensors[owner];
  if (static_cast<ElemType>(t.type) != type) return;
  Moments<double> m = chunk_moments<Kind>(t, chunk - t.chunk_begin);
  m = block_merge(m, scratch);
  if (threadIdx.x == 0) store_moments(m, partials + chunk * kMomentColumns);
}

__global__ void __launch_bounds__(kThreads) group_merge_kernel(const double* partials, const int64_t* group_chunk_begin,
                                                               double* out) {
  __shared__ Moments<double> scratch[kThreads / 32];
  const int64_t g = blockIdx.x;
  const int64_t first = group_chunk_begin[g];
  const int64_t last = group_chunk_begin[g + 1];
  Moments<double> m;
  for (int64_t c = first + threadIdx.x; c < last; c += kThreads) merge_into(m, load_moments(partials + c * kMomentColumns));
  m = block_merge(m, scratch);
  if (threadIdx.x == 0) store_moments(m, out + g * kMomentColumns);
}

at::Tensor group_moments_cuda(at::TensorList tensors, c10::IntArrayRef group_ids, int64_t num_groups) {
  check_tensor_list("group_moments", tensors, group_ids, num_groups);
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  const at::TensorOptions dev = at::TensorOptions().device(tensors[0].device());
  const TensorListPlan plan = make_plan(tensors, group_ids, num_groups, /*align_head=*/true);
  at::Tensor out = at::zeros({num_groups, kMomentColumns}, dev.dtype(at::kDouble));
  if (plan.num_chunks == 0) return out;
  GG_CHECK(plan.num_chunks < (int64_t(1) << 31), "group_moments: too many chunks (", plan.num_chunks, ")");

  // Metadata: the tensor table, then group_chunk_begin; uploaded once per distinct table.
  const int64_t num_tensors = static_cast<int64_t>(plan.tensors.size());
  const int64_t words = num_tensors * 4 + num_groups + 1;
  const at::Tensor meta = cached_upload_words(words, dev, [&](int64_t* host) {
    auto* table = reinterpret_cast<DeviceTensor*>(host);
    for (int64_t i = 0; i < num_tensors; ++i) {
      const PlannedTensor& p = plan.tensors[i];
      table[i] = DeviceTensor{p.data, p.numel, p.chunk_begin, p.head, static_cast<int32_t>(p.type)};
    }
    std::copy(plan.group_chunk_begin.begin(), plan.group_chunk_begin.end(), host + num_tensors * 4);
  });

  at::Tensor partials = at::empty({plan.num_chunks, kMomentColumns}, dev.dtype(at::kDouble));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto* dev_table = reinterpret_cast<const DeviceTensor*>(meta.data_ptr<int64_t>());
  bool present[4] = {false, false, false, false};
  for (const PlannedTensor& p : plan.tensors) present[static_cast<int>(p.type)] = true;
  const dim3 grid(static_cast<unsigned>(plan.num_chunks));
  const int nt = static_cast<int>(num_tensors);
  double* parts = partials.data_ptr<double>();
  if (present[static_cast<int>(ElemType::kBFloat16)])
    chunk_partials_kernel<BF16, 3><<<grid, kThreads, 0, stream>>>(dev_table, nt, ElemType::kBFloat16, parts);
  if (present[static_cast<int>(ElemType::kFloat16)])
    chunk_partials_kernel<F16, 3><<<grid, kThreads, 0, stream>>>(dev_table, nt, ElemType::kFloat16, parts);
  if (present[static_cast<int>(ElemType::kFloat32)])
    chunk_partials_kernel<F32, 3><<<grid, kThreads, 0, stream>>>(dev_table, nt, ElemType::kFloat32, parts);
  if (present[static_cast<int>(ElemType::kFloat64)])
    chunk_partials_kernel<F64, 1><<<grid, kThreads, 0, stream>>>(dev_table, nt, ElemType::kFloat64, parts);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  group_merge_kernel<<<static_cast<unsigned>(num_groups), kThreads, 0, stream>>>(
      partials.data_ptr<double>(), meta.data_ptr<int64_t>() + num_tensors * 4, out.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(gradgeom, CUDA, m) {
  m.impl("group_moments", &group_moments_cuda);
}

}  // namespace gradgeom
