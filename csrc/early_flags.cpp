// gradgeom/early_flags.h: lora_svdvals's flags copied to the host before its bisection.
#include "gradgeom/early_flags.h"

#ifdef GRADGEOM_WITH_CUDA
#include <ATen/ops/empty.h>
#include <c10/core/Event.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/intrusive_ptr.h>

#include "gradgeom/check.h"
#endif

namespace gradgeom::early_flags {

#ifdef GRADGEOM_WITH_CUDA
namespace {

// The flags a HostCopy finished last on this thread: a weak reference (the caller owns the
// tensor; while the reference has not expired no other tensor can have its address), their
// pinned host copy and the event that follows it.
struct Remembered {
  c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl> flags{
      c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>(
          c10::intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>())};
  at::Tensor host;
  std::optional<c10::Event> copied;
};

thread_local Remembered last;

}  // namespace

HostCopy::HostCopy() = default;
HostCopy::~HostCopy() = default;

bool HostCopy::started() const { return flags_.defined(); }

void HostCopy::start(const std::function<at::Tensor()>& compute) {
  GG_CHECK(!started(), "early_flags: HostCopy::start called twice");
  flags_ = compute();
  // Under CUDA graph capture a side stream forked here would have to join the capture again, and
  // a host copy would be replayed into memory nobody reads: no copy, the flags are read as usual.
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None) return;
  // The copy runs on a side stream (the copy engine), so that the caller's stream goes straight
  // on to its next kernel (a copy between two kernels cost ~8 µs of gaps on an H100).
  const c10::DeviceIndex device = flags_.device().index();
  const c10::cuda::CUDAStream caller = c10::cuda::getCurrentCUDAStream(device);
  const c10::cuda::CUDAStream side = c10::cuda::getStreamFromPool(/*isHighPriority=*/false, device);
  c10::Event computed(c10::DeviceType::CUDA);
  computed.record(caller);
  computed.block(side);
  copied_ = std::make_unique<c10::Event>(c10::DeviceType::CUDA);
  {
    const c10::cuda::CUDAStreamGuard on_side(side);
    host_ = at::empty(flags_.sizes(), flags_.options().device(at::kCPU).pinned_memory(true));
    host_.copy_(flags_, /*non_blocking=*/true);
    copied_->record(side);
  }
  flags_.record_stream(side);  // allocated on the caller's stream, read on the side stream
}

at::Tensor HostCopy::finish() {
  GG_CHECK(started(), "early_flags: HostCopy::finish before start");
  if (!copied_) return flags_;
  last.flags = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>(flags_.getIntrusivePtr());
  last.host = host_;
  last.copied.emplace(std::move(*copied_));
  return flags_;
}

bool pending(const at::Tensor& ill) {
  return ill.defined() && last.copied && !last.flags.expired() &&
         last.flags._unsafe_get_target() == ill.unsafeGetTensorImpl();
}

std::optional<std::vector<int64_t>> take(const at::Tensor& ill) {
  if (!pending(ill)) return std::nullopt;
  last.copied->synchronize();
  const at::Tensor host = std::move(last.host);
  last = Remembered();
  std::vector<int64_t> set;
  const bool* p = host.const_data_ptr<bool>();
  for (int64_t i = 0; i < host.numel(); ++i)
    if (p[i]) set.push_back(i);
  return set;
}
#else
bool pending(const at::Tensor&) { return false; }
std::optional<std::vector<int64_t>> take(const at::Tensor&) { return std::nullopt; }
#endif

}  // namespace gradgeom::early_flags
