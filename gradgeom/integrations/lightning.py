"""Lightning (``lightning.pytorch``) integration.

::

    from gradgeom import GradientSmoothnessEstimator, PauseController
    from gradgeom.integrations.lightning import GradGeomCallback

    cb = GradGeomCallback(
        estimator=lambda module: GradientSmoothnessEstimator(module, attach=False),
        controller=lambda estimator: PauseController(estimator),      # optional
    )
    lightning.Trainer(callbacks=[cb]).fit(module, datamodule)

``estimator`` (and ``controller``) may be objects or factories; a factory runs at
``on_fit_start``, after the strategy has moved the module to its device, so the estimator's state
lives where the gradients are.

- ``on_fit_start``: builds/attaches the estimator, binds the controller to the first optimizer,
  loads any state restored from a checkpoint.
- ``on_before_optimizer_step`` (after AMP unscaling, inside ``optimizer.step``'s closure):
  ``estimator.step()``, ``controller.update()`` + ``apply()`` (the LR scale applies to this very
  step), ``STOP`` → ``trainer.should_stop``; every ``log_every`` steps ``log_dict`` of the
  estimator's and controller's metrics.
- ``on_fit_end``: removes the hooks.
- ``state_dict`` / ``load_state_dict``: estimator + controller state in the Lightning checkpoint.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Union

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # pragma: no cover - exercised only without lightning
    try:
        from pytorch_lightning.callbacks import Callback  # type: ignore[no-redef]
    except ImportError as exc:
        raise ImportError("gradgeom.integrations.lightning needs lightning: pip install lightning") from exc

from gradgeom.integrations._state import collect_state, restore_state
from gradgeom.policy import Action

__all__ = ["GradGeomCallback"]


class GradGeomCallback(Callback):
    """Gradient statistics (and optionally the pause controller) inside ``lightning.Trainer``.

    Args:
        estimator: a :class:`gradgeom.GradientSmoothnessEstimator`, or a callable
            ``LightningModule -> estimator`` run at ``on_fit_start``. Give it no ``optimizer=``:
            the callback calls ``estimator.step()`` itself.
        controller: optional :class:`gradgeom.PauseController`, or a callable ``estimator -> controller``.
        log_every: ``log_dict`` the metrics every this many optimizer steps (each read is one
            device synchronisation).
        prog_bar: show the metrics in the progress bar.
    """

    def __init__(
        self,
        estimator: Union[Any, Callable[[Any], Any]],
        controller: Union[Any, Callable[[Any], Any], None] = None,
        *,
        log_every: int = 50,
        prog_bar: bool = False,
    ) -> None:
        if estimator is None:
            raise ValueError("GradGeomCallback: estimator is required (an estimator or a factory of one)")
        if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 1:
            raise ValueError(f"GradGeomCallback: log_every must be an int >= 1, got {log_every!r}")
        self._estimator_spec = estimator
        self._controller_spec = controller
        self.estimator: Optional[Any] = None if _is_factory(estimator) else estimator
        self.controller: Optional[Any] = None
        if controller is not None and not _is_factory(controller):
            self.controller = controller
        self.log_every = log_every
        self.prog_bar = prog_bar
        self.last_decision = None
        self._pending_state: Optional[dict] = None

    def _build(self, pl_module: Any) -> None:
        if self.estimator is None:
            self.estimator = self._estimator_spec(pl_module)
        if self.controller is None and self._controller_spec is not None:
            self.controller = self._controller_spec(self.estimator)
        if self._pending_state is not None:
            restore_state(self._pending_state, self.estimator, self.controller)
            self._pending_state = None

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._build(pl_module)
        self.estimator.attach()
        if self.controller is not None and trainer.optimizers:
            self.controller.bind_optimizer(trainer.optimizers[0])

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if getattr(self.estimator, "_optimizer", None) is None:
            self.estimator.step()
        step = trainer.global_step + 1
        if self.controller is not None:
            self.controller.bind_optimizer(optimizer)
            decision = self.controller.update(step)
            self.controller.apply(decision)
            self.last_decision = decision
            if decision.action is Action.STOP:
                trainer.should_stop = True
        if step % self.log_every == 0:
            metrics = dict(self.estimator.metrics())
            if self.controller is not None:
                metrics.update(self.controller.metrics())
            metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
            pl_module.log_dict(metrics, on_step=True, on_epoch=False, prog_bar=self.prog_bar)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if self.estimator is not None:
            self.estimator.remove()
        if self.controller is not None:
            self.controller.close()

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        """Estimator and controller state (tensors included), saved in the Lightning checkpoint."""
        if self.estimator is None:
            return dict(self._pending_state or {})
        return collect_state(self.estimator, self.controller)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore now if built, else at ``on_fit_start`` (Lightning restores callbacks before it)."""
        if not state_dict:
            return
        if self.estimator is None:
            self._pending_state = dict(state_dict)
        else:
            restore_state(state_dict, self.estimator, self.controller)


def _is_factory(obj: Any) -> bool:
    return callable(obj) and not hasattr(obj, "state_dict")
