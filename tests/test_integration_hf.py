"""GradGeomCallback in a real transformers.Trainer: tiny random Llama + PEFT LoRA, CPU."""

from __future__ import annotations

import glob
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from gradgeom import Action, GradientSmoothnessEstimator, PauseController, PausePolicy  # noqa: E402
from gradgeom.integrations.hf import GradGeomCallback  # noqa: E402
from controller_fakes import QuietMachine  # noqa: E402


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n=64, seq=8, vocab=64):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, vocab, (n, seq), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


def _model():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    base = transformers.LlamaForCausalLM(cfg)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    return peft.get_peft_model(base, lora)


def _parts(audit=None, **policy_kw):
    model = _model()
    est = GradientSmoothnessEstimator(model, include=r"lora_", attach=False)
    policy = PausePolicy(**{**dict(warmup_steps=0, patience=1, min_dwell_steps=100, snr_enter=1e6, snr_exit=2e6),
                            **policy_kw})
    ctrl = PauseController(est, policy=policy, system=QuietMachine(), sleep=None, audit_log=audit)
    return model, est, ctrl


def _args(out, max_steps, **kw):
    return transformers.TrainingArguments(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        learning_rate=1e-3, lr_scheduler_type="linear", logging_steps=2, save_steps=3,
        report_to=["tensorboard"], use_cpu=True, disable_tqdm=True, seed=0, data_seed=0,
        dataloader_num_workers=0, **{"save_strategy": "steps", **kw})


class _LRRecorder(transformers.TrainerCallback):
    """Records the LR the optimizer used inside step() and the scheduler's LR × controller scale."""

    def __init__(self, ctrl):
        self.ctrl, self.used, self.expected = ctrl, [], []

    def on_train_begin(self, args, state, control, optimizer=None, **kw):
        inner = optimizer.optimizer  # accelerate's AcceleratedOptimizer wraps the torch optimizer
        inner.register_step_pre_hook(lambda o, a, k: self.used.append(o.param_groups[0]["lr"]))

    def on_pre_optimizer_step(self, args, state, control, lr_scheduler=None, **kw):
        self.expected.append(lr_scheduler.get_last_lr()[0] * self.ctrl.lr_scale)


def test_trainer_logs_metrics_to_report_to_and_applies_the_controller(tmp_path):
    model, est, ctrl = _parts(audit=tmp_path / "audit.jsonl")
    cb = GradGeomCallback(estimator=est, controller=ctrl)
    rec = _LRRecorder(ctrl)
    trainer = transformers.Trainer(model=model, args=_args(tmp_path / "run", 6), train_dataset=_Tokens(),
                                   callbacks=[cb, rec])
    trainer.train()
    assert len(rec.used) == 6 and rec.used == rec.expected  # scheduler value × our scale, inside step()
    assert rec.used[0] == rec.expected[0] and ctrl.lr_scale < 1.0
    assert trainer.callback_handler.callbacks[0] is cb  # moved before the report_to callbacks
    assert not est.attached
    hist = [h for h in trainer.state.log_history if "loss" in h]
    assert len(hist) == 3
    groups = [k for k in hist[-1] if k.startswith("gradgeom/snr/")]
    assert groups and all(k in hist[-1] for k in ("gradgeom/controller/lr_scale", "gradgeom/controller/actions"))
    assert hist[-1]["gradgeom/controller/lr_scale"] < 1.0  # SNR (finite from the 2nd step) < enter 1e6
    assert ctrl.lr_scale < 1.0 and cb.last_decision.step == 6

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    (event_dir,) = {os.path.dirname(p) for p in glob.glob(str(tmp_path / "run" / "runs" / "**" / "events.*"),
                                                          recursive=True)}
    acc = EventAccumulator(event_dir, size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert any(t.startswith("train/gradgeom/snr/") for t in tags), tags
    assert [e.step for e in acc.Scalars("train/gradgeom/controller/lr_scale")] == [2, 4, 6]

    audit = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert audit and audit[0]["action"] == "scale_lr" and "snr_enter" in audit[0]["reason"]


def test_trainer_checkpoint_and_resume_restore_estimator_and_controller(tmp_path):
    model, est, ctrl = _parts()
    trainer = transformers.Trainer(model=model, args=_args(tmp_path / "a", 6), train_dataset=_Tokens(),
                                   callbacks=[GradGeomCallback(estimator=est, controller=ctrl)])
    trainer.train()
    full_est, full_ctrl = est.state_dict(), ctrl.state_dict()
    with open(tmp_path / "a" / "checkpoint-3" / "trainer_state.json") as f:
        saved = json.load(f)["stateful_callbacks"]["GradGeomCallback"]
    assert saved["attributes"]["gradgeom_state"]

    model2, est2, ctrl2 = _parts()
    cb2 = GradGeomCallback(estimator=est2, controller=ctrl2)
    trainer2 = transformers.Trainer(model=model2, args=_args(tmp_path / "a", 6), train_dataset=_Tokens(),
                                    callbacks=[cb2])
    trainer2.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    assert ctrl2.state_dict()["t"] == 6 and ctrl2.state_dict()["low"] == full_ctrl["low"]
    assert ctrl2.lr_scale == full_ctrl["lr_scale"]
    resumed = est2.state_dict()
    assert resumed["step_count"] == full_est["step_count"] == 6
    for k, v in full_est["state"].items():
        assert torch.equal(resumed["state"][k], v), k  # bit for bit


def test_trainer_recreating_callbacks_from_checkpoint_keeps_the_estimator(tmp_path):
    model, est, ctrl = _parts()
    trainer = transformers.Trainer(model=model, args=_args(tmp_path / "b", 3), train_dataset=_Tokens(),
                                   callbacks=[GradGeomCallback(estimator=est, controller=ctrl)])
    trainer.train()
    at3 = ctrl.state_dict()
    model2, est2, ctrl2 = _parts()
    cb = GradGeomCallback(estimator=est2, controller=ctrl2, log_every=1)
    args = _args(tmp_path / "b", 5, restore_callback_states_from_checkpoint=True)
    trainer2 = transformers.Trainer(model=model2, args=args, train_dataset=_Tokens(), callbacks=[cb])
    trainer2.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-3"))
    new_cb = trainer2.callback_handler.callbacks[0]
    assert isinstance(new_cb, GradGeomCallback) and new_cb is not cb
    assert new_cb.estimator is est2 and new_cb.controller is ctrl2 and new_cb.log_every == 1
    assert ctrl2.state_dict()["t"] == at3["t"] + 2
    assert sum(isinstance(c, GradGeomCallback) for c in trainer2.callback_handler.callbacks) == 1


def test_stop_decision_stops_the_trainer(tmp_path):
    model = _model()
    est = GradientSmoothnessEstimator(model, include=r"lora_", attach=False)
    steps = {"n": 0}

    def user_signal():
        steps["n"] += 1
        return 10.0 if steps["n"] >= 4 else 0.0

    ctrl = PauseController(est, policy=PausePolicy(warmup_steps=0, user_signal_enter=5.0, user_signal_exit=1.0,
                                                   user_signal_action="stop"),
                           system=QuietMachine(), user_signal=user_signal, sleep=None)
    cb = GradGeomCallback(estimator=est, controller=ctrl)
    trainer = transformers.Trainer(model=model, args=_args(tmp_path / "s", 10, save_strategy="no"),
                                   train_dataset=_Tokens(), callbacks=[cb])
    trainer.train()
    assert trainer.state.global_step == 4 and cb.last_decision.action is Action.STOP


class _ParamRecorder(transformers.TrainerCallback):
    def __init__(self, model):
        self.params = [p for n, p in model.named_parameters() if p.requires_grad]
        self.after = []

    def on_step_end(self, args, state, control, **kw):
        self.after.append([p.detach().clone() for p in self.params])


def test_skip_step_decision_leaves_the_adapter_untouched(tmp_path):
    model = _model()
    est = GradientSmoothnessEstimator(model, include=r"lora_", attach=False)
    n = {"k": 0}

    def user_signal():  # skip the updates of optimizer steps 3 and 4
        n["k"] += 1
        return 10.0 if n["k"] in (3, 4) else 0.0

    ctrl = PauseController(est, policy=PausePolicy(warmup_steps=0, user_signal_enter=5.0, user_signal_exit=1.0,
                                                   user_signal_action="skip_step"),
                           system=QuietMachine(), user_signal=user_signal, sleep=None)
    rec = _ParamRecorder(model)
    trainer = transformers.Trainer(model=model, args=_args(tmp_path / "k", 5, save_strategy="no"),
                                   train_dataset=_Tokens(), callbacks=[GradGeomCallback(estimator=est, controller=ctrl), rec])
    trainer.train()
    changed = [any(not torch.equal(a, b) for a, b in zip(rec.after[i - 1], rec.after[i])) for i in range(1, 5)]
    assert changed == [True, False, False, True]  # steps 2..5 vs the step before
