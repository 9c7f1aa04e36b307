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


# --- LoRA geometry (issue 4) -------------------------------------------------------------------

__all__ += ["lora_gram", "psd_cholesky", "sym_eigh"]


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
