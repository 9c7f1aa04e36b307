"""Pure-torch float64 twins of every gradgeom op, with the same signatures.

These are the definitions the kernels are tested against (and a readable statement of what each
number means). They are slow and allocate freely; use :mod:`gradgeom.ops` in real code.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

__all__ = ["group_moments"]


def group_moments(
    tensors: Sequence[torch.Tensor],
    group_ids: Optional[Sequence[int]] = None,
    num_groups: Optional[int] = None,
    *,
    device: Union[torch.device, str, None] = None,
) -> torch.Tensor:
    """Reference for :func:`gradgeom.ops.group_moments`; float64 ``[num_groups, 6]``.

    Per group, over the concatenation of its tensors: count of finite elements, Σx, Σx²,
    Σ(x − mean)² computed two-pass around the exact mean, max |x| over finite elements, and the
    count of non-finite elements.
    """
    tensors = list(tensors)
    ids = [0] * len(tensors) if group_ids is None else [int(g) for g in group_ids]
    if num_groups is None:
        num_groups = max(ids, default=0) + 1
    out_device = tensors[0].device if tensors else device
    out = torch.zeros((num_groups, 6), dtype=torch.float64)
    for g in range(num_groups):
        parts = [t.detach().reshape(-1).to("cpu", torch.float64) for t, i in zip(tensors, ids) if i == g]
        if not parts:
            continue
        x = torch.cat(parts)
        finite = torch.isfinite(x)
        v = x[finite]
        n = v.numel()
        if n:
            mean = v.mean()
            out[g] = torch.stack([
                torch.tensor(float(n), dtype=torch.float64),
                v.sum(),
                (v * v).sum(),
                ((v - mean) ** 2).sum(),
                v.abs().max(),
                (~finite).sum().to(torch.float64),
            ])
        else:
            out[g, 5] = float((~finite).sum())
    return out.to(out_device)


# --- sketch_moments (issue 3) ---------------------------------------------------------------

__all__ += ["sketch_moments", "sketch_buckets_and_signs"]

_U64 = (1 << 64) - 1


def _sketch_hash_coefficients(seed: int) -> list[int]:
    """The six splitmix64 draws of ``make_sketch_hash`` (sketch_hash.h), as Python ints."""
    state = int(seed) & _U64
    out = []
    for _ in range(6):
        state = (state + 0x9E3779B97F4A7C15) & _U64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _U64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _U64
        out.append(z ^ (z >> 31))
    return out


def sketch_buckets_and_signs(n: int, sketch_dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Bucket (int64 ``[n]``) and sign (float64 ``[n]``, ±1) of group indices ``0..n-1``.

    The rotated-fold count-sketch of ``sketch_hash.h``, written out with numpy uint64 arithmetic.
    """
    import numpy as np

    a_lo, a_hi, a_add, c_lo, c_hi, c_add = (np.uint64(c) for c in _sketch_hash_coefficients(seed))
    k = int(sketch_dim)
    log2k = k.bit_length() - 1
    g8_log2 = log2k - 3
    i = np.arange(n, dtype=np.uint64)
    lo32 = np.uint64(0xFFFFFFFF)
    with np.errstate(over="ignore"):
        sign_word = a_lo * (i & lo32) + a_hi * (i >> np.uint64(32)) + a_add
        fold = i >> np.uint64(log2k)
        if g8_log2 == 0:
            rot = np.zeros_like(fold)
        else:
            rot_word = c_lo * (fold & lo32) + c_hi * (fold >> np.uint64(32)) + c_add
            rot = (rot_word >> np.uint64(64 - g8_log2)) << np.uint64(3)
    kmask = np.uint64(k - 1)
    bucket = ((i & kmask) + rot) & kmask
    sign = np.where((sign_word >> np.uint64(63)) != 0, -1.0, 1.0)
    return torch.from_numpy(bucket.astype(np.int64)), torch.from_numpy(sign)


def sketch_moments(
    tensors: Sequence[torch.Tensor],
    group_ids: Optional[Sequence[int]] = None,
    num_groups: Optional[int] = None,
    *,
    offsets: Optional[Sequence[int]] = None,
    sketch_dim: int = 4096,
    seed: int = 0,
    device: Union[torch.device, str, None] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for :func:`gradgeom.ops.sketch_moments`: ``(float64 [G, 6], float64 [G, k])``.

    Moments as :func:`group_moments`; the sketch sums ``sign(i) * x_i`` into ``bucket(i)`` over
    the finite elements, with ``i`` the element's index in its group's concatenation.
    """
    tensors = list(tensors)
    ids = [0] * len(tensors) if group_ids is None else [int(g) for g in group_ids]
    if num_groups is None:
        num_groups = max(ids, default=0) + 1
    if offsets is None:
        next_offset: dict[int, int] = {}
        offsets = []
        for t, g in zip(tensors, ids):
            offsets.append(next_offset.get(g, 0))
            next_offset[g] = offsets[-1] + t.numel()
    out_device = tensors[0].device if tensors else device
    moments = group_moments(tensors, ids, num_groups, device=device).cpu()
    sketch = torch.zeros((num_groups, sketch_dim), dtype=torch.float64)
    for t, g, off in zip(tensors, ids, offsets):
        x = t.detach().reshape(-1).to("cpu", torch.float64)
        if x.numel() == 0:
            continue
        bucket, sign = sketch_buckets_and_signs(int(off) + x.numel(), sketch_dim, seed)
        bucket, sign = bucket[int(off):], sign[int(off):]
        finite = torch.isfinite(x)
        sketch[g].index_add_(0, bucket[finite], sign[finite] * x[finite])
    return moments.to(out_device), sketch.to(out_device)
# --- LoRA geometry (issue 4) -------------------------------------------------------------------

__all__ += ["gram_fro", "lora_cross_gram", "lora_gram", "psd_cholesky", "sym_eigh"]


def lora_gram(
    Bs: Sequence[torch.Tensor], As: Sequence[torch.Tensor], *, device: Union[torch.device, str, None] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for :func:`gradgeom.lora_ops.lora_gram`: float64 ``(G_B, G_A)``, each
    ``[n, R, R]`` (``R = max r_i``, zero-padded), ``G_B[i] = BᵢᵀBᵢ``, ``G_A[i] = Aᵢ·Aᵢᵀ``."""
    Bs, As = list(Bs), list(As)
    out_device = Bs[0].device if Bs else device
    R = max((B.shape[1] for B in Bs), default=0)
    gb = torch.zeros((len(Bs), R, R), dtype=torch.float64)
    ga = torch.zeros((len(Bs), R, R), dtype=torch.float64)
    for i, (B, A) in enumerate(zip(Bs, As)):
        b = B.detach().to("cpu", torch.float64)
        a = A.detach().to("cpu", torch.float64)
        r = b.shape[1]
        gb[i, :r, :r] = b.T @ b
        ga[i, :r, :r] = a @ a.T
    return gb.to(out_device), ga.to(out_device)


def lora_cross_gram(
    B1s: Sequence[torch.Tensor], B2s: Sequence[torch.Tensor], *, device: Union[torch.device, str, None] = None
) -> torch.Tensor:
    """Reference for :func:`gradgeom.lora_ops.lora_cross_gram`: float64 ``[n, R, R]``
    (``R = max(p_i, q_i)``, zero-padded), ``out[i, :p_i, :q_i] = B1ᵢᵀ·B2ᵢ`` with both factors
    widened to float64 first; float64 ``[0, 0, 0]`` on ``device`` (default CPU) for empty lists."""
    B1s, B2s = list(B1s), list(B2s)
    out_device = B1s[0].device if B1s else device
    R = max((max(x.shape[1], y.shape[1]) for x, y in zip(B1s, B2s)), default=0)
    out = torch.zeros((len(B1s), R, R), dtype=torch.float64)
    for i, (x, y) in enumerate(zip(B1s, B2s)):
        a = x.detach().to("cpu", torch.float64)
        b = y.detach().to("cpu", torch.float64)
        out[i, : a.shape[1], : b.shape[1]] = a.T @ b
    return out.to(out_device)


def gram_fro(gb: torch.Tensor, ga: torch.Tensor) -> torch.Tensor:
    """Reference for :func:`gradgeom.lora_ops.gram_fro`: float64 ``[n]``,
    √max(Σ gb[i]∘ga[i], 0) (NaN where the sum is NaN) of the symmetric matrices whose lower
    triangles ``gb``, ``ga`` hold."""

    def sym(t: torch.Tensor) -> torch.Tensor:
        t = t.detach().to("cpu", torch.float64)
        return torch.tril(t) + torch.tril(t, -1).mT

    x, y = sym(gb), sym(ga)
    return (x * y).sum((-2, -1)).clamp_min(0).sqrt().to(gb.device)


def sym_eigh(A: torch.Tensor, *, vectors: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for :func:`gradgeom.lora_ops.sym_eigh`: LAPACK ``eigh`` in float64 on the lower
    triangle; eigenvalues ascending ``[batch, n]``, eigenvectors ``[batch, n, n]`` or ``[0]``."""
    w, V = torch.linalg.eigh(A.detach().to("cpu", torch.float64))
    if not vectors:
        V = torch.empty(0, dtype=torch.float64)
    return w.to(A.device), V.to(A.device)


def psd_cholesky(A: torch.Tensor, *, tol: float = 1e-14) -> torch.Tensor:
    """Reference for :func:`gradgeom.lora_ops.psd_cholesky` on positive definite input: LAPACK
    Cholesky in float64 of the lower triangle. (The op pivots, so its F equals this L only up to
    a row permutation and column signs; compare F·Fᵀ, or F·Fᵀ's eigenvalues.)"""
    a = A.detach().to("cpu", torch.float64)
    a = torch.tril(a) + torch.tril(a, -1).mT
    return torch.linalg.cholesky(a).to(A.device)
