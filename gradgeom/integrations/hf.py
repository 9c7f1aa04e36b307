"""Hugging Face ``transformers.Trainer`` integration.

::

    from gradgeom import GradientSmoothnessEstimator, PauseController
    from gradgeom.integrations.hf import GradGeomCallback

    estimator = GradientSmoothnessEstimator(model, include=r"lora_", attach=False)
    controller = PauseController(estimator)             # optional
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[GradGeomCallback(estimator=estimator, controller=controller)])
    trainer.train()

What the callback does:

- ``on_train_begin``: attaches the estimator, binds the controller to the Trainer's optimizer,
  restores estimator + controller state when resuming from a checkpoint, and moves itself to the
  front of the Trainer's callback list (Trainer puts its ``report_to`` callbacks before user
  callbacks; only a callback that runs before them can add metrics they will see).
- ``on_pre_optimizer_step`` (complete, unscaled, accumulated gradients, before the update):
  ``estimator.step()``, then ``controller.update()`` + ``apply()``; ``STOP`` sets
  ``control.should_training_stop``.
- ``on_log``: merges ``estimator.metrics()`` and ``controller.metrics()`` into the Trainer's logs
  (and its ``log_history``), so TensorBoard / W&B / ... receive them.
- ``on_train_end``: removes the estimator's hooks and the controller's optimizer hooks.
- Checkpoints: the callback is an ``ExportableState``; estimator and controller state ride in
  ``trainer_state.json`` (base64 of ``torch.save``) and come back on
  ``trainer.train(resume_from_checkpoint=...)``.
"""

from __future__ import annotations

import inspect
import math
import warnings
import weakref
from typing import Any, Optional

try:
    from transformers import TrainerCallback
    from transformers.trainer_callback import CallbackHandler, ExportableState
except ImportError as exc:  # pragma: no cover - exercised only without transformers
    raise ImportError("gradgeom.integrations.hf needs transformers: pip install transformers") from exc

from gradgeom.integrations._state import collect_state, decode_state, encode_state, restore_state
from gradgeom.policy import Action

__all__ = ["GradGeomCallback"]

_STATE_ATTRIBUTE = "gradgeom_state"


class GradGeomCallback(TrainerCallback, ExportableState):
    """Gradient statistics (and optionally the pause controller) inside ``transformers.Trainer``.

    Args:
        estimator: a :class:`gradgeom.GradientSmoothnessEstimator` over the Trainer's model. Do not
            give it ``optimizer=``: the callback calls ``estimator.step()`` at
            ``on_pre_optimizer_step`` so the controller sees the current step's gradients.
            ``None`` is only for Trainer's own re-creation of callbacks
            (``restore_callback_states_from_checkpoint=True``): the new instance then takes the
            estimator, controller and settings of the callback it replaces.
        controller: an optional :class:`gradgeom.PauseController` over ``estimator``.
        log_every: read ``estimator.metrics()`` (a device synchronisation) every this many
            optimizer steps and merge the latest reading at each Trainer log; None (default)
            reads once per Trainer log event (every ``logging_steps``).
    """

    _last_configured: "Optional[weakref.ReferenceType[GradGeomCallback]]" = None

    def __init__(self, estimator: Any = None, controller: Any = None, log_every: Optional[int] = None) -> None:
        if estimator is None:
            donor = GradGeomCallback._last_configured() if GradGeomCallback._last_configured else None
            if donor is None:
                raise ValueError("GradGeomCallback: estimator is required (a gradgeom.GradientSmoothnessEstimator)")
            estimator, controller = donor.estimator, donor.controller
            log_every = donor.log_every if log_every is None else log_every
        if not callable(getattr(estimator, "state_dict", None)) or not callable(getattr(estimator, "metrics", None)):
            raise TypeError(f"GradGeomCallback: estimator must be a GradientSmoothnessEstimator, got {type(estimator).__name__}")
        if controller is not None and not callable(getattr(controller, "update", None)):
            raise TypeError(f"GradGeomCallback: controller must be a PauseController, got {type(controller).__name__}")
        if log_every is not None and (isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 1):
            raise ValueError(f"GradGeomCallback: log_every must be None or an int >= 1, got {log_every!r}")
        self.estimator = estimator
        self.controller = controller
        self.log_every = log_every
        self.last_decision = None
        self._latest: dict[str, float] = {}
        self._decisions = 0
        GradGeomCallback._last_configured = weakref.ref(self)

    # ------------------------------------------------------------------ checkpoint state
    def state(self) -> dict:
        """ExportableState: ``{"args": {...}, "attributes": {"gradgeom_state": base64}}``."""
        return {
            "args": {"log_every": self.log_every},
            "attributes": {_STATE_ATTRIBUTE: encode_state(collect_state(self.estimator, self.controller))},
        }

    def _restore_from(self, state: Any) -> None:
        saved = state.stateful_callbacks.get(type(self).__name__) if state.stateful_callbacks else None
        if isinstance(saved, list):
            saved = saved[0] if saved else None
        if not isinstance(saved, dict):
            return
        blob = saved.get("attributes", {}).get(_STATE_ATTRIBUTE)
        if blob:
            restore_state(decode_state(blob), self.estimator, self.controller)

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._move_to_front(inspect.currentframe().f_back)
        if state.global_step > 0:  # resuming: TrainerState came from the checkpoint
            self._restore_from(state)
        self.estimator.attach()
        if self.controller is not None and optimizer is not None:
            self.controller.bind_optimizer(optimizer)
        self._latest = {}
        return control

    def _move_to_front(self, caller_frame) -> None:
        handler = caller_frame.f_locals.get("self") if caller_frame is not None else None
        if not isinstance(handler, CallbackHandler):
            warnings.warn(
                "GradGeomCallback could not reach the Trainer's CallbackHandler; put it first yourself "
                "(trainer.callback_handler.callbacks.insert(0, cb)) so report_to loggers see gradgeom metrics",
                RuntimeWarning, stacklevel=3)
            return
        callbacks = handler.callbacks
        if callbacks and callbacks[0] is not self and any(cb is self for cb in callbacks):
            # Safe inside CallbackHandler.call_event's loop: moving the current element to the
            # front keeps every later element at its index, so the loop goes on with the next one.
            index = next(i for i, cb in enumerate(callbacks) if cb is self)
            callbacks.insert(0, callbacks.pop(index))

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if getattr(self.estimator, "_optimizer", None) is None:
            self.estimator.step()
        step = state.global_step + 1
        if self.controller is not None:
            decision = self.controller.update(step)
            self.controller.apply(decision)
            self.last_decision = decision
            if decision.action is not Action.CONTINUE:
                self._decisions += 1
            if decision.action is Action.STOP:
                control.should_training_stop = True
        if self.log_every is not None and step % self.log_every == 0:
            self._latest = self._read_metrics()
        return control

    def _read_metrics(self) -> dict[str, float]:
        out = dict(self.estimator.metrics())
        if self.controller is not None:
            out.update(self.controller.metrics())
            out["gradgeom/controller/actions"] = float(self._decisions)
        return {k: float(v) for k, v in out.items() if isinstance(v, (int, float)) and math.isfinite(v)}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs:  # training-step logs only, not eval or the final summary
            return control
        metrics = self._latest if self.log_every is not None else self._read_metrics()
        logs.update(metrics)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.estimator.remove()
        if self.controller is not None:
            self.controller.close()
        return control
