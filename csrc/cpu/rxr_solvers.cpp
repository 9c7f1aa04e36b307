// The batched r x r ops on the CPU: sym_eigh (eigenvalues only: Householder + bisection of
// tridiag_eig.h; with eigenvectors: the parallel cyclic Jacobi solver of jacobi.h) and
// psd_cholesky (psd_cholesky.h), run sequentially per matrix, matrices in parallel. The solvers
// are here so that the algorithms the GPU runs are tested on every machine; gradgeom.lora uses
// LAPACK (torch.linalg) for eigenvalues on the CPU.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <torch/library.h>

#include <limits>
#include <tuple>
#include <vector>

#include "gradgeom/jacobi.h"
#include "gradgeom/psd_cholesky.h"
#include "gradgeom/rxr_check.h"
#include "gradgeom/tridiag_eig.h"

namespace gradgeom {
namespace {

// Packed lower triangles; rows below n/2 in a separate buffer, so that the CPU also runs the
// head/tail split the GPU uses for matrices too large for shared memory.
void eigvalsh_cpu(const at::Tensor& a64, at::Tensor& w) {
  const int64_t batch = a64.size(0);
  const int n = static_cast<int>(a64.size(1));
  const int split = n / 2;
  const double* src = a64.data_ptr<double>();
  double* wout = w.data_ptr<double>();
  at::parallel_for(0, batch, 1, [&](int64_t first, int64_t last) {
    const int64_t head_size = block::packed_size(split);
    std::vector<double> head(head_size), tail(block::packed_size(n) - head_size);
    std::vector<double> work(tridiag::workspace_doubles(n));
    std::vector<int> iwork(tridiag::grid_points(n, 1));
    const block::PackedLower a{head.data(), tail.data(), split};
    for (int64_t b = first; b < last; ++b) {
      block::load_lower(src + b * n * n, n, a, 0, 1);
      tridiag::eigvalsh(a, n, work.data(), iwork.data(), wout + b * n, 0, 1, [] {});
    }
  });
}

std::tuple<at::Tensor, at::Tensor> sym_eigh_cpu(const at::Tensor& A, bool vectors) {
  check_square_batch("sym_eigh", A);
  const at::Tensor a64 = A.to(at::kDouble).contiguous();
  const int64_t batch = a64.size(0);
  const int64_t n = a64.size(1);
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  const double nan = std::numeric_limits<double>::quiet_NaN();
  at::Tensor w = at::full({batch, n}, nan, opts);
  at::Tensor V = vectors ? at::full({batch, n, n}, nan, opts) : at::empty({0}, opts);
  if (batch == 0 || n == 0) return {w, V};
  if (!vectors) {
    eigvalsh_cpu(a64, w);
    return {w, V};
  }
  const int m = static_cast<int>(n + (n % 2));
  const int ld = m;
  const double* src = a64.data_ptr<double>();
  double* wout = w.data_ptr<double>();
  double* vout = V.data_ptr<double>();

  at::parallel_for(0, batch, 1, [&](int64_t first, int64_t last) {
    std::vector<double> a(m * ld), v(m * ld), rot(2 * m);
    int flag = 0;
    for (int64_t b = first; b < last; ++b) {
      const double* s = src + b * n * n;
      std::fill(a.begin(), a.end(), 0.0);
      for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j <= i; ++j) a[i * ld + j] = a[j * ld + i] = s[i * n + j];  // lower triangle
      std::fill(v.begin(), v.end(), 0.0);
      for (int i = 0; i < m; ++i) v[i * ld + i] = 1.0;
      jacobi::solve(a.data(), ld, v.data(), m, rot.data(), &flag, 0, 1, [] {});
      for (int i = 0; i < n; ++i) {
        const int k = jacobi::ascending_rank(a.data(), ld, static_cast<int>(n), i);
        wout[b * n + k] = a[i * ld + i];
        for (int64_t row = 0; row < n; ++row) vout[(b * n + row) * n + k] = v[row * ld + i];
      }
    }
  });
  return {w, V};
}

at::Tensor psd_cholesky_cpu(const at::Tensor& A, double tol) {
  check_square_batch("psd_cholesky", A);
  const at::Tensor a64 = A.to(at::kDouble).contiguous();
  const int64_t batch = a64.size(0);
  const int n = static_cast<int>(a64.size(1));
  at::Tensor F = at::empty_like(a64);
  const double* src = a64.data_ptr<double>();
  double* out = F.data_ptr<double>();
  at::parallel_for(0, batch, 1, [&](int64_t first, int64_t last) {
    std::vector<double> packed(block::packed_size(n)), work(cholesky::workspace_doubles(n, 1));
    std::vector<int> iwork(cholesky::workspace_ints(n));
    const block::PackedLower a{packed.data(), packed.data(), n};
    for (int64_t b = first; b < last; ++b) {
      block::load_lower(src + b * n * n, n, a, 0, 1);
      cholesky::factor(a, n, tol, out + b * n * n, work.data(), iwork.data(), 0, 1, [] {});
    }
  });
  return F;
}

}  // namespace

TORCH_LIBRARY_IMPL(gradgeom, CPU, m) {
  m.impl("sym_eigh", &sym_eigh_cpu);
  m.impl("psd_cholesky", &psd_cholesky_cpu);
}

}  // namespace gradgeom
