// gradgeom._C._lora_call: the LoRA list ops called from Python without boxing their arguments.
//
// torch.ops.gradgeom.<op>(Bs, As) converts every tensor of both lists into an IValue and back
// (85 us for the 448 factors of 224 adapters on the 2-core development machine, more than the
// ops' own host work). This entry reads the lists with the CPython API, unpacks plain tensors in
// place and calls the same operator through the dispatcher's typed (unboxed) path, so every
// dispatch key (CPU, CUDA, Python dispatch modes) is honoured. It returns None, for the caller to
// take torch.ops, wherever that shortcut could differ: a tensor subclass other than Parameter
// (its __torch_function__ must run), an active torch function mode, a factor that requires grad
// while grad mode is on, an element that is not a tensor or a malformed pair, an empty list.
// Compiled only into the Python extension (GRADGEOM_PYTHON_MODULE); the CMake library has no
// Python.
#ifdef GRADGEOM_PYTHON_MODULE

#include <ATen/PythonTorchFunctionTLS.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <tuple>
#include <vector>

#include "gradgeom/early_flags.h"
#include "gradgeom/typed_op.h"

namespace gradgeom {
namespace {

enum LoraOp : int { kFro = 0, kSvdvals = 1, kPrincipalAngles = 2, kGram = 3, kSvdvalsNoFro = 4 };

// The tensors of plain torch.Tensor / Parameter objects, borrowed: no reference-count traffic on
// the tensors themselves (on recent torch a tensor's count going 1 -> 2 -> 1 also moves its Python
// object's count, through a GIL check, for every factor). Each Python object is held by a
// reference of its own (taken and dropped with the GIL held), so the borrowed tensors stay valid
// while the op runs without the GIL. Destroy with the GIL held.
class BorrowedTensors {
 public:
  BorrowedTensors() = default;
  BorrowedTensors(const BorrowedTensors&) = delete;
  BorrowedTensors& operator=(const BorrowedTensors&) = delete;
  ~BorrowedTensors() {
    for (at::Tensor& t : tensors_) c10::MaybeOwnedTraits<at::Tensor>::destroyBorrow(t);
    for (PyObject* o : owners_) Py_DECREF(o);
  }
  void reserve(size_t n) {
    tensors_.reserve(n);
    owners_.reserve(n);
  }
  // Appends the tensor behind obj; false for anything but a plain torch.Tensor or Parameter.
  bool take(PyObject* obj, bool& requires_grad) {
    if (!THPVariable_CheckExact(obj)) return false;
    const at::Tensor& t = THPVariable_Unpack(obj);
    requires_grad = requires_grad || t.requires_grad();
    Py_INCREF(obj);
    owners_.push_back(obj);
    tensors_.push_back(c10::MaybeOwnedTraits<at::Tensor>::createBorrow(t));
    return true;
  }
  at::TensorList list() const { return tensors_; }

 private:
  std::vector<at::Tensor> tensors_;
  std::vector<PyObject*> owners_;
};

// Factors of a sequence of (B, A) pairs, or of two parallel sequences; false where the shortcut
// does not apply.
bool read_factors(PyObject* first, PyObject* second, BorrowedTensors& Bs, BorrowedTensors& As, bool& requires_grad) {
  auto is_seq = [](PyObject* o) { return PyList_Check(o) || PyTuple_Check(o); };
  if (!is_seq(first) || (second != Py_None && !is_seq(second))) return false;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(first);
  if (n == 0) return false;
  PyObject** items = PySequence_Fast_ITEMS(first);
  Bs.reserve(n);
  As.reserve(n);
  if (second == Py_None) {
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* pair = items[i];
      if (!is_seq(pair) || PySequence_Fast_GET_SIZE(pair) != 2) return false;
      PyObject** ba = PySequence_Fast_ITEMS(pair);
      if (!Bs.take(ba[0], requires_grad) || !As.take(ba[1], requires_grad)) return false;
    }
    return true;
  }
  if (PySequence_Fast_GET_SIZE(second) != n) return false;
  PyObject** others = PySequence_Fast_ITEMS(second);
  for (Py_ssize_t i = 0; i < n; ++i)
    if (!Bs.take(items[i], requires_grad) || !As.take(others[i], requires_grad)) return false;
  return true;
}

PyObject* wrap(const at::Tensor& t) { return THPVariable_Wrap(t); }

template <typename... Ts>
PyObject* wrap(const std::tuple<Ts...>& ts) {
  PyObject* out = PyTuple_New(sizeof...(Ts));
  if (out == nullptr) return nullptr;
  Py_ssize_t i = 0;
  auto put = [&](const at::Tensor& t) {
    PyObject* o = THPVariable_Wrap(t);
    PyTuple_SET_ITEM(out, i++, o);  // steals o; a NULL item is fine for the tuple's dealloc
    return o != nullptr;
  };
  if (!std::apply([&](const auto&... t) { return (put(t) & ...); }, ts)) Py_CLEAR(out);
  return out;
}

using TensorList = at::TensorList;

// Runs op() without the GIL (as torch.ops does), then wraps its result with it.
template <typename Op>
PyObject* without_gil(Op&& op) {
  auto result = [&] {
    const pybind11::gil_scoped_release no_gil;
    return op();
  }();
  return wrap(result);
}

PyObject* call(int op, TensorList Bs, TensorList As, bool flag) {
  switch (op) {
    case kFro: {
      static const auto h = typed_op<at::Tensor(TensorList, TensorList)>("gradgeom::lora_fro");
      return without_gil([&] { return h.call(Bs, As); });
    }
    case kSvdvals:
    case kSvdvalsNoFro: {
      using Result = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
      static const auto h = typed_op<Result(TensorList, TensorList, bool, bool)>("gradgeom::lora_svdvals");
      return without_gil([&] { return h.call(Bs, As, flag, op == kSvdvals); });
    }
    case kPrincipalAngles: {
      static const auto h = typed_op<at::Tensor(TensorList, TensorList, bool)>("gradgeom::lora_principal_angles");
      return without_gil([&] { return h.call(Bs, As, flag); });
    }
    case kGram: {
      static const auto h = typed_op<std::tuple<at::Tensor, at::Tensor>(TensorList, TensorList)>("gradgeom::lora_gram");
      return without_gil([&] { return h.call(Bs, As); });
    }
    default:
      TORCH_CHECK_VALUE(false, "_lora_call: op must be 0 (lora_fro), 1 (lora_svdvals), 2 (lora_principal_angles), ",
                        "3 (lora_gram) or 4 (lora_svdvals without fro)");
  }
}

// _lora_call(op: int, first, second, flag: bool, no_grad: bool) -> result or None.
// second None: first is a list/tuple of (B, A) pairs; else first = Bs and second = As.
// no_grad: run under torch.no_grad() (then factors that require grad are fine).
PyObject* lora_call(PyObject* /*self*/, PyObject* args) {
  HANDLE_TH_ERRORS
  int op = 0, flag = 0, no_grad = 0;
  PyObject* first = nullptr;
  PyObject* second = nullptr;
  if (!PyArg_ParseTuple(args, "iOOpp", &op, &first, &second, &flag, &no_grad)) return nullptr;
  BorrowedTensors Bs, As;
  bool requires_grad = false;
  if (at::impl::torch_function_mode_enabled() || !read_factors(first, second, Bs, As, requires_grad) ||
      (requires_grad && !no_grad && c10::GradMode::is_enabled()))
    Py_RETURN_NONE;
  const c10::AutoGradMode grad_mode(!no_grad && c10::GradMode::is_enabled());
  return call(op, Bs.list(), As.list(), flag != 0);
  END_HANDLE_TH_ERRORS
}

// _early_flags(ill) -> list of the set flags' indices, or None (early_flags::take).
PyObject* early_flags_of(PyObject* /*self*/, PyObject* ill) {
  HANDLE_TH_ERRORS
  if (!THPVariable_Check(ill)) {
    PyErr_SetString(PyExc_TypeError, "_early_flags: ill must be a torch.Tensor");
    return nullptr;
  }
  const at::Tensor& t = THPVariable_Unpack(ill);
  const auto set = [&] {
    const pybind11::gil_scoped_release no_gil;  // the wait for the copy
    return early_flags::take(t);
  }();
  if (!set) Py_RETURN_NONE;
  PyObject* out = PyList_New(static_cast<Py_ssize_t>(set->size()));
  if (out == nullptr) return nullptr;
  for (size_t i = 0; i < set->size(); ++i) {
    PyObject* v = PyLong_FromLongLong((*set)[i]);
    if (v == nullptr) {
      Py_DECREF(out);
      return nullptr;
    }
    PyList_SET_ITEM(out, static_cast<Py_ssize_t>(i), v);
  }
  return out;
  END_HANDLE_TH_ERRORS
}

// _early_flags_pending(ill) -> bool (early_flags::pending).
PyObject* early_flags_pending(PyObject* /*self*/, PyObject* ill) {
  HANDLE_TH_ERRORS
  if (THPVariable_Check(ill) && early_flags::pending(THPVariable_Unpack(ill))) Py_RETURN_TRUE;
  Py_RETURN_FALSE;
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"_early_flags", early_flags_of, METH_O,
     "_early_flags(ill): the indices of the set flags of this thread's last CUDA lora_svdvals call, from the "
     "host copy it queued before its bisection (waits for that copy), when ill is that call's flags; else None."},
    {"_early_flags_pending", early_flags_pending, METH_O,
     "_early_flags_pending(ill): whether _early_flags(ill) would find a host copy (does not wait)."},
    {"_lora_call", lora_call, METH_VARARGS,
     "_lora_call(op, first, second, flag, no_grad): a LoRA list op without boxing (None: use torch.ops)."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

PyMethodDef* python_methods() { return methods; }

}  // namespace gradgeom

#endif  // GRADGEOM_PYTHON_MODULE
