// The native composites of gradgeom.lora: lora_fro (‖B·A‖_F), lora_svdvals (the Gram-route
// spectrum) and lora_principal_angles (the Gram-route subspace angles) of many adapters in one
// call. One device-generic kernel each, registered for CPU and CUDA: lora_gram, psd_cholesky and
// sym_eigh through the dispatcher, then ATen ops; step by step the ops of the Python statements in
// gradgeom._lora_core (gram_spectrum, gram_bases, cosines, cross_grams) in the same order, so the
// bits are those of the Python composition at a fraction of its host time. On CUDA the
// elementwise steps run fused (gram_stage.h), with the same bits but for the Grassmann
// distance's order of summation and the non-finite flag's NaN.
// Never synchronises with the GPU: per-adapter structural ranks and dtype flags come from sizes
// and dtypes on the host; uniform ones stay host scalars, ragged ones go to the device in one
// asynchronous copy. The results are not differentiable: the inner ops run below autograd, so
// they record no graph and the nested lora_gram call stays unboxed.
#include <ATen/TensorOperators.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/arccos.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/full_like.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/linalg_eigh.h>
#include <ATen/ops/linalg_eigvalsh.h>
#include <ATen/ops/linalg_matrix_norm.h>
#include <ATen/ops/linalg_svdvals.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/minimum.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "gradgeom/gram_stage.h"
#include "gradgeom/check.h"
#include "gradgeom/device_upload.h"
#include "gradgeom/early_flags.h"
#include "gradgeom/eigvalsh_staged.h"
#include "gradgeom/lora_tolerances.h"
#include "gradgeom/rxr_check.h"
#include "gradgeom/typed_op.h"

namespace gradgeom {
namespace {

std::tuple<at::Tensor, at::Tensor> lora_gram(at::TensorList Bs, at::TensorList As) {
  static const auto op =
      typed_op<std::tuple<at::Tensor, at::Tensor>(at::TensorList, at::TensorList)>("gradgeom::lora_gram");
  return op.call(Bs, As);
}

at::Tensor psd_cholesky(const at::Tensor& A, double tol) {
  static const auto op = typed_op<at::Tensor(const at::Tensor&, double)>("gradgeom::psd_cholesky");
  return op.call(A, tol);
}

std::tuple<at::Tensor, at::Tensor> sym_eigh(const at::Tensor& A, bool vectors) {
  static const auto op =
      typed_op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, bool)>("gradgeom::sym_eigh");
  return op.call(A, vectors);
}

at::Tensor sym_eigvalsh(const at::Tensor& A) { return std::get<0>(sym_eigh(A, /*vectors=*/false)); }

// ‖B·A‖_F per adapter, float64 [n] (_lora_core.fro).
at::Tensor fro_norm(const at::Tensor& gb, const at::Tensor& ga) {
  static const auto op = typed_op<at::Tensor(const at::Tensor&, const at::Tensor&)>("gradgeom::gram_fro");
  return op.call(gb, ga);
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
  PerAdapter rank;   // r, int64 (only when asked for)
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

// _lora_core.shape_info for the factor lists (already checked): the ragged rows go up in one copy.
Structure structure(at::TensorList Bs, at::TensorList As, bool with_rank = false) {
  const int64_t n = static_cast<int64_t>(Bs.size());
  std::vector<int64_t> srank(n), fp64(n), rank(n);
  Structure s;
  for (int64_t i = 0; i < n; ++i) {
    rank[i] = Bs[i].size(1);
    srank[i] = std::min({Bs[i].size(0), As[i].size(1), rank[i]});
    fp64[i] = Bs[i].scalar_type() == at::kDouble && As[i].scalar_type() == at::kDouble;
    (fp64[i] ? s.any64 : s.any32) = true;
    s.max_rank = std::max(s.max_rank, rank[i]);
  }
  auto ragged = [n](const std::vector<int64_t>& v) { return n > 0 && std::count(v.begin(), v.end(), v[0]) != n; };
  const bool srank_ragged = ragged(srank);
  const bool fp64_ragged = s.any64 && s.any32;
  const bool rank_ragged = with_rank && ragged(rank);
  s.srank.value = n > 0 ? srank[0] : 0;
  s.fp64.value = s.any64 ? 1 : 0;
  s.rank.value = n > 0 ? rank[0] : 0;
  std::vector<const std::vector<int64_t>*> rows;
  if (srank_ragged) rows.push_back(&srank);
  if (fp64_ragged) rows.push_back(&fp64);
  if (rank_ragged) rows.push_back(&rank);
  if (rows.empty()) return s;
  const at::Tensor up = to_device(rows, n, Bs[0].device());
  int64_t row = 0;
  if (srank_ragged) s.srank.device = up.select(0, row++);
  if (fp64_ragged) s.fp64.device = up.select(0, row++).to(at::kBool);
  if (rank_ragged) s.rank.device = up.select(0, row++);
  return s;
}

// _lora_core.psd_factor: F with F·Fᵀ = G_B, cut at each Gram's own noise floor.
at::Tensor psd_factor(const at::Tensor& gb, const Structure& s) {
  if (!s.any32) return psd_cholesky(gb, kCholTolFp64);
  at::Tensor low = psd_cholesky(gb, kCholTolFp32);
  if (!s.any64) return low;
  return at::where(s.fp64.device.view({-1, 1, 1}), psd_cholesky(gb, kCholTolFp64), low);
}

// For LAPACK on the CPU, which raises on non-finite input: ok [n], whether matrix i of x [n, p, q]
// is finite, and x with the other matrices zeroed (their results are then replaced by NaN).
std::tuple<at::Tensor, at::Tensor> finite_or_zero(const at::Tensor& x) {
  const at::Tensor ok = at::isfinite(x).flatten(1).all(1);
  return {ok, at::where(ok.view({-1, 1, 1}), x, at::zeros({}, x.options()))};
}

at::Tensor nan_like(const at::Tensor& x) { return at::full({}, std::numeric_limits<double>::quiet_NaN(), x.options()); }

// _lora_core.eigh(x, vectors=False): eigenvalues ascending; LAPACK on the CPU, where a matrix
// with a non-finite entry gets NaN eigenvalues (LAPACK would raise); sym_eigh elsewhere.
// x: contiguous float64 [n, R, R].
at::Tensor eigvalsh(const at::Tensor& x) {
  if (!x.is_cpu()) return sym_eigvalsh(x);
  const double* p = x.const_data_ptr<double>();
  if (std::all_of(p, p + x.numel(), [](double v) { return std::isfinite(v); }))
    return at::linalg_eigvalsh(x);  // what the masked path below computes when every entry is finite
  const auto [ok, safe] = finite_or_zero(x);
  return at::where(ok.view({-1, 1}), at::linalg_eigvalsh(safe), nan_like(x));
}

// _lora_core._beyond_rank(x, srank, 0.0 / False): x [n, R] (float64 or bool) with the entries at
// and beyond srank zeroed.
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

// _lora_core.error_bound: ‖G_B‖_F·‖G_A‖_F, float64 [n].
at::Tensor error_bound(const at::Tensor& gb, const at::Tensor& ga) {
  return at::linalg_matrix_norm(gb, c10::string_view("fro")) * at::linalg_matrix_norm(ga, c10::string_view("fro"));
}

// _lora_core._ill: bool [n], the smallest structural eigenvalue of M (mu descending) is below the
// Gram route's resolution.
at::Tensor ill_conditioned(const at::Tensor& mu, const at::Tensor& gb, const at::Tensor& ga, const Structure& s) {
  const PerAdapter& srank = s.srank;
  if (srank.uniform() && srank.value == 0) return at::zeros({mu.size(0)}, mu.options().dtype(at::kBool));
  const at::Tensor mu_min = srank.uniform()
                                ? mu.select(1, srank.value - 1)
                                : mu.gather(-1, (srank.device - 1).clamp_min(0).unsqueeze(-1)).squeeze(-1);
  const at::Tensor bound = error_bound(gb, ga);
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

#ifdef GRADGEOM_WITH_CUDA
gram_stage::Adapters stage_adapters(const Structure& s) {
  auto words = [](const PerAdapter& p) {
    return gram_stage::PerAdapter64{p.value, p.uniform() ? nullptr : p.device.const_data_ptr<int64_t>()};
  };
  gram_stage::Adapters a;
  a.srank = words(s.srank);
  a.rank = words(s.rank);
  a.fp64 = {s.fp64.value != 0, s.fp64.uniform() ? nullptr : s.fp64.device.const_data_ptr<bool>()};
  a.cond_tol_fp64 = cond_tol(true);
  a.cond_tol_fp32 = cond_tol(false);
  return a;
}
#endif

at::Tensor lora_fro(at::TensorList Bs, at::TensorList As) {
  const at::AutoDispatchBelowADInplaceOrView no_autograd;
  const auto [gb, ga] = lora_gram(Bs, As);  // checks the factors
  return fro_norm(gb, ga);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_svdvals(at::TensorList Bs, at::TensorList As, bool flag_ill,
                                                            bool with_fro) {
  const at::AutoDispatchBelowADInplaceOrView no_autograd;
  const auto [gb, ga] = lora_gram(Bs, As);  // checks the factors
  const Structure s = structure(Bs, As);
  GG_CHECK_VALUE(s.max_rank <= kSmallMatrixMaxSize, "lora_svdvals: ranks above ", kSmallMatrixMaxSize,
                 " are not supported, got r = ", s.max_rank);
  const int64_t n = gb.size(0);
  const at::Tensor fro = with_fro ? fro_norm(gb, ga) : gb.new_empty({0});
  auto none_ill = [&] { return at::zeros({n}, gb.options().dtype(at::kBool)); };
  if (s.max_rank == 0) return {gb.new_zeros({n, 0}), none_ill(), fro};
  const at::Tensor L = psd_factor(gb, s);
  const at::Tensor x = at::matmul(at::matmul(L.mT(), ga), L);
#ifdef GRADGEOM_WITH_CUDA
  if (x.is_cuda()) {  // the elementwise end fused (gram_stage.h), the flags on the host early
    const gram_stage::Adapters adapters = stage_adapters(s);
    early_flags::HostCopy flags;
    const at::Tensor w = sym_eigvalsh_staged(
        x.contiguous(), [&](const at::Tensor& tri, const at::Tensor& scale, const at::Tensor& w_out) {
          if (flag_ill)
            flags.start([&] { return gram_stage::tridiagonal_flags(tri, scale, w_out, adapters, gb, ga); });
        });
    const bool early = flags.started();
    const auto [sv, ill] = gram_stage::spectrum(w, adapters, gb, ga, flag_ill && !early);
    if (!flag_ill) return {sv, none_ill(), fro};
    return {sv, early ? flags.finish() : ill, fro};
  }
#endif
  const at::Tensor mu = beyond_rank(eigvalsh(x.contiguous()).clamp_min(0).flip(-1), s.srank);  // lower triangle read
  return {mu.sqrt(), flag_ill ? ill_conditioned(mu, gb, ga, s) : none_ill(), fro};
}

// --- principal angles (gradgeom.lora.principal_angles, method "gram") ----------------------------

// _lora_core.eigh(x, vectors=True): eigenvalues ascending and eigenvectors; LAPACK on the CPU with
// NaN for matrices that hold a non-finite entry, sym_eigh (Jacobi) elsewhere.
std::tuple<at::Tensor, at::Tensor> eigh_vectors(const at::Tensor& x) {
  if (!x.is_cpu()) return sym_eigh(x, /*vectors=*/true);
  const auto [ok, safe] = finite_or_zero(x);
  const auto [w, V] = at::linalg_eigh(safe);
  return {at::where(ok.view({-1, 1}), w, nan_like(x)), at::where(ok.view({-1, 1, 1}), V, nan_like(x))};
}

// _lora_core.gram_bases: coefficients T [n, R, R] of orthonormal bases U = B·T of the column
// spaces, the numerical ranks [n], and (flag_ill) the adapters the Gram route cannot resolve.
std::tuple<at::Tensor, at::Tensor, at::Tensor> gram_bases(const at::Tensor& gb, const at::Tensor& ga,
                                                          const Structure& s, bool flag_ill) {
  const int64_t n = gb.size(0);
  if (gb.size(-1) == 0) {
    const at::Tensor none = at::zeros({n}, gb.options().dtype(at::kLong));
    return {gb.new_zeros({n, 0, 0}), none, flag_ill ? none.to(at::kBool) : at::Tensor()};
  }
  const auto [lam_raw, V] = eigh_vectors(gb);
  const at::Tensor lam_b = lam_raw.clamp_min(0);
  const at::Tensor F = V * lam_b.sqrt().unsqueeze(-2);
  const at::Tensor x = at::matmul(at::matmul(F.mT(), ga), F);
  const auto [mu_raw, W_raw] = eigh_vectors((x + x.mT()) * 0.5);
  const at::Tensor mu = mu_raw.clamp_min(0).flip(-1);
  const at::Tensor W = W_raw.flip(-1);
  const at::Tensor keep = beyond_rank(mu > 0, s.srank);
  const at::Tensor inv = at::where(lam_b > 0, lam_b.clamp_min(1e-300).rsqrt(), 0.0);
  const at::Tensor T = at::matmul(V * inv.unsqueeze(-2), W * keep.unsqueeze(-2));
  if (!flag_ill) return {T, keep.sum(-1), at::Tensor()};
  at::Tensor ill = ill_conditioned(mu, gb, ga, s);
  const at::Tensor live = mu.select(1, 0) > 0;
  const PerAdapter& rank = s.rank;
  if (!s.srank.uniform() || !rank.uniform()) {  // r > min(d, k): the Gram route's basis is not unique
    const at::Tensor sr = s.srank.uniform() ? at::full_like(rank.device, s.srank.value) : s.srank.device;
    const at::Tensor r = rank.uniform() ? at::full_like(sr, rank.value) : rank.device;
    ill = ill | ((sr < r) & live);
  } else if (s.srank.value < rank.value) {
    ill = ill | live;
  }
  return {T, keep.sum(-1), ill};
}

// _lora_core.cosines: singular values of C [n, p, q] descending in [0, 1]; on CUDA the square
// roots of the eigenvalues of CᵀC, on the CPU LAPACK's SVD (NaN where C holds a non-finite entry).
at::Tensor cosines(const at::Tensor& C) {
  at::Tensor s;
  if (!C.is_cpu()) {
    const at::Tensor g = at::matmul(C.mT(), C);
    s = sym_eigvalsh(((g + g.mT()) * 0.5).contiguous()).clamp_min(0).sqrt().flip(-1);
  } else {
    const auto [ok, safe] = finite_or_zero(C);
    s = at::where(ok.view({-1, 1}), at::linalg_svdvals(safe), nan_like(C));
  }
  return s.clamp(0.0, 1.0);
}

// _lora_core.cross_grams: float64 [n, R, R] with B1ᵢᵀ·B2ᵢ in the top-left corner (R = the largest
// rank of both lists, as lora_gram's).
at::Tensor cross_grams(at::TensorList Bs, int64_t n) {
  static const auto op = typed_op<at::Tensor(at::TensorList, at::TensorList)>("gradgeom::lora_cross_gram");
  return op.call(Bs.slice(0, n), Bs.slice(n, n));
}

#ifdef GRADGEOM_WITH_CUDA
// lora_principal_angles on CUDA after the Grams: the statement's products (at::bmm, as at::matmul
// issues them) and eigen-decompositions, with the elementwise steps between them fused
// (gram_stage.h): 25 kernel launches a flagged call where the ATen statement took 70 (counted in
// a profile of 224 pairs).
at::Tensor principal_angles_cuda(at::TensorList Bs, const at::Tensor& gb, const at::Tensor& ga, const Structure& s,
                                 int64_t n, bool flag_ill) {
  namespace stage = gram_stage;
  const auto [lam, V] = sym_eigh(gb, /*vectors=*/true);
  const at::Tensor F = stage::scaled_columns(V, lam);
  const auto [mu, W] = sym_eigh(stage::symmetric_part(at::bmm(at::bmm(F.mT(), ga), F)), /*vectors=*/true);
  const stage::Coefficients c = stage::coefficients(lam, V, mu, W, gb, ga, stage_adapters(s), flag_ill);
  const at::Tensor T = at::bmm(c.left, c.right);
  const at::Tensor C = at::bmm(at::bmm(T.narrow(0, 0, n).mT(), cross_grams(Bs, n)), T.narrow(0, n, n));
  const at::Tensor w = sym_eigvalsh(stage::symmetric_part(at::bmm(C.mT(), C)));
  return stage::angle_rows(w, c.rank, c.nonfinite, c.ill);
}
#endif

// Bs = (B1_0 .. B1_{n-1}, B2_0 .. B2_{n-1}), As likewise: angles between the column spaces of
// B1ᵢ·A1ᵢ and B2ᵢ·A2ᵢ. Returns float64 [n, K + 4] (+1 column with flag_ill): the angles (radians,
// ascending, 0 beyond min(rank1, rank2)), then the Grassmann distance, rank1, rank2, a nonzero
// value where a Gram matrix holds Inf/NaN, and (flag_ill) 1 where either side needs the exact route.
at::Tensor lora_principal_angles(at::TensorList Bs, at::TensorList As, bool flag_ill) {
  const at::AutoDispatchBelowADInplaceOrView no_autograd;
  GG_CHECK_VALUE(Bs.size() % 2 == 0, "lora_principal_angles: Bs must hold the first and then the second adapters "
                 "(an even count), got ", Bs.size());
  const int64_t extra = flag_ill ? 5 : 4;
  if (Bs.empty() && As.empty()) return at::zeros({0, extra}, at::TensorOptions().dtype(at::kDouble));
  const auto [gb, ga] = lora_gram(Bs, As);  // checks the factors
  const int64_t n = static_cast<int64_t>(Bs.size()) / 2;
  for (int64_t i = 0; i < n; ++i)
    GG_CHECK_VALUE(Bs[i].size(0) == Bs[n + i].size(0), "lora_principal_angles: adapter ", i,
                   ": column spaces live in different dimensions d = ", Bs[i].size(0), " and ", Bs[n + i].size(0));
  const Structure s = structure(Bs, As, /*with_rank=*/flag_ill);
  GG_CHECK_VALUE(s.max_rank <= kSmallMatrixMaxSize, "lora_principal_angles: ranks above ", kSmallMatrixMaxSize,
                 " are not supported, got r = ", s.max_rank);
#ifdef GRADGEOM_WITH_CUDA
  if (gb.is_cuda()) return principal_angles_cuda(Bs, gb, ga, s, n, flag_ill);
#endif
  const auto [T, rk, ill] = gram_bases(gb, ga, s, flag_ill);
  const at::Tensor nonfinite = (gb * 0 + ga * 0).sum(at::IntArrayRef{-2, -1});
  const at::Tensor X = cross_grams(Bs, n);
  const at::Tensor cos = cosines(at::matmul(at::matmul(T.narrow(0, 0, n).mT(), X), T.narrow(0, n, n)));
  const int64_t K = cos.size(-1);
  const at::Tensor r1 = rk.narrow(0, 0, n), r2 = rk.narrow(0, n, n);
  const at::Tensor live = at::arange(K, rk.options()) < at::minimum(r1, r2).unsqueeze(-1);
  const at::Tensor theta = at::where(live, at::arccos(cos), 0.0);
  std::vector<at::Tensor> cols{theta.square().sum(-1).sqrt(), r1, r2, nonfinite.narrow(0, 0, n) + nonfinite.narrow(0, n, n)};
  if (flag_ill) cols.push_back(ill.narrow(0, 0, n) | ill.narrow(0, n, n));
  return at::cat({theta, at::stack(cols, 1)}, 1);
}

}  // namespace

TORCH_LIBRARY_IMPL(gradgeom, CPU, m) {
  m.impl("lora_fro", &lora_fro);
  m.impl("lora_svdvals", &lora_svdvals);
  m.impl("lora_principal_angles", &lora_principal_angles);
}

#ifdef GRADGEOM_WITH_CUDA
TORCH_LIBRARY_IMPL(gradgeom, CUDA, m) {
  m.impl("lora_fro", &lora_fro);
  m.impl("lora_svdvals", &lora_svdvals);
  m.impl("lora_principal_angles", &lora_principal_angles);
}
#endif

}  // namespace gradgeom
