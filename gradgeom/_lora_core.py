"""The factored linear algebra behind :mod:`gradgeom.lora` (batched, float64 r×r stage).

Notation: adapter i has ΔWᵢ = sᵢ·Bᵢ·Aᵢ, Bᵢ ``[d, r]``, Aᵢ ``[r, k]``; G_B = BᵀB, G_A = A·Aᵀ from
:func:`gradgeom.lora_ops.lora_gram` (zero-padded to ``[n, R, R]``). For any factor G_B = F·Fᵀ,
M = Fᵀ·G_A·F has the eigenvalues σ²/s² of ΔW (those of G_B·G_A). Spectra use the semi-definite
Cholesky factor F = L (:func:`gradgeom.lora_ops.psd_cholesky`, diagonally pivoted, cheap for r up to 256); subspace
bases use F = V·Λ^½ from G_B = V·Λ·Vᵀ, because they also need Λ^-½. The Gram route squares the condition number, so every routine also flags adapters
whose small singular values it cannot resolve; those are recomputed by the exact route: thin QR
of B and Aᵀ in float64, then the SVD of R_B·R_Aᵀ.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from gradgeom import lora_ops

# The Gram route's tolerances, defined once in C++ (csrc/include/gradgeom/lora_tolerances.h
# says what they bound) and shared with the native lora_svdvals: pivoted Cholesky of G_B stops
# at pivots below CHOL_TOL·max(diag G_B); an adapter is ill-conditioned when its smallest
# structural eigenvalue of M is below COND_TOL·‖G_B‖_F·‖G_A‖_F (rounded to float32).
CHOL_TOL_FP32, CHOL_TOL_FP64, COND_TOL_FP32, COND_TOL_FP64 = map(
    lora_ops.lora_tolerances().__getitem__, ("chol_fp32", "chol_fp64", "cond_fp32", "cond_fp64"))
# Numerical rank on the exact (float64 QR) route: σ > RANK_TOL·σ_max.
RANK_TOL = 1e-10

_shape = operator.attrgetter("shape")
_dtype = operator.attrgetter("dtype")
_first = operator.itemgetter(0)
_second = operator.itemgetter(1)

# Per-adapter quantities known on the host: one Python value when every adapter shares it (no
# device tensor, no upload), else a device tensor ``[n]``.
Rank = Union[int, torch.Tensor]
Flags = Union[bool, torch.Tensor]


def eigh(x: torch.Tensor, vectors: bool = True) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Batched symmetric eigen-decomposition, float64, eigenvalues ascending.

    CUDA: gradgeom's one-block-per-matrix :func:`gradgeom.lora_ops.sym_eigh` (no cuSOLVER batched
    cliff at n > 32; eigenvalues to about n·1e-16·‖x‖ absolute, like LAPACK).
    CPU: LAPACK through torch.linalg.
    """
    if x.is_cuda:
        w, V = lora_ops.sym_eigh(x, vectors=vectors)
        return w, (V if vectors else None)
    # LAPACK raises on non-finite input; such matrices get NaN results instead.
    ok = torch.isfinite(x).flatten(1).all(1)
    x = torch.where(ok[:, None, None], x, torch.zeros((), dtype=x.dtype))
    nan = torch.full((), float("nan"), dtype=x.dtype)
    if vectors:
        w, V = torch.linalg.eigh(x)
        return torch.where(ok[:, None], w, nan), torch.where(ok[:, None, None], V, nan)
    return torch.where(ok[:, None], torch.linalg.eigvalsh(x), nan), None


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list as a device tensor without a synchronising copy (pinned + async)."""
    t = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def uniform_or_device(values: list, dtype: torch.dtype, device: torch.device) -> Union[int, float, bool, torch.Tensor]:
    """``values[0]`` as a Python scalar when every entry equals it (no upload), else the list
    as a device tensor (:func:`to_device`). Callers treat both alike (broadcasting)."""
    if values and values.count(values[0]) == len(values):
        return values[0]
    return to_device(values, dtype, device)


# torch.where(flags, COND_TOL_FP64, COND_TOL_FP32) rounds both to float32 (the default dtype);
# the scalar (uniform batch) path uses the same rounded values, so it flags identically.
_COND_TOL = {flag: torch.tensor(tol, dtype=torch.float32).item() for flag, tol in ((True, COND_TOL_FP64), (False, COND_TOL_FP32))}


def _cond_tol(fp64: Flags) -> Union[float, torch.Tensor]:
    return _COND_TOL[fp64] if isinstance(fp64, bool) else torch.where(fp64, COND_TOL_FP64, COND_TOL_FP32)


def error_bound(gb: torch.Tensor, ga: torch.Tensor) -> torch.Tensor:
    """‖G_B‖_F·‖G_A‖_F ``[n]``: the scale of the eigenvalue error of M from Gram rounding."""
    return torch.linalg.matrix_norm(gb) * torch.linalg.matrix_norm(ga)


def fro(gb: torch.Tensor, ga: torch.Tensor) -> torch.Tensor:
    """‖B·A‖_F = √max(Σ G_B∘G_A, 0) per adapter, float64 ``[n]``, in one native launch."""
    return lora_ops.gram_fro(gb, ga)


def _sym(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (x + x.mT)


def psd_factor(gb: torch.Tensor, fp64: Flags, kinds: tuple[bool, bool]) -> torch.Tensor:
    """F with F·Fᵀ = G_B, cut at each Gram's own noise floor. ``kinds`` = (any fp64-accumulated,
    any fp32-accumulated) adapter, known on the host; a mixed batch is factored both ways."""
    any64, any32 = kinds
    if not any32:
        return lora_ops.psd_cholesky(gb, tol=CHOL_TOL_FP64)
    low = lora_ops.psd_cholesky(gb, tol=CHOL_TOL_FP32)
    if not any64:
        return low
    return torch.where(fp64[:, None, None], lora_ops.psd_cholesky(gb, tol=CHOL_TOL_FP64), low)


def _beyond_rank(x: torch.Tensor, srank: Rank, value: Union[float, bool]) -> torch.Tensor:
    """``x [n, R]`` with the entries at and beyond each structural rank set to ``value``."""
    R = x.shape[-1]
    if isinstance(srank, int):  # in place: x is a fresh result
        if srank < R:
            x[:, srank:] = value
        return x
    idx = torch.arange(R, device=x.device)
    return torch.where(idx < srank.unsqueeze(-1), x, torch.full((), value, dtype=x.dtype, device=x.device))


def _ill(mu: torch.Tensor, gb: torch.Tensor, ga: torch.Tensor, srank: Rank, fp64: Flags) -> torch.Tensor:
    """bool ``[n]``: the smallest structural eigenvalue of M (``mu`` descending) is below the
    Gram route's resolution (see :data:`COND_TOL_FP32`)."""
    if isinstance(srank, int):
        if srank == 0:
            return torch.zeros(mu.shape[0], dtype=torch.bool, device=mu.device)
        mu_min = mu[:, srank - 1]
    else:
        mu_min = mu.gather(-1, (srank - 1).clamp_min(0).unsqueeze(-1)).squeeze(-1)
    ill = (mu[:, 0] > 0) & (mu_min < _cond_tol(fp64) * error_bound(gb, ga))
    return ill if isinstance(srank, int) else ill & (srank > 0)


def gram_spectrum(
    gb: torch.Tensor, ga: torch.Tensor, srank: Rank, fp64: Flags, kinds: tuple[bool, bool], flag_ill: bool = True
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Eigenvalues σ²/s² of every ΔW from its Gram matrices: the Python statement of the native
    :func:`gradgeom.lora_ops.lora_svdvals` (``sv = mu.sqrt()``), which issues the same ops in the
    same order from C++ and is tested against this for identical bits.

    Args:
        gb, ga: float64 ``[n, R, R]`` Gram matrices (zero-padded).
        srank: int64 ``[n]`` structural ranks min(d, k, r), or one Python int for all adapters.
        fp64: bool ``[n]``, True where both factors are float64 (Grams accumulated in fp64), or
            one Python bool for all adapters.
        kinds: (any fp64 entry, any non-fp64 entry) of ``fp64``, known on the host.
        flag_ill: also compute the ill-conditioning flags (else ``None`` is returned for them).

    Returns:
        ``(mu, ill)``: float64 ``[n, R]`` descending, entries at and beyond ``srank`` set to
        exactly 0; bool ``[n]`` adapters the Gram route cannot resolve (see
        :data:`COND_TOL_FP32`). Nothing is read back to the host.
    """
    n, R = gb.shape[0], gb.shape[-1]
    if R == 0:
        return gb.new_zeros((n, 0)), (torch.zeros(n, dtype=torch.bool, device=gb.device) if flag_ill else None)
    L = psd_factor(gb, fp64, kinds)
    mu, _ = eigh(L.mT @ ga @ L, vectors=False)  # its lower triangle: eigvalsh reads no other
    mu = _beyond_rank(mu.clamp_min(0).flip(-1), srank, 0.0)
    return mu, (_ill(mu, gb, ga, srank, fp64) if flag_ill else None)


def qr_svdvals(B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """Singular values of B·A (no scaling), float64 ``[..., r]`` descending, zero-padded.

    The exact route: thin QR of B and Aᵀ in float64, then the SVD of the small R_B·R_Aᵀ.
    Differentiable (where the singular values are distinct); for a wide factor (d < r or k < r)
    the product itself is small and is decomposed directly.
    """
    b, a = B.to(torch.float64), A.to(torch.float64)
    d, r, k = b.shape[-2], b.shape[-1], a.shape[-1]
    if d < r or k < r:
        s = torch.linalg.svdvals(b @ a)
    else:
        rb = torch.linalg.qr(b, mode="reduced").R
        ra = torch.linalg.qr(a.mT, mode="reduced").R
        s = torch.linalg.svdvals(rb @ ra.mT)
    pad = r - s.shape[-1]
    if pad > 0:
        s = torch.cat([s, s.new_zeros(s.shape[:-1] + (pad,))], dim=-1)
    return s


def safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """sqrt with a zero (not NaN) gradient at 0."""
    pos = x > 0
    return torch.where(pos, torch.where(pos, x, torch.ones_like(x)).sqrt(), torch.zeros_like(x))


def fro_sq_autograd(B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """‖B·A‖_F² = Σ (BᵀB)∘(A·Aᵀ) in float64, differentiable, ``[...]`` for ``[..., d, r]``."""
    b, a = B.to(torch.float64), A.to(torch.float64)
    return ((b.mT @ b) * (a @ a.mT)).sum((-2, -1))


def gram_bases(
    gb: torch.Tensor, ga: torch.Tensor, srank: Rank, fp64: Flags, R_full: Optional[Rank]
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Orthonormal bases of the column spaces of ΔW, as coefficients on B: U = B·T.

    With M = W·diag(μ)·Wᵀ (descending), U = B·V·Λ^-½·W restricted to the nonzero μ.

    Args:
        gb, ga, srank, fp64: as in :func:`gram_spectrum`.
        R_full: int64 ``[n]`` (or one Python int) the rank r of each adapter; ``None``: do not
            compute the ill-conditioning flags.

    Returns:
        ``(T, rank, ill)``: float64 ``[n, R, R]`` (columns beyond ``rank`` are zero), int64 ``[n]``
        numerical rank of ΔW, bool ``[n]`` adapters that need the exact route (ill-conditioned, or
        r > min(d, k)); ``ill`` is ``None`` when ``R_full`` is.
    """
    n, R = gb.shape[0], gb.shape[-1]
    if R == 0:
        z = torch.zeros(n, dtype=torch.int64, device=gb.device)
        return gb.new_zeros((n, 0, 0)), z, (None if R_full is None else z.bool())
    lam_b, V = eigh(gb)
    lam_b = lam_b.clamp_min(0)
    F = V * lam_b.sqrt().unsqueeze(-2)
    mu, W = eigh(_sym(F.mT @ ga @ F))
    mu, W = mu.clamp_min(0).flip(-1), W.flip(-1)
    keep = _beyond_rank(mu > 0, srank, False)
    inv = torch.where(lam_b > 0, lam_b.clamp_min(1e-300).rsqrt(), 0.0)
    T = (V * inv.unsqueeze(-2)) @ (W * keep.unsqueeze(-2))
    if R_full is None:
        return T, keep.sum(-1), None
    ill = _ill(mu, gb, ga, srank, fp64)
    wide = srank < R_full  # r > min(d, k): the Gram route's basis is not unique
    if isinstance(wide, torch.Tensor):
        ill = ill | (wide & (mu[:, 0] > 0))
    elif wide:
        ill = ill | (mu[:, 0] > 0)
    return T, keep.sum(-1), ill


def finite(*ts: torch.Tensor) -> bool:
    """True when every element is finite (reads one flag back from the device)."""
    return all(bool(torch.isfinite(t).all()) for t in ts)


def qr_basis(B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis ``[d, rank]`` (float64) of the column space of B·A, exact route.
    B and A must be finite."""
    b, a = B.detach().to(torch.float64), A.detach().to(torch.float64)
    qb, rb = torch.linalg.qr(b, mode="reduced")
    ra = torch.linalg.qr(a.mT, mode="reduced").R
    U, S, _ = torch.linalg.svd(rb @ ra.mT, full_matrices=False)
    if S.numel() == 0 or not bool(S[0] > 0):
        return b.new_zeros((b.shape[0], 0))
    rank = int((S > RANK_TOL * S[0]).sum())
    return qb @ U[:, :rank]


def cosines(C: torch.Tensor) -> torch.Tensor:
    """Singular values of a batch ``[n, p, q]`` (cosines of principal angles), descending, in
    [0, 1]. CUDA: square roots of the eigenvalues of CᵀC (sym_eigh); CPU: LAPACK SVD."""
    if C.is_cuda:
        w, _ = eigh(_sym(C.mT @ C), vectors=False)
        s = w.clamp_min(0).sqrt().flip(-1)
    else:
        ok = torch.isfinite(C).flatten(1).all(1)
        s = torch.linalg.svdvals(torch.where(ok[:, None, None], C, torch.zeros((), dtype=C.dtype)))
        s = torch.where(ok[:, None], s, torch.full((), float("nan"), dtype=s.dtype))
    return s.clamp(0.0, 1.0)


@dataclass
class Shapes:
    """What the r×r stage needs to know about each adapter, known on the host. Per-adapter values
    are one Python value when every adapter shares it, else a device tensor ``[n]``; all the device
    tensors of one call come from a single upload."""

    srank: Rank               # structural rank min(d, k, r)
    fp64: Flags               # both factors float64 (Grams accumulated in fp64)
    ranks: list[int]               # r per adapter (host)
    kinds: tuple[bool, bool]       # (any fp64 adapter, any non-fp64 adapter)
    rank: Optional[Rank]      # r per adapter, when asked for (else None)


def shape_info(Bs: Sequence[torch.Tensor], As: Sequence[torch.Tensor], device: torch.device, with_rank: bool = False) -> Shapes:
    if not Bs:
        return Shapes(0, False, [], (False, True), 0 if with_rank else None)
    bshapes, ashapes = list(map(_shape, Bs)), list(map(_shape, As))
    ranks = list(map(_second, bshapes))
    if min(min(map(_first, bshapes)), min(map(_second, ashapes))) >= max(ranks):
        sranks = ranks  # r <= min(d, k) everywhere (the usual case)
    else:
        sranks = [min(b[0], a[1], b[1]) for b, a in zip(bshapes, ashapes)]
    bd, ad = set(map(_dtype, Bs)), set(map(_dtype, As))
    if torch.float64 not in bd or torch.float64 not in ad:
        flags: Union[bool, list[bool]] = False
    elif len(bd) == 1 and len(ad) == 1:
        flags = True
    else:
        flags = [b.dtype == torch.float64 and a.dtype == torch.float64 for b, a in zip(Bs, As)]
        flags = flags[0] if flags.count(flags[0]) == len(flags) else flags
    kinds = (flags is not False, flags is not True)  # a list here is mixed
    # Ragged values: one int64 upload for all of them.
    rows = {"srank": sranks, "fp64": flags, "rank": ranks if with_rank else None}
    ragged = {k: v for k, v in rows.items() if isinstance(v, list) and v.count(v[0]) != len(v)}
    up = dict(zip(ragged, to_device(list(ragged.values()), torch.int64, device).unbind(0))) if ragged else {}

    def pick(key):
        v = rows[key]
        if key in up:
            return up[key].bool() if key == "fp64" else up[key]
        return v[0] if isinstance(v, list) else v

    return Shapes(pick("srank"), pick("fp64"), ranks, kinds, pick("rank") if with_rank else None)


def cross_grams(B1: list[torch.Tensor], B2: list[torch.Tensor], R: int, device: torch.device) -> torch.Tensor:
    """float64 ``[n, R, R]`` with B1ᵢᵀ·B2ᵢ in the top-left corner (R: the largest rank of both
    lists): the native :func:`gradgeom.lora_ops.lora_cross_gram`, which the Python statement of
    :func:`gradgeom.lora_ops.lora_principal_angles` shares with it (tested for identical bits)."""
    if not B1:
        return torch.zeros((0, R, R), dtype=torch.float64, device=device)
    X = torch.ops.gradgeom.lora_cross_gram(list(B1), list(B2))
    if X.shape[-1] == R:
        return X
    out = X.new_zeros((len(B1), R, R))
    out[:, : X.shape[-1], : X.shape[-1]] = X
    return out
