"""state_dict()/load_state_dict(): resuming anywhere gives the same decisions as never stopping."""

from __future__ import annotations

import io
import json

import pytest
import torch

from gradgeom import PauseController, PausePolicy
from controller_fakes import FakeClock, FakeMachine, ScriptedEstimator

SNRS = [1.0, 0.05, 0.05, 0.05, 0.2, 0.5, 0.05, 0.05, 0.05, 0.05, 0.5, 0.5, 0.5, 0.5, 0.5, 0.05, 0.05, 0.05]


def _key(d):
    return (d.step, d.action, d.lr_scale, d.accumulate, d.pause_seconds, d.reason, d.event, d.index)


def _controller(policy, machine=None, est=None, **kw):
    return PauseController(est or ScriptedEstimator(), policy=policy, system=machine or FakeMachine(),
                           sleep=None, clock=FakeClock(), **kw)


@pytest.mark.parametrize("response", ["scale_lr", "accumulate", "skip_step"])
def test_resume_at_every_step_reproduces_decisions(response):
    policy = PausePolicy(warmup_steps=2, patience=2, min_dwell_steps=4, snr_enter=0.1, snr_exit=0.3,
                         low_snr_response=response, lr_recovery_factor=1.5, max_consecutive_skips=3)
    ref = _controller(policy)
    expected = []
    for i, snr in enumerate(SNRS):
        ref.estimator.set(snr)
        expected.append(_key(ref.update(step=100 + i)))
    for cut in range(1, len(SNRS)):
        a = _controller(policy)
        got = []
        for i, snr in enumerate(SNRS[:cut]):
            a.estimator.set(snr)
            got.append(_key(a.update(step=100 + i)))
        state = json.loads(json.dumps(a.state_dict()))  # no tensors without a stash: plain JSON
        b = _controller(policy)
        b.load_state_dict(state)
        for i, snr in enumerate(SNRS[cut:], start=cut):
            b.estimator.set(snr)
            got.append(_key(b.update(step=100 + i)))
        assert got == expected, f"diverged after resuming at {cut}"


def test_resume_mid_pause_keeps_the_pause_state():
    policy = PausePolicy(warmup_steps=0, max_temperature=85.0, temperature_exit=78.0)
    temps = [70.0, 90.0, 86.0, 80.0, 79.0, 75.0, 75.0]

    def run(cut):
        m = FakeMachine()
        c = _controller(policy, machine=m)
        out = []
        for i, temp in enumerate(temps):
            if i == cut:
                state = c.state_dict()
                c = _controller(policy, machine=m)
                c.load_state_dict(state)
            m.temperature = temp
            c.clock.now += 60.0
            out.append((c.update().action.value, c._pressure["gpu_temperature"].active))
        return out

    expected = run(None)
    assert [a for a, _ in expected] == ["continue", "pause", "pause", "pause", "pause", "continue", "continue"]
    for cut in range(1, len(temps)):
        assert run(cut) == expected


def test_resume_mid_accumulation_restores_the_gradient_stash():
    policy = PausePolicy(warmup_steps=0, patience=1, min_dwell_steps=0, snr_enter=0.2, snr_exit=0.6,
                         low_snr_response="accumulate")
    torch.manual_seed(3)
    grads = [torch.randn(3) for _ in range(8)]
    snrs = [0.15] * 7 + [0.9]

    def run(cut):
        p = torch.nn.Parameter(torch.zeros(3))
        opt = torch.optim.SGD([p], lr=0.5, momentum=0.9)
        c = _controller(policy, optimizer=opt, apply=True)
        for i, (g, snr) in enumerate(zip(grads, snrs)):
            if i == cut:
                buf = io.BytesIO()
                torch.save({"ctrl": c.state_dict(), "opt": opt.state_dict(), "p": p.detach().clone()}, buf)
                buf.seek(0)
                saved = torch.load(buf)
                p = torch.nn.Parameter(saved["p"])
                opt = torch.optim.SGD([p], lr=0.5, momentum=0.9)
                opt.load_state_dict(saved["opt"])
                c = _controller(policy, optimizer=opt, apply=True)
                c.load_state_dict(saved["ctrl"])
            p.grad = g.clone()
            c.estimator.set(snr)
            c.update()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return p.detach()

    expected = run(None)
    for cut in range(1, 8):
        assert torch.equal(run(cut), expected), cut


def test_load_state_dict_rejects_unknown_versions():
    c = _controller(PausePolicy())
    state = c.state_dict()
    state["version"] = 99
    with pytest.raises(ValueError, match="version"):
        c.load_state_dict(state)


def test_resume_restores_lr_scale_on_the_optimizer_hooks():
    policy = PausePolicy(warmup_steps=0, patience=1)
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=1.0)
    a = _controller(policy, optimizer=opt)
    a.estimator.set(0.001)
    assert a.update().lr_scale == 0.5
    b = _controller(policy, optimizer=torch.optim.SGD([p], lr=1.0))
    seen = []
    b.optimizer.register_step_pre_hook(lambda o, *_: seen.append(o.param_groups[0]["lr"]))
    b.load_state_dict(a.state_dict())
    p.grad = torch.ones(2)
    b.optimizer.step()
    assert seen == [0.5]
