"""The controller on the real GradientSmoothnessEstimator in a plain training loop (CPU)."""

from __future__ import annotations

import pytest
import torch


from gradgeom import Action, GradientSmoothnessEstimator, PauseController, PausePolicy  # noqa: E402
from controller_fakes import QuietMachine  # noqa: E402


@pytest.mark.parametrize("every", [1, 2])
def test_nonfinite_step_is_skipped_once_and_parameters_are_untouched(every):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    est = GradientSmoothnessEstimator(model, groups="module", every=every)
    ctrl = PauseController(est, optimizer=opt, apply=True, system=QuietMachine(), sleep=None,
                           policy=PausePolicy(warmup_steps=0))
    x, y = torch.randn(16, 5), torch.randn(16, 1)
    bad_step = 5  # an active step for every in (1, 2)
    actions = []
    for step in range(1, 9):
        loss = torch.nn.functional.mse_loss(model(x), y)
        if step == bad_step:
            loss = loss * float("nan")
        loss.backward()
        est.step()
        before = [p.detach().clone() for p in model.parameters()]
        d = ctrl.update(step)
        opt.step()
        opt.zero_grad(set_to_none=True)
        actions.append(d.action)
        if step == bad_step:
            assert "non-finite" in d.reason
            assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert actions == [Action.CONTINUE] * (bad_step - 1) + [Action.SKIP_STEP] + [Action.CONTINUE] * (8 - bad_step)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    q = est.quality()
    assert all(v.nonfinite == 0 for v in q.values())
