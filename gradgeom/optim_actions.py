"""How controller decisions touch an optimizer: LR multiplier, skipped steps, gradient stash.

The LR multiplier is applied *inside* ``optimizer.step()`` only, through the optimizer's step
pre/post hooks: the pre-hook multiplies every group's ``lr`` by the scale, the post-hook puts back
the exact value it found. Outside ``step()`` the groups hold the value the user or an
``lr_scheduler`` set, so schedulers (closed-form or chainable) compose exactly: the LR used is the
scheduler's value times our scale, and at scale 1.0 nothing is touched at all.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

__all__ = ["unwrap_optimizer", "LRScaleHooks", "GradientStash", "drop_gradients"]


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The innermost ``torch.optim.Optimizer`` of a wrapper (accelerate's ``AcceleratedOptimizer``,
    Lightning's ``LightningOptimizer``), whose ``step`` actually runs."""
    seen = 0
    while not _is_plain_optimizer(optimizer):
        inner = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
        if inner is None or seen > 8:
            break
        optimizer, seen = inner, seen + 1
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer (or a wrapper of one), got {type(optimizer).__name__}")
    return optimizer


def _is_plain_optimizer(obj: Any) -> bool:
    return isinstance(obj, torch.optim.Optimizer) and not hasattr(obj, "optimizer") and not hasattr(obj, "_optimizer")


class LRScaleHooks:
    """Multiplies every param group's ``lr`` by ``scale`` for the duration of ``optimizer.step()``.

    :meth:`set_scale` may also be called *inside* ``step()`` (Lightning runs the closure with
    forward, backward and ``on_before_optimizer_step`` inside ``optimizer.step``, after the
    pre-hook): the new scale then applies to this step's update, which torch optimizers compute
    after the closure returns.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.scale = 1.0
        self._saved: Optional[list[Any]] = None
        self._modified = False
        self._handles = [
            optimizer.register_step_pre_hook(self._pre),
            optimizer.register_step_post_hook(self._post),
        ]

    def set_scale(self, scale: float) -> None:
        """Use ``scale`` from now on (and for the step in progress, if any)."""
        self.scale = float(scale)
        if self._saved is not None:
            self._write()

    def _write(self) -> None:
        if self.scale == 1.0:
            if self._modified:
                for group, lr in zip(self.optimizer.param_groups, self._saved):
                    group["lr"] = lr
                self._modified = False
            return
        for group, lr in zip(self.optimizer.param_groups, self._saved):
            group["lr"] = lr * self.scale
        self._modified = True

    def _pre(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._restore()  # a previous step() that raised never reached its post-hook
        self._saved = [group["lr"] for group in optimizer.param_groups]
        self._modified = False
        self._write()

    def _post(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._saved is None:
            return
        if self._modified:
            for group, lr in zip(self.optimizer.param_groups, self._saved):
                group["lr"] = lr
        self._saved = None
        self._modified = False

    def remove(self) -> None:
        """Detach the hooks (restoring any LR they changed)."""
        self._restore()
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def drop_gradients(optimizer: torch.optim.Optimizer) -> None:
    """Set every parameter's ``.grad`` to None, so the following ``optimizer.step()`` changes
    neither parameters nor optimizer state (torch optimizers skip parameters without gradients)."""
    for p in _params(optimizer):
        p.grad = None


class GradientStash:
    """Grows the effective batch across optimizer steps.

    ``push(optimizer, k)`` adds the current gradients to a stash. While fewer than ``k``
    gradients are stashed it drops them (the step becomes a no-op); at the ``k``-th it writes
    the mean of the stashed gradients back into ``.grad`` so that step updates with the
    ``k``-times larger batch. ``flush`` ends a window early (the mean of what is there plus the
    current gradient). Memory: one extra gradient-sized buffer of the optimizer's parameters.
    """

    def __init__(self) -> None:
        self.count = 0
        self.buffers: Optional[list[Optional[torch.Tensor]]] = None

    def push(self, optimizer: torch.optim.Optimizer, k: int) -> bool:
        """Stash this step's gradients; returns True when this step should update (window full)."""
        params = _params(optimizer)
        if self.buffers is None:
            self.buffers = [None] * len(params)
        if len(self.buffers) != len(params):
            raise RuntimeError(
                f"GradientStash: the optimizer has {len(params)} parameters but the stash holds {len(self.buffers)}"
            )
        for i, p in enumerate(params):
            if p.grad is None:
                continue
            if self.buffers[i] is None:
                self.buffers[i] = p.grad.detach().clone()
            else:
                self._to_grad_device(i, p.grad).add_(p.grad)
        self.count += 1
        if self.count >= k:
            self._write_mean(params)
            return True
        drop_gradients(optimizer)
        return False

    def flush(self, optimizer: torch.optim.Optimizer) -> None:
        """End the window now: ``.grad`` becomes the mean of the stash and the current gradient."""
        if self.count == 0:
            return
        params = _params(optimizer)
        for i, p in enumerate(params):
            if p.grad is not None and self.buffers[i] is not None:
                self._to_grad_device(i, p.grad).add_(p.grad)
            elif p.grad is not None:
                self.buffers[i] = p.grad.detach().clone()
        self.count += 1
        self._write_mean(params)

    def _to_grad_device(self, i: int, grad: torch.Tensor) -> torch.Tensor:
        buf = self.buffers[i]
        if buf.device != grad.device or buf.dtype != grad.dtype:
            buf = self.buffers[i] = buf.to(device=grad.device, dtype=grad.dtype)
        return buf

    def _write_mean(self, params: list[torch.Tensor]) -> None:
        for p, buf in zip(params, self.buffers):
            p.grad = None if buf is None else buf.div_(self.count)
        self.count = 0
        self.buffers = None

    def state_dict(self) -> dict[str, Any]:
        """``count`` and the stashed buffers (tensors, aligned with the optimizer's parameters)."""
        return {"count": self.count, "buffers": None if self.buffers is None else list(self.buffers)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.count = int(state["count"])
        self.buffers = None if state["buffers"] is None else list(state["buffers"])
