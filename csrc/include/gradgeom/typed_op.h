// Handle of a registered operator for typed (unboxed) calls through the dispatcher, so that every
// dispatch key (CPU, CUDA, autograd, Python modes) still applies. Look it up once:
//   static const auto op = typed_op<at::Tensor(const at::Tensor&, double)>("gradgeom::psd_cholesky");
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>

namespace gradgeom {

template <typename Signature>
c10::TypedOperatorHandle<Signature> typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

}  // namespace gradgeom
