"""GradGeomCallback in a real lightning.Trainer on CPU: metrics logged, controller applied, resume."""

from __future__ import annotations

import pytest
import torch

L = pytest.importorskip("lightning")

from lightning.pytorch.loggers import CSVLogger  # noqa: E402

from gradgeom import Action, GradientSmoothnessEstimator, PauseController, PausePolicy  # noqa: E402
from gradgeom.integrations.lightning import GradGeomCallback  # noqa: E402
from controller_fakes import QuietMachine  # noqa: E402


class _Net(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Linear(6, 16), torch.nn.Linear(16, 1)])
        self.lrs = []

    def forward(self, x):
        return self.layers[1](torch.tanh(self.layers[0](x)))

    def training_step(self, batch, _):
        x, y = batch
        return torch.nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.05)
        opt.register_step_post_hook(lambda o, a, k: self.lrs.append(o.param_groups[0]["lr"]))
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _data(batch_size=16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=g)
    y = x[:, :1] + 0.5 * torch.randn(64, 1, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def _callback(policy_kw=None, log_every=2, user_signal=None):
    pol = PausePolicy(**{**dict(warmup_steps=0, patience=1, min_dwell_steps=100, snr_enter=1e6, snr_exit=2e6),
                         **(policy_kw or {})})
    return GradGeomCallback(
        estimator=lambda m: GradientSmoothnessEstimator(m, attach=False),
        controller=lambda est: PauseController(est, policy=pol, system=QuietMachine(), sleep=None,
                                               user_signal=user_signal),
        log_every=log_every,
    )


def _trainer(tmp_path, cb, max_steps, name="run"):
    return L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, callbacks=[cb], logger=CSVLogger(tmp_path, name=name),
                     enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
                     default_root_dir=tmp_path, deterministic=True)


def test_lightning_logs_metrics_and_scales_lr(tmp_path):
    torch.manual_seed(0)
    cb = _callback()
    net = _Net()
    trainer = _trainer(tmp_path, cb, 6)
    trainer.fit(net, _data())
    logged = trainer.logged_metrics
    assert any(k.startswith("gradgeom/snr/layers.") for k in logged), logged
    assert float(logged["gradgeom/controller/lr_scale"]) < 1.0
    assert not cb.estimator.attached
    # This post-hook was registered before the controller's, so it sees the LR the update used:
    # StepLR's value × our scale, where the scale decided in this step's closure applies at once
    # (SNR is defined from the 2nd step; then enter, and halve each step down to the floor).
    scales = [1.0, 0.5, 0.25, 0.125, 0.125, 0.125]
    assert net.lrs == [pytest.approx(0.05 * 0.9 ** i * s, rel=1e-12) for i, s in enumerate(scales)]
    opt = trainer.optimizers[0]
    assert opt.param_groups[0]["lr"] == trainer.lr_scheduler_configs[0].scheduler.get_last_lr()[0]
    metrics_csv = (tmp_path / "run" / "version_0" / "metrics.csv").read_text()
    assert "gradgeom/controller/lr_scale" in metrics_csv.splitlines()[0]


def test_lightning_stop_decision(tmp_path):
    n = {"k": 0}

    def signal():
        n["k"] += 1
        return 10.0 if n["k"] >= 3 else 0.0

    cb = _callback(dict(snr_enter=0.05, snr_exit=0.1, user_signal_enter=5.0, user_signal_exit=1.0,
                        user_signal_action="stop"), user_signal=signal)
    trainer = _trainer(tmp_path, cb, 20)
    trainer.fit(_Net(), _data())
    assert cb.last_decision.action is Action.STOP and trainer.global_step == 3


def test_lightning_checkpoint_resume_matches_an_uninterrupted_run(tmp_path):
    # One batch per epoch, so the data each step sees does not depend on how Lightning positions a
    # plain (non-resumable) dataloader after a restore; what is tested is that *our* state resumes.
    torch.manual_seed(0)
    full = _callback(log_every=1)
    _trainer(tmp_path, full, 6, name="full").fit(_Net(), _data(64))

    torch.manual_seed(0)
    cb = _callback(log_every=1)
    trainer = _trainer(tmp_path, cb, 4, name="a")
    trainer.fit(_Net(), _data(64))
    ckpt = tmp_path / "four.ckpt"
    trainer.save_checkpoint(ckpt)

    torch.manual_seed(1)  # the checkpoint, not the seed, must bring the state back
    cb2 = _callback(log_every=1)
    _trainer(tmp_path, cb2, 6, name="b").fit(_Net(), _data(64), ckpt_path=str(ckpt))
    want, got = full.controller.state_dict(), cb2.controller.state_dict()
    assert got["t"] == want["t"] == 6 and got["lr_scale"] == want["lr_scale"] and got["low"] == want["low"]
    want_est, got_est = full.estimator.state_dict(), cb2.estimator.state_dict()
    assert got_est["step_count"] == want_est["step_count"] == 6
    for k, v in want_est["state"].items():
        assert torch.equal(got_est["state"][k], v), k
