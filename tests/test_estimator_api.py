"""GradientSmoothnessEstimator: grouping, hooks, steps, AMP scale, resume, errors."""

import copy
import math

import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from gradgeom import GradientSmoothnessEstimator, SmoothnessThresholds
from gradgeom.grouping import layer_group_name, top_module_name

torch.set_num_threads(1)

MODES = ["moments", "sketch", "exact", "microbatch"]


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.fc2(torch.tanh(self.fc1(x)))


class Net(nn.Module):
    def __init__(self, d: int = 8, n_layers: int = 2, ckpt: bool = False, tie: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, d)
        self.layers = nn.ModuleList([Block(d) for _ in range(n_layers)])
        self.head = nn.Linear(d, 11, bias=False)
        if tie:
            self.head.weight = self.embed.weight
        self.ckpt = ckpt
        self.skip_layer = None

    def forward(self, tokens):
        x = self.embed(tokens)
        for i, layer in enumerate(self.layers):
            if i == self.skip_layer:
                continue
            x = checkpoint(layer, x, use_reentrant=False) if self.ckpt else layer(x)
        return self.head(x)


def batches(n, seed=0, bs=6):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 11, (bs, 5), generator=gen), torch.randint(0, 11, (bs, 5), generator=gen)) for _ in range(n)]


def loss_fn(model, batch):
    tokens, target = batch
    return nn.functional.cross_entropy(model(tokens).reshape(-1, 11), target.reshape(-1))


def run(model, est, data, micro=1, opt=None, scale=None):
    for batch in data:
        tokens, target = batch
        for j in range(micro):  # equal slices of the batch: the mean of their losses is the batch loss
            rows = slice(j * len(tokens) // micro, (j + 1) * len(tokens) // micro)
            loss = loss_fn(model, (tokens[rows], target[rows])) / micro
            (loss * scale if scale is not None else loss).backward()
        if opt is not None:
            opt.step()
        if est is not None and (opt is None or est._optimizer is None):
            est.step()
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        else:
            model.zero_grad(set_to_none=True)


def same_quality(a, b, exact=True):
    assert a.keys() == b.keys()
    for k in a:
        da, db = a[k].as_dict(), b[k].as_dict()
        for f in da:
            x, y = da[f], db[f]
            if isinstance(x, float) and isinstance(y, float):
                if math.isnan(x) and math.isnan(y):
                    continue
                if exact:
                    assert x == y, (k, f, x, y)
                else:
                    assert x == pytest.approx(y, rel=1e-4, abs=1e-9), (k, f, x, y)
            elif isinstance(x, dict):
                for e in x:
                    xe, ye = x[e], y[e]
                    if isinstance(xe, float) and math.isnan(xe):
                        assert math.isnan(ye)
                    elif exact:
                        assert xe == ye, (k, f, e)
                    elif e == "element_mean":  # a sum that cancels to rounding noise
                        continue
                    else:
                        assert xe == pytest.approx(ye, rel=1e-4, abs=1e-9), (k, f, e, xe, ye)
            else:
                assert x == y, (k, f, x, y)


# ------------------------------------------------------------------ grouping
def test_layer_groups_and_top_modules():
    est = GradientSmoothnessEstimator(Net())
    assert est.group_names == ["embed", "layers.0", "layers.1", "head"]
    est.remove()
    assert layer_group_name("base_model.model.model.layers.12.self_attn.q_proj.lora_A.default.weight") == "layers.12"
    for name, want in [("transformer.h.3.mlp.c_fc.weight", "h.3"), ("blocks.0.w", "blocks.0"),
                       ("enc.block.7.w", "block.7"), ("bert.encoder.layer.2.w", "layer.2")]:
        assert layer_group_name(name) == want
    assert top_module_name("model.embed_tokens.weight") == "embed_tokens"
    assert top_module_name("base_model.model.lm_head.weight") == "lm_head"
    assert top_module_name("_orig_mod.head.weight") == "head"


def test_two_stacks_get_qualified_names():
    class EncDec(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Module()
            self.encoder.layer = nn.ModuleList([nn.Linear(2, 2)])
            self.decoder = nn.Module()
            self.decoder.layer = nn.ModuleList([nn.Linear(2, 2)])

    est = GradientSmoothnessEstimator(EncDec(), attach=False)
    assert est.group_names == ["encoder.layer.0", "decoder.layer.0"]


def test_other_grouping_modes_include_exclude_frozen():
    model = Net()
    model.layers[1].fc2.weight.requires_grad_(False)
    est = GradientSmoothnessEstimator(model, groups="module", attach=False)
    assert est.group_names == ["embed", "layers.0.fc1", "layers.0.fc2", "layers.1.fc1", "layers.1.fc2", "head"]
    assert sum(len(p) for p in est._params) == len([p for p in model.parameters() if p.requires_grad])
    est = GradientSmoothnessEstimator(model, groups="tensor", include=r"fc1", attach=False)
    assert est.group_names == ["layers.0.fc1.weight", "layers.0.fc1.bias", "layers.1.fc1.weight", "layers.1.fc1.bias"]
    est = GradientSmoothnessEstimator(model, groups="layer", exclude=r"bias|embed|head", attach=False)
    assert est.group_names == ["layers.0", "layers.1"]
    assert [len(p) for p in est._params] == [2, 1]  # the frozen fc2.weight is not watched
    est = GradientSmoothnessEstimator(model, groups={"mlp_in": r"fc1", "mlp_out": r"fc2"}, attach=False)
    assert est.group_names == ["mlp_in", "mlp_out"]
    est = GradientSmoothnessEstimator(model, groups=lambda n: "w" if n.endswith("weight") else None, attach=False)
    assert est.group_names == ["w"]
    opt = torch.optim.SGD([{"params": model.layers.parameters(), "name": "body"},
                           {"params": list(model.embed.parameters()) + list(model.head.parameters())}], lr=0.1)
    est = GradientSmoothnessEstimator(model, groups="param_group", optimizer=opt, attach=False)
    assert est.group_names == ["param_group.1", "body"]


def test_frozen_parameters_get_no_hooks():
    model = Net()
    model.embed.weight.requires_grad_(False)
    est = GradientSmoothnessEstimator(model)
    assert model.embed.weight._post_accumulate_grad_hooks is None
    assert len(model.head.weight._post_accumulate_grad_hooks) == 1
    est.remove()


# ------------------------------------------------------------------ attach / remove
@pytest.mark.parametrize("mode", MODES)
def test_attach_twice_is_noop_and_remove_restores(mode):
    model = Net()
    est = GradientSmoothnessEstimator(model, mode=mode)
    est.attach()
    for p in model.parameters():
        assert len(p._post_accumulate_grad_hooks) == 1
        if mode == "microbatch":
            assert len(p._backward_hooks) == 1
    est.remove()
    est.remove()
    for p in model.parameters():
        assert p._post_accumulate_grad_hooks is None and p._backward_hooks is None
    run(model, None, batches(1))  # no estimator work happens
    assert est._pending_moments == [None] * 4
    with GradientSmoothnessEstimator(model, mode=mode, attach=False) as est2:
        assert est2.attached
        run(model, est2, batches(3))
    assert not est2.attached
    assert all(p._post_accumulate_grad_hooks is None for p in model.parameters())


# ------------------------------------------------------------------ training is unchanged
@pytest.mark.parametrize("mode", MODES)
def test_training_bit_identical_with_and_without_estimator(mode):
    torch.manual_seed(0)
    a = Net()
    b = copy.deepcopy(a)
    opt_a = torch.optim.AdamW(a.parameters(), lr=1e-2)
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-2)
    est = GradientSmoothnessEstimator(a, mode=mode, optimizer=opt_a, sketch_dim=64)
    data = batches(6)
    run(a, est, data, micro=2, opt=opt_a)
    run(b, None, data, micro=2, opt=opt_b)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), na
    q = est.quality()
    assert all(v.sample_count == (0 if mode == "moments" else 6) for v in q.values()) or mode == "moments"


# ------------------------------------------------------------------ steps
@pytest.mark.parametrize("mode", ["sketch", "exact", "microbatch"])
def test_quality_fields_and_metrics(mode):
    model = Net()
    est = GradientSmoothnessEstimator(model, mode=mode, sketch_dim=256, examples_per_microbatch=6,
                                      thresholds=SmoothnessThresholds(smooth=2.0, rugged=0.5))
    run(model, est, batches(8), micro=3)
    q = est.quality()
    assert list(q) == est.group_names
    for name, v in q.items():
        assert v.sample_count == 8
        assert math.isfinite(v.variance) and v.variance > 0 and math.isfinite(v.snr) and v.snr >= 0
        assert v.smoothness == SmoothnessThresholds(2.0, 0.5).label(v.snr)
        assert v.grad_norm > 0 and v.nonfinite == 0
        assert (v.noise_scale is not None) == (mode == "microbatch")
    m = est.metrics()
    assert m["gradgeom/snr/layers.0"] == q["layers.0"].snr
    assert m["gradgeom/nonfinite_steps"] == 0.0
    assert ("gradgeom/noise_scale/head" in m) == (mode == "microbatch")


def test_moments_mode_reports_norms():
    model = Net()
    est = GradientSmoothnessEstimator(model, mode="moments")
    run(model, est, batches(2))
    model(batches(1)[0][0]).sum().backward()
    expected = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in model.layers[0].parameters()))
    est.step()
    q = est.quality()["layers.0"]
    assert q.grad_norm == pytest.approx(expected, rel=1e-6)
    assert math.isnan(q.snr) and q.smoothness == "unknown" and q.definition == "moments"


def test_every_n_steps():
    model = Net()
    est = GradientSmoothnessEstimator(model, every=3, sketch_dim=64)
    run(model, est, batches(7))
    assert est.quality()["head"].sample_count == 3  # steps 0, 3, 6


def test_optimizer_auto_step():
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    est = GradientSmoothnessEstimator(model, optimizer=opt, sketch_dim=64)
    run(model, est, batches(4), opt=opt)
    assert est._step_count == 4 and est.quality()["head"].sample_count == 4
    est.remove()
    opt.step()
    assert est._step_count == 4


def test_gradient_accumulation_equals_one_big_backward():
    torch.manual_seed(0)
    a = Net()
    data = batches(5)
    est_a = GradientSmoothnessEstimator(a, sketch_dim=128)
    run(a, est_a, data, micro=2)  # two halves of the loss per step
    est_a.remove()
    est_b = GradientSmoothnessEstimator(a, sketch_dim=128)
    run(a, est_b, data, micro=1)
    same_quality(est_a.quality(), est_b.quality(), exact=False)


def test_activation_checkpointing_and_tied_parameters():
    torch.manual_seed(0)
    plain = Net(tie=True)
    ckpt = copy.deepcopy(plain)
    ckpt.ckpt = True
    names = [n for n, _ in plain.named_parameters()]
    assert "head.weight" not in names  # tied: watched once, under its first name
    ea = GradientSmoothnessEstimator(plain, sketch_dim=128)
    eb = GradientSmoothnessEstimator(ckpt, sketch_dim=128)
    assert ea.group_names == ["embed", "layers.0", "layers.1"]
    data = batches(4)
    run(plain, ea, data)
    run(ckpt, eb, data)
    same_quality(ea.quality(), eb.quality(), exact=False)


@pytest.mark.parametrize("mode", ["sketch", "microbatch"])
def test_parameters_without_gradients_in_some_steps(mode):
    model = Net(n_layers=3)
    est = GradientSmoothnessEstimator(model, mode=mode, sketch_dim=64)
    for i, batch in enumerate(batches(6)):
        model.skip_layer = 1 if i % 2 else None
        for _ in range(2):
            loss_fn(model, batch).backward()
        est.step()
        model.zero_grad(set_to_none=True)
    q = est.quality()
    assert q["layers.0"].sample_count == 6 and q["layers.1"].sample_count == 3
    # A group whose parameters only partly get gradients still completes via the end-of-backward flush.
    model.layers[2].fc2.weight.requires_grad_(True)
    model.skip_layer = None
    for _ in range(2):
        model.layers[2].fc1(torch.randn(2, 8)).sum().backward()
    est.step()
    assert est.quality()["layers.2"].sample_count == 7


def test_torch_compile_model():
    torch.manual_seed(0)
    model = Net()
    compiled = torch.compile(model, backend="aot_eager")
    est_c = GradientSmoothnessEstimator(compiled, sketch_dim=128)
    assert est_c.group_names == ["embed", "layers.0", "layers.1", "head"]
    data = batches(3)
    run(compiled, est_c, data)
    est_c.remove()
    est_e = GradientSmoothnessEstimator(model, sketch_dim=128)
    run(model, est_e, data)
    same_quality(est_c.quality(), est_e.quality(), exact=False)


# ------------------------------------------------------------------ AMP scale, non-finite
@pytest.mark.parametrize("mode", ["sketch", "exact", "microbatch"])
def test_grad_scale_is_divided_out(mode):
    torch.manual_seed(0)
    model = Net()
    data = batches(4)
    ref = GradientSmoothnessEstimator(model, mode=mode, sketch_dim=128)
    run(model, ref, data, micro=2)
    ref.remove()
    est = GradientSmoothnessEstimator(model, mode=mode, sketch_dim=128)
    est.set_grad_scale(torch.tensor(1024.0))
    run(model, est, data, micro=2, scale=1024.0)
    same_quality(ref.quality(), est.quality(), exact=False)


def test_grad_scaler_with_optimizer():
    torch.manual_seed(0)
    a = Net()
    b = copy.deepcopy(a)
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    ea = GradientSmoothnessEstimator(a, mode="exact", optimizer=opt_a, grad_scaler=scaler)
    eb = GradientSmoothnessEstimator(b, mode="exact", optimizer=opt_b)
    for batch in batches(4):
        scaler.scale(loss_fn(a, batch)).backward()
        scaler.step(opt_a)
        scaler.update()
        opt_a.zero_grad()
        loss_fn(b, batch).backward()
        opt_b.step()
        opt_b.zero_grad()
    same_quality(ea.quality(), eb.quality(), exact=False)


@pytest.mark.parametrize("mode", ["sketch", "exact", "microbatch"])
def test_nonfinite_step_is_flagged_and_skipped(mode):
    torch.manual_seed(0)
    model = Net()
    data = batches(4)
    ea = GradientSmoothnessEstimator(model, mode=mode, sketch_dim=64)
    run(model, ea, data[:2], micro=2)
    for _ in range(2):  # a step whose gradients hold a NaN
        loss_fn(model, data[2]).backward()
        model.head.weight.grad[0, 0] = float("nan")
    ea.step()
    model.zero_grad(set_to_none=True)
    run(model, ea, data[3:], micro=2)
    ea.remove()
    eb = GradientSmoothnessEstimator(model, mode=mode, sketch_dim=64)
    run(model, eb, data[:2] + data[3:], micro=2)
    qa, qb = ea.quality(), eb.quality()
    assert ea.metrics()["gradgeom/nonfinite_steps"] == 1.0
    for k in qa:
        assert qa[k].sample_count == qb[k].sample_count == 3
        assert qa[k].snr == qb[k].snr and qa[k].variance == qb[k].variance


# ------------------------------------------------------------------ resume
@pytest.mark.parametrize("mode", MODES)
def test_state_dict_resume_is_bit_exact(mode):
    torch.manual_seed(0)
    model = Net()
    data = batches(10)
    est = GradientSmoothnessEstimator(model, mode=mode, sketch_dim=64, every=2)
    run(model, est, data[:5], micro=2)
    saved = copy.deepcopy(est.state_dict())
    run(model, est, data[5:], micro=2)
    est.remove()
    resumed = GradientSmoothnessEstimator(model, mode=mode, sketch_dim=64, every=2)
    resumed.load_state_dict(saved)
    run(model, resumed, data[5:], micro=2)
    same_quality(est.quality(), resumed.quality(), exact=True)
    with pytest.raises(ValueError, match="config mismatch"):
        GradientSmoothnessEstimator(model, mode=mode, sketch_dim=128, every=2, attach=False).load_state_dict(saved)
    with pytest.raises(ValueError, match="state_dict"):
        resumed.load_state_dict({"nope": 1})


# ------------------------------------------------------------------ errors
def test_bad_arguments():
    model = Net()
    G = GradientSmoothnessEstimator
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        G("model")
    with pytest.raises(ValueError, match="mode must be one of"):
        G(model, mode="fast")
    with pytest.raises(ValueError, match="beta"):
        G(model, beta=1.0)
    with pytest.raises(ValueError, match="sketch_dim"):
        G(model, sketch_dim=1000)
    with pytest.raises(ValueError, match="every"):
        G(model, every=0)
    with pytest.raises(ValueError, match="examples_per_microbatch"):
        G(model, examples_per_microbatch=0)
    with pytest.raises(ValueError, match="param_group"):
        G(model, groups="param_group")
    with pytest.raises(ValueError, match="groups must be"):
        G(model, groups="layers")
    with pytest.raises(TypeError, match="groups must be"):
        G(model, groups=5)
    with pytest.raises(ValueError, match="include is not a valid regex"):
        G(model, include="(")
    with pytest.raises(ValueError, match="no trainable parameter matched"):
        G(model, include="nothing_matches_this")
    with pytest.raises(TypeError, match="optimizer"):
        G(model, optimizer="adam")
    with pytest.raises(TypeError, match="grad_scaler"):
        G(model, grad_scaler=2.0)
    est = G(model, attach=False)
    with pytest.raises(ValueError, match="scale must be finite"):
        est.set_grad_scale(0.0)
    with pytest.raises(TypeError, match="scale must be a float or a tensor"):
        est.set_grad_scale("big")
