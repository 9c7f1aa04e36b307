"""System-pressure PAUSE with the machine faked at the provider boundary; the real providers."""

from __future__ import annotations

import math

import pytest
import torch

from gradgeom import Action, PauseController, PausePolicy
from gradgeom.system_signals import (CombinedProvider, HostMemoryProvider, NVMLProvider, SystemSignals,
                                     default_system_provider, thermal_state)
from controller_fakes import FakeClock, FakeMachine, FakeSleep, ScriptedEstimator

POL = dict(warmup_steps=0, max_temperature=85.0, temperature_exit=78.0, min_idle_seconds=20.0,
           cooldown_seconds=60.0, evaluation_interval=10.0, max_host_memory_fraction=0.95, host_memory_exit=0.9)


def make(machine, sleep=True, apply=True, **kw):
    est = ScriptedEstimator()
    clock = FakeClock()
    sl = FakeSleep(clock) if sleep else None
    ctrl = PauseController(est, policy=PausePolicy(**{**POL, **kw}), system=machine, clock=clock, sleep=sl,
                           apply=apply)
    return est, ctrl, clock, sl


def test_system_is_read_at_most_every_evaluation_interval():
    m = FakeMachine()
    est, ctrl, clock, _ = make(m)
    for _ in range(5):
        ctrl.update()
    assert m.reads == 1
    clock.now += 9.9
    ctrl.update()
    assert m.reads == 1
    clock.now += 0.1
    ctrl.update()
    assert m.reads == 2


def test_hot_gpu_pauses_until_cooled_and_min_idle_passed():
    m = FakeMachine(temperature=91.0)
    cools = iter([88.0, 80.0, 77.0, 70.0, 70.0, 70.0])
    m.on_read = lambda mm: setattr(mm, "temperature", next(cools)) if mm.reads > 1 else None
    est, ctrl, clock, sl = make(m)
    d = ctrl.update(step=12)
    assert d.action is Action.PAUSE and d.pause_seconds == 60.0
    assert "GPU temperature 91 °C above max_temperature 85 °C" in d.reason
    assert d.event == "enter:pause:gpu_temperature"
    # readings after each 10 s slice: 88 (hot), 80 (between: still paused), 77 (cooled, 30 s >= 20 s idle)
    assert sl.calls == [10.0, 10.0, 10.0]
    assert ctrl.total_pause_seconds == 30.0
    assert ctrl.update().action is Action.CONTINUE


def test_pause_respects_min_idle_and_is_bounded_by_cooldown():
    m = FakeMachine(temperature=90.0)
    m.on_read = lambda mm: setattr(mm, "temperature", 60.0) if mm.reads > 1 else None
    est, ctrl, clock, sl = make(m, min_idle_seconds=25.0, evaluation_interval=10.0)
    ctrl.update()
    assert sl.calls == [10.0, 10.0, 10.0]  # cooled at once, but 25 s of idle are required
    m2 = FakeMachine(temperature=95.0)
    est, ctrl, clock, sl = make(m2, cooldown_seconds=35.0)
    d = ctrl.update()
    assert d.event == "enter:pause:gpu_temperature"
    assert sl.calls == [10.0, 10.0, 10.0, 5.0]  # never cooled: one pause is at most cooldown_seconds
    d2 = ctrl.update()
    assert d2.action is Action.PAUSE and d2.event is None  # still hot: pause again
    assert m2.reads == (1 + 4) * 2  # one read to decide, one per 10 s slice, twice


def test_thermal_state_host_memory_and_unavailable_signals():
    m = FakeMachine(temperature=None, thermal_state=2, host_memory=None)
    est, ctrl, clock, sl = make(m, sleep=False)
    d = ctrl.update()
    assert d.action is Action.PAUSE and "thermal state serious (2) above max_thermal_state 1" in d.reason
    m = FakeMachine(temperature=None, thermal_state=None, host_memory=0.97)
    est, ctrl, clock, sl = make(m, sleep=False)
    d = ctrl.update()
    assert d.action is Action.PAUSE and "host memory in use 0.97 above max_host_memory_fraction 0.95" in d.reason
    assert math.isnan(d.signals["gpu_temperature"])
    m = FakeMachine(temperature=None, thermal_state=None, host_memory=None)
    est, ctrl, clock, sl = make(m, sleep=False)
    assert ctrl.update().action is Action.CONTINUE
    m = FakeMachine(temperature=99.0)
    est, ctrl, clock, sl = make(m, sleep=False, max_temperature=None)
    assert ctrl.update().action is Action.CONTINUE


def test_nonfinite_outranks_pause_and_pause_outranks_low_snr():
    m = FakeMachine(temperature=99.0)
    est, ctrl, clock, sl = make(m, sleep=False, apply=False, patience=1, snr_enter=0.1, snr_exit=0.2)
    est.set(0.01, nonfinite=1)
    assert ctrl.update().action is Action.SKIP_STEP
    est.set(0.01)
    d = ctrl.update()
    assert d.action is Action.PAUSE and d.lr_scale == 0.5  # the low-SNR state still moved the scale
    assert "GPU temperature 99" in d.reason and "LR scale -> 0.5" in d.reason


def test_user_signal_pause_skip_and_stop():
    value = {"v": 0.0}
    for action in ("pause", "skip_step", "stop"):
        est = ScriptedEstimator()
        ctrl = PauseController(est, policy=PausePolicy(**POL, user_signal_enter=5.0, user_signal_exit=2.0,
                                                       user_signal_action=action),
                               system=FakeMachine(), user_signal=lambda: value["v"], sleep=None)
        value["v"] = 1.0
        assert ctrl.update().action is Action.CONTINUE
        value["v"] = 7.0
        d = ctrl.update()
        assert d.action is Action(action) and "user signal 7 above user_signal_enter 5" in d.reason
        value["v"] = 3.0
        assert ctrl.update().action is Action(action)  # hysteresis: 3 > exit 2
        value["v"] = 2.0
        assert ctrl.update().action is Action.CONTINUE


def test_thermal_state_mapping():
    assert thermal_state(None, None, None) is None
    assert thermal_state(70.0, 90.0, 0) == 0
    assert thermal_state(86.0, 90.0, 0) == 1
    assert thermal_state(70.0, 90.0, 0x20) == 2
    assert thermal_state(70.0, 90.0, 0x40 | 0x20) == 3
    assert thermal_state(None, None, 0x80) == 3
    assert thermal_state(None, None, 0) == 0


def test_real_host_memory_provider_and_combination():
    pytest.importorskip("psutil")
    frac = HostMemoryProvider().read().host_memory_fraction
    assert 0.0 < frac < 1.0
    merged = CombinedProvider([FakeMachine(temperature=50.0, host_memory=None), HostMemoryProvider()]).read()
    assert merged.gpu_temperature == 50.0 and merged.host_memory_fraction == pytest.approx(frac, abs=0.2)
    assert isinstance(default_system_provider().read(), SystemSignals)


def test_nvml_provider_degrades_to_unavailable_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: see test_real_nvml_reading")
    prov = NVMLProvider()
    if prov.available:
        pytest.skip("NVML initialised on a machine where torch sees no CUDA device")
    assert prov.unavailable_reason
    assert prov.read() == SystemSignals()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_real_nvml_reading():
    pytest.importorskip("pynvml")
    prov = NVMLProvider()
    assert prov.available, prov.unavailable_reason
    s = prov.read()
    assert 5.0 < s.gpu_temperature < 120.0
    assert 0.0 < s.gpu_memory_fraction <= 1.0
    assert s.thermal_state in (0, 1, 2, 3)
    est = ScriptedEstimator()
    ctrl = PauseController(est, policy=PausePolicy(warmup_steps=0), sleep=None)
    d = ctrl.update()
    assert d.signals["gpu_temperature"] == pytest.approx(s.gpu_temperature, abs=15.0)
