"""PauseController rules on scripted signal sequences (the estimator is faked at quality())."""

from __future__ import annotations

import io
import json
import math

import pytest

from gradgeom import Action, PauseController, PausePolicy
from gradgeom.controller import gradient_signals
from controller_fakes import FakeClock, FakeMachine, ScriptedEstimator, quality

A = Action


def make(sleep=None, machine=None, **policy_kw):
    est = ScriptedEstimator()
    clock = FakeClock()
    ctrl = PauseController(est, policy=PausePolicy(**policy_kw), system=machine or FakeMachine(),
                           sleep=sleep, clock=clock)
    return est, ctrl


def drive(est, ctrl, snrs, **kw):
    out = []
    for snr in snrs:
        est.set(snr, **kw)
        out.append(ctrl.update())
    return out


BASE = dict(warmup_steps=0, patience=3, min_dwell_steps=5, snr_enter=0.1, snr_exit=0.3,
            lr_down_factor=0.5, min_lr_scale=0.125, lr_recovery_factor=2.0)


# ---------------------------------------------------------------- policy validation
@pytest.mark.parametrize("kw, match", [
    (dict(snr_enter=-0.1), "snr_enter"),
    (dict(snr_enter=0.2, snr_exit=0.1), "snr_exit"),
    (dict(snr_enter=0.1, snr_exit=0.1), "snr_exit"),
    (dict(max_temperature=80.0, temperature_exit=85.0), "temperature_exit"),
    (dict(temperature_exit=-1.0), "temperature_exit"),
    (dict(max_host_memory_fraction=0.8, host_memory_exit=0.9), "host_memory_exit"),
    (dict(max_host_memory_fraction=1.5), "max_host_memory_fraction"),
    (dict(max_gpu_memory_fraction=-0.5), "max_gpu_memory_fraction"),
    (dict(warmup_steps=-1), "warmup_steps"),
    (dict(patience=0), "patience"),
    (dict(min_dwell_steps=-3), "min_dwell_steps"),
    (dict(lr_down_factor=1.5), "lr_down_factor"),
    (dict(min_lr_scale=0.0), "min_lr_scale"),
    (dict(min_lr_scale=2.0), "min_lr_scale"),
    (dict(lr_recovery_factor=1.0), "lr_recovery_factor"),
    (dict(low_snr_response="pause"), "low_snr_response"),
    (dict(low_snr_response="nonsense"), "low_snr_response"),
    (dict(cooldown_seconds=-5.0), "cooldown_seconds"),
    (dict(min_idle_seconds=-1.0), "min_idle_seconds"),
    (dict(min_idle_seconds=300.0, cooldown_seconds=60.0), "min_idle_seconds"),
    (dict(evaluation_interval=0.0), "evaluation_interval"),
    (dict(max_thermal_state=3), "max_thermal_state"),
    (dict(user_signal_enter=1.0), "user_signal"),
    (dict(user_signal_enter=1.0, user_signal_exit=2.0), "user_signal_exit"),
    (dict(snr_enter=math.nan), "snr_enter"),
    (dict(plateau_grad_norm=-1e-3), "plateau_grad_norm"),
])
def test_bad_policy_raises_value_error(kw, match):
    with pytest.raises(ValueError, match=match):
        PausePolicy(**kw)


def test_policy_type_errors_and_roundtrip():
    with pytest.raises(TypeError, match="patience"):
        PausePolicy(patience=2.5)
    with pytest.raises(TypeError, match="estimator"):
        PauseController(object())
    with pytest.raises(ValueError, match="user_signal"):
        PauseController(ScriptedEstimator(), user_signal=lambda: 1.0, system=FakeMachine())
    p = PausePolicy(low_snr_response="accumulate", snr_enter=0.01, snr_exit=0.02)
    assert p.low_snr_response is A.ACCUMULATE
    assert PausePolicy.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    with pytest.raises(ValueError, match="unknown"):
        PausePolicy.from_dict({"bogus": 1})


# ---------------------------------------------------------------- signals
def test_gradient_signals_pool_like_the_concatenated_gradient():
    q = {"a": quality(2.0, variance=1.0, grad_norm=3.0), "b": quality(0.5, variance=3.0, grad_norm=4.0),
         "c": quality(math.nan, variance=math.nan, grad_norm=math.nan)}
    s = gradient_signals(q)
    # ‖μ‖² = 2·1 + 0.5·3 = 3.5, tr Σ = 4
    assert s["snr_global"] == pytest.approx(3.5 / 4.0)
    assert s["snr_min"] == 0.5
    assert s["grad_norm"] == pytest.approx(5.0)
    assert s["nonfinite"] == 0.0
    assert math.isnan(s["noise_scale"])
    assert s["snr/a"] == 2.0 and math.isnan(s["snr/c"])
    assert math.isnan(gradient_signals({})["snr_global"])


# ---------------------------------------------------------------- warm-up, patience, hysteresis, dwell
def test_enter_exit_dwell_and_recovery_at_exact_steps():
    est, ctrl = make(**BASE)
    snrs = [1.0, 0.05, 0.05, 0.05, 0.2, 0.5, 0.05, 0.05, 0.05, 0.5, 0.5, 0.5, 0.05, 0.05, 0.05]
    d = drive(est, ctrl, snrs)
    actions = [x.action for x in d]
    C, S = A.CONTINUE, A.SCALE_LR
    assert actions == [C, C, C, S, C, C, C, C, S, S, S, C, C, C, S]
    assert [x.lr_scale for x in d] == [1, 1, 1, 0.5, 0.5, 0.5, 0.5, 0.5, 0.25, 0.5, 1.0, 1.0, 1.0, 1.0, 0.5]
    assert d[3].event == "enter:low_snr" and d[9].event == "exit:low_snr" and d[14].event == "enter:low_snr"
    assert "SNR 0.05 below snr_enter 0.1" in d[3].reason
    assert "back above snr_exit 0.3" in d[9].reason
    assert d[10].lr_scale == 1.0  # exactly 1.0 again, not 0.9999...


def test_signal_between_thresholds_neither_enters_nor_exits():
    est, ctrl = make(**BASE)
    d = drive(est, ctrl, [0.2] * 10 + [0.05] * 3 + [0.2] * 20 + [0.31])
    assert all(x.action is A.CONTINUE for x in d[:12])
    assert d[12].event == "enter:low_snr"
    assert all(x.event is None for x in d[13:-1])  # 0.2 is above enter but below exit: stays in
    assert d[-1].event == "exit:low_snr"


def test_warmup_suppresses_snr_rules_but_not_patience_after():
    est, ctrl = make(**{**BASE, "warmup_steps": 5, "patience": 2})
    d = drive(est, ctrl, [0.01] * 8)
    assert [x.action for x in d] == [A.CONTINUE] * 6 + [A.SCALE_LR, A.CONTINUE]
    assert d[6].index == 7


def test_nan_snr_changes_nothing():
    est, ctrl = make(**BASE)
    d = drive(est, ctrl, [0.05, 0.05, math.nan, math.nan, 0.05])
    assert [x.action for x in d] == [A.CONTINUE] * 4 + [A.SCALE_LR]


def test_lr_scale_floor():
    est, ctrl = make(**BASE)
    d = drive(est, ctrl, [0.01] * 40)
    assert min(x.lr_scale for x in d) == 0.125
    assert sum(x.action is A.SCALE_LR for x in d) == 3  # 0.5, 0.25, 0.125


def test_snr_signal_min_and_named_group():
    est, ctrl = make(**{**BASE, "snr_signal": "min", "patience": 1})
    est.groups = {"a": quality(5.0), "b": quality(0.01)}
    assert ctrl.update().action is A.SCALE_LR
    est, ctrl = make(**{**BASE, "snr_signal": "a", "patience": 1})
    est.groups = {"a": quality(5.0), "b": quality(0.01)}
    assert ctrl.update().action is A.CONTINUE
    est, ctrl = make(**{**BASE, "snr_signal": "nope"})
    est.groups = {"a": quality(5.0)}
    with pytest.raises(ValueError, match="names no estimator group"):
        ctrl.update()


# ---------------------------------------------------------------- other responses
def test_accumulate_response_counts():
    est, ctrl = make(**{**BASE, "low_snr_response": "accumulate", "max_accumulate": 8})
    d = drive(est, ctrl, [0.04] * 3 + [0.02] * 6 + [0.001] + [0.5] * 2)
    assert d[2].action is A.ACCUMULATE and d[2].accumulate == math.ceil(0.3 / 0.04)  # 8
    d2 = drive(*make(**{**BASE, "low_snr_response": "accumulate"}), [0.09] * 3 + [0.06] + [0.5] * 6)
    assert d2[2].accumulate == 4 and d2[3].action is A.ACCUMULATE and d2[3].accumulate == 5
    assert d2[7].event == "exit:low_snr" and d2[7].action is A.ACCUMULATE and d2[7].accumulate == 1
    assert d[9].accumulate == 8  # capped at max_accumulate


def test_skip_response_and_max_consecutive_skips():
    est, ctrl = make(**{**BASE, "low_snr_response": "skip_step", "max_consecutive_skips": 4})
    d = drive(est, ctrl, [0.01] * 3 + [0.01] * 5 + [0.5] * 2)
    acts = [x.action for x in d]
    assert acts[:2] == [A.CONTINUE] * 2
    assert acts[2:6] == [A.SKIP_STEP] * 4
    assert acts[6] is A.CONTINUE and "4 skipped steps" in d[6].reason
    assert acts[7] is A.SKIP_STEP
    assert d[8].event == "exit:low_snr" and acts[8] is A.CONTINUE
    assert all(x.lr_scale == 1.0 for x in d)


def test_nonfinite_gradients_skip_even_during_warmup_and_do_not_count_for_patience():
    est, ctrl = make(**{**BASE, "warmup_steps": 3})
    est.set(1.0, nonfinite=7)
    d = ctrl.update()
    assert d.action is A.SKIP_STEP and "7 non-finite" in d.reason
    est2, ctrl2 = make(**BASE)
    seq = [(0.05, 0), (0.05, 0), (0.05, 3), (0.05, 0)]
    acts = []
    for snr, nf in seq:
        est2.set(snr, nonfinite=nf)
        acts.append(ctrl2.update().action)
    assert acts == [A.CONTINUE, A.CONTINUE, A.SKIP_STEP, A.SCALE_LR]


def test_plateau_stop_only_when_enabled():
    kw = dict(BASE, plateau_snr=10.0, plateau_grad_norm=1e-3, plateau_patience=3)
    est, ctrl = make(**kw)
    d = drive(est, ctrl, [50.0] * 6, grad_norm=1e-5)
    assert all(x.action is A.CONTINUE for x in d)
    est, ctrl = make(**kw, stop_on_plateau=True)
    d = drive(est, ctrl, [50.0, 50.0, 5.0, 50.0, 50.0, 50.0], grad_norm=1e-5)
    assert [x.action for x in d] == [A.CONTINUE] * 5 + [A.STOP]
    assert "plateau_snr" in d[-1].reason
    est, ctrl = make(**kw, stop_on_plateau=True)
    assert all(x.action is A.CONTINUE for x in drive(est, ctrl, [50.0] * 5, grad_norm=1.0))


# ---------------------------------------------------------------- audit log
def test_audit_log_has_one_json_line_per_non_continue_decision(tmp_path):
    path = tmp_path / "sub" / "audit.jsonl"
    est = ScriptedEstimator()
    ctrl = PauseController(est, policy=PausePolicy(**BASE), system=FakeMachine(), audit_log=path, sleep=None)
    d = drive(est, ctrl, [1.0, 0.05, 0.05, 0.05, 0.05, math.nan, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5])
    ctrl.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    logged = [x for x in d if x.action is not A.CONTINUE or x.event]
    assert len(lines) == len(logged) == 2
    for rec, dec in zip(lines, logged):
        assert rec["step"] == dec.step and rec["action"] == dec.action.value and rec["reason"] == dec.reason
        assert isinstance(rec["time"], float) and rec["signals"]["lr_scale"] == dec.lr_scale
    assert lines[0]["event"] == "enter:low_snr"
    buf = io.StringIO()
    est2 = ScriptedEstimator()
    ctrl2 = PauseController(est2, policy=PausePolicy(**BASE), system=FakeMachine(), audit_log=buf, sleep=None)
    est2.set(1.0, nonfinite=1)
    ctrl2.update(step=41)
    rec = json.loads(buf.getvalue())
    assert rec["step"] == 41 and rec["action"] == "skip_step"
    assert rec["signals"]["gpu_memory_fraction"] is None  # NaN is written as null, valid JSON


def test_steps_the_estimator_skipped_are_not_counted_again():
    # An estimator with every=3 computes on steps 1, 4, 7, ...; in between quality() repeats the
    # last computed numbers, which must neither advance patience nor re-trigger a skip.
    est, ctrl = make(**{**BASE, "patience": 2})
    est.every = 3
    acts = []
    for i in range(1, 8):
        est._step_count = i  # what the estimator's step() leaves after step i
        est.set(0.01, nonfinite=1 if i == 1 else 0)
        acts.append(ctrl.update().action)
    assert acts == [A.SKIP_STEP, A.CONTINUE, A.CONTINUE, A.CONTINUE, A.CONTINUE, A.CONTINUE, A.SCALE_LR]
    assert est.calls == 3  # quality() (a device sync) read only on the computed steps 1, 4, 7


def test_microbatch_quality_uses_the_per_step_batch_snr():
    per_example = quality(0.01, variance=2.0)
    per_example.definition = "microbatch"
    per_example.extra = {"batch_snr": 0.32}
    s = gradient_signals({"a": per_example, "b": quality(0.1, variance=2.0)})
    assert s["snr/a"] == 0.32 and s["snr_global"] == pytest.approx((0.32 + 0.1) / 2)
    per_example.extra = {"batch_snr": -0.5}  # the raw estimate can dip below 0; SNR is clipped like snr
    assert gradient_signals({"a": per_example})["snr/a"] == 0.0


def test_audit_log_target_must_be_a_path_or_stream():
    with pytest.raises(TypeError, match="audit_log"):
        PauseController(ScriptedEstimator(), audit_log=123, system=FakeMachine())
