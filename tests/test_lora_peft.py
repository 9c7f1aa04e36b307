"""gradgeom.lora on real PEFT models: discovery, scaling, and norms against get_delta_weight()."""

import math

import pytest
import torch
from torch import nn

from gradgeom import lora

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens"]


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=130, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg)


def peft_model(use_rslora, init=False, seed=0):
    cfg = peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=TARGETS, use_rslora=use_rslora, init_lora_weights=init,
        rank_pattern={"q_proj": 4, "layers.1.mlp.down_proj": 33}, alpha_pattern={"v_proj": 40},
    )
    return peft.get_peft_model(tiny_llama(seed), cfg)


def lora_layers(model):
    for name, m in model.named_modules():
        if isinstance(m, peft.tuners.lora.LoraLayer):
            yield name, m


def dense_delta(layer, adapter):
    W = layer.get_delta_weight(adapter).detach().double()
    return W.reshape(W.shape[0], -1)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_geometry_matches_peft(use_rslora):
    model = peft_model(use_rslora)
    geo = lora.geometry(model)
    layers = dict(lora_layers(model))
    assert len(geo) == len(layers) == 2 * 7 + 1
    seen_ranks = set()
    for name, layer in layers.items():
        g = geo[f"{name}.default"]
        # Scaling: what the layer applies, what gradgeom derives from r / alpha / rsLoRA, and from
        # the LoraConfig with its rank_pattern / alpha_pattern.
        assert g.scaling == layer.scaling["default"]
        assert math.isclose(lora.scaling(layer.lora_alpha["default"], layer.r["default"], rslora=use_rslora),
                            layer.scaling["default"], rel_tol=1e-15)
        assert math.isclose(lora.scaling_from_config(model.peft_config["default"], name), layer.scaling["default"],
                            rel_tol=1e-15)
        W = dense_delta(layer, "default")
        sv = torch.linalg.svdvals(W)
        r = layer.r["default"]
        seen_ranks.add(r)
        assert g.rank == r and g.svdvals.shape == (r,)
        m = min(r, *W.shape)
        torch.testing.assert_close(g.svdvals[:m], sv[:m], rtol=1e-4, atol=1e-6 * float(sv[0]))
        assert math.isclose(g.fro, float(torch.linalg.matrix_norm(W)), rel_tol=1e-5)
        assert math.isclose(g.spectral, float(sv[0]), rel_tol=1e-4)
        assert math.isclose(g.nuclear, float(sv[:m].sum()), rel_tol=1e-4)
        base = layer.get_base_layer().weight.detach().double()
        assert math.isclose(g.relative, g.fro / float(base.norm()), rel_tol=1e-5)
    assert seen_ranks == {4, 8, 33}


def test_zero_adapters_at_init():
    model = peft_model(False, init=True)
    geo = lora.geometry(model)
    for name, g in geo.items():
        if "embed_tokens" in name:
            continue  # PEFT zero-initialises lora_embedding_A instead, still ΔW = 0
        assert (g.fro, g.spectral, g.nuclear, g.effective_rank, g.stable_rank, g.relative) == (0, 0, 0, 0, 0, 0)
    assert all(g.fro == 0.0 and not math.isnan(g.effective_rank) for g in geo.values())


def test_multiple_adapters_and_filter():
    model = peft_model(False)
    second = peft.LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                             use_rslora=True)
    model.add_adapter("second", second)
    every = lora.geometry(model)
    only = lora.geometry(model, adapter_name="second")
    assert len(only) == 4 and all(k.endswith(".second") for k in only)
    assert len(every) == 15 + 4
    for name, layer in lora_layers(model):
        if "second" in layer.lora_A:
            g = only[f"{name}.second"]
            assert g.scaling == layer.scaling["second"] == 3 / math.sqrt(2)
            W = dense_delta(layer, "second")
            assert math.isclose(g.fro, float(torch.linalg.matrix_norm(W)), rel_tol=1e-5)
            assert g.module == name and g.adapter == "second"


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 12, kernel_size=3)
        self.pw = nn.Conv2d(12, 10, kernel_size=1)
        self.c1 = nn.Conv1d(4, 6, kernel_size=5)
        self.emb = nn.Embedding(50, 16)
        self.fc = nn.Linear(16, 9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv_embedding_linear(dtype):
    torch.manual_seed(3)
    cfg = peft.LoraConfig(r=4, lora_alpha=6, target_modules=["conv", "pw", "c1", "emb", "fc"], init_lora_weights=False)
    model = peft.get_peft_model(ConvNet(), cfg).to(dtype)
    geo = lora.geometry(model)
    assert len(geo) == 5
    for name, layer in lora_layers(model):
        g = geo[f"{name}.default"]
        W = dense_delta(layer, "default")
        sv = torch.linalg.svdvals(W)
        m = min(4, *W.shape)
        torch.testing.assert_close(g.svdvals[:m], sv[:m], rtol=1e-3, atol=1e-3 * float(sv[0]))
        assert math.isclose(g.fro, float(torch.linalg.matrix_norm(W)), rel_tol=1e-3)


def test_snapshot_and_principal_angles():
    model = peft_model(False)
    snap = lora.snapshot(model)
    assert all(b.data_ptr() != 0 and not b.requires_grad for b, _ in snap.values())
    same = lora.principal_angles(snap, model)
    assert set(same) == set(lora.geometry(model))
    assert all(p.distance < 5e-3 for p in same.values())
    # Train a few steps: the column spaces turn; compare with dense SVD bases.
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    ids = torch.randint(0, 130, (2, 16))
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    moved = lora.principal_angles(snap, model)
    now = lora.snapshot(model)
    for key, pa in moved.items():
        # Column spaces of B·A (for an Embedding, PEFT's get_delta_weight is its transpose).
        B0, A0 = snap[key]
        B1, A1 = now[key]
        U0 = torch.linalg.svd(B0.double() @ A0.double(), full_matrices=False)[0][:, : pa.rank_1]
        U1 = torch.linalg.svd(B1.double() @ A1.double(), full_matrices=False)[0][:, : pa.rank_2]
        ref = torch.arccos(torch.linalg.svdvals(U0.T @ U1).clamp(0, 1))
        assert pa.angles.shape == ref.shape
        assert (pa.angles - ref).abs().max() < 2e-3, (key, pa.angles, ref)
    assert any(p.distance > 1e-3 for p in moved.values())
