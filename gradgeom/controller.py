"""PauseController: turns gradient-quality and machine-health signals into training actions.

Once per optimizer step (after the backward(s), before ``optimizer.step()``)::

    decision = controller.update(step)      # reads estimator.quality(), system signals
    controller.apply(decision)               # or PauseController(..., apply=True)
    optimizer.step()

Rules, in priority order: STOP (high-SNR plateau, opt-in) > SKIP_STEP (non-finite gradients) >
PAUSE (GPU temperature / thermal state / GPU or host memory / user signal) > the low-SNR response
(SCALE_LR down with geometric recovery, ACCUMULATE toward the noise-scale batch, or SKIP_STEP) >
CONTINUE. Gradient rules wait ``warmup_steps`` and ``patience`` and use separate enter/exit
thresholds plus a minimum dwell (:class:`~gradgeom.policy.PausePolicy`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Mapping, Optional, Union

import torch

from gradgeom.audit_log import AuditLog, json_number
from gradgeom.gradient_signals import gradient_signals
from gradgeom.hysteresis import Hysteresis
from gradgeom.optim_actions import GradientStash, LRScaleHooks, drop_gradients, unwrap_optimizer
from gradgeom.policy import Action, PausePolicy
from gradgeom.system_signals import THERMAL_STATES, SystemSignalProvider, SystemSignals, default_system_provider

__all__ = ["Decision", "PauseController", "gradient_signals"]

_STATE_VERSION = 1
_PRESSURE_RULES = (
    # name, signal field, policy enter field, policy exit field, unit
    ("gpu_temperature", "gpu_temperature", "max_temperature", "temperature_exit", " °C"),
    ("thermal_state", "thermal_state", "max_thermal_state", "max_thermal_state", ""),
    ("gpu_memory", "gpu_memory_fraction", "max_gpu_memory_fraction", "gpu_memory_exit", ""),
    ("host_memory", "host_memory_fraction", "max_host_memory_fraction", "host_memory_exit", ""),
)


@dataclass(frozen=True)
class Decision:
    """What the controller asks for at one optimizer step.

    Attributes:
        step: the step passed to :meth:`PauseController.update`.
        action: the headline :class:`~gradgeom.policy.Action`.
        lr_scale: multiplier on the scheduler's learning rate in effect from this step (1.0 = none).
        accumulate: optimizer steps whose gradients form one update, in effect from this step (1 = none).
        pause_seconds: planned pause length (PAUSE only, else 0).
        reason: a sentence naming the signal and its value ("" for a plain CONTINUE).
        signals: the numbers the decision used (NaN where a signal was not available).
        event: a state transition that happened at this step ("enter:low_snr", "exit:low_snr",
            "enter:pause", ...), or None.
        index: the controller's update count when it decided (``apply`` is idempotent per index).
    """

    step: int
    action: Action
    lr_scale: float = 1.0
    accumulate: int = 1
    pause_seconds: float = 0.0
    reason: str = ""
    signals: Mapping[str, float] = field(default_factory=dict)
    event: Optional[str] = None
    index: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (non-finite numbers become None)."""
        return {
            "step": self.step,
            "action": self.action.value,
            "lr_scale": self.lr_scale,
            "accumulate": self.accumulate,
            "pause_seconds": self.pause_seconds,
            "reason": self.reason,
            "event": self.event,
            "signals": {k: json_number(v) for k, v in self.signals.items()},
        }


class PauseController:
    """Turns an estimator's statistics and machine-health readings into :class:`Decision`s.

    Args:
        estimator: anything with ``quality() -> dict[str, LayerGradientQuality]``
            (a :class:`gradgeom.GradientSmoothnessEstimator`).
        optimizer: the optimizer whose LR is scaled / steps skipped (wrappers from accelerate or
            Lightning are unwrapped). May be bound later with :meth:`bind_optimizer`.
        policy: thresholds and responses (default :class:`PausePolicy()`).
        apply: call :meth:`apply` inside :meth:`update` before returning the decision.
        audit_log: path (appended to), text stream, or None: every non-CONTINUE decision and every
            state transition is written as one JSON line.
        sleep: how PAUSE waits (default ``time.sleep``); None never sleeps (the caller handles PAUSE).
        system: machine-health provider (``read() -> SystemSignals``); default NVML (when a CUDA
            device is visible) + psutil, each degrading to "not available".
        user_signal: optional callable ``() -> float`` (higher = worse), thresholds in the policy.
        clock: monotonic clock in seconds (tests pass a fake).
        broadcast: under ``torch.distributed`` (initialised, world size > 1) every rank adopts rank
            0's decision (one small ``broadcast_object_list`` per update), so all ranks scale,
            skip, accumulate, pause and stop together; only rank 0 writes the audit log. Each
            rank's estimator sees its local gradients, which differ between ranks.
    """

    def __init__(
        self,
        estimator: Any,
        *,
        optimizer: Optional[Any] = None,
        policy: Optional[PausePolicy] = None,
        apply: bool = False,
        audit_log: Union[str, Path, IO[str], None] = None,
        sleep: Optional[Callable[[float], None]] = time.sleep,
        system: Optional[SystemSignalProvider] = None,
        user_signal: Optional[Callable[[], float]] = None,
        clock: Callable[[], float] = time.monotonic,
        broadcast: bool = True,
    ) -> None:
        if not callable(getattr(estimator, "quality", None)):
            raise TypeError(f"PauseController: estimator must have a quality() method, got {type(estimator).__name__}")
        if policy is None:
            policy = PausePolicy()
        if not isinstance(policy, PausePolicy):
            raise TypeError(f"PauseController: policy must be a PausePolicy, got {type(policy).__name__}")
        if user_signal is not None and not callable(user_signal):
            raise TypeError("PauseController: user_signal must be a callable returning a float")
        if user_signal is not None and policy.user_signal_enter is None:
            raise ValueError("PauseController: user_signal given but PausePolicy.user_signal_enter/exit are not set")
        self.estimator = estimator
        self.policy = policy
        self.apply_decisions = bool(apply)
        self.sleep = sleep
        self.system = system if system is not None else default_system_provider()
        self.user_signal = user_signal
        self.clock = clock
        self.broadcast = bool(broadcast)
        self._audit = AuditLog(audit_log)

        p = policy
        self._low = Hysteresis(p.snr_enter, p.snr_exit, direction="below", patience=p.patience, min_dwell=p.min_dwell_steps)
        self._pressure: dict[str, Hysteresis] = {}
        for name, _, enter_field, exit_field, _ in _PRESSURE_RULES:
            enter = getattr(p, enter_field)
            if enter is not None:
                self._pressure[name] = Hysteresis(enter, getattr(p, exit_field), direction="above")
        self._user: Optional[Hysteresis] = None
        if p.user_signal_enter is not None:
            self._user = Hysteresis(p.user_signal_enter, p.user_signal_exit, direction="above")

        self._t = 0
        self.lr_scale = 1.0
        self.accumulate = 1
        self._below_count = 0
        self._skip_streak = 0
        self._plateau_count = 0
        self._last_read: Optional[float] = None
        self._last_gradient_signals: Optional[dict[str, float]] = None
        self._system_signals = SystemSignals()
        self._user_value = math.nan
        self._last_applied = 0
        self.total_pause_seconds = 0.0
        self._stash = GradientStash()
        self._optimizer: Optional[torch.optim.Optimizer] = None
        self._lr_hooks: Optional[LRScaleHooks] = None
        if optimizer is not None:
            self.bind_optimizer(optimizer)

    # ------------------------------------------------------------------ optimizer
    @property
    def optimizer(self) -> Optional[torch.optim.Optimizer]:
        """The (unwrapped) optimizer the controller acts on, if bound."""
        return self._optimizer

    def bind_optimizer(self, optimizer: Any) -> None:
        """Act on ``optimizer`` (rebinding moves the LR hooks to the new one)."""
        inner = unwrap_optimizer(optimizer)
        if inner is self._optimizer:
            return
        if self._lr_hooks is not None:
            self._lr_hooks.remove()
        self._optimizer = inner
        self._lr_hooks = LRScaleHooks(inner)
        self._lr_hooks.set_scale(self.lr_scale)

    def close(self) -> None:
        """Remove the optimizer hooks and close an audit file the controller opened."""
        if self._lr_hooks is not None:
            self._lr_hooks.remove()
            self._lr_hooks = None
        self._optimizer = None
        self._audit.close()

    # ------------------------------------------------------------------ deciding
    def update(self, step: Optional[int] = None) -> Decision:
        """Read the signals for one optimizer step and decide. Call once per optimizer step,
        after the backward(s) and the estimator's ``step()``, before ``optimizer.step()``.

        Reading ``estimator.quality()`` synchronises with the GPU. It is read only on steps the
        estimator computed: with ``GradientSmoothnessEstimator(every=N)`` the controller
        synchronises once per N steps and keeps its last readings in between.
        """
        self._t += 1
        t = self._t
        step = t if step is None else int(step)
        p = self.policy
        fresh = self._estimator_fresh()
        if fresh or self._last_gradient_signals is None:
            self._last_gradient_signals = gradient_signals(self.estimator.quality())
        signals = dict(self._last_gradient_signals)
        snr = self._pick_snr(signals)
        signals["snr"] = snr
        events: list[str] = []
        reasons: list[str] = []

        pressure_reason = self._check_system(events)
        signals.update(self._system_dict())
        user_action = self._check_user(events)

        nonfinite = fresh and signals["nonfinite"] > 0
        snr_action, snr_reason = Action.CONTINUE, ""
        stop_reason = ""
        if not fresh:
            if self.lr_scale != 1.0 and not self._low.active:
                snr_action, snr_reason = self._recover()
        elif not nonfinite:
            if t > p.warmup_steps:
                snr_action, snr_reason = self._snr_rule(snr, t, events)
                stop_reason = self._plateau_rule(snr, signals["grad_norm"], t)
            elif self.lr_scale != 1.0 and not self._low.active:
                snr_action, snr_reason = self._recover()

        signals["lr_scale"] = self.lr_scale
        signals["accumulate"] = float(self.accumulate)
        pause_seconds = 0.0
        if stop_reason:
            action, reasons = Action.STOP, [stop_reason]
            events.append("stop:plateau")
        elif user_action is Action.STOP:
            action, reasons = Action.STOP, [self._user_reason()]
        elif nonfinite and p.skip_nonfinite:
            action = Action.SKIP_STEP
            reasons = [f"{int(signals['nonfinite'])} non-finite gradient elements; skipping the update"]
        elif pressure_reason or user_action is Action.PAUSE:
            action = Action.PAUSE
            pause_seconds = p.cooldown_seconds
            reasons = [r for r in (pressure_reason, self._user_reason() if user_action is Action.PAUSE else "") if r]
            reasons[-1] += f"; pausing up to {p.cooldown_seconds:g} s, re-checked every {p.evaluation_interval:g} s"
        elif user_action is Action.SKIP_STEP:
            action, reasons = Action.SKIP_STEP, [self._user_reason()]
        else:
            action, reasons = snr_action, [snr_reason] if snr_reason else []
        if action is not snr_action and snr_reason:
            reasons.append(snr_reason)  # e.g. the LR scale moved during a pause: say why
        decision = Decision(
            step=step,
            action=action,
            lr_scale=self.lr_scale,
            accumulate=self.accumulate,
            pause_seconds=pause_seconds,
            reason="; ".join(reasons),
            signals=signals,
            event=",".join(events) or None,
            index=t,
        )
        decision, is_writer = self._agree(decision)
        if is_writer and (decision.action is not Action.CONTINUE or decision.event):
            self._audit.write(decision.to_dict())
        if self.apply_decisions:
            self.apply(decision)
        return decision

    def _agree(self, decision: Decision) -> tuple[Decision, bool]:
        """Rank 0's decision on every rank (see ``broadcast``); returns (decision, writes audit)."""
        dist = torch.distributed
        if not (self.broadcast and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return decision, True
        box = [decision]
        dist.broadcast_object_list(box, src=0)
        agreed = box[0]
        self.lr_scale = agreed.lr_scale
        self.accumulate = agreed.accumulate
        return dataclasses.replace(agreed, index=decision.index), dist.get_rank() == 0

    def _estimator_fresh(self) -> bool:
        """False when the estimator skipped this step (``every=N``): its numbers are the last
        computed step's, so gradient rules must not count them again."""
        every = getattr(self.estimator, "every", 1)
        count = getattr(self.estimator, "_step_count", None)
        if not isinstance(every, int) or every <= 1 or not isinstance(count, int) or count < 1:
            return True
        return (count - 1) % every == 0

    def _pick_snr(self, signals: Mapping[str, float]) -> float:
        which = self.policy.snr_signal
        if which == "global":
            return signals["snr_global"]
        if which == "min":
            return signals["snr_min"]
        key = f"snr/{which}"
        if key not in signals:
            groups = sorted(k[4:] for k in signals if k.startswith("snr/"))
            if groups:
                raise ValueError(f"PausePolicy.snr_signal={which!r} names no estimator group; groups are {groups}")
            return math.nan
        return signals[key]

    def _snr_rule(self, snr: float, t: int, events: list[str]) -> tuple[Action, str]:
        p = self.policy
        transition = self._low.update(snr, t)
        response = p.low_snr_response
        if transition == "enter":
            events.append("enter:low_snr")
            self._below_count = 0
            why = f"SNR {_fmt(snr)} below snr_enter {p.snr_enter:g} for {p.patience} steps"
            if response is Action.SCALE_LR:
                self.lr_scale = max(p.min_lr_scale, self.lr_scale * p.lr_down_factor)
                return Action.SCALE_LR, f"{why}; LR scale -> {_fmt(self.lr_scale)}"
            if response is Action.ACCUMULATE:
                self.accumulate = self._wanted_accumulate(snr)
                return Action.ACCUMULATE, f"{why}; accumulating {self.accumulate} steps per update"
            self._skip_streak = 1
            return Action.SKIP_STEP, f"{why}; idle training (measuring, not updating)"
        if transition == "exit":
            events.append("exit:low_snr")
            why = f"SNR {_fmt(snr)} back above snr_exit {p.snr_exit:g}"
            if response is Action.SCALE_LR:
                if self.lr_scale == 1.0:
                    return Action.CONTINUE, why
                action, reason = self._recover()
                return action, f"{why}; {reason}"
            if response is Action.ACCUMULATE:
                self.accumulate = 1
                return Action.ACCUMULATE, f"{why}; back to 1 step per update"
            self._skip_streak = 0
            return Action.CONTINUE, f"{why}; updating again"
        if self._low.active:
            if response is Action.SCALE_LR:
                self._below_count = self._below_count + 1 if snr < p.snr_enter else 0
                if self._below_count >= p.patience and self.lr_scale > p.min_lr_scale:
                    self._below_count = 0
                    self.lr_scale = max(p.min_lr_scale, self.lr_scale * p.lr_down_factor)
                    return Action.SCALE_LR, (
                        f"SNR {_fmt(snr)} still below snr_enter {p.snr_enter:g}; LR scale -> {_fmt(self.lr_scale)}")
                return Action.CONTINUE, ""
            if response is Action.ACCUMULATE:
                wanted = self._wanted_accumulate(snr)
                if wanted > self.accumulate:
                    self.accumulate = wanted
                    return Action.ACCUMULATE, f"SNR {_fmt(snr)}; accumulating {wanted} steps per update"
                return Action.CONTINUE, ""
            if self._skip_streak >= p.max_consecutive_skips:
                self._skip_streak = 0
                return Action.CONTINUE, (
                    f"SNR {_fmt(snr)} still low after {p.max_consecutive_skips} skipped steps; one update goes through")
            self._skip_streak += 1
            return Action.SKIP_STEP, f"SNR {_fmt(snr)} below snr_exit {p.snr_exit:g}; idle training"
        if self.lr_scale != 1.0:
            return self._recover()
        return Action.CONTINUE, ""

    def _recover(self) -> tuple[Action, str]:
        scale = self.lr_scale * self.policy.lr_recovery_factor
        self.lr_scale = 1.0 if scale >= 1.0 else scale
        return Action.SCALE_LR, f"recovering: LR scale -> {_fmt(self.lr_scale)}"

    def _wanted_accumulate(self, snr: float) -> int:
        if not snr > 0:
            return self.policy.max_accumulate
        return max(1, min(self.policy.max_accumulate, math.ceil(self.policy.snr_exit / snr)))

    def _plateau_rule(self, snr: float, grad_norm: float, t: int) -> str:
        p = self.policy
        if not p.stop_on_plateau:
            return ""
        if snr > p.plateau_snr and grad_norm < p.plateau_grad_norm:
            self._plateau_count += 1
        else:
            self._plateau_count = 0
        if self._plateau_count >= p.plateau_patience:
            return (f"SNR {_fmt(snr)} above plateau_snr {p.plateau_snr:g} with gradient norm {_fmt(grad_norm)} "
                    f"below plateau_grad_norm {p.plateau_grad_norm:g} for {p.plateau_patience} steps; stopping")
        return ""

    # ------------------------------------------------------------------ system pressure
    def _pressure_active(self) -> bool:
        return any(h.active for h in self._pressure.values())

    def _check_system(self, events: list[str]) -> str:
        """Re-read the machine when due (or while under pressure); returns the pressure reason or ""."""
        if not self._pressure:
            return ""
        now = self.clock()
        due = self._last_read is None or now - self._last_read >= self.policy.evaluation_interval
        if due or self._pressure_active():
            self._read_system(now, events)
        return self._pressure_reason()

    def _read_system(self, now: float, events: list[str]) -> None:
        self._system_signals = self.system.read()
        self._last_read = now
        for name, attr, _, _, _ in _PRESSURE_RULES:
            trigger = self._pressure.get(name)
            if trigger is None:
                continue
            value = getattr(self._system_signals, attr)
            transition = trigger.update(None if value is None else float(value), self._t)
            if transition:
                events.append(f"{transition}:pause:{name}")

    def _pressure_reason(self) -> str:
        parts = []
        for name, attr, enter_field, _, unit in _PRESSURE_RULES:
            trigger = self._pressure.get(name)
            if trigger is None or not trigger.active:
                continue
            value = getattr(self._system_signals, attr)
            limit = getattr(self.policy, enter_field)
            if name == "thermal_state":
                parts.append(f"GPU thermal state {THERMAL_STATES[int(value)] if value is not None else '?'} "
                             f"({value}) above max_thermal_state {limit}")
            else:
                label = {"gpu_temperature": "GPU temperature", "gpu_memory": "GPU memory in use",
                         "host_memory": "host memory in use"}[name]
                parts.append(f"{label} {_fmt(value)}{unit} above {enter_field} {limit:g}{unit}")
        return "; ".join(parts)

    def _system_dict(self) -> dict[str, float]:
        s = self._system_signals
        return {
            "gpu_temperature": _num(s.gpu_temperature),
            "thermal_state": _num(s.thermal_state),
            "gpu_memory_fraction": _num(s.gpu_memory_fraction),
            "host_memory_fraction": _num(s.host_memory_fraction),
            "user_signal": self._user_value,
        }

    def _check_user(self, events: list[str]) -> Optional[Action]:
        if self._user is None or self.user_signal is None:
            return None
        self._user_value = float(self.user_signal())
        transition = self._user.update(self._user_value, self._t)
        if transition:
            events.append(f"{transition}:user_signal")
        return self.policy.user_signal_action if self._user.active else None

    def _user_reason(self) -> str:
        return f"user signal {_fmt(self._user_value)} above user_signal_enter {self.policy.user_signal_enter:g}"

    # ------------------------------------------------------------------ acting
    def apply(self, decision: Decision) -> None:
        """Carry out ``decision`` on the bound optimizer. Applying the same decision again (or an
        older one) changes nothing.

        - ``lr_scale`` is set on the optimizer's step hooks (the scheduler's LR × scale inside
          ``optimizer.step()``; see :mod:`gradgeom.optim_actions`).
        - SKIP_STEP sets every parameter's ``.grad`` to None, so ``optimizer.step()`` is a no-op.
        - ``accumulate > 1`` stashes gradients and lets every ``accumulate``-th step update with
          their mean; going back to 1 flushes a partial stash into the current step.
        - PAUSE calls ``sleep`` in slices of ``evaluation_interval``, re-reading the system after
          each; it ends after ``cooldown_seconds``, or earlier once every pressure signal is back
          at or below its exit threshold and ``min_idle_seconds`` have passed.
        - STOP and CONTINUE change nothing here (the loop or integration stops on STOP).
        """
        if decision.index <= self._last_applied:
            return
        self._last_applied = decision.index
        needs_optimizer = (decision.lr_scale != 1.0 or decision.accumulate > 1 or self._stash.count > 0
                           or decision.action is Action.SKIP_STEP)
        if needs_optimizer and self._optimizer is None:
            raise RuntimeError(
                f"PauseController.apply: decision {decision.action.value} at step {decision.step} needs an optimizer; "
                "pass optimizer= or call bind_optimizer()")
        if self._lr_hooks is not None:
            self._lr_hooks.set_scale(decision.lr_scale)
        if decision.action is Action.SKIP_STEP:
            drop_gradients(self._optimizer)
        elif decision.accumulate > 1:
            self._stash.push(self._optimizer, decision.accumulate)
        elif self._stash.count > 0:
            self._stash.flush(self._optimizer)
        if decision.action is Action.PAUSE and self.sleep is not None:
            self._pause(decision)

    def _pause(self, decision: Decision) -> None:
        p = self.policy
        slept = 0.0
        while slept < p.cooldown_seconds:
            chunk = min(p.evaluation_interval, p.cooldown_seconds - slept)
            self.sleep(chunk)
            slept += chunk
            events: list[str] = []
            self._read_system(self.clock(), events)
            user_active = False
            if self._user is not None and self.user_signal is not None:
                self._check_user(events)
                user_active = self._user.active and p.user_signal_action is Action.PAUSE
            if slept >= p.min_idle_seconds and not self._pressure_active() and not user_active:
                break
        self.total_pause_seconds += slept
        still = self._pressure_reason()
        self._audit.write({
            "step": decision.step,
            "action": "pause_end",
            "reason": f"paused {slept:g} s; " + (f"pressure persists ({still})" if still else "pressure cleared"),
            "signals": {k: json_number(v) for k, v in self._system_dict().items()},
        })

    # ------------------------------------------------------------------ reporting and state
    def metrics(self) -> dict[str, float]:
        """Flat logging dict: ``gradgeom/controller/{lr_scale, accumulate, paused_seconds, low_snr}``."""
        return {
            "gradgeom/controller/lr_scale": self.lr_scale,
            "gradgeom/controller/accumulate": float(self.accumulate),
            "gradgeom/controller/paused_seconds": self.total_pause_seconds,
            "gradgeom/controller/low_snr": float(self._low.active),
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: counters, LR scale, accumulation (including the
        gradient stash, as tensors), and every trigger's hysteresis state."""
        return {
            "version": _STATE_VERSION,
            "t": self._t,
            "lr_scale": self.lr_scale,
            "accumulate": self.accumulate,
            "below_count": self._below_count,
            "skip_streak": self._skip_streak,
            "plateau_count": self._plateau_count,
            "last_applied": self._last_applied,
            "total_pause_seconds": self.total_pause_seconds,
            "low": self._low.state_dict(),
            "pressure": {k: h.state_dict() for k, h in self._pressure.items()},
            "user": None if self._user is None else self._user.state_dict(),
            "user_value": json_number(self._user_value),
            "system_signals": dataclasses.asdict(self._system_signals),
            "stash": self._stash.state_dict(),
            "policy": self.policy.to_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (the policy in use is kept; triggers it
        disables are ignored)."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"PauseController.load_state_dict: unsupported state version {state.get('version')!r}")
        self._t = int(state["t"])
        self.lr_scale = float(state["lr_scale"])
        self.accumulate = int(state["accumulate"])
        self._below_count = int(state["below_count"])
        self._skip_streak = int(state["skip_streak"])
        self._plateau_count = int(state["plateau_count"])
        self._last_applied = int(state["last_applied"])
        self.total_pause_seconds = float(state["total_pause_seconds"])
        self._low.load_state_dict(state["low"])
        for name, trigger_state in state["pressure"].items():
            if name in self._pressure:
                self._pressure[name].load_state_dict(trigger_state)
        if self._user is not None and state.get("user") is not None:
            self._user.load_state_dict(state["user"])
        self._user_value = math.nan if state.get("user_value") is None else float(state["user_value"])
        self._system_signals = SystemSignals(**state["system_signals"])
        self._last_read = None
        self._stash.load_state_dict(state["stash"])
        if self._lr_hooks is not None:
            self._lr_hooks.set_scale(self.lr_scale)


def _num(value: Optional[float]) -> float:
    return math.nan if value is None else float(value)


def _fmt(value: Optional[float]) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.4g}"
