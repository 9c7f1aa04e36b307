"""PauseController.apply on real torch optimizers and LR schedulers."""

from __future__ import annotations

import pytest
import torch

from gradgeom import Action, PauseController, PausePolicy
from gradgeom.controller import Decision
from controller_fakes import FakeMachine, ScriptedEstimator

BASE = dict(warmup_steps=0, patience=2, min_dwell_steps=3, snr_enter=0.1, snr_exit=0.3,
            lr_down_factor=0.5, min_lr_scale=0.125, lr_recovery_factor=1.5)

SCHEDULERS = {
    "lambda": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.37 * s)),
    "exponential": lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.93),
    "cosine": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=17),
    "step": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.7),
    "none": None,
}


def _setup(sched_name, with_controller, policy=None):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5))
    q = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.AdamW([{"params": [p], "lr": 0.1}, {"params": [q], "lr": 0.03}])
    make = SCHEDULERS[sched_name]
    sched = make(opt) if make else None
    est = ScriptedEstimator()
    ctrl = None
    if with_controller:
        ctrl = PauseController(est, optimizer=opt, policy=policy or PausePolicy(**BASE), apply=True,
                               system=FakeMachine(), sleep=None)
    used = []
    opt.register_step_pre_hook(lambda o, a, k: used.append([g["lr"] for g in o.param_groups]))
    return p, q, opt, sched, est, ctrl, used


@pytest.mark.parametrize("sched_name", list(SCHEDULERS))
def test_lr_is_scheduler_value_times_scale_and_exactly_restored(sched_name):
    snrs = [1.0, 0.05, 0.05, 0.05, 0.05, 0.05, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]
    *_, opt_ref, sched_ref, _, _, used_ref = _setup(sched_name, False)
    p, q, opt, sched, est, ctrl, used = _setup(sched_name, True)
    scales = []
    for snr in snrs:
        for o in (opt, opt_ref):
            for t in o.param_groups:
                for x in t["params"]:
                    x.grad = torch.full_like(x, 0.1)
        est.set(snr)
        scales.append(ctrl.update().lr_scale)
        opt.step()
        opt_ref.step()
        for s in (sched, sched_ref):
            if s is not None:
                s.step()
        # outside step() the groups hold exactly the scheduler's value
        assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in opt_ref.param_groups]
    assert min(scales) < 1.0 and scales[-1] == 1.0
    for lr_used, lr_ref, scale in zip(used, used_ref, scales):
        assert lr_used == [lr * scale for lr in lr_ref]  # bit-exact product, exact when scale == 1
    if sched is not None:
        assert sched.get_last_lr() == sched_ref.get_last_lr()


def test_apply_is_idempotent_and_ignores_older_decisions():
    p, q, opt, sched, est, ctrl, used = _setup("none", True,
                                              PausePolicy(**{**BASE, "low_snr_response": "accumulate"}))
    ctrl.apply_decisions = False
    for snr in (0.05, 0.05):
        est.set(snr)
        d = ctrl.update()
    assert d.action is Action.ACCUMULATE and d.accumulate == 6
    p.grad = torch.ones_like(p)
    q.grad = torch.ones_like(q)
    ctrl.apply(d)
    ctrl.apply(d)
    assert ctrl._stash.count == 1 and p.grad is None  # stashed once, step dropped
    older = Decision(step=0, action=Action.SKIP_STEP, index=1)
    p.grad = torch.ones_like(p)
    ctrl.apply(older)
    assert p.grad is not None


def test_apply_without_optimizer_raises_when_it_needs_one():
    est = ScriptedEstimator()
    ctrl = PauseController(est, policy=PausePolicy(**BASE), system=FakeMachine(), sleep=None)
    ctrl.apply(ctrl.update())  # CONTINUE at scale 1 needs nothing
    est.set(1.0, nonfinite=2)
    with pytest.raises(RuntimeError, match="needs an optimizer"):
        ctrl.apply(ctrl.update())


def test_skip_step_leaves_parameters_and_optimizer_state_untouched():
    p, q, opt, sched, est, ctrl, used = _setup("none", True)
    p.grad = torch.ones_like(p)
    q.grad = torch.ones_like(q)
    ctrl.update()
    opt.step()
    before = [x.detach().clone() for x in (p, q)]
    state_before = {k: v.clone() for k, v in opt.state[p].items()}
    p.grad = torch.full_like(p, float("nan"))
    q.grad = torch.ones_like(q)
    est.set(1.0, nonfinite=5)
    d = ctrl.update()
    assert d.action is Action.SKIP_STEP and p.grad is None and q.grad is None
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, (p, q)))
    assert all(torch.equal(state_before[k], opt.state[p][k]) for k in state_before)


def test_accumulate_updates_with_the_mean_of_k_steps():
    torch.manual_seed(1)
    p = torch.nn.Parameter(torch.zeros(4))
    opt = torch.optim.SGD([p], lr=1.0)
    est = ScriptedEstimator()
    pol = PausePolicy(**{**BASE, "low_snr_response": "accumulate", "patience": 1, "min_dwell_steps": 0,
                         "snr_enter": 0.2, "snr_exit": 0.6})
    ctrl = PauseController(est, optimizer=opt, policy=pol, apply=True, system=FakeMachine(), sleep=None)
    grads = [torch.randn(4) for _ in range(7)]
    snrs = [0.2, 0.15, 0.15, 0.15, 0.15, 0.15, 0.7]  # k = ceil(0.6/0.15) = 4 from step 2
    trace = []
    for g, snr in zip(grads, snrs):
        p.grad = g.clone()
        est.set(snr)
        d = ctrl.update()
        opt.step()
        opt.zero_grad(set_to_none=True)
        trace.append((d.accumulate, p.detach().clone()))
    assert [k for k, _ in trace] == [1, 4, 4, 4, 4, 4, 1]
    assert torch.equal(trace[0][1], -grads[0])
    for i in (1, 2, 3):
        assert torch.equal(trace[i][1], trace[0][1])  # stashing: no update
    expected = trace[0][1] - torch.stack(grads[1:5]).sum(0) / 4
    assert torch.allclose(trace[4][1], expected, rtol=0, atol=1e-6)
    # step 6 stashed (1 of 4); step 7 leaves the state and flushes: mean of the two
    assert torch.allclose(trace[6][1], expected - (grads[5] + grads[6]) / 2, rtol=0, atol=1e-6)
    assert ctrl._stash.count == 0


def test_rebinding_optimizer_moves_hooks():
    p = torch.nn.Parameter(torch.zeros(2))
    o1 = torch.optim.SGD([p], lr=1.0)
    o2 = torch.optim.SGD([p], lr=1.0)
    est = ScriptedEstimator()
    ctrl = PauseController(est, optimizer=o1, policy=PausePolicy(**{**BASE, "patience": 1}), apply=True,
                           system=FakeMachine(), sleep=None)
    est.set(0.01)
    assert ctrl.update().lr_scale == 0.5
    ctrl.bind_optimizer(o2)
    seen = []
    o1.register_step_pre_hook(lambda o, a, k: seen.append(("o1", o.param_groups[0]["lr"])))
    o2.register_step_pre_hook(lambda o, a, k: seen.append(("o2", o.param_groups[0]["lr"])))
    p.grad = torch.ones(2)
    o1.step()
    o2.step()
    assert seen == [("o1", 1.0), ("o2", 0.5)]
    ctrl.close()
    o2.step()
    assert seen[-1] == ("o2", 1.0)


def test_decision_taken_inside_a_step_closure_applies_to_that_step():
    # Lightning's order: optimizer.step(closure) runs the pre-hook, then the closure
    # (forward, backward, on_before_optimizer_step), then the update.
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([p], lr=1.0)
    est = ScriptedEstimator()
    ctrl = PauseController(est, optimizer=opt, policy=PausePolicy(**{**BASE, "patience": 1}), apply=True,
                           system=FakeMachine(), sleep=None)

    def closure(snr):
        def run():
            p.grad = torch.ones(3)
            est.set(snr)
            ctrl.update()
            return torch.tensor(0.0)
        return run

    opt.step(closure(0.01))
    assert torch.equal(p.detach(), torch.full((3,), -0.5))
    assert opt.param_groups[0]["lr"] == 1.0
    opt.step(closure(0.2))  # between the thresholds: the scale stays 0.5
    assert torch.equal(p.detach(), torch.full((3,), -1.0))
    assert opt.param_groups[0]["lr"] == 1.0
