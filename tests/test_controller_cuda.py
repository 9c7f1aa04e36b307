"""On a GPU: applying decisions (LR hooks, skip, gradient stash) never synchronises with the host."""

from __future__ import annotations

import pytest
import torch

from gradgeom import Action, PauseController, PausePolicy
from gradgeom.controller import Decision
from controller_fakes import FakeMachine, ScriptedEstimator

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("fused", [False, True])
def test_apply_and_step_do_not_sync(fused):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(1 << 16, device="cuda"))
    opt = torch.optim.AdamW([p], lr=1e-3, fused=fused)
    ctrl = PauseController(ScriptedEstimator(), optimizer=opt, policy=PausePolicy(warmup_steps=0), system=FakeMachine(),
                           sleep=None)
    decisions = [
        Decision(step=1, action=Action.SCALE_LR, lr_scale=0.5, index=1),
        Decision(step=2, action=Action.ACCUMULATE, lr_scale=0.5, accumulate=3, index=2),
        Decision(step=3, action=Action.CONTINUE, lr_scale=0.5, accumulate=3, index=3),
        Decision(step=4, action=Action.CONTINUE, lr_scale=0.5, accumulate=1, index=4),  # flush
        Decision(step=5, action=Action.SKIP_STEP, lr_scale=1.0, index=5),
        Decision(step=6, action=Action.CONTINUE, lr_scale=1.0, index=6),
    ]
    grads = [torch.randn_like(p) for _ in decisions]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for g, d in zip(grads, decisions):
            p.grad = g.clone()
            ctrl.apply(d)
            opt.step()
            opt.zero_grad(set_to_none=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(p).all()
    assert opt.param_groups[0]["lr"] == 1e-3


def test_real_estimator_controller_loop_on_gpu():
    import gradgeom

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    est = gradgeom.GradientSmoothnessEstimator(model, groups="module")
    ctrl = PauseController(est, optimizer=opt, apply=True, sleep=None, policy=PausePolicy(warmup_steps=0))
    x, y = torch.randn(32, 64, device="cuda"), torch.randn(32, 1, device="cuda")
    for step in range(1, 6):
        loss = torch.nn.functional.mse_loss(model(x), y)
        if step == 3:
            loss = loss * float("inf")
        loss.backward()
        est.step()
        d = ctrl.update(step)  # the one synchronising read per step
        opt.step()
        opt.zero_grad(set_to_none=True)
        assert (d.action is Action.SKIP_STEP) == (step == 3), d
    assert all(torch.isfinite(q).all() for q in model.parameters())
    assert d.signals["gpu_temperature"] == d.signals["gpu_temperature"]  # NVML read on a GPU machine
