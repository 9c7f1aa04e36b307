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
#include <mutex>
#include <utility>
#include <vector>

#include "gradgeom/device_upload.h"

namespace gradgeom {
namespace upload_cache {

constexpr size_t kEntries = 32;

struct Entry {
  int device;
  int64_t stream;
  std::vector<int64_t> words;
  at::Tensor on_device;
  uint64_t last_use;
};

struct Cache {
  std::mutex mu;
  std::vector<Entry> entries;
  uint64_t clock = 0;
};

inline Cache& cache() {
  static Cache* c = new Cache();  // never destroyed: no CUDA frees after the runtime shuts down
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
  upload_cache::Cache& c = upload_cache::cache();
  {
    const std::lock_guard<std::mutex> lock(c.mu);
    for (upload_cache::Entry& e : c.entries) {
      // No hash: the words of different tensor sets differ in their first words (data pointers),
      // where the comparison stops.
      if (e.device == dev && e.stream == stream && e.words == host) {
        e.last_use = ++c.clock;
        return e.on_device;
      }
    }
  }
  at::Tensor fresh = upload_words(words, device, copy_host);
  const std::lock_guard<std::mutex> lock(c.mu);
  upload_cache::Entry entry{dev, stream, std::move(host), fresh, ++c.clock};
  if (c.entries.size() < upload_cache::kEntries) {
    c.entries.push_back(std::move(entry));
    return fresh;
  }
  upload_cache::Entry* victim = nullptr;  // the least recently used entry of this stream
  for (upload_cache::Entry& e : c.entries)
    if (e.device == dev && e.stream == stream && (victim == nullptr || e.last_use < victim->last_use)) victim = &e;
  if (victim != nullptr) *victim = std::move(entry);
  return fresh;
}

}  // namespace gradgeom
