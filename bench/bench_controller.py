"""Cost of the PauseController per optimizer step.

1. Host cost of ``update()`` + ``apply()`` alone (a scripted estimator with 64 groups; no device):
   pytest-benchmark, runs anywhere.
2. On a GPU, a PEFT LoRA (r=16, every linear layer) Llama-shaped bf16 model (DESIGN §5, 953 M
   parameters, batch 4×1024): wall time per full training step (forward, backward, AdamW step)
   with the estimator alone, estimator + controller every step (one host synchronisation per
   step, to read the statistics), and estimator(every=10) + controller (one per ten steps), all in
   the same run. The difference is the price of the synchronisation (lost CPU run-ahead).

    pytest bench/bench_controller.py -s --benchmark-columns=mean,median,ops
"""

from __future__ import annotations

import math
import time

import pytest
import torch

from gradgeom import PauseController, PausePolicy
from gradgeom.quality import LayerGradientQuality
from gradgeom.system_signals import SystemSignals


class _Quiet:
    def read(self):
        return SystemSignals()


class _Groups:
    """quality() with 64 groups and slowly varying SNR (crosses the thresholds now and then)."""

    def __init__(self, n=64):
        self.n, self.t = n, 0

    def quality(self):
        self.t += 1
        snr = 0.05 + 0.04 * math.sin(self.t / 7.0)
        return {f"layers.{i}": LayerGradientQuality(1.0, snr * (1 + 0.01 * i), 1.0, self.t, None, 1.0, 0)
                for i in range(self.n)}


def test_controller_host_cost_per_step(benchmark):
    p = torch.nn.Parameter(torch.zeros(8))
    opt = torch.optim.SGD([p], lr=0.1)
    ctrl = PauseController(_Groups(), optimizer=opt, apply=True, system=_Quiet(), sleep=None,
                           policy=PausePolicy(warmup_steps=0, patience=2, min_dwell_steps=3))
    benchmark(ctrl.update)


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_gpu
def test_controller_sync_cost_on_lora_llama():
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from gradgeom import GradientSmoothnessEstimator, compiled_with_cuda

    if not compiled_with_cuda():
        pytest.skip("gradgeom was built without CUDA kernels")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                                   num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=1024)
    cfg._attn_implementation = "sdpa"
    base = transformers.LlamaForCausalLM(cfg).to("cuda", torch.bfloat16)
    lora = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = peft.get_peft_model(base, lora)
    ids = torch.randint(0, 32000, (4, 1024), device="cuda")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def run(every, with_controller, steps=30, warmup=5):
        est = GradientSmoothnessEstimator(model, include=r"lora_", every=every)
        ctrl = None
        if with_controller:
            ctrl = PauseController(est, optimizer=opt, apply=True, system=_Quiet(), sleep=None,
                                   policy=PausePolicy(warmup_steps=10 ** 9))  # decide, never act
        for i in range(warmup + steps):
            if i == warmup:
                torch.cuda.synchronize()
                t0 = time.perf_counter()
            model(input_ids=ids, labels=ids).loss.backward()
            est.step()
            if ctrl is not None:
                ctrl.update()
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) * 1e3 / steps
        est.remove()
        if ctrl is not None:
            ctrl.close()
        return ms

    base_ms = run(1, False)
    every_step = run(1, True)
    every_ten = run(10, True)
    base_again = run(1, False)
    ref = min(base_ms, base_again)
    print(f"\n[{torch.cuda.get_device_name()}] LoRA r=16 Llama 953M bf16, batch 4x1024, ms per training step:")
    print(f"  estimator (sketch) alone:                 {base_ms:8.2f}  (again at the end: {base_again:.2f})")
    print(f"  + controller every step (1 sync/step):    {every_step:8.2f}  ({100 * (every_step / ref - 1):+.2f} %)")
    print(f"  estimator every=10 + controller:          {every_ten:8.2f}  ({100 * (every_ten / ref - 1):+.2f} %)")
