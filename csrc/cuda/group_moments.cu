// group_moments on CUDA: one launch computes a Moments partial for every chunk of every tensor
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
#include "gradgeom/moments.h"
#include "gradgeom/tensor_list_plan.h"

namespace gradgeom {
namespace {

using namespace cuda_detail;

constexpr int kThreads = 256;
constexpr int kUnroll = 4;

template <typename Kind, int N>
__device__ __forceinline__ void add_batch(Moments<typename Kind::acc>& acc,
                                          const typename Kind::acc (&v)[N], const bool (&present)[N]) {
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

  Moments<acc_t> acc;
  for (int64_t first = threadIdx.x; first < nvec; first += int64_t(kThreads) * kUnroll) {
    Vec loaded[kUnroll];
    bool in_range[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t idx = first + int64_t(u) * kThreads;
      in_range[u] = idx < nvec;
      if (in_range[u]) loaded[u].raw = __ldg(vec_base + idx);
    }
    acc_t v[kUnroll * kVec];
    bool present[kUnroll * kVec];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        v[u * kVec + j] = in_range[u] ? Kind::widen(loaded[u].e[j]) : acc_t(0);
        present[u * kVec + j] = in_range[u];
      }
    }
    add_batch<Kind>(acc, v, present);
  }

  // Scalars: the unaligned head (first chunk only) and the tail shorter than one vector.
  const int64_t tail_begin = body_begin + nvec * kVec;
  const int64_t n_tail = body_end > tail_begin ? body_end - tail_begin : 0;
  const int64_t n_head = local_chunk == 0 ? t.head : 0;
  for (int64_t i = threadIdx.x; i < n_head + n_tail; i += kThreads) {
    const int64_t pos = i < n_head ? i : tail_begin + (i - n_head);
    acc_t v[1] = {Kind::widen(base[pos])};
    bool present[1] = {true};
    add_batch<Kind>(acc, v, present);
  }
  return moments_cast<double>(acc);
}

__global__ void __launch_bounds__(kThreads) chunk_partials_kernel(const DeviceTensor* tensors, int num_tensors,
                                                                  double* partials) {
  __shared__ Moments<double> scratch[kThreads / 32];
  __shared__ int owner;
  const int64_t chunk = blockIdx.x;
  if (threadIdx.x == 0) owner = find_owner(tensors, num_tensors, chunk);
  __syncthreads();
  const DeviceTensor t = tensors[owner];
  const int64_t local = chunk - t.chunk_begin;
  Moments<double> m;
  switch (static_cast<ElemType>(t.type)) {
    case ElemType::kFloat32: m = chunk_moments<F32>(t, local); break;
    case ElemType::kFloat64: m = chunk_moments<F64>(t, local); break;
    case ElemType::kFloat16: m = chunk_moments<F16>(t, local); break;
    case ElemType::kBFloat16: m = chunk_moments<BF16>(t, local); break;
  }
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
  TORCH_CHECK(plan.num_chunks < (int64_t(1) << 31), "group_moments: too many chunks (", plan.num_chunks, ")");

  // Metadata: the tensor table, then group_chunk_begin; one pinned buffer, one async copy.
  const int64_t num_tensors = static_cast<int64_t>(plan.tensors.size());
  const int64_t words = num_tensors * 4 + num_groups + 1;
  at::Tensor host = at::empty({words}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  auto* table = reinterpret_cast<DeviceTensor*>(host.data_ptr<int64_t>());
  for (int64_t i = 0; i < num_tensors; ++i) {
    const PlannedTensor& p = plan.tensors[i];
    table[i] = DeviceTensor{p.data, p.numel, p.chunk_begin, p.head, static_cast<int32_t>(p.type)};
  }
  std::copy(plan.group_chunk_begin.begin(), plan.group_chunk_begin.end(), host.data_ptr<int64_t>() + num_tensors * 4);
  at::Tensor meta = at::empty({words}, dev.dtype(at::kLong));
  meta.copy_(host, /*non_blocking=*/true);

  at::Tensor partials = at::empty({plan.num_chunks, kMomentColumns}, dev.dtype(at::kDouble));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto* dev_table = reinterpret_cast<const DeviceTensor*>(meta.data_ptr<int64_t>());
  chunk_partials_kernel<<<static_cast<unsigned>(plan.num_chunks), kThreads, 0, stream>>>(
      dev_table, static_cast<int>(num_tensors), partials.data_ptr<double>());
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
