"""What the :class:`~gradgeom.controller.PauseController` may do, and when: actions and the policy.

Every threshold of :class:`PausePolicy` is documented with its default and the reason for it.
A policy is validated when it is built: a negative threshold, an exit threshold on the wrong side
of its enter threshold, or an unknown response raises :class:`ValueError` naming the field.
"""

from __future__ import annotations

import enum
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Optional, Union

__all__ = ["Action", "PausePolicy", "SNR_RESPONSES"]


class Action(str, enum.Enum):
    """What the controller asks the training loop to do at one optimizer step.

    The enum is a ``str`` so decisions serialise to JSON as plain words.
    """

    CONTINUE = "continue"
    """Nothing to change (the current ``lr_scale`` / ``accumulate`` stay in effect)."""
    SCALE_LR = "scale_lr"
    """The learning-rate multiplier changes at this step (down on low SNR, back up while recovering)."""
    ACCUMULATE = "accumulate"
    """Grow the effective batch: accumulate ``accumulate`` steps' gradients before one update."""
    SKIP_STEP = "skip_step"
    """Do not update the parameters at this step (non-finite gradients, or idle training)."""
    PAUSE = "pause"
    """System pressure (temperature, memory, user signal): sleep ``pause_seconds`` before going on."""
    STOP = "stop"
    """End training (only when ``PausePolicy.stop_on_plateau`` is enabled)."""


#: The responses ``PausePolicy.low_snr_response`` accepts.
SNR_RESPONSES = (Action.SCALE_LR, Action.ACCUMULATE, Action.SKIP_STEP)

_SNR_SIGNALS = ("global", "min")


@dataclass
class PausePolicy:
    """Thresholds and responses of the pause controller.

    SNR below means the SNR of the per-step gradient, ‖μ‖²/tr Σ (DESIGN.md §2): the temporal SNR
    ``LayerGradientQuality.snr`` reports in ``sketch``/``exact`` mode, and the batch SNR
    (``extra["batch_snr"]``) in ``microbatch`` mode. The *global* SNR pools groups the way the
    concatenated gradient would: Σ_g snr_g·var_g / Σ_g var_g (both ‖μ‖² and tr Σ are additive
    over disjoint groups).

    Attributes (default, and why):
        warmup_steps: 50. No SNR-based action before this many ``update`` calls: the estimator's
            EMA window (β = 0.99, ~100 steps) is too short to trust earlier. Non-finite
            gradients and system pressure are acted on during warm-up too: neither is a
            statistic that needs a window.
        patience: 5. Consecutive steps a gradient signal must stay past its enter threshold before
            the controller acts; one noisy reading never triggers an action.
        min_dwell_steps: 20. Steps a gradient-triggered state lasts at least before it may be left,
            so the controller does not flap between states.
        snr_signal: "global". Which SNR drives the low-SNR rule: "global" (pooled over groups),
            "min" (the worst group), or a group name as the estimator reports it.
        snr_enter: 0.05. Enter the low-SNR state below this SNR. At per-step SNR s the batch is
            1/s times smaller than the noise scale B_simple (McCandlish et al. 2018); below 0.05
            each update is over 95 % noise and the optimal learning rate is ~s times the
            noise-free one, so lowering it costs little progress and avoids drifting on noise.
        snr_exit: 0.1. Leave the low-SNR state only when SNR is back above this (twice the enter
            threshold: hysteresis against a signal that hovers at the threshold). Must be > snr_enter.
        low_snr_response: Action.SCALE_LR. What to do in the low-SNR state: SCALE_LR (multiply
            the learning rate down, recover geometrically), ACCUMULATE (grow the effective batch
            toward the noise scale), or SKIP_STEP (idle training: keep measuring, stop updating).
        lr_down_factor: 0.5. On entering the low-SNR state the LR multiplier is multiplied by this,
            and again after every further ``patience`` steps still below ``snr_enter``. Halving is
            the usual reduce-on-plateau step: large enough to matter, small enough to undo.
        min_lr_scale: 0.125. Floor of the multiplier (three halvings): the controller damps noise,
            it never silently freezes training.
        lr_recovery_factor: 1.25. After the low-SNR state is left, the multiplier grows by this
            factor per step until it is exactly 1.0 again (0.125 → 1 in 10 steps): geometric
            recovery undoes a geometric cut at the same relative pace, with no LR jump.
        max_accumulate: 8. Upper bound of the ACCUMULATE response's micro-batch count. The count
            wanted is ceil(snr_exit / snr) (accumulating k steps divides the noise variance by k);
            8 bounds the memory of the gradient stash and the wait between updates.
        max_consecutive_skips: 200. The SKIP_STEP response lets training update again after this
            many consecutive skipped steps (with a reason in the audit log), so a permanently
            noisy task cannot stall a run forever.
        skip_nonfinite: True. A step whose gradients hold Inf/NaN (any group's ``nonfinite`` > 0)
            is skipped at once (like GradScaler); the estimator keeps such steps out of its EMA.
        max_temperature: 85.0 (°C, GPU). PAUSE when the GPU is hotter. Datacenter GPUs start
            their own slowdown around 87–92 °C (NVML's SLOWDOWN threshold); pausing a little
            below keeps clocks steady. None disables the rule.
        temperature_exit: 78.0 (°C). A temperature pause may end once the GPU is at or below this.
        max_thermal_state: 1. PAUSE when the thermal state exceeds this: 0 nominal, 1 fair (within
            5 °C of the slowdown threshold), 2 serious (software thermal slowdown active),
            3 critical (hardware slowdown). 1 tolerates a warm GPU and pauses once it throttles.
            None disables the rule.
        max_gpu_memory_fraction: None (off). PAUSE when NVML's used/total memory of the GPU
            exceeds this. Off by default because PyTorch's caching allocator keeps memory it
            freed, so a busy training process normally reads 90 %+.
        gpu_memory_exit: 0.90. A GPU-memory pause may end at or below this fraction.
        max_host_memory_fraction: 0.95. PAUSE when host memory in use (psutil) exceeds this: at
            95 % the kernel is about to swap or kill, and pausing lets data workers drain.
            None disables the rule.
        host_memory_exit: 0.90. A host-memory pause may end at or below this fraction.
        user_signal_enter / user_signal_exit: None. Thresholds for the optional user callable
            signal (higher = worse): enter when it exceeds ``user_signal_enter``, leave at or
            below ``user_signal_exit`` (<= enter). None disables the rule.
        user_signal_action: Action.PAUSE. What the user signal triggers: PAUSE, SKIP_STEP or STOP.
        min_idle_seconds: 30.0. A system pause lasts at least this long even if the pressure clears
            sooner: a GPU that has just cooled below the exit temperature heats up again within
            seconds of load.
        cooldown_seconds: 120.0. Length of one PAUSE. If pressure persists at its end, the next
            ``update`` pauses again; a pause never blocks unbounded.
        evaluation_interval: 10.0 (s). System signals are read at most this often while training
            (NVML and psutil cost tens of µs each; temperatures change over seconds), and every
            this many seconds during a pause.
        stop_on_plateau: False. STOP is opt-in: the controller never ends a run unless asked.
        plateau_snr: 10.0. STOP needs SNR above this (the gradient is almost pure signal) ...
        plateau_grad_norm: 1e-4. ... and a global gradient norm below this (updates are tiny) ...
        plateau_patience: 50. ... for this many consecutive steps.
    """

    warmup_steps: int = 50
    patience: int = 5
    min_dwell_steps: int = 20
    snr_signal: str = "global"
    snr_enter: float = 0.05
    snr_exit: float = 0.1
    low_snr_response: Union[Action, str] = Action.SCALE_LR
    lr_down_factor: float = 0.5
    min_lr_scale: float = 0.125
    lr_recovery_factor: float = 1.25
    max_accumulate: int = 8
    max_consecutive_skips: int = 200
    skip_nonfinite: bool = True
    max_temperature: Optional[float] = 85.0
    temperature_exit: float = 78.0
    max_thermal_state: Optional[int] = 1
    max_gpu_memory_fraction: Optional[float] = None
    gpu_memory_exit: float = 0.90
    max_host_memory_fraction: Optional[float] = 0.95
    host_memory_exit: float = 0.90
    user_signal_enter: Optional[float] = None
    user_signal_exit: Optional[float] = None
    user_signal_action: Union[Action, str] = Action.PAUSE
    min_idle_seconds: float = 30.0
    cooldown_seconds: float = 120.0
    evaluation_interval: float = 10.0
    stop_on_plateau: bool = False
    plateau_snr: float = 10.0
    plateau_grad_norm: float = 1e-4
    plateau_patience: int = 50

    def __post_init__(self) -> None:
        self.low_snr_response = _as_action("low_snr_response", self.low_snr_response, SNR_RESPONSES)
        self.user_signal_action = _as_action(
            "user_signal_action", self.user_signal_action, (Action.PAUSE, Action.SKIP_STEP, Action.STOP)
        )
        for name in ("warmup_steps", "patience", "min_dwell_steps", "max_accumulate",
                     "max_consecutive_skips", "plateau_patience"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"PausePolicy.{name} must be an int, got {type(value).__name__}")
            if value < 0:
                raise ValueError(f"PausePolicy.{name} must be >= 0, got {value}")
        for name in ("patience", "max_accumulate", "plateau_patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"PausePolicy.{name} must be >= 1, got {getattr(self, name)}")
        if not isinstance(self.snr_signal, str) or not self.snr_signal:
            raise ValueError(f"PausePolicy.snr_signal must be 'global', 'min' or a group name, got {self.snr_signal!r}")

        _positive("snr_enter", self.snr_enter)
        _positive("snr_exit", self.snr_exit)
        if not self.snr_exit > self.snr_enter:
            raise ValueError(
                f"PausePolicy: snr_exit ({self.snr_exit}) must be greater than snr_enter ({self.snr_enter}): "
                "the low-SNR state is entered below snr_enter and left above snr_exit"
            )
        _positive("lr_down_factor", self.lr_down_factor)
        if not self.lr_down_factor < 1.0:
            raise ValueError(f"PausePolicy.lr_down_factor must be in (0, 1), got {self.lr_down_factor}")
        _positive("min_lr_scale", self.min_lr_scale)
        if self.min_lr_scale > 1.0:
            raise ValueError(f"PausePolicy.min_lr_scale must be in (0, 1], got {self.min_lr_scale}")
        _finite("lr_recovery_factor", self.lr_recovery_factor)
        if not self.lr_recovery_factor > 1.0:
            raise ValueError(f"PausePolicy.lr_recovery_factor must be > 1, got {self.lr_recovery_factor}")

        if self.max_temperature is not None:
            _positive("max_temperature", self.max_temperature)
            _nonneg("temperature_exit", self.temperature_exit)
            _exit_below("temperature_exit", self.temperature_exit, "max_temperature", self.max_temperature)
        if self.max_thermal_state is not None:
            if isinstance(self.max_thermal_state, bool) or self.max_thermal_state not in (0, 1, 2):
                raise ValueError(
                    f"PausePolicy.max_thermal_state must be 0, 1 or 2 (pause above it; 3 is the highest state), "
                    f"got {self.max_thermal_state!r}"
                )
        for enter_name, exit_name in (("max_gpu_memory_fraction", "gpu_memory_exit"),
                                      ("max_host_memory_fraction", "host_memory_exit")):
            enter = getattr(self, enter_name)
            if enter is None:
                continue
            _positive(enter_name, enter)
            if enter > 1.0:
                raise ValueError(f"PausePolicy.{enter_name} is a fraction in (0, 1], got {enter}")
            _nonneg(exit_name, getattr(self, exit_name))
            _exit_below(exit_name, getattr(self, exit_name), enter_name, enter)
        if (self.user_signal_enter is None) != (self.user_signal_exit is None):
            raise ValueError("PausePolicy: set both user_signal_enter and user_signal_exit, or neither")
        if self.user_signal_enter is not None:
            _finite("user_signal_enter", self.user_signal_enter)
            _finite("user_signal_exit", self.user_signal_exit)
            if self.user_signal_exit > self.user_signal_enter:
                raise ValueError(
                    f"PausePolicy: user_signal_exit ({self.user_signal_exit}) must not exceed "
                    f"user_signal_enter ({self.user_signal_enter}): the signal enters above enter, leaves at or below exit"
                )

        _nonneg("min_idle_seconds", self.min_idle_seconds)
        _positive("cooldown_seconds", self.cooldown_seconds)
        _positive("evaluation_interval", self.evaluation_interval)
        if self.min_idle_seconds > self.cooldown_seconds:
            raise ValueError(
                f"PausePolicy: min_idle_seconds ({self.min_idle_seconds}) must not exceed "
                f"cooldown_seconds ({self.cooldown_seconds}), the length of one pause"
            )
        _positive("plateau_snr", self.plateau_snr)
        _positive("plateau_grad_norm", self.plateau_grad_norm)

    def to_dict(self) -> dict[str, Any]:
        """The policy as JSON-safe plain values (actions as their string values)."""
        out = asdict(self)
        out["low_snr_response"] = self.low_snr_response.value
        out["user_signal_action"] = self.user_signal_action.value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PausePolicy":
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"PausePolicy.from_dict: unknown fields {sorted(unknown)}")
        return cls(**data)


def _as_action(name: str, value: Union[Action, str], allowed: tuple) -> Action:
    try:
        action = Action(value)
    except ValueError:
        raise ValueError(
            f"PausePolicy.{name} must be one of {[a.value for a in allowed]}, got {value!r}"
        ) from None
    if action not in allowed:
        raise ValueError(f"PausePolicy.{name} must be one of {[a.value for a in allowed]}, got {action.value!r}")
    return action


def _finite(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"PausePolicy.{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"PausePolicy.{name} must be finite, got {value}")


def _nonneg(name: str, value: float) -> None:
    _finite(name, value)
    if value < 0:
        raise ValueError(f"PausePolicy.{name} must be >= 0, got {value}")


def _positive(name: str, value: float) -> None:
    _finite(name, value)
    if not value > 0:
        raise ValueError(f"PausePolicy.{name} must be > 0, got {value}")


def _exit_below(exit_name: str, exit_value: float, enter_name: str, enter_value: float) -> None:
    if not exit_value < enter_value:
        raise ValueError(
            f"PausePolicy: {exit_name} ({exit_value}) must be below {enter_name} ({enter_value}): "
            "a pause starts above the enter threshold and may end at or below the exit threshold"
        )
