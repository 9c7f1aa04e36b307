// lora_svdvals's ill-conditioning flags on the host before the call's last kernels are done
// (csrc/early_flags.cpp). On CUDA the composite reads the flags off the tridiagonal matrices
// (gram_stage::tridiagonal_flags) and copies them to pinned host memory before it queues the
// bisection; gradgeom.lora's "auto" route, which must read them to pick the rows it recomputes
// exactly, takes that copy (`take`) about a bisection's time before the call's last kernel ends.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Event.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <vector>

namespace gradgeom::early_flags {

#ifdef GRADGEOM_WITH_CUDA
// One call's flags, queued on the current stream of a CUDA device between the work they read and
// the work that may run while the host reads them, and their copy to pinned host memory, queued
// on a side stream behind them.
class HostCopy {
 public:
  HostCopy();
  ~HostCopy();
  HostCopy(const HostCopy&) = delete;
  HostCopy& operator=(const HostCopy&) = delete;

  // Queues compute() (kernels on the current stream, returning the flags: bool [n] on the
  // device) and, unless the stream is capturing a CUDA graph, the flags' copy to pinned host
  // memory. Once per object.
  void start(const std::function<at::Tensor()>& compute);
  bool started() const;

  // Remembers the flags and their host copy for take() on this thread; returns the flags.
  at::Tensor finish();

 private:
  at::Tensor flags_, host_;
  std::unique_ptr<c10::Event> copied_;
};
#endif

// The indices of the set flags in `ill`, when it is the flags tensor of the last HostCopy that
// finished on this thread: waits for their host copy (not for the stream) and forgets them.
// std::nullopt for any other tensor (read it the usual way).
std::optional<std::vector<int64_t>> take(const at::Tensor& ill);

// Whether take(ill) would find `ill`'s host copy (it does not wait).
bool pending(const at::Tensor& ill);

}  // namespace gradgeom::early_flags
