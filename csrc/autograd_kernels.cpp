// Autograd-key kernels of every gradgeom operator. None of the ops is differentiable: each kernel
// steps below autograd and calls the operator again, so its outputs never require grad (a
// backward through them fails with torch's "does not require grad" error).
//
// Without them the dispatcher takes torch's boxed autograd fallback for custom operators, which
// turns every argument into an IValue and back on every call: for the list ops that is each
// factor or gradient tensor twice (two lists of 224 factors for a Llama-7B-sized LoRA set).
// Typed kernels keep the call unboxed end to end. Nested calls (the composites' lora_gram,
// psd_cholesky, sym_eigh and ATen ops) run below autograd too, as under the fallback.
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <tuple>

#include "gradgeom/typed_op.h"

namespace gradgeom {
namespace {

template <const char* kName, typename Signature>
struct BelowAutograd;

template <const char* kName, typename Ret, typename... Args>
struct BelowAutograd<kName, Ret(Args...)> {
  static Ret call(Args... args) {
    static const auto op = typed_op<Ret(Args...)>(kName);
    const at::AutoDispatchBelowADInplaceOrView below;
    return op.call(args...);
  }
};

using at::Tensor;
using at::TensorList;
using Tensors2 = std::tuple<Tensor, Tensor>;
using Tensors3 = std::tuple<Tensor, Tensor, Tensor>;

constexpr char kGroupMoments[] = "gradgeom::group_moments";
constexpr char kSketchMoments[] = "gradgeom::sketch_moments";
constexpr char kLoraGram[] = "gradgeom::lora_gram";
constexpr char kGramFro[] = "gradgeom::gram_fro";
constexpr char kLoraCrossGram[] = "gradgeom::lora_cross_gram";
constexpr char kSymEigh[] = "gradgeom::sym_eigh";
constexpr char kPsdCholesky[] = "gradgeom::psd_cholesky";
constexpr char kLoraFro[] = "gradgeom::lora_fro";
constexpr char kLoraSvdvals[] = "gradgeom::lora_svdvals";
constexpr char kLoraPrincipalAngles[] = "gradgeom::lora_principal_angles";

}  // namespace

TORCH_LIBRARY_IMPL(gradgeom, Autograd, m) {
  m.impl("group_moments", &BelowAutograd<kGroupMoments, Tensor(TensorList, at::IntArrayRef, int64_t)>::call);
  m.impl("sketch_moments",
         &BelowAutograd<kSketchMoments,
                        Tensors2(TensorList, at::IntArrayRef, at::IntArrayRef, int64_t, int64_t, int64_t)>::call);
  m.impl("lora_gram", &BelowAutograd<kLoraGram, Tensors2(TensorList, TensorList)>::call);
  m.impl("gram_fro", &BelowAutograd<kGramFro, Tensor(const Tensor&, const Tensor&)>::call);
  m.impl("lora_cross_gram", &BelowAutograd<kLoraCrossGram, Tensor(TensorList, TensorList)>::call);
  m.impl("sym_eigh", &BelowAutograd<kSymEigh, Tensors2(const Tensor&, bool)>::call);
  m.impl("psd_cholesky", &BelowAutograd<kPsdCholesky, Tensor(const Tensor&, double)>::call);
  m.impl("lora_fro", &BelowAutograd<kLoraFro, Tensor(TensorList, TensorList)>::call);
  m.impl("lora_svdvals", &BelowAutograd<kLoraSvdvals, Tensors3(TensorList, TensorList, bool, bool)>::call);
  m.impl("lora_principal_angles", &BelowAutograd<kLoraPrincipalAngles, Tensor(TensorList, TensorList, bool)>::call);
}

}  // namespace gradgeom
