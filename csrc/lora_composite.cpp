// The native composites of gradgeom.lora: lora_fro (‖B·A‖_F) and lora_svdvals (the Gram-route
// spectrum) of many adapters in one call. One device-generic kernel each, registered for CPU and
// CUDA: lora_gram, psd_cholesky and sym_eigh through the dispatcher, then ATen ops; step by step
// the ops of gradgeom._lora_core.gram_spectrum (psd_factor, eigh, _beyond_rank, _ill) in the same
// order, so the bits are those of the Python composition at a fraction of its host time.
// Never synchronises with the GPU: per-adapter structural ranks and dtype flags come from sizes
// and dtypes on the host; uniform ones stay host scalars, ragged ones go to the device in one
// asynchronous copy.
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/linalg_eigvalsh.h>
#include <ATen/ops/linalg_matrix_norm.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "gradgeom/check.h"
#include "gradgeom/device_upload.h"
#include "gradgeom/lora_check.h"
#include "gradgeom/lora_tolerances.h"
#include "gradgeom/rxr_check.h"

namespace gradgeom {
namespace {

std::tuple<at::Tensor, at::Tensor> lora_gram(at::TensorList Bs, at::TensorList As) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("gradgeom::lora_gram", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(at::TensorList, at::TensorList)>();
  return op.call(Bs, As);
}

at::Tensor psd_cholesky(const at::Tensor& A, double tol) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("gradgeom::psd_cholesky", "")
                             .typed<at::Tensor(const at::Tensor&, double)>();
  return op.call(A, tol);
}

at::Tensor sym_eigvalsh(const at::Tensor& A) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("gradgeom::sym_eigh", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, bool)>();
  return std::get<0>(op.call(A, /*vectors=*/false));
}

// ‖B·A‖_F per adapter, float64 [n]: _lora_core.fro_sq, then sqrt.
at::Tensor fro_norm(const at::Tensor& gb, const at::Tensor& ga) {
  return (gb * ga).sum(at::IntArrayRef{-2, -1}).clamp_min(0).sqrt();
}

// One value per adapter, known on the host: `value` when every adapter shares it (then `device`
// is undefined), else `device`, a [n] tensor on the Grams' device.
struct PerAdapter {
  int64_t value = 0;
  at::Tensor device;
  bool uniform() const { return !device.defined(); }
};

struct Structure {
  PerAdapter srank;  // min(d, k, r), int64
  PerAdapter fp64;   // both factors float64 (Grams accumulated in fp64), bool on the device
  bool any64 = false;
  bool any32 = false;
  int64_t max_rank = 0;  // R = max r
};

// Int64 [rows.size(), n] on `device` holding the given host rows: written in place on the CPU,
// one pinned buffer and one asynchronous copy on an accelerator.
at::Tensor to_device(const std::vector<const std::vector<int64_t>*>& rows, int64_t n, const at::Device& device) {
  const int64_t words = static_cast<int64_t>(rows.size()) * n;
  auto fill = [&](int64_t* out) {
    for (const std::vector<int64_t>* row : rows) out = std::copy(row->begin(), row->end(), out);
  };
  at::Tensor flat;
  if (device.is_cpu()) {
    flat = at::empty({words}, at::TensorOptions().dtype(at::kLong));
    fill(flat.data_ptr<int64_t>());
  } else {
    flat = upload_words(words, at::TensorOptions().device(device), fill);
  }
  return flat.view({static_cast<int64_t>(rows.size()), n});
}

// gradgeom.lora._shape_info for the factor lists (already checked).
Structure structure(at::TensorList Bs, at::TensorList As) {
  const int64_t n = static_cast<int64_t>(Bs.size());
  std::vector<int64_t> srank(n), fp64(n);
  Structure s;
  for (int64_t i = 0; i < n; ++i) {
    srank[i] = std::min({Bs[i].size(0), As[i].size(1), Bs[i].size(1)});
    fp64[i] = Bs[i].scalar_type() == at::kDouble && As[i].scalar_type() == at::kDouble;
    (fp64[i] ? s.any64 : s.any32) = true;
    s.max_rank = std::max(s.max_rank, Bs[i].size(1));
  }
  const bool srank_ragged = n > 0 && std::count(srank.begin(), srank.end(), srank[0]) != n;
  const bool fp64_ragged = s.any64 && s.any32;
  s.srank.value = n > 0 ? srank[0] : 0;
  s.fp64.value = s.any64 ? 1 : 0;
  std::vector<const std::vector<int64_t>*> rows;
  if (srank_ragged) rows.push_back(&srank);
  if (fp64_ragged) rows.push_back(&fp64);
  if (rows.empty()) return s;
  const at::Tensor up = to_device(rows, n, Bs[0].device());
  if (srank_ragged) s.srank.device = up.select(0, 0);
  if (fp64_ragged) s.fp64.device = up.select(0, srank_ragged ? 1 : 0).to(at::kBool);
  return s;
}

// _lora_core.psd_factor: F with F·Fᵀ = G_B, cut at each Gram's own noise floor.
at::Tensor psd_factor(const at::Tensor& gb, const Structure& s) {
  if (!s.any32) return psd_cholesky(gb, kCholTolFp64);
  at::Tensor low = psd_cholesky(gb, kCholTolFp32);
  if (!s.any64) return low;
  return at::where(s.fp64.device.view({-1, 1, 1}), psd_cholesky(gb, kCholTolFp64), low);
}

// _lora_core.eigh(x, vectors=False): eigenvalues ascending; LAPACK on the CPU, where a matrix
// with a non-finite entry gets NaN eigenvalues (LAPACK would raise); sym_eigh elsewhere.
// x: contiguous float64 [n, R, R].
at::Tensor eigvalsh(const at::Tensor& x) {
  if (!x.is_cpu()) return sym_eigvalsh(x);
  const double* p = x.const_data_ptr<double>();
  if (std::all_of(p, p + x.numel(), [](double v) { return std::isfinite(v); }))
    return at::linalg_eigvalsh(x);  // what the masked path below computes when every entry is finite
  const at::Tensor ok = at::isfinite(x).flatten(1).all(1);
  const at::Tensor safe = at::where(ok.view({-1, 1, 1}), x, at::zeros({}, x.options()));
  const double nan = std::numeric_limits<double>::quiet_NaN();
  return at::where(ok.view({-1, 1}), at::linalg_eigvalsh(safe), at::full({}, nan, x.options()));
}

// _lora_core._beyond_rank(x, srank, 0.0): x [n, R] with the entries at and beyond srank zeroed.
at::Tensor beyond_rank(at::Tensor x, const PerAdapter& srank) {
  const int64_t R = x.size(-1);
  if (srank.uniform()) {
    if (srank.value < R) x.narrow(1, srank.value, R - srank.value).fill_(0.0);
    return x;
  }
  const at::Tensor idx = at::arange(R, srank.device.options());
  return at::where(idx < srank.device.unsqueeze(-1), x, at::zeros({}, x.options()));
}

// The ill-conditioning tolerances, rounded to float32 as torch.where of two Python floats rounds them.
double cond_tol(bool fp64) { return static_cast<float>(fp64 ? kCondTolFp64 : kCondTolFp32); }

// _lora_core._ill: bool [n], the smallest structural eigenvalue of M (mu descending) is below the
// Gram route's resolution.
at::Tensor ill_conditioned(const at::Tensor& mu, const at::Tensor& gb, const at::Tensor& ga, const Structure& s) {
  const PerAdapter& srank = s.srank;
  if (srank.uniform() && srank.value == 0) return at::zeros({mu.size(0)}, mu.options().dtype(at::kBool));
  const at::Tensor mu_min = srank.uniform()
                                ? mu.select(1, srank.value - 1)
                                : mu.gather(-1, (srank.device - 1).clamp_min(0).unsqueeze(-1)).squeeze(-1);
  const at::Tensor bound = at::linalg_matrix_norm(gb, c10::string_view("fro")) *
                           at::linalg_matrix_norm(ga, c10::string_view("fro"));
  at::Tensor below;
  if (s.fp64.uniform()) {
    below = mu_min < bound * cond_tol(s.fp64.value != 0);
  } else {
    const auto opts = bound.options();
    const at::Tensor tol =
        at::where(s.fp64.device, at::scalar_tensor(cond_tol(true), opts), at::scalar_tensor(cond_tol(false), opts));
    below = mu_min < tol * bound;
  }
  const at::Tensor ill = (mu.select(1, 0) > 0) & below;
  return srank.uniform() ? ill : ill & (srank.device > 0);
}

at::Tensor lora_fro(at::TensorList Bs, at::TensorList As) {
  check_lora_factors("lora_fro", Bs, As);
  const auto [gb, ga] = lora_gram(Bs, As);
  return fro_norm(gb, ga);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_svdvals(at::TensorList Bs, at::TensorList As, bool flag_ill) {
  check_lora_factors("lora_svdvals", Bs, As);
  const Structure s = structure(Bs, As);
  GG_CHECK_VALUE(s.max_rank <= kSmallMatrixMaxSize, "lora_svdvals: ranks above ", kSmallMatrixMaxSize,
                 " are not supported, got r = ", s.max_rank);
  const auto [gb, ga] = lora_gram(Bs, As);
  const int64_t n = gb.size(0);
  const at::Tensor fro = fro_norm(gb, ga);
  const at::Tensor none_ill = at::zeros({n}, gb.options().dtype(at::kBool));
  if (s.max_rank == 0) return {gb.new_zeros({n, 0}), none_ill, fro};
  const at::Tensor L = psd_factor(gb, s);
  const at::Tensor x = at::matmul(at::matmul(L.mT(), ga), L);
  const at::Tensor mu = beyond_rank(eigvalsh(((x + x.mT()) * 0.5).contiguous()).clamp_min(0).flip(-1), s.srank);
  return {mu.sqrt(), flag_ill ? ill_conditioned(mu, gb, ga, s) : none_ill, fro};
}

}  // namespace

TORCH_LIBRARY_IMPL(gradgeom, CPU, m) {
  m.impl("lora_fro", &lora_fro);
  m.impl("lora_svdvals", &lora_svdvals);
}

#ifdef GRADGEOM_WITH_CUDA
TORCH_LIBRARY_IMPL(gradgeom, CUDA, m) {
  m.impl("lora_fro", &lora_fro);
  m.impl("lora_svdvals", &lora_svdvals);
}
#endif

}  // namespace gradgeom
