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

from typing import Optional

import torch

from gradgeom import lora_ops

# An adapter is "ill-conditioned" for the Gram route when its smallest structural eigenvalue of
# M falls below TOL·‖G_B‖_F·‖G_A‖_F (the eigenvalue error of M is about u·that product, u the
# accumulation precision). Below it, σ_min would carry more than ~1 % relative error.
COND_TOL_FP32 = 1e-4
COND_TOL_FP64 = 1e-10
# Pivoted Cholesky of G_B stops at pivots below CHOL_TOL·max(diag G_B): about the rounding noise
# of the Gram matrix (pivots made of noise would amplify it).
CHOL_TOL_FP32 = 1e-6
CHOL_TOL_FP64 = 1e-14
# Numerical rank on the exact (float64 QR) route: σ > RANK_TOL·σ_max.
RANK_TOL = 1e-10


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


def structural_rank(shapes: list[tuple[int, int, int]], device: torch.device) -> torch.Tensor:
    """min(d, k, r) per adapter, int64 ``[n]``: ΔW can have no more nonzero singular values."""
    return to_device([min(d, k, r) for d, k, r in shapes], torch.int64, device)


def error_bound(gb: torch.Tensor, ga: torch.Tensor) -> torch.Tensor:
    """‖G_B‖_F·‖G_A‖_F ``[n]``: the scale of the eigenvalue error of M from Gram rounding."""
    return torch.linalg.matrix_norm(gb) * torch.linalg.matrix_norm(ga)


def _sym(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (x + x.mT)


def psd_factor(gb: torch.Tensor, fp64: torch.Tensor, kinds: tuple[bool, bool]) -> torch.Tensor:
    """F with F·Fᵀ = G_B, cut at each Gram's own noise floor. ``kinds`` = (any fp64-accumulated,
    any fp32-accumulated) adapter, known on the host; a mixed batch is factored both ways."""
    any64, any32 = kinds
    if not any32:
        return lora_ops.psd_cholesky(gb, tol=CHOL_TOL_FP64)
    low = lora_ops.psd_cholesky(gb, tol=CHOL_TOL_FP32)
    if not any64:
        return low
    return torch.where(fp64[:, None, None], lora_ops.psd_cholesky(gb, tol=CHOL_TOL_FP64), low)


def gram_spectrum(
    gb: torch.Tensor, ga: torch.Tensor, srank: torch.Tensor, fp64: torch.Tensor, kinds: tuple[bool, bool]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eigenvalues σ²/s² of every ΔW from its Gram matrices.

    Args:
        gb, ga: float64 ``[n, R, R]`` Gram matrices (zero-padded).
        srank: int64 ``[n]`` structural ranks min(d, k, r).
        fp64: bool ``[n]``, True where both factors are float64 (Grams accumulated in fp64).
        kinds: (any fp64 entry, any non-fp64 entry) of ``fp64``, known on the host.

    Returns:
        ``(mu, fro_sq, ill)``: float64 ``[n, R]`` descending, entries at and beyond ``srank`` set to
        exactly 0; float64 ``[n]`` ‖BA‖_F² = Σ G_B∘G_A; bool ``[n]`` adapters the Gram route cannot
        resolve (see :data:`COND_TOL_FP32`). Nothing is read back to the host.
    """
    n, R = gb.shape[0], gb.shape[-1]
    fro_sq = (gb * ga).sum((-2, -1)).clamp_min(0)
    if R == 0:
        empty = gb.new_zeros((n, 0))
        return empty, fro_sq, torch.zeros(n, dtype=torch.bool, device=gb.device)
    L = psd_factor(gb, fp64, kinds)
    mu, _ = eigh(_sym(L.mT @ ga @ L), vectors=False)
    mu = mu.clamp_min(0).flip(-1)
    idx = torch.arange(R, device=gb.device)
    mu = torch.where(idx < srank.unsqueeze(-1), mu, torch.zeros((), dtype=mu.dtype, device=mu.device))
    bound = error_bound(gb, ga)
    mu_min = mu.gather(-1, (srank - 1).clamp_min(0).unsqueeze(-1)).squeeze(-1)
    tol = torch.where(fp64, COND_TOL_FP64, COND_TOL_FP32)
    ill = (srank > 0) & (mu[:, 0] > 0) & (mu_min < tol * bound)
    return mu, fro_sq, ill


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
    gb: torch.Tensor, ga: torch.Tensor, srank: torch.Tensor, fp64: torch.Tensor, R_full: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Orthonormal bases of the column spaces of ΔW, as coefficients on B: U = B·T.

    With M = W·diag(μ)·Wᵀ (descending), U = B·V·Λ^-½·W restricted to the nonzero μ.

    Args:
        gb, ga, srank, fp64: as in :func:`gram_spectrum`.
        R_full: int64 ``[n]`` the rank r of each adapter.

    Returns:
        ``(T, rank, ill)``: float64 ``[n, R, R]`` (columns beyond ``rank`` are zero), int64 ``[n]``
        numerical rank of ΔW, bool ``[n]`` adapters that need the exact route (ill-conditioned, or
        r > min(d, k)).
    """
    n, R = gb.shape[0], gb.shape[-1]
    if R == 0:
        z = torch.zeros(n, dtype=torch.int64, device=gb.device)
        return gb.new_zeros((n, 0, 0)), z, z.bool()
    lam_b, V = eigh(gb)
    lam_b = lam_b.clamp_min(0)
    F = V * lam_b.sqrt().unsqueeze(-2)
    mu, W = eigh(_sym(F.mT @ ga @ F))
    mu, W = mu.clamp_min(0).flip(-1), W.flip(-1)
    idx = torch.arange(R, device=gb.device)
    keep = (idx < srank.unsqueeze(-1)) & (mu > 0)
    inv = torch.where(lam_b > 0, lam_b.clamp_min(1e-300).rsqrt(), torch.zeros_like(lam_b))
    T = (V * inv.unsqueeze(-2)) @ (W * keep.unsqueeze(-2))
    bound = error_bound(gb, ga)
    mu_min = mu.gather(-1, (srank - 1).clamp_min(0).unsqueeze(-1)).squeeze(-1)
    tol = torch.where(fp64, COND_TOL_FP64, COND_TOL_FP32)
    ill = ((srank > 0) & (mu[:, 0] > 0) & (mu_min < tol * bound)) | ((srank < R_full) & (mu[:, 0] > 0))
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
