// Kernel metadata uploads with a content cache (CUDA only). The same tensors in the same places
// (the usual case: the same parameters or gradients every step) give the same words, so the
// device copy made by an earlier call on the same device and stream is handed back: no pinned
// buffer, no copy, no work for the caching host allocator (which, while the GPU is busy, cannot
// recycle its pinned blocks and allocates new ones). Entries are read-only; one is replaced only
// by a call on its own stream, so freeing it is ordered after the kernels that read it. Misses,
// and calls during CUDA graph capture (whose memory the graph must own), go through
// upload_words.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "gradgeom/device_upload.h"
#include "gradgeom/stream_lru.h"

namespace gradgeom {
namespace upload_cache {

inline StreamLru<std::vector<int64_t>, at::Tensor>& cache() {
  // Never destroyed: no CUDA frees after the runtime shuts down.
  static auto* c = new StreamLru<std::vector<int64_t>, at::Tensor>(/*capacity=*/32);
  return *c;
}

}  // namespace upload_cache

// As upload_words (an int64 device tensor of `words` words written by fill(int64_t* host)), but
// the result may be shared with earlier and later calls: callers must only read it.
template <typename Fill>
at::Tensor cached_upload_words(int64_t words, const at::TensorOptions& device, Fill&& fill) {
  std::vector<int64_t> host(static_cast<size_t>(words), 0);
  fill(host.data());
  auto copy_host = [&](int64_t* out) { std::copy(host.begin(), host.end(), out); };
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None)
    return upload_words(words, device, copy_host);
  const int dev = device.device().index();
  const int64_t stream = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(dev)).id();
  // No hash: the words of different tensor sets differ in their first words (data pointers),
  // where the comparison stops.
  auto same = [&](const std::vector<int64_t>& key) { return key == host; };
  if (auto hit = upload_cache::cache().find(dev, stream, same)) return *hit;
  at::Tensor fresh = upload_words(words, device, copy_host);
  upload_cache::cache().insert(dev, stream, std::move(host), fresh);
  return fresh;
}

}  // namespace gradgeom
