// Kernel metadata (tensor tables, chunk offsets) goes to the device through one pinned host
// buffer and one asynchronous copy on the current stream: no host synchronisation, and torch's
// caching host allocator keeps the buffer alive until the copy has run.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstdint>

namespace gradgeom {

// Returns an int64 device tensor of `words` words; fill(int64_t* host) writes them.
template <typename Fill>
at::Tensor upload_words(int64_t words, const at::TensorOptions& device, Fill&& fill) {
  at::Tensor host = at::empty({words}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  fill(host.data_ptr<int64_t>());
  at::Tensor meta = at::empty({words}, device.dtype(at::kLong));
  meta.copy_(host, /*non_blocking=*/true);
  return meta;
}

}  // namespace gradgeom
