"""The controller part of ``gradgeom demo``: watch the PauseController react to a noisy phase.

A tiny random-initialised Llama with a LoRA adapter learns a synthetic next-token rule
(``next = (3·token + 1) mod vocab``) fully offline. In the middle third of the run the labels are
replaced by random tokens with probability ``noise``: the gradient's signal shrinks, its noise
grows, SNR falls, and the controller scales the learning rate down; when clean labels return,
SNR recovers and the scale climbs back to exactly 1. :func:`run_controller_demo` returns the
per-step records, prints a table that marks when and why the controller acted, and writes a
JSONL file, the controller's audit log and (with matplotlib) a PNG plot.

Entry point for the CLI: ``run_controller_demo(out_dir, steps=..., progress=True)``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch

from gradgeom.controller import PauseController
from gradgeom.policy import Action, PausePolicy
from gradgeom.sinks import JSONLSink
from gradgeom.system_signals import SystemSignals

__all__ = ["ControllerDemoResult", "run_controller_demo", "demo_policy", "format_table"]


@dataclass
class ControllerDemoResult:
    """What the demo produced: one record per step, the decisions that acted, output files."""

    records: list[dict[str, Any]]
    decisions: list[dict[str, Any]]
    metrics_path: Path
    audit_path: Path
    plot_path: Optional[Path]
    seconds: float


def demo_policy(steps: int) -> PausePolicy:
    """The policy the demo uses: thresholds scaled to its short run (see docs/controller.md)."""
    return PausePolicy(
        warmup_steps=max(10, steps // 10),
        patience=4,
        min_dwell_steps=max(5, steps // 20),
        snr_enter=0.04,
        snr_exit=0.08,
        lr_down_factor=0.5,
        min_lr_scale=0.125,
        lr_recovery_factor=1.25,
        max_temperature=None,
        max_thermal_state=None,
        max_host_memory_fraction=None,
    )


class _NoMachine:
    """The demo is about gradient signals; machine-health rules are off."""

    def read(self) -> SystemSignals:
        return SystemSignals()


def _model(vocab: int, seed: int) -> torch.nn.Module:
    import peft
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    base = transformers.LlamaForCausalLM(cfg)
    lora = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                           lora_dropout=0.0)
    return peft.get_peft_model(base, lora)


def _batch(gen: torch.Generator, batch: int, seq: int, vocab: int, noise: float) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randint(0, vocab, (batch, seq), generator=gen)
    target = (3 * x + 1) % vocab
    if noise > 0:
        flip = torch.rand(batch, seq, generator=gen) < noise
        target = torch.where(flip, torch.randint(0, vocab, (batch, seq), generator=gen), target)
    return x, target


def run_controller_demo(
    out_dir: Union[str, Path] = "gradgeom_demo_out",
    *,
    steps: int = 180,
    noise: float = 0.9,
    shrink: int = 1,
    batch: int = 16,
    seq: int = 16,
    vocab: int = 32,
    lr: float = 1e-3,
    beta: float = 0.9,
    seed: int = 0,
    policy: Optional[PausePolicy] = None,
    progress: bool = True,
    plot: bool = True,
    print_table: bool = True,
) -> ControllerDemoResult:
    """Train the demo model for ``steps`` steps with label noise ``noise`` in the middle third.

    Writes ``controller_metrics.jsonl`` (one line per step), ``controller_audit.jsonl`` (every
    controller action with its reason) and ``controller.png`` (SNR and LR scale over steps, noisy
    phase shaded, actions marked) into ``out_dir``. ``beta`` sets the estimator's window
    (0.9 ≈ 10 steps, so a short run shows the reaction). ``shrink`` > 1 also divides the batch by
    that factor in the middle third (per-step SNR scales with the batch). About 30 s for 180 steps
    on a 2-core CPU. Returns a :class:`ControllerDemoResult`.
    """
    from gradgeom.estimator import GradientSmoothnessEstimator

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "controller_metrics.jsonl"
    audit_path = out / "controller_audit.jsonl"
    for p in (metrics_path, audit_path):
        p.unlink(missing_ok=True)
    model = _model(vocab, seed)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    estimator = GradientSmoothnessEstimator(model, include=r"lora_", mode="sketch", beta=beta, attach=False)
    controller = PauseController(estimator, optimizer=opt, policy=policy or demo_policy(steps), apply=True,
                                 audit_log=audit_path, system=_NoMachine(), sleep=None)
    gen = torch.Generator().manual_seed(seed + 1)
    noisy = range(steps // 3, 2 * steps // 3)
    records: list[dict[str, Any]] = []
    decisions: list[dict[str, Any]] = []
    bar = _progress(steps, progress)
    start = time.perf_counter()
    with estimator, JSONLSink(metrics_path) as sink:
        for step in range(1, steps + 1):
            in_phase = (step - 1) in noisy
            phase_noise = noise if in_phase else 0.0
            x, y = _batch(gen, max(1, batch // shrink) if in_phase else batch, seq, vocab, phase_noise)
            logits = model(input_ids=x).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1))
            loss.backward()
            estimator.step()
            decision = controller.update(step)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            rec = {
                "step": step,
                "label_noise": phase_noise,
                "batch": x.shape[0],
                "loss": float(loss.detach()),
                "snr": decision.signals.get("snr", math.nan),
                "lr_scale": decision.lr_scale,
                "lr": sched.get_last_lr()[0] * decision.lr_scale,
                "action": decision.action.value,
                "reason": decision.reason,
            }
            records.append(rec)
            sink.log({k: v for k, v in rec.items() if isinstance(v, float)} | {"lr_scale": decision.lr_scale}, step)
            if decision.action is not Action.CONTINUE or decision.event:
                decisions.append(decision.to_dict())
                sink.log_decision(decision)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(snr=f"{rec['snr']:.3g}", lr_scale=f"{decision.lr_scale:.3g}")
    if bar is not None:
        bar.close()
    controller.close()
    seconds = time.perf_counter() - start
    plot_path = _plot(records, noisy, controller.policy, out / "controller.png") if plot else None
    if print_table:
        print(format_table(records, every=max(1, steps // 15)))
    return ControllerDemoResult(records, decisions, metrics_path, audit_path, plot_path, seconds)


def format_table(records: list[dict[str, Any]], every: int = 20) -> str:
    """A text table: every ``every``-th step plus every step where the controller acted (marked ``*``)."""
    lines = [f"{'step':>5} {'noise':>5} {'loss':>7} {'SNR':>8} {'LR scale':>8}  action / reason"]
    for r in records:
        acted = r["action"] != Action.CONTINUE.value or r["reason"]
        if not acted and r["step"] % every:
            continue
        snr = "n/a" if not math.isfinite(r["snr"]) else f"{r['snr']:.3g}"
        mark = "*" if acted else " "
        what = f"{r['action']}: {r['reason']}" if acted else ""
        lines.append(f"{r['step']:>5} {r['label_noise']:>5.2f} {r['loss']:>7.3f} {snr:>8} {r['lr_scale']:>8.3g} {mark} {what}")
    return "\n".join(lines)


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="gradgeom controller demo", leave=False)


def _plot(records: list[dict[str, Any]], noisy: range, policy: PausePolicy, path: Path) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.axvspan(noisy.start + 1, noisy.stop, color="0.9", label="label noise phase")
    ax.plot(steps, [r["snr"] for r in records], color="tab:blue", label="global SNR (temporal)")
    ax.axhline(policy.snr_enter, color="tab:blue", linestyle=":", linewidth=1, label=f"snr_enter {policy.snr_enter:g}")
    ax.axhline(policy.snr_exit, color="tab:blue", linestyle="--", linewidth=1, label=f"snr_exit {policy.snr_exit:g}")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("SNR")
    ax2 = ax.twinx()
    ax2.plot(steps, [r["lr_scale"] for r in records], color="tab:red", drawstyle="steps-post", label="LR scale")
    ax2.set_ylim(0, 1.1)
    ax2.set_ylabel("LR scale")
    acted = [r for r in records if r["action"] != Action.CONTINUE.value]
    ax2.scatter([r["step"] for r in acted], [r["lr_scale"] for r in acted], marker="v", color="tab:red", zorder=3,
                label="controller action")
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], loc="lower left", fontsize=8)
    ax.set_title("gradgeom PauseController: SNR falls under label noise, LR scale follows")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":  # pragma: no cover
    result = run_controller_demo()
    print(json.dumps({"decisions": len(result.decisions), "seconds": round(result.seconds, 1),
                      "plot": str(result.plot_path)}))
