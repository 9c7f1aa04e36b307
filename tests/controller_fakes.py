"""Fakes at the controller's boundaries: a scripted estimator, a scripted machine, a fake clock."""

from __future__ import annotations

import math
from typing import Optional

from gradgeom.quality import LayerGradientQuality
from gradgeom.system_signals import SystemSignals


def quality(snr: float, variance: float = 1.0, grad_norm: float = 1.0, nonfinite: int = 0,
            noise_scale: Optional[float] = None) -> LayerGradientQuality:
    return LayerGradientQuality(variance=variance, snr=snr, mean_norm=math.sqrt(max(snr * variance, 0.0)),
                                sample_count=10, noise_scale=noise_scale, grad_norm=grad_norm,
                                nonfinite=nonfinite, definition="temporal")


class ScriptedEstimator:
    """quality() returns whatever the test set last; counts calls."""

    def __init__(self) -> None:
        self.groups: dict[str, LayerGradientQuality] = {"layers.0": quality(1.0)}
        self.calls = 0

    def set(self, snr: float = 1.0, **kw) -> None:
        self.groups = {"layers.0": quality(snr, **kw)}

    def quality(self) -> dict[str, LayerGradientQuality]:
        self.calls += 1
        return dict(self.groups)


class FakeMachine:
    """A provider that reports the temperature / memory the test sets; counts reads."""

    def __init__(self, temperature: Optional[float] = 60.0, host_memory: Optional[float] = 0.5,
                 thermal_state: Optional[int] = 0, gpu_memory: Optional[float] = None) -> None:
        self.temperature = temperature
        self.host_memory = host_memory
        self.thermal_state = thermal_state
        self.gpu_memory = gpu_memory
        self.reads = 0
        self.on_read = None

    def read(self) -> SystemSignals:
        self.reads += 1
        if self.on_read is not None:
            self.on_read(self)
        return SystemSignals(gpu_temperature=self.temperature, thermal_state=self.thermal_state,
                             gpu_memory_fraction=self.gpu_memory, host_memory_fraction=self.host_memory)


class QuietMachine:
    """A provider that reports no machine signal at all (nothing to pause for)."""

    def read(self) -> SystemSignals:
        return SystemSignals()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeSleep:
    """Records sleeps and advances the fake clock."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)
        self.clock.now += seconds
