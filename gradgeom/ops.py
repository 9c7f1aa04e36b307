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


def _check_tensor_list(op: str, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, (list, tuple)):
        raise TypeError(f"{op}: tensors must be a list or tuple of tensors, got {type(tensors).__name__}")
    tensors = list(tensors)
    # Only the Python type is checked here (a non-tensor must never reach the dispatcher);
    # dtype and device are checked by the C++ op, with messages naming the argument.
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: tensors[{i}] must be a torch.Tensor, got {type(t).__name__}")
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
