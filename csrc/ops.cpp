// Every gradgeom operator schema, in one place. Kernels live in cpu/<op>.cpp and cuda/<op>.cu,
// device-generic composites of other ops in lora_composite.cpp; the Python wrappers and fake
// (meta) implementations live in gradgeom/ops.py and gradgeom/lora_ops.py.
#include <torch/library.h>

#include "gradgeom/lora_tolerances.h"

#ifdef GRADGEOM_PYTHON_MODULE
#include <Python.h>
#endif

namespace gradgeom {
bool compiled_with_cuda();
}

TORCH_LIBRARY(gradgeom, m) {
  // True when this build contains the CUDA kernels.
  m.def("_compiled_with_cuda() -> bool", [] { return gradgeom::compiled_with_cuda(); });
  // tensors: float32/float64/float16/bfloat16, any shapes, one device.
  // Returns float64 [num_groups, 6]: count of finite elements, sum, sum of squares,
  // M2 = sum((x - mean)^2), max |x| over finite elements, count of non-finite elements.
  m.def("group_moments(Tensor[] tensors, int[] group_ids, int num_groups) -> Tensor");
  // sketch_moments: group_moments plus a count-sketch of each group in the same pass.
  // offsets[i]: index of tensors[i]'s first element in its group's concatenation. sketch_dim: a
  // power of two in [8, 8192]. Returns (float64 [num_groups, 6] moments as group_moments,
  // float64 [num_groups, sketch_dim] sketch y = S g; non-finite elements are left out of y).
  m.def("sketch_moments(Tensor[] tensors, int[] group_ids, int[] offsets, int num_groups, int sketch_dim, int seed) -> (Tensor, Tensor)");
  // Bs[i]: [d_i, r_i], As[i]: [r_i, k_i]; float32/float64/float16/bfloat16, any strides, one device.
  // Returns float64 (B_iᵀB_i, A_i·A_iᵀ), each [n, R, R] with R = max r_i, zero-padded beyond r_i.
  m.def("lora_gram(Tensor[] Bs, Tensor[] As) -> (Tensor, Tensor)");
  // gb, ga: float64 [n, R, R] symmetric (lower triangles read), one shape, one device (lora_gram's
  // outputs). Returns float64 [n]: sqrt(max(sum(gb[i] * ga[i]), 0)) = ‖B_i·A_i‖_F from the Gram
  // matrices (NaN propagates).
  m.def("gram_fro(Tensor gb, Tensor ga) -> Tensor");
  // B1s[i]: [d_i, p_i], B2s[i]: [d_i, q_i]; float32/float64/float16/bfloat16, any strides, one
  // device. Returns float64 [n, R, R], R = max(p_i, q_i): B1s[i]ᵀ·B2s[i] in its top-left p_i x q_i
  // corner (factors widened to float64, products and sums in float64), zeros elsewhere. At least
  // one pair (the dispatcher needs a tensor); R <= 8160 on CUDA.
  m.def("lora_cross_gram(Tensor[] B1s, Tensor[] B2s) -> Tensor");
  // A: float32/float64 [batch, n, n] symmetric (lower triangle read), n <= 1024. Eigenvalues only:
  // Householder tridiagonalisation + bisection; with vectors: Jacobi eigen-solver.
  // Returns float64 eigenvalues [batch, n] ascending, eigenvectors [batch, n, n] (columns) or [0].
  m.def("sym_eigh(Tensor A, bool vectors) -> (Tensor, Tensor)");
  // A: float32/float64 [batch, n, n] symmetric positive semi-definite (lower triangle read).
  // Returns float64 F [batch, n, n] with F·Fᵀ = A (diagonally pivoted Cholesky; stops when the
  // largest remaining pivot is <= tol·max(diag A), so F has A's numerical rank).
  m.def("psd_cholesky(Tensor A, float tol) -> Tensor");
  // Bs, As as lora_gram. Returns float64 [n]: ‖B_i·A_i‖_F (no scaling), from the Gram matrices.
  m.def("lora_fro(Tensor[] Bs, Tensor[] As) -> Tensor");
  // Bs, As as lora_gram, R = max r_i <= 1024. The Gram route of gradgeom.lora in one call:
  // returns (float64 [n, R] singular values of B_i·A_i (no scaling), descending, exactly 0 at and
  // beyond min(d_i, k_i, r_i); bool [n] adapters the Gram route cannot resolve (all false unless
  // flag_ill); float64 [n] ‖B_i·A_i‖_F, or [0] when not with_fro).
  m.def("lora_svdvals(Tensor[] Bs, Tensor[] As, bool flag_ill, bool with_fro=True) -> (Tensor, Tensor, Tensor)");
  // The Gram route's tolerances (lora_tolerances.h): [chol fp32, chol fp64, cond fp32, cond fp64].
  // Bs/As: the first adapters' factors, then the second's (2n of each, as lora_gram takes them).
  // Returns float64 [n, R + 4 (+1 with flag_ill)]: principal angles between the column spaces of
  // B1ᵢ·A1ᵢ and B2ᵢ·A2ᵢ by the Gram route (ascending, 0 beyond the smaller rank), Grassmann
  // distance, both numerical ranks, a non-finite marker, (flag_ill) the exact-route flag.
  m.def("lora_principal_angles(Tensor[] Bs, Tensor[] As, bool flag_ill) -> Tensor");
  m.def("_lora_tolerances() -> float[]", [] { return gradgeom::lora_tolerances(); });
  // gradgeom-schemas: each new op adds its m.def line above this comment.
}

namespace gradgeom {
bool compiled_with_cuda() {
#ifdef GRADGEOM_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace gradgeom

#ifdef GRADGEOM_PYTHON_MODULE
namespace gradgeom {
PyMethodDef* python_methods();  // python_lists.cpp
}

// `import gradgeom._C` loads this library and with it the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, gradgeom::python_methods()};
  return PyModule_Create(&module);
}
#endif
