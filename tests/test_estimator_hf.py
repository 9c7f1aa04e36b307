"""A real HF transformers model (tiny random-initialised Llama) with PEFT LoRA, on CPU."""

import math

import pytest
import torch

from gradgeom import GradientSmoothnessEstimator

torch.set_num_threads(1)

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def tiny_lora_llama(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    model = transformers.LlamaForCausalLM(config)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                               "up_proj", "down_proj"], lora_dropout=0.0)
    return peft.get_peft_model(model, lora)


@pytest.mark.parametrize("mode", ["sketch", "exact", "microbatch"])
def test_lora_llama_trains_with_estimator(mode):
    model = tiny_lora_llama()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    est = GradientSmoothnessEstimator(model, mode=mode, optimizer=opt, sketch_dim=256, examples_per_microbatch=2)
    assert est.group_names == ["layers.0", "layers.1"]
    assert sum(len(p) for p in est._params) == len(trainable) == 2 * 7 * 2
    gen = torch.Generator().manual_seed(0)
    for _ in range(6):
        for _ in range(2):  # gradient accumulation
            ids = torch.randint(0, 64, (2, 16), generator=gen)
            out = model(input_ids=ids, labels=ids)
            (out.loss / 2).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    q = est.quality()
    for name, v in q.items():
        assert v.sample_count == 6, name
        assert math.isfinite(v.variance) and math.isfinite(v.snr) and v.grad_norm > 0
    metrics = est.metrics()
    assert "gradgeom/snr/layers.1" in metrics
    est.remove()
    assert all(p._post_accumulate_grad_hooks is None for p in model.parameters())


def test_lora_llama_bit_identical_training():
    a, b = tiny_lora_llama(1), tiny_lora_llama(1)
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (a, b)]
    est = GradientSmoothnessEstimator(a, optimizer=opts[0], sketch_dim=128)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        ids = torch.randint(0, 64, (2, 16), generator=gen)
        for m, o in zip((a, b), opts):
            m(input_ids=ids, labels=ids).loss.backward()
            o.step()
            o.zero_grad(set_to_none=True)
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), n
    assert est.quality()["layers.0"].sample_count == 3
