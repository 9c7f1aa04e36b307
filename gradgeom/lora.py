"""LoRA update geometry without forming ΔW = s·B·A.

Functional API (``from gradgeom import lora``):

* :func:`delta_norm` / :func:`delta_svdvals`: norms and singular values of s·B·A for one adapter,
  a batch ``B [..., d, r]``, ``A [..., r, k]``, or a ragged list of ``(B, A)`` pairs in one call;
* :func:`scaling`: α/r or α/√r (rsLoRA);
* :func:`geometry`: every adapter of a PEFT model (or a dict/list of pairs) →
  :class:`AdapterGeometry` (norms, spectrum, stable/effective rank, ‖ΔW‖_F/‖W‖_F);
* :func:`snapshot` and :func:`principal_angles`: how far the column space of each ΔW turned.

All of it costs O((d + k)·r²) per adapter and never allocates a d×k buffer: one native launch
(:func:`gradgeom.lora_ops.lora_gram`) forms every BᵀB and A·Aᵀ, then a batched float64 r×r stage
(pivoted PSD Cholesky, then one-block-per-matrix Householder + bisection eigenvalues on CUDA, or
LAPACK on CPU) gives the spectrum. Norms and spectra of a list of pairs cost one native call
(:func:`gradgeom.lora_ops.lora_fro`, :func:`gradgeom.lora_ops.lora_svdvals`), which issues
those steps from C++; a list of pairs is read in C++ too
(:func:`gradgeom.lora_ops.unboxed_call`), so there is little host work per pair. The Gram
route squares the condition number; ``method="auto"`` detects adapters whose small singular
values it cannot resolve (≈1 % accuracy bound) and recomputes those exactly (float64 thin QR of B
and Aᵀ, then an r×r SVD). ``"auto"`` reads that flag from the device once (a host
synchronisation); ``method="gram"`` never synchronises, ``method="qr"`` is exact everywhere.

If r > min(d, k), ΔW has at most min(d, k) nonzero singular values; the r values returned are
padded with exact zeros.
"""

from __future__ import annotations

import math
import operator
from dataclasses import asdict, dataclass, fields
from itertools import repeat
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import nn

from gradgeom import _lora_core as core
from gradgeom import lora_ops
from gradgeom._lora_peft import FoundAdapter, discover, scaling_from_config
from gradgeom._native import _C

__all__ = [
    "AdapterGeometry",
    "PrincipalAngles",
    "delta_norm",
    "delta_svdvals",
    "geometry",
    "principal_angles",
    "scaling",
    "scaling_from_config",
    "snapshot",
]

Pair = tuple[torch.Tensor, torch.Tensor]
_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_METHODS = ("auto", "gram", "qr")
_shape = operator.attrgetter("shape")
_device = operator.attrgetter("device")
_get_device = operator.methodcaller("get_device")
_requires_grad = operator.attrgetter("requires_grad")
_first = operator.itemgetter(0)
_B = operator.attrgetter("B")
_name = operator.attrgetter("name")
_A = operator.attrgetter("A")
_second = operator.itemgetter(1)


def scaling(alpha: float, r: int, *, rslora: bool = False) -> float:
    """The LoRA scaling s of ΔW = s·B·A: α/r, or α/√r with rsLoRA (Kalajdzievski 2023)."""
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"scaling: r must be a positive int, got {r!r}")
    alpha = float(alpha)
    return alpha / math.sqrt(r) if rslora else alpha / r


# --- input normalisation ------------------------------------------------------------------------


@dataclass
class _Batch:
    Bs: list[torch.Tensor]                 # 2-D factors [d, r]
    As: list[torch.Tensor]                 # 2-D factors [r, k]
    lead: Optional[tuple[int, ...]]        # leading shape of batched input, None for a list
    stacked: Optional[Pair]                # [N, d, r], [N, r, k] views of batched input
    scal: Union[float, torch.Tensor]       # one float for all, or float64 [n] on the device
    device: torch.device
    op: str


def _check_pair(op: str, i: Optional[int], B: Any, A: Any, two_d: bool) -> None:
    where = "" if i is None else f"[{i}]"
    for name, t in (("B", B), ("A", A)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name}{where} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOATS:
            raise TypeError(f"{op}: {name}{where} has dtype {t.dtype}; expected float32, float64, float16 or bfloat16")
    if two_d and (B.dim() != 2 or A.dim() != 2):
        raise ValueError(
            f"{op}: pair{where} must hold 2-D factors B [d, r] and A [r, k], got shapes {tuple(B.shape)} and {tuple(A.shape)}"
        )
    if B.dim() < 2 or A.dim() < 2:
        raise ValueError(f"{op}: B must be [..., d, r] and A [..., r, k], got shapes {tuple(B.shape)} and {tuple(A.shape)}")
    if B.shape[-1] != A.shape[-2]:
        raise ValueError(
            f"{op}: inner dimension r differs{(' for pair ' + str(i)) if i is not None else ''}: B has shape "
            f"{tuple(B.shape)} (r = {B.shape[-1]}) but A has shape {tuple(A.shape)} (r = {A.shape[-2]})"
        )
    if B.device != A.device:
        raise ValueError(f"{op}: B{where} is on {B.device} but A{where} is on {A.device}; both must be on one device")


def _validate_pairs(op: str, pairs: Sequence[Any]) -> None:
    """Full per-pair checks with messages that name the pair (the slow path)."""
    for i, p in enumerate(pairs):
        if not isinstance(p, (list, tuple)) or len(p) != 2:
            raise TypeError(f"{op}: pairs[{i}] must be a (B, A) tuple, got {type(p).__name__}")
        _check_pair(op, i, p[0], p[1], two_d=True)
        if p[0].device != pairs[0][0].device:
            raise ValueError(f"{op}: all pairs must be on one device: pair {i} is on {p[0].device}, pair 0 on {pairs[0][0].device}")


def _normalize(op: str, B: Any, A: Any, scal: Any) -> _Batch:
    if A is None:
        if isinstance(B, torch.Tensor) or not isinstance(B, (list, tuple)):
            raise TypeError(f"{op}: pass B and A tensors, or a list of (B, A) pairs; got {type(B).__name__} and no A")
        # Fast path: the native op checks every factor; _validate_pairs explains a failure.
        if B and all(issubclass(t, (tuple, list)) for t in set(map(type, B))) and set(map(len, B)) == {2}:
            Bs, As = map(list, zip(*B))  # tuples and lists: unpacking is indexing
            ok = all(issubclass(t, torch.Tensor) for t in set(map(type, Bs)))
        else:
            try:
                Bs = [p[0] for p in B]
                As = [p[1] for p in B]
                ok = all(len(p) == 2 for p in B) and all(isinstance(t, torch.Tensor) for t in Bs)
            except (TypeError, IndexError, KeyError):
                ok = False
        if not ok:
            _validate_pairs(op, B)
        device = Bs[0].device if Bs else torch.device("cpu")
        lead, stacked, n = None, None, len(Bs)
    else:
        _check_pair(op, None, B, A, two_d=False)
        try:
            lead = tuple(torch.broadcast_shapes(B.shape[:-2], A.shape[:-2]))
        except RuntimeError as exc:
            raise ValueError(f"{op}: leading (batch) dimensions of B {tuple(B.shape)} and A {tuple(A.shape)} do not broadcast") from exc
        Bx = B.expand(lead + tuple(B.shape[-2:])).reshape((-1,) + tuple(B.shape[-2:]))
        Ax = A.expand(lead + tuple(A.shape[-2:])).reshape((-1,) + tuple(A.shape[-2:]))
        Bs, As = list(Bx.unbind(0)), list(Ax.unbind(0))
        stacked, device, n = (Bx, Ax), B.device, Bx.shape[0]
    if isinstance(scal, (int, float)) and not isinstance(scal, bool):
        return _Batch(Bs, As, lead, stacked, float(scal), device, op)  # a host scalar: no device tensor
    if isinstance(scal, torch.Tensor):
        s = scal.detach().to(device=device, dtype=torch.float64)
    else:
        values = list(scal)
        if (values and len(values) == n and lead is None and set(map(type, values)) <= {float, int}
                and values.count(values[0]) == n):
            return _Batch(Bs, As, lead, stacked, float(values[0]), device, op)  # one value for all
        s = core.to_device(values, torch.float64, device)
    try:
        s = s.expand(lead if lead is not None else (n,)).reshape(-1) if s.dim() else s.expand(n)
    except RuntimeError as exc:
        raise ValueError(f"{op}: scaling of shape {tuple(s.shape)} does not match {lead if lead is not None else (n,)}") from exc
    return _Batch(Bs, As, lead, stacked, s.contiguous(), device, op)


def _scale(x: torch.Tensor, s: Union[float, torch.Tensor]) -> torch.Tensor:
    """x ``[n, ...]`` times the per-adapter scaling ``s`` (a float, or ``[n]``)."""
    if isinstance(s, float):
        return x if s == 1.0 else x * s
    return x * s.reshape(s.shape + (1,) * (x.dim() - 1))


def _native(batch: _Batch, op: Any, *args: Any) -> Any:
    """``op(batch.Bs, batch.As, *args)``, a native op over the factor lists, for a batch that
    :func:`_needs_grad` cleared (so no autograd graph forms); on bad input, the Python checks
    name the offending pair."""
    try:
        return op(batch.Bs, batch.As, *args)
    except (ValueError, TypeError, RuntimeError):
        if batch.lead is None:
            _validate_pairs(batch.op, list(zip(batch.Bs, batch.As)))
        raise


def _check_method(op: str, method: str) -> None:
    if method not in _METHODS:
        raise ValueError(f"{op}: method must be one of {_METHODS}, got {method!r}")


def _needs_grad(batch: _Batch) -> bool:
    if not torch.is_grad_enabled():
        return False
    try:
        grad = any(map(_requires_grad, batch.Bs)) or any(map(_requires_grad, batch.As))
    except AttributeError:  # a factor that is not a tensor (the fast path of _normalize checks B only)
        grad = True
    if grad and batch.lead is None:
        _validate_pairs(batch.op, list(zip(batch.Bs, batch.As)))
    return grad


def _exact_rows(Bs: Sequence[torch.Tensor], As: Sequence[torch.Tensor], method: str, sv: torch.Tensor, ill: torch.Tensor) -> list[int]:
    """Recompute by the exact route, in place, the rows of the Gram-route ``sv [n, R]`` that
    ``method`` asks for (``"auto"``: those flagged in ``ill [n]``); returns their indices."""
    redo = _rows_to_redo(method, len(Bs), ill)
    _recompute_exact(Bs, As, redo, sv)
    return redo


def _read_flags(ill: torch.Tensor) -> Callable[[], list[int]]:
    """Queue the read of the flags ``ill [n]`` (bool) now; the returned function waits for it and
    gives the flagged indices, so host work done in between overlaps the device's. On CUDA the
    flags of a native ``lora_svdvals`` call at 33 <= R <= 128 already have a host copy in flight,
    queued before its bisection (csrc/early_flags.cpp), and the function waits for that copy
    alone; other flags are copied to pinned memory here and waited for through an event."""
    if ill.device.type != "cuda":
        return lambda: _flag_indices(ill)
    if _C._early_flags_pending(ill):
        return lambda: _C._early_flags(ill)
    host = ill.to("cpu", non_blocking=True)
    copied = torch.cuda.Event()
    copied.record(torch.cuda.current_stream(ill.device))

    def flagged() -> list[int]:
        copied.synchronize()
        return host.nonzero().flatten().tolist()

    return flagged


def _flag_indices(ill: torch.Tensor) -> list[int]:
    """The indices of the set flags in ``ill [n]`` (bool), read now: from the host copy a native
    CUDA call queued before its bisection when there is one, else one blocking copy (which costs
    less host time than a pinned copy and an event when nothing would overlap it)."""
    if ill.device.type == "cuda":
        early = _C._early_flags(ill)
        if early is not None:
            return early
    return ill.cpu().nonzero().flatten().tolist()


def _rows_to_redo(method: str, n: int, ill: torch.Tensor, flagged: Optional[Callable[[], list[int]]] = None) -> list[int]:
    """The rows ``method`` takes by the exact route: none (``"gram"``), all (``"qr"``) or the
    flagged ones (``"auto"``, the one host read: ``flagged`` from :func:`_read_flags` when the
    read was queued earlier, else :func:`_flag_indices`)."""
    if method == "gram":
        return []
    if method == "qr":
        return list(range(n))
    return flagged() if flagged is not None else _flag_indices(ill)


def _recompute_exact(Bs: Sequence[torch.Tensor], As: Sequence[torch.Tensor], rows: list[int], sv: torch.Tensor) -> None:
    """Rows ``rows`` of ``sv [n, R]`` by the exact float64 QR route, in place."""
    with torch.no_grad():
        for i in rows:
            r = Bs[i].shape[1]
            sv[i, :r] = core.qr_svdvals(Bs[i], As[i]) if core.finite(Bs[i], As[i]) else float("nan")


def _unboxed_svdvals(pairs: Any, method: str) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """``(sv, ill)``: the Gram-route σ(B·A) ``[n, R]`` of a list of pairs and the flags ``[n]``
    of the adapters it cannot resolve (all False unless ``method`` is ``"auto"``), through
    :func:`gradgeom.lora_ops.unboxed_call`, nothing read back; None where the general path must
    run. :func:`_exact_rows` or :func:`_svdval_rows` then apply ``method``."""
    if method == "qr":
        return None
    got = lora_ops.unboxed_call(lora_ops.SVDVALS_NO_FRO, pairs, flag=method == "auto")
    return None if got is None else got[:2]


def _svdval_rows(sv: torch.Tensor, ill: torch.Tensor, method: str, Bs: list, As: list,
                 s: Union[float, torch.Tensor]) -> list[torch.Tensor]:
    """The rows of ``sv [n, R]`` scaled by ``s`` and cut to each r (:func:`_rows_of`), with the
    rows ``method`` takes by the exact route recomputed. The rows are cut before ``ill`` is read
    back, so that this host work overlaps the device's; recomputed rows are cut anew."""
    flagged = _read_flags(ill) if method == "auto" else None
    rows = _rows_of(_scale(sv, s), Bs)
    redo = _rows_to_redo(method, sv.shape[0], ill, flagged)
    if not redo:
        return rows
    _recompute_exact(Bs, As, redo, sv)
    return _rows_of(_scale(sv, s), Bs)


def _is_host_scalar(x: Any) -> bool:
    return type(x) in (float, int)


def _unscaled_svdvals(batch: _Batch, method: str) -> torch.Tensor:
    """σ(B·A) ``[n, R]`` descending zero-padded, float64 on the device, no autograd: one native
    call (:func:`gradgeom.lora_ops.lora_svdvals`), then the exact route where ``method`` asks."""
    sv, ill, _ = _native(batch, torch.ops.gradgeom.lora_svdvals, method == "auto", False)
    _exact_rows(batch.Bs, batch.As, method, sv, ill)
    return sv


def _ranks_if_ragged(Bs: Sequence[torch.Tensor], R: int) -> Optional[list[int]]:
    """None when every factor B ``[d, r]`` has r = R, else the list of r."""
    if all(shape[1] == R for shape in set(map(_shape, Bs))):  # few distinct shapes
        return None
    return [b.shape[1] for b in Bs]


def _reshape_out(batch: _Batch, x: torch.Tensor) -> torch.Tensor:
    return x.reshape(batch.lead + x.shape[1:]) if batch.lead is not None else x


# --- functional API -----------------------------------------------------------------------------


def delta_norm(
    B: Union[torch.Tensor, Sequence[Pair]],
    A: Optional[torch.Tensor] = None,
    *,
    scaling: Union[float, Sequence[float], torch.Tensor] = 1.0,
    ord: Union[str, int] = "fro",
    method: str = "auto",
) -> torch.Tensor:
    """Norm of ΔW = scaling·B·A without forming ΔW.

    Args:
        B: ``[..., d, r]``, or a list of ``(B_i [d_i, r_i], A_i [r_i, k_i])`` pairs (then omit ``A``);
            float32 / float64 / float16 / bfloat16.
        A: ``[..., r, k]``; leading dimensions broadcast against B's.
        scaling: s, a float, or one value per adapter (broadcastable to the leading shape, or a
            sequence of length n for a list).
        ord: ``"fro"`` (Frobenius), ``2`` (spectral), ``"nuc"`` (nuclear).
        method: r×r stage for ``2`` / ``"nuc"``: ``"auto"``, ``"gram"`` or ``"qr"`` (module docs).

    Returns:
        float64 tensor ``[...]`` (batched input; 0-d for one pair) or ``[n]`` (list), on the
        input's device. With autograd on and a factor requiring grad, the result is
        differentiable: ``"fro"`` through |s|·√Σ(BᵀB)∘(A·Aᵀ) (zero gradient at ΔW = 0), ``2`` and
        ``"nuc"`` through a float64 QR + SVD (valid where singular values are distinct).
        Without autograd, one native launch computes every Gram matrix.
    """
    if ord not in ("fro", 2, "nuc"):
        raise ValueError(f"delta_norm: ord must be 'fro', 2 or 'nuc', got {ord!r}")
    _check_method("delta_norm", method)
    if A is None and _is_host_scalar(scaling):  # a list of pairs: the shortcut past torch.ops
        if ord == "fro":
            out = lora_ops.unboxed_call(lora_ops.FRO, B)
        else:
            got = _unboxed_svdvals(B, method)
            if got is not None:
                _exact_rows(list(map(_first, B)), list(map(_second, B)), method, *got)
            out = None if got is None else _norm_of_svdvals(got[0], ord)
        if out is not None:
            return _scale(out, abs(float(scaling)))
    batch = _normalize("delta_norm", B, A, scaling)
    s = abs(batch.scal)
    if not batch.Bs:
        return _reshape_out(batch, torch.zeros(0, dtype=torch.float64, device=batch.device))
    if _needs_grad(batch):
        if batch.stacked is not None:
            Bx, Ax = batch.stacked
            if ord == "fro":
                out = core.safe_sqrt(core.fro_sq_autograd(Bx, Ax))
            else:
                sv = core.qr_svdvals(Bx, Ax)
                out = sv[..., 0] if ord == 2 else sv.sum(-1)
        else:
            vals = []
            for b, a in zip(batch.Bs, batch.As):
                if ord == "fro":
                    vals.append(core.safe_sqrt(core.fro_sq_autograd(b, a)))
                else:
                    sv = core.qr_svdvals(b, a)
                    vals.append(sv.new_zeros(()) if sv.numel() == 0 else (sv[0] if ord == 2 else sv.sum()))
            out = torch.stack(vals)
        return _reshape_out(batch, _scale(out, s))
    if ord == "fro":
        out = _native(batch, torch.ops.gradgeom.lora_fro)
    else:
        out = _norm_of_svdvals(_unscaled_svdvals(batch, method), ord)
    return _reshape_out(batch, _scale(out, s))


def _norm_of_svdvals(sv: torch.Tensor, ord: Union[str, int]) -> torch.Tensor:
    """``[n]``: the spectral (``ord=2``) or nuclear norm from the singular values ``sv [n, R]``."""
    if sv.shape[-1] == 0:
        return sv.new_zeros(sv.shape[0])
    return sv[:, 0] if ord == 2 else sv.sum(-1)


def delta_svdvals(
    B: Union[torch.Tensor, Sequence[Pair]],
    A: Optional[torch.Tensor] = None,
    *,
    scaling: Union[float, Sequence[float], torch.Tensor] = 1.0,
    method: str = "auto",
) -> Union[torch.Tensor, list[torch.Tensor]]:
    """The r singular values of ΔW = scaling·B·A, descending, without forming ΔW.

    Args: as :func:`delta_norm`.

    Returns:
        float64 ``[..., r]`` for batched input, or a list of float64 ``[r_i]`` for a list of
        pairs, on the input's device. Values beyond min(d, k) are exactly 0. Differentiable
        (float64 QR + SVD) when autograd is on and a factor requires grad.
    """
    _check_method("delta_svdvals", method)
    if A is None and _is_host_scalar(scaling):  # a list of pairs: the shortcut past torch.ops
        got = _unboxed_svdvals(B, method)
        if got is not None:
            return _svdval_rows(*got, method, list(map(_first, B)), list(map(_second, B)), abs(float(scaling)))
    batch = _normalize("delta_svdvals", B, A, scaling)
    s = abs(batch.scal)
    if _needs_grad(batch):
        if batch.stacked is not None:
            return _reshape_out(batch, _scale(core.qr_svdvals(*batch.stacked), s))
        if isinstance(s, float):
            return [_scale(core.qr_svdvals(b, a), s) for b, a in zip(batch.Bs, batch.As)]
        return [core.qr_svdvals(b, a) * s[i] for i, (b, a) in enumerate(zip(batch.Bs, batch.As))]
    if batch.stacked is not None:
        r = batch.stacked[0].shape[-1]
        if not batch.Bs:
            return torch.zeros(batch.lead + (r,), dtype=torch.float64, device=batch.device)
        sv = _unscaled_svdvals(batch, method)
        return _reshape_out(batch, _scale(sv[:, :r], s))
    if not batch.Bs:
        return []
    sv, ill, _ = _native(batch, torch.ops.gradgeom.lora_svdvals, method == "auto", False)
    return _svdval_rows(sv, ill, method, batch.Bs, batch.As, s)


def _rows_of(sv: torch.Tensor, Bs: Any) -> list[torch.Tensor]:
    """The rows of ``sv [n, R]``, row i cut to r_i = ``Bs[i].shape[1]``."""
    rows = sv.unbind(0)
    R = sv.shape[-1]
    ranks = _ranks_if_ragged(list(Bs), R)
    if ranks is None:  # uniform r: the rows as they are
        return list(rows)
    return [row if r == R else row[:r] for row, r in zip(rows, ranks)]


# --- per-adapter reports ------------------------------------------------------------------------


@dataclass
class AdapterGeometry:
    """Geometry of one adapter's update ΔW = scaling·B·A (B ``[d, r]``, A ``[r, k]``).

    Attributes:
        fro, spectral, nuclear: ‖ΔW‖_F, ‖ΔW‖₂, ‖ΔW‖_* (scaling included).
        svdvals: float64 CPU tensor ``[r]``, the singular values of ΔW, descending.
        stable_rank: ‖ΔW‖_F² / ‖ΔW‖₂² (0 for ΔW = 0).
        effective_rank: exp of the entropy of σ²/Σσ² (Roy & Vetterli), 0 for ΔW = 0.
        rank: r, the adapter's configured rank.
        scaling: s as the layer applies it (α/r, α/√r for rsLoRA, patterns resolved).
        relative: ‖ΔW‖_F / ‖W‖_F of the frozen base weight; None when unknown.
        shape: (d, k) of B·A.
        route: "gram" (factored Gram route) or "qr" (exact float64 fallback).
        module, adapter: where it was found ("" for user-given pairs).
    """

    fro: float
    spectral: float
    nuclear: float
    svdvals: torch.Tensor
    stable_rank: float
    effective_rank: float
    rank: int
    scaling: float
    relative: Optional[float]
    shape: tuple[int, int]
    route: str = "gram"
    module: str = ""
    adapter: str = ""

    def as_dict(self) -> dict:
        """Plain-Python dict (svdvals as a list), e.g. for JSON logs."""
        d = asdict(self)
        d["svdvals"] = self.svdvals.tolist()
        return d


def _split_pairs(obj: Any) -> Optional[tuple[list[str], list, list]]:
    """``(names, Bs, As)`` when ``obj`` is a dict ``name -> (B, A)`` or a list/tuple of ``(B, A)``
    pairs (named ``"0"``, ``"1"``, ...), read off without a per-pair object; else None."""
    if isinstance(obj, dict):
        values = list(obj.values())
    elif isinstance(obj, (list, tuple)):
        values = list(obj)
    else:
        return None
    if not (values and set(map(type, values)) <= {tuple, list} and set(map(len, values)) == {2}):
        return None
    if isinstance(obj, dict):
        keys = list(obj)
        names = keys if set(map(type, keys)) == {str} else [k if type(k) is str else str(k) for k in keys]
    else:
        names = list(map(str, range(len(values))))
    return names, list(map(_first, values)), list(map(_second, values))


def _as_found(obj: Any, adapter_name: Optional[str], op: str) -> list[FoundAdapter]:
    if isinstance(obj, nn.Module):
        return discover(obj, adapter_name)
    if isinstance(obj, dict):
        items = list(obj.items())
    elif isinstance(obj, (list, tuple)):
        items = [(str(i), p) for i, p in enumerate(obj)]
    else:
        raise TypeError(f"{op}: expected an nn.Module, a dict of name -> (B, A[, scaling]) or a list of pairs, got {type(obj).__name__}")
    pairs = _split_pairs(obj)
    if pairs is not None:
        names, Bs, As = pairs
        n = len(names)
        return list(map(FoundAdapter, names, repeat("", n), repeat("", n), Bs, As, repeat(1.0, n), repeat(None, n)))
    out = []
    for name, p in items:
        if not isinstance(p, (list, tuple)) or len(p) not in (2, 3):
            raise TypeError(f"{op}: entry {name!r} must be (B, A) or (B, A, scaling), got {type(p).__name__}")
        out.append(FoundAdapter(str(name), "", "", p[0], p[1], float(p[2]) if len(p) == 3 else 1.0, None))
    return out


def _checked_native(op: str, found: Sequence[FoundAdapter], code: int, flag: bool) -> Any:
    """The native op ``code`` (a :mod:`gradgeom.lora_ops` op code) with flag ``flag`` over the
    found adapters' factors (no autograd); on bad input, name the offending adapter."""
    return _checked_native_lists(op, list(map(_name, found)), list(map(_B, found)), list(map(_A, found)), code, flag)


def _checked_native_lists(op: str, names: Sequence[str], Bs: list, As: list, code: int, flag: bool) -> Any:
    """:func:`_checked_native` on parallel lists of names and factors."""
    got = lora_ops.unboxed_call(code, Bs, As, flag=flag, no_grad=True)
    if got is not None:
        return got
    native = {lora_ops.SVDVALS: torch.ops.gradgeom.lora_svdvals, lora_ops.PRINCIPAL_ANGLES: torch.ops.gradgeom.lora_principal_angles}[code]
    try:
        with torch.no_grad():
            return native(Bs, As, flag)
    except (ValueError, TypeError, RuntimeError):
        for name, B, A in zip(names, Bs, As):
            _check_pair(f"{op}: {name!r}", None, B, A, two_d=True)
        raise


def _check_on_one_device(label: str, B: Any, A: Any) -> None:
    """Raise, naming ``label``, unless B and A are tensors on one device."""
    if not isinstance(B, torch.Tensor) or not isinstance(A, torch.Tensor):
        _check_pair(label, None, B, A, two_d=True)
    if A.device != B.device:
        raise ValueError(f"{label}: B is on {B.device} but A is on {A.device}")


def _by_device(found: Sequence[FoundAdapter]) -> dict[torch.device, list[int]]:
    Bs, As = list(map(_B, found)), list(map(_A, found))
    if all(issubclass(t, torch.Tensor) for t in set(map(type, Bs)) | set(map(type, As))):
        devices = set(map(_device, Bs))
        if len(devices) == 1 and set(map(_device, As)) == devices:  # the usual case: one device
            return {devices.pop(): list(range(len(found)))}
    groups: dict[torch.device, list[int]] = {}
    for i, f in enumerate(found):
        _check_on_one_device(f.name, f.B, f.A)
        groups.setdefault(f.B.device, []).append(i)
    return groups


def _base_norms(found: Sequence[FoundAdapter], device: torch.device) -> tuple[Optional[torch.Tensor], list[Optional[int]]]:
    """‖W‖_F of the distinct base weights on ``device`` (float64 ``[m]`` on the device, not read
    back), and for each adapter the slot of its weight (None when unknown)."""
    from gradgeom import ops

    weights, slots, slot = [], [], {}
    for f in found:
        w = f.base_weight
        if w is None or w.device != device:
            slots.append(None)
            continue
        if id(w) not in slot:
            slot[id(w)] = len(weights)
            weights.append(w.detach())
        slots.append(slot[id(w)])
    if not weights:
        return None, slots
    m = ops.group_moments(weights, list(range(len(weights))), len(weights))
    return m[:, 2].sqrt(), slots


def _stats(sv: torch.Tensor, fro: float) -> tuple[float, float, float, float]:
    if not bool(torch.isfinite(sv).all()) or not math.isfinite(fro):
        return (math.nan,) * 4
    spectral = float(sv[0]) if sv.numel() else 0.0
    nuclear = float(sv.sum())
    stable = fro * fro / (spectral * spectral) if spectral > 0 else 0.0
    sq = sv * sv
    total = float(sq.sum())
    if total > 0:
        p = sq / total
        p = p[p > 0]
        erank = math.exp(float(-(p * p.log()).sum()))
    else:
        erank = 0.0
    return spectral, nuclear, stable, erank


def _stats_by_rank(sv: torch.Tensor, fro: list[float], ranks: list[int]) -> list[tuple[float, float, float, float]]:
    """:func:`_stats` of every row ``sv[j, :ranks[j]]`` (host float64), batched per rank: the
    row-wise reductions give the same bits as :func:`_stats` on each row. Rows with a zero or
    non-finite value (rare but for ΔW = 0) go through :func:`_stats` itself."""
    out: list = [None] * len(ranks)
    groups: dict[int, list[int]] = {}
    for j, r in enumerate(ranks):
        groups.setdefault(r, []).append(j)
    for r, idx in groups.items():
        if r == 0:
            for j in idx:
                out[j] = _stats(sv[j, :0], fro[j])
            continue
        v = sv[:, :r] if len(idx) == len(ranks) else sv[idx, :r]
        sq = v * v
        total = sq.sum(1)
        p = sq / total.unsqueeze(1)
        # case 1: every p > 0 (and finite); case 2: ΔW = 0 (total 0, so every value is 0).
        case = ((p > 0).all(1) & torch.isfinite(v).all(1)).double() + 2.0 * (total == 0)
        for j, (spectral, nuclear, neg_ent, c) in zip(idx, torch.stack([v[:, 0], v.sum(1), -(p * p.log()).sum(1), case], 1).tolist()):
            if c == 0 or not math.isfinite(fro[j]):
                out[j] = _stats(sv[j, :r], fro[j])
            else:  # what _stats computes, read off the batch
                stable = fro[j] * fro[j] / (spectral * spectral) if spectral > 0 else 0.0
                out[j] = (spectral, nuclear, stable, math.exp(neg_ent) if c == 1 else 0.0)
    return out


def geometry(
    model_or_pairs: Union[nn.Module, dict, Sequence], *, adapter_name: Optional[str] = None, method: str = "auto"
) -> dict[str, AdapterGeometry]:
    """Geometry of every LoRA update ΔW = s·B·A, factored, batched per device.

    Args:
        model_or_pairs: a model with PEFT LoRA layers (Linear, Embedding, ConvNd with the kernel
            flattened: A ``[r, c_in·∏kernel]``), or a dict ``name -> (B, A)`` / ``(B, A, scaling)``,
            or a list of such tuples (named ``"0"``, ``"1"``, ...).
        adapter_name: only this adapter (default: every adapter of every layer).
        method: ``"auto"`` (Gram route, exact fallback where ill-conditioned), ``"gram"``, ``"qr"``.

    Returns:
        ``{"{module}.{adapter}": AdapterGeometry}`` for models (e.g.
        ``"base_model.model.model.layers.0.self_attn.q_proj.default"``), or the given names. One
        native launch per device forms all Gram matrices; the results are read back once.
        Adapters at init (B = 0) give zeros, effective rank 0, no NaN.
    """
    _check_method("geometry", method)
    found = _as_found(model_or_pairs, adapter_name, "geometry")
    out: dict[str, AdapterGeometry] = {}
    for device, idx in _by_device(found).items():
        sub = [found[i] for i in idx]
        sv, ill, fro_unscaled = _checked_native("geometry", sub, lora_ops.SVDVALS, method == "auto")
        redo = _exact_rows(list(map(_B, sub)), list(map(_A, sub)), method, sv, ill)
        ranks = [f.B.shape[1] for f in sub]
        n, R = sv.shape
        with torch.no_grad():
            s = core.uniform_or_device([abs(f.scaling) for f in sub], torch.float64, device)
            parts = [_scale(sv, s).flatten(), _scale(fro_unscaled, s)]
            wnorm, slots = _base_norms(sub, device)
            if wnorm is not None:
                parts.append(wnorm)
            host = torch.cat(parts).cpu()  # the one read back
        svh = host[: n * R].view(n, R)
        tail = host[n * R :].tolist()
        fro, wn = tail[:n], tail[n:]
        stats = _stats_by_rank(svh, fro, ranks)
        rows = svh.unbind(0)
        redo = set(redo)
        for j, f in enumerate(sub):
            r = ranks[j]
            spectral, nuclear, stable, erank = stats[j]
            w = None if slots[j] is None else wn[slots[j]]
            rel = None if w is None else (fro[j] / w if w > 0 else (0.0 if fro[j] == 0 else math.inf))
            out[f.name] = AdapterGeometry(
                fro=fro[j], spectral=spectral, nuclear=nuclear, svdvals=(rows[j] if r == R else rows[j][:r]).clone(), stable_rank=stable,
                effective_rank=erank, rank=r, scaling=f.scaling, relative=rel, shape=(f.B.shape[0], f.A.shape[1]),
                route="qr" if j in redo else "gram", module=f.module, adapter=f.adapter,
            )
    return {f.name: out[f.name] for f in found if f.name in out}


# --- subspace angles ----------------------------------------------------------------------------


@dataclass
class PrincipalAngles:
    """Principal angles between the column spaces of two updates ΔW₁, ΔW₂ (same d).

    Attributes:
        angles: float64 CPU tensor ``[min(rank_1, rank_2)]``, radians in [0, π/2], ascending.
        distance: Grassmann distance ‖angles‖₂ (0 when either update is 0).
        rank_1, rank_2: numerical ranks of ΔW₁ and ΔW₂.
        route: "gram" or "qr" (exact float64 fallback).
    """

    angles: torch.Tensor
    distance: float
    rank_1: int
    rank_2: int
    route: str = "gram"


class _RowAngles(PrincipalAngles):
    """A Gram-route :class:`PrincipalAngles` whose ``angles`` are the first min(rank_1, rank_2)
    entries of row ``i`` of the host tensor a :func:`principal_angles` call reads back, cut when
    first read (one view per adapter costs about as much as the rest of the per-adapter work)."""

    def __init__(self, rows: Optional[torch.Tensor] = None, i: int = 0, distance: float = 0.0, rank_1: int = 0,
                 rank_2: int = 0, *, angles: Optional[torch.Tensor] = None, route: str = "gram") -> None:
        # Positional: row i of rows (the fast path). Keywords as PrincipalAngles' (dataclasses.replace).
        self._rows, self._i, self.distance, self.rank_1, self.rank_2 = rows, i, distance, rank_1, rank_2
        if angles is not None:
            self.angles = angles
        if route != "gram":
            self.route = route

    @property
    def angles(self) -> torch.Tensor:  # type: ignore[override]
        cut = self.__dict__.get("_angles")
        if cut is None:
            cut = self.__dict__["_angles"] = self._rows[self._i, : min(self.rank_1, self.rank_2)]
        return cut

    @angles.setter
    def angles(self, value: torch.Tensor) -> None:
        self.__dict__["_angles"] = value

    def __repr__(self) -> str:
        return "PrincipalAngles(" + ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self)) + ")"


def snapshot(model_or_pairs: Union[nn.Module, dict, Sequence], *, adapter_name: Optional[str] = None) -> dict[str, Pair]:
    """Detached copies of every adapter's factors, ``{name: (B [d, r], A [r, k])}``, for
    :func:`principal_angles` later. Costs r·(d + k) elements per adapter, never d·k."""
    found = _as_found(model_or_pairs, adapter_name, "snapshot")
    return {f.name: (f.B.detach().clone(), f.A.detach().clone()) for f in found}


def _named_pairs(obj: Any, adapter_name: Optional[str], op: str) -> tuple[list[str], list, list]:
    """``(names, Bs, As)`` of a snapshot, dict or list of ``(B, A)`` pairs (:func:`_split_pairs`);
    models and ``(B, A, scaling)`` entries go through :func:`_as_found`."""
    pairs = _split_pairs(obj)
    if pairs is not None:
        return pairs
    found = _as_found(obj, adapter_name, op)
    return list(map(_name, found)), list(map(_B, found)), list(map(_A, found))


def _all_tensors(*seqs: list) -> bool:
    return all(issubclass(t, torch.Tensor) for seq in seqs for t in set(map(type, seq)))


def _angle_groups(names: list[str], B1: list, A1: list, B2: list, A2: list, strict: bool = False) -> dict[torch.device, list[int]]:
    """Indices of the pairs per device. The usual case (every B a tensor, one device index) is
    read off cheaply and the native op checks the rest (A's devices, d); otherwise, or with
    ``strict`` (to name the pair behind a native error), each pair is checked: tensors, one device,
    the same d."""
    if not strict and _all_tensors(B1, B2) and len(set(map(_get_device, B1 + B2))) == 1:
        return {B1[0].device: list(range(len(names)))} if names else {}
    groups: dict[torch.device, list[int]] = {}
    for i, name in enumerate(names):
        for B, A in ((B1[i], A1[i]), (B2[i], A2[i])):
            _check_on_one_device(f"principal_angles: {name!r}", B, A)
        if B1[i].shape[0] != B2[i].shape[0]:
            raise ValueError(f"principal_angles: {name}: column spaces live in different dimensions d = {B1[i].shape[0]} and {B2[i].shape[0]}")
        if B1[i].device != B2[i].device:
            raise ValueError(f"principal_angles: {name}: the two updates are on {B1[i].device} and {B2[i].device}")
        groups.setdefault(B1[i].device, []).append(i)
    return groups


def principal_angles(
    first: Union[nn.Module, dict, Sequence],
    second: Union[nn.Module, dict, Sequence],
    *,
    adapter_name: Optional[str] = None,
    method: str = "auto",
) -> dict[str, PrincipalAngles]:
    """Principal angles between the column spaces of ΔW in ``first`` and ``second``, per name.

    Args:
        first, second: a :func:`snapshot`, a model with PEFT LoRA layers, a dict
            ``name -> (B, A)``, or lists of pairs (matched by position). Every name of ``first``
            must exist in ``second`` with the same d. Compare two adapters of one layer by
            passing ``{"q": (B1, A1)}`` and ``{"q": (B2, A2)}``.
        adapter_name: only this adapter (models and snapshots of models).
        method: ``"auto"``, ``"gram"`` or ``"qr"`` as in :func:`delta_svdvals`.

    Returns:
        ``{name: PrincipalAngles}``. The bases come factored (U = B·T with T from the r×r
        stage), so the only d-sized work is BᵢᵀBᵢ, A·Aᵀ (one native launch) and B₁ᵀB₂. Reads the
        results back to the host once. Angles below ~1e-3 rad (Gram route) or ~1e-7 rad (exact
        route) are not resolved: cos θ is 1 to that precision.
    """
    _check_method("principal_angles", method)
    names, B1, A1 = _named_pairs(first, adapter_name, "principal_angles")
    names2, B2, A2 = _named_pairs(second, adapter_name, "principal_angles")
    if names2 != names:  # match by name
        where = dict(zip(names2, range(len(names2))))
        if not where.keys() >= set(names):
            missing = [name for name in names if name not in where]
            raise ValueError(f"principal_angles: {len(missing)} adapters of `first` are missing in `second`, e.g. {missing[:3]}")
        idx2 = list(map(where.__getitem__, names))
        B2, A2 = [B2[i] for i in idx2], [A2[i] for i in idx2]
    out: dict[str, PrincipalAngles] = {}
    groups = _angle_groups(names, B1, A1, B2, A2)
    for idx in groups.values():
        one = len(groups) == 1
        sel = names if one else [names[i] for i in idx]
        n = len(sel)
        Bs = (B1 + B2) if one else [B1[i] for i in idx] + [B2[i] for i in idx]
        As = (A1 + A2) if one else [A1[i] for i in idx] + [A2[i] for i in idx]
        # One native call: Grams, factored bases, cosines (the steps of _lora_core.gram_bases and
        # cosines), then the one read back.
        try:
            host = _checked_native_lists("principal_angles", sel + sel, Bs, As, lora_ops.PRINCIPAL_ANGLES,
                                         method == "auto").cpu()
        except (ValueError, TypeError, RuntimeError):
            _angle_groups(names, B1, A1, B2, A2, strict=True)  # name the offending pair
            raise
        K = host.shape[1] - (5 if method == "auto" else 4)
        cols = host[:, K:].t().tolist()
        dist, r1s, r2s, bads = cols[:4]
        if method != "qr" and not any(bads) and (method == "gram" or not any(cols[4])):  # every pair on the Gram route
            r1s, r2s = list(map(int, r1s)), list(map(int, r2s))
            out.update(zip(sel, map(_RowAngles, repeat(host, n), range(n), dist, r1s, r2s)))
            continue
        thetas = host[:, :K].unbind(0)
        for j, (name, row) in enumerate(zip(sel, zip(*cols))):
            b1, a1, b2, a2 = Bs[j], As[j], Bs[n + j], As[n + j]
            dist, r1, r2, bad = row[0], int(row[1]), int(row[2]), row[3] != 0
            if bad:  # non-finite factors: NaN angles, never silently 0
                r1, r2 = b1.shape[1], b2.shape[1]
                th = torch.full((min(r1, r2),), math.nan, dtype=torch.float64)
                out[name] = PrincipalAngles(th, math.nan, r1, r2, "gram")
            elif method == "qr" or (method == "auto" and row[4]):
                U1, U2 = core.qr_basis(b1, a1), core.qr_basis(b2, a2)
                k = min(U1.shape[1], U2.shape[1])
                c = torch.linalg.svdvals(U1.mT @ U2)[:k].clamp(0.0, 1.0).cpu() if k else torch.zeros(0, dtype=torch.float64)
                th = torch.arccos(c)  # cosines descending: angles ascending
                out[name] = PrincipalAngles(th, float(th.square().sum().sqrt()), U1.shape[1], U2.shape[1], "qr")
            else:
                k = min(r1, r2)
                out[name] = PrincipalAngles(thetas[j] if k == K else thetas[j][:k], dist, r1, r2, "gram")
    if len(groups) == 1:
        return out
    return {name: out[name] for name in names}
