"""Functional ops: thin typed wrappers over ``torch.ops.gradgeom.*``.

Each op has a float64 pure-torch twin with the same signature in :mod:`gradgeom.reference`, and
a fake (meta) implementation registered here so it works under ``torch.compile`` and
``torch.library.opcheck``.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from gradgeom import _native  # noqa: F401  (registers torch.ops.gradgeom)

__all__ = ["group_moments", "MOMENT_COLUMNS"]

#: Column names of every ``[num_groups, 6]`` moments tensor, in order.
MOMENT_COLUMNS = ("count", "sum", "sumsq", "m2", "maxabs", "nonfinite")

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _check_tensor_list(op: str, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, (list, tuple)):
        raise TypeError(f"{op}: tensors must be a list or tuple of tensors, got {type(tensors).__name__}")
    tensors = list(tensors)
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: tensors[{i}] must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(
                f"{op}: tensors[{i}] has dtype {t.dtype}; expected float32, float64, float16 or bfloat16"
            )
        if t.device != tensors[0].device:
            raise ValueError(
                f"{op}: all tensors must be on one device: tensors[{i}] is on {t.device} "
                f"but tensors[0] is on {tensors[0].device}"
            )
    return tensors


def _resolve_groups(
    op: str, n: int, group_ids: Optional[Sequence[int]], num_groups: Optional[int]
) -> tuple[list[int], int]:
    if group_ids is None:
        ids = [0] * n
    else:
        if isinstance(group_ids, torch.Tensor):
            group_ids = group_ids.tolist()
        ids = [int(g) for g in group_ids]
        if len(ids) != n:
            raise ValueError(f"{op}: group_ids must have one entry per tensor: got {len(ids)} group ids for {n} tensors")
    if num_groups is None:
        num_groups = max(ids, default=0) + 1
    num_groups = int(num_groups)
    if num_groups < 1:
        raise ValueError(f"{op}: num_groups must be >= 1, got {num_groups}")
    for i, g in enumerate(ids):
        if not 0 <= g < num_groups:
            raise ValueError(f"{op}: group_ids[{i}] = {g} is outside [0, num_groups={num_groups})")
    return ids, num_groups


def group_moments(
    tensors: Sequence[torch.Tensor],
    group_ids: Optional[Sequence[int]] = None,
    num_groups: Optional[int] = None,
    *,
    device: Union[torch.device, str, None] = None,
) -> torch.Tensor:
    """Moments of many tensors, reduced per group, in one fused pass over the data.

    Args:
        tensors: float32 / float64 / float16 / bfloat16 tensors of any shapes (0 elements, more
            than 2**31 elements, non-contiguous views are all fine), all on one device.
        group_ids: the group of each tensor, ints in ``[0, num_groups)``; default: one group.
        num_groups: number of groups; default ``max(group_ids) + 1``.
        device: where the result lives when ``tensors`` is empty (default CPU).

    Returns:
        float64 tensor ``[num_groups, 6]`` on the tensors' device, columns
        :data:`MOMENT_COLUMNS`: count of finite elements, sum, sum of squares,
        M2 = Σ(x − mean)² (Chan merge), max |x| over finite elements, count of non-finite
        elements (NaN/±Inf are counted there and excluded from every other column).
        A group with no elements gives a row of zeros. Deterministic: identical input gives
        identical bits. Never synchronises with the GPU.
    """
    tensors = _check_tensor_list("group_moments", tensors)
    ids, num_groups = _resolve_groups("group_moments", len(tensors), group_ids, num_groups)
    if not tensors:
        return torch.zeros((num_groups, 6), dtype=torch.float64, device=device)
    return torch.ops.gradgeom.group_moments(tensors, ids, num_groups)


@torch.library.register_fake("gradgeom::group_moments")
def _group_moments_fake(tensors, group_ids, num_groups):
    torch._check(num_groups >= 1, lambda: f"group_moments: num_groups must be >= 1, got {num_groups}")
    device = tensors[0].device if len(tensors) else torch.device("cpu")
    return torch.empty((num_groups, 6), dtype=torch.float64, device=device)


# --- sketch_moments (issue 3) ---------------------------------------------------------------

__all__ += ["sketch_moments", "SKETCH_DIM_RANGE"]

#: Allowed ``sketch_dim`` values: powers of two in this closed range.
SKETCH_DIM_RANGE = (8, 8192)


def check_sketch_dim(op: str, sketch_dim: int) -> int:
    """Validate ``sketch_dim`` (a power of two in :data:`SKETCH_DIM_RANGE`) and return it as int."""
    if isinstance(sketch_dim, bool) or not isinstance(sketch_dim, int):
        raise TypeError(f"{op}: sketch_dim must be an int, got {type(sketch_dim).__name__}")
    lo, hi = SKETCH_DIM_RANGE
    if not (lo <= sketch_dim <= hi and sketch_dim & (sketch_dim - 1) == 0):
        raise ValueError(f"{op}: sketch_dim must be a power of two in [{lo}, {hi}], got {sketch_dim}")
    return sketch_dim


def concat_offsets(tensors: Sequence[torch.Tensor], group_ids: Sequence[int]) -> list[int]:
    """Offset of each tensor in its group's concatenation, tensors taken in list order."""
    next_offset: dict[int, int] = {}
    offsets = []
    for t, g in zip(tensors, group_ids):
        offsets.append(next_offset.get(g, 0))
        next_offset[g] = offsets[-1] + t.numel()
    return offsets


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
    """Group moments and a count-sketch of every group, in one fused pass over the data.

    Element ``i`` of a group is the element at position ``offsets[t] + j`` of the group's
    concatenation when it is element ``j`` (row-major) of ``tensors[t]``. Its sketch bucket is a
    rotated fold, ``(i % k + 8 * r(i // k)) % k`` with a hashed rotation ``r``, and its sign a
    pairwise-independent hash of ``i`` (``csrc/include/gradgeom/sketch_hash.h``); the same
    ``seed`` gives the same sketch on CPU and CUDA, so ``‖y‖²`` is an unbiased estimate of
    ``‖g‖²`` with relative standard deviation about ``sqrt(2 / k)``.

    Args:
        tensors: float32 / float64 / float16 / bfloat16 tensors, any shapes, one device.
        group_ids: group of each tensor in ``[0, num_groups)``; default one group.
        num_groups: default ``max(group_ids) + 1``.
        offsets: start of each tensor in its group's concatenation (ints >= 0); default: the
            tensors concatenated in list order within each group.
        sketch_dim: k, a power of two in :data:`SKETCH_DIM_RANGE`.
        seed: selects the hash functions (any int).
        device: where the results live when ``tensors`` is empty (default CPU).

    Returns:
        ``(moments, sketch)``: float64 ``[num_groups, 6]`` with the columns of
        :func:`group_moments`, and float64 ``[num_groups, sketch_dim]`` with y = S·g (non-finite
        elements are counted in ``moments[:, 5]`` and left out of y). Deterministic; never
        synchronises with the GPU.
    """
    tensors = _check_tensor_list("sketch_moments", tensors)
    ids, num_groups = _resolve_groups("sketch_moments", len(tensors), group_ids, num_groups)
    sketch_dim = check_sketch_dim("sketch_moments", sketch_dim)
    if offsets is None:
        offs = concat_offsets(tensors, ids)
    else:
        offs = [int(o) for o in offsets]
        if len(offs) != len(tensors):
            raise ValueError(
                f"sketch_moments: offsets must have one entry per tensor: got {len(offs)} offsets for {len(tensors)} tensors"
            )
        for i, o in enumerate(offs):
            if o < 0:
                raise ValueError(f"sketch_moments: offsets[{i}] = {o} must be >= 0")
    if not tensors:
        return (
            torch.zeros((num_groups, 6), dtype=torch.float64, device=device),
            torch.zeros((num_groups, sketch_dim), dtype=torch.float64, device=device),
        )
    return torch.ops.gradgeom.sketch_moments(tensors, ids, offs, num_groups, sketch_dim, int(seed))


@torch.library.register_fake("gradgeom::sketch_moments")
def _sketch_moments_fake(tensors, group_ids, offsets, num_groups, sketch_dim, seed):
    torch._check(num_groups >= 1, lambda: f"sketch_moments: num_groups must be >= 1, got {num_groups}")
    device = tensors[0].device if len(tensors) else torch.device("cpu")
    return (
        torch.empty((num_groups, 6), dtype=torch.float64, device=device),
        torch.empty((num_groups, sketch_dim), dtype=torch.float64, device=device),
    )
