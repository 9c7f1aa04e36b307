"""Statistical validity of the estimator on synthetic gradients with known truth."""

import math

import pytest
import torch

# Small tensors on a shared 2-core box: OpenMP spinning costs more than it gives.
torch.set_num_threads(1)

from gradgeom import GradientSmoothnessEstimator
from gradgeom.grouping import layer_index


class OneLayer(torch.nn.Module):
    def __init__(self, rows: int, cols: int) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Linear(cols, rows, bias=False)])

    @property
    def weight(self) -> torch.nn.Parameter:
        return self.layers[0].weight


def _temporal_snr(mode: str, snr: float, *, n_rows=256, n_cols=256, steps=300, sketch_dim=4096, seed=0,
                  sketch_seed=0) -> float:
    gen = torch.Generator().manual_seed(seed)
    model = OneLayer(n_rows, n_cols)
    p = model.weight
    n = p.numel()
    mu = torch.randn(p.shape, generator=gen)
    sigma = math.sqrt(float(mu.pow(2).sum()) / (n * snr))
    est = GradientSmoothnessEstimator(model, mode=mode, beta=0.99, sketch_dim=sketch_dim, seed=sketch_seed)
    for _ in range(steps):
        p.grad = None
        (p * (mu + sigma * torch.randn(p.shape, generator=gen))).sum().backward()
        est.step()
    q = est.quality()["layers.0"]
    assert q.sample_count == steps and q.definition == "temporal"
    est.remove()
    return q.snr


@pytest.mark.parametrize("mode", ["exact", "sketch"])
@pytest.mark.parametrize("snr", [0.01, 0.1, 1.0, 10.0, 100.0])
def test_temporal_snr_within_5_percent(mode, snr):
    got = _temporal_snr(mode, snr)
    assert abs(got / snr - 1) < 0.05, (mode, snr, got)


def test_sketch_error_scales_like_sqrt_2_over_k():
    # At high SNR the sketch's own error dominates; with k = 64 it is ~sqrt(2/64) = 18 %.
    k = 64
    errs = [abs(_temporal_snr("sketch", 100.0, n_rows=64, n_cols=64, steps=60, sketch_dim=k, sketch_seed=s) / 100 - 1)
            for s in range(12)]
    rms = math.sqrt(sum(e * e for e in errs) / len(errs))
    expected = math.sqrt(2 / k)
    assert 0.25 * expected < rms < 3 * expected, (rms, expected)


@pytest.mark.parametrize("snr", [0.05, 1.0, 20.0])
def test_microbatch_noise_scale_within_5_percent(snr):
    gen = torch.Generator().manual_seed(1)
    model = OneLayer(64, 64)
    p = model.weight
    n, b, m = p.numel(), 8, 4
    mu = torch.randn(p.shape, generator=gen)
    sigma = math.sqrt(float(mu.pow(2).sum()) / (n * snr))  # per-example noise
    est = GradientSmoothnessEstimator(model, mode="microbatch", beta=0.99, examples_per_microbatch=b)
    for _ in range(300):
        p.grad = None
        for _ in range(m):
            g_i = mu + sigma / math.sqrt(b) * torch.randn(p.shape, generator=gen)  # mean over b examples
            ((p * g_i).sum() / m).backward()
        est.step()
    q = est.quality()["layers.0"]
    truth_b_simple = n * sigma**2 / float(mu.pow(2).sum())
    assert q.definition == "microbatch" and q.sample_count == 300
    assert abs(q.noise_scale / truth_b_simple - 1) < 0.05, (q.noise_scale, truth_b_simple)
    assert abs(q.snr / snr - 1) < 0.05
    assert q.extra["batch_size"] == m * b
    assert abs(q.extra["batch_snr"] / (snr * m * b) - 1) < 0.05


def _direct_per_layer(samples, eps=1e-8):
    """The seed's formulas written out in float64, one layer at a time."""
    layers = {}
    for name in samples[0]:
        idx = layer_index(name)
        if idx is not None:
            layers.setdefault(idx, []).append(name)
    out = {}
    n = len(samples)
    for idx, names in layers.items():
        g = torch.stack([torch.cat([s[k].double().reshape(-1) for k in names]) for s in samples])
        mean = g.mean(0)
        var = float(((g - mean) ** 2).sum()) / (n - 1)
        out[idx] = (var, float(mean.pow(2).sum()) / (var + eps), float(mean.norm()))
    return out


@pytest.mark.parametrize("n_samples", [2, 3, 17])
def test_per_layer_quality_matches_direct_formulas(n_samples):
    gen = torch.Generator().manual_seed(n_samples)
    shapes = {
        "model.layers.0.mlp.weight": (5, 7),
        "model.layers.0.mlp.bias": (5,),
        "transformer.h.1.attn.c_attn.weight": (3, 9),
        "encoder.blocks.2.conv.weight": (2, 3, 3),
        "t5.block.3.layer.0.SelfAttention.q.weight": (4, 4),  # .block.3 comes first → layer 3
        "bert.encoder.layer.4.output.dense.weight": (6, 2),
        "layers.5.weight": (129,),
        "lm_head.weight": (10, 3),  # no layer index → ignored
    }
    samples = [{k: torch.randn(s, generator=gen) * (1 + i) + 0.3 for i, (k, s) in enumerate(shapes.items())}
               for _ in range(n_samples)]
    got = GradientSmoothnessEstimator.per_layer_quality(samples)
    want = _direct_per_layer(samples)
    assert sorted(got) == [0, 1, 2, 3, 4, 5] == sorted(want)
    for idx, (var, snr, mean_norm) in want.items():
        q = got[idx]
        assert q.sample_count == n_samples and q.definition == "per_sample"
        assert q.variance == pytest.approx(var, rel=1e-10)
        assert q.snr == pytest.approx(snr, rel=1e-10)
        assert q.mean_norm == pytest.approx(mean_norm, rel=1e-10)


def test_per_layer_quality_needs_two_samples():
    one = [{"layers.0.w": torch.ones(3)}]
    assert GradientSmoothnessEstimator.per_layer_quality(one) == {}
    assert GradientSmoothnessEstimator.per_layer_quality([]) == {}
    with pytest.raises(TypeError):
        GradientSmoothnessEstimator.per_layer_quality({"layers.0.w": torch.ones(3)})
    with pytest.raises(ValueError, match="lacks"):
        GradientSmoothnessEstimator.per_layer_quality([{"layers.0.w": torch.ones(3)}, {}])
