"""sketch_moments kernel vs its float64 reference; sketch statistics; argument errors."""

import math

import pytest
import torch

# Small tensors on a shared 2-core box: OpenMP spinning costs more than it gives.
torch.set_num_threads(1)

from gradgeom import ops, reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Relative tolerance of the moment sums per dtype (fp32 accumulation for 16/32-bit inputs).
MOMENT_RTOL = {torch.float32: 2e-5, torch.float64: 1e-10, torch.float16: 2e-5, torch.bfloat16: 2e-5}


def _check(tensors, ids, num_groups, offsets, k, seed, device, dtype):
    mom, sk = ops.sketch_moments(tensors, ids, num_groups, offsets=offsets, sketch_dim=k, seed=seed)
    rmom, rsk = reference.sketch_moments(tensors, ids, num_groups, offsets=offsets, sketch_dim=k, seed=seed)
    assert mom.shape == (num_groups, 6) and sk.shape == (num_groups, k)
    assert mom.dtype == sk.dtype == torch.float64 and mom.device.type == sk.device.type == device
    mom, sk, rmom, rsk = mom.cpu(), sk.cpu(), rmom.cpu(), rsk.cpu()
    rtol = MOMENT_RTOL[dtype]
    assert torch.equal(mom[:, 0], rmom[:, 0]), "finite counts"
    assert torch.equal(mom[:, 5], rmom[:, 5]), "non-finite counts"
    assert torch.equal(mom[:, 4], rmom[:, 4]), "max |x|"
    scale = rmom[:, 2].sqrt() * rmom[:, 0].clamp(min=1).sqrt() + 1e-30
    torch.testing.assert_close(mom[:, 1], rmom[:, 1], rtol=0, atol=float((rtol * scale).max()) + 1e-12)
    torch.testing.assert_close(mom[:, 2], rmom[:, 2], rtol=rtol, atol=1e-12)
    torch.testing.assert_close(mom[:, 3], rmom[:, 3], rtol=rtol * 10, atol=float((rtol * rmom[:, 2]).max()) + 1e-12)
    # Sketch sums are per-bucket sums of ~n/k signed terms: compare against the group norm.
    sk_tol = (1e-6 if dtype != torch.float64 or device == "cuda" else 1e-12) * float(rmom[:, 2].sqrt().max() + 1)
    torch.testing.assert_close(sk, rsk, rtol=0, atol=sk_tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [0, 1, 3, 129, 65537, 300001])
def test_single_tensor_matches_reference(device, dtype, n):
    torch.manual_seed(n)
    x = torch.randn(n, device=device).to(dtype)
    for k in (8, 4096):
        _check([x], [0], 1, [0], k, seed=7, device=device, dtype=dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [8, 16, 64, 256, 2048, 4096, 8192])
def test_many_tensors_groups_offsets(device, dtype, k):
    gen = torch.Generator().manual_seed(k)
    sizes = [int(s) for s in torch.randint(0, 5000, (23,), generator=gen)] + [70001, 262145, 129, 3]
    ids = [int(g) for g in torch.randint(0, 5, (len(sizes),), generator=gen)]
    tensors = [(torch.randn(s, generator=gen) * (1 + i)).to(device, dtype) for i, s in enumerate(sizes)]
    # Awkward views: misaligned start, non-contiguous (transposed), a 2-D tensor.
    base = torch.randn(4097, generator=gen).to(device, dtype)
    tensors += [base[1:], torch.randn(33, 65, generator=gen).to(device, dtype).t(), torch.randn(7, 129, generator=gen).to(device, dtype)]
    ids += [1, 2, 4]
    # Offsets with gaps and an odd start, as when some parameters of a group got no gradient.
    offsets, nxt = [], {}
    for t, g in zip(tensors, ids):
        offsets.append(nxt.get(g, 3 * g + 1))
        nxt[g] = offsets[-1] + t.numel() + (5 if g % 2 else 0)
    _check(tensors, ids, 6, offsets, k, seed=k, device=device, dtype=dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_counted_and_excluded(device, dtype):
    torch.manual_seed(1)
    x = torch.randn(70000, device=device).to(dtype)
    x[[0, 17, 65536, 69999]] = torch.tensor([float("nan"), float("inf"), -float("inf"), float("nan")], device=device).to(dtype)
    y = torch.full((9,), float("nan"), device=device).to(dtype)
    mom, sk = ops.sketch_moments([x, y], [0, 1], 2, sketch_dim=64)
    assert mom[0, 5].item() == 4 and mom[0, 0].item() == 69996
    assert mom[1, 5].item() == 9 and mom[1, 0].item() == 0 and torch.all(sk[1] == 0)
    assert torch.isfinite(sk).all() and torch.isfinite(mom).all()
    _check([x, y], [0, 1], 2, None, 64, seed=0, device=device, dtype=dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_and_seeded(device):
    x = torch.randn(300000, device=device)
    a = ops.sketch_moments([x], sketch_dim=512, seed=5)
    b = ops.sketch_moments([x], sketch_dim=512, seed=5)
    c = ops.sketch_moments([x], sketch_dim=512, seed=6)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    # Moments agree with group_moments.
    torch.testing.assert_close(a[0], ops.group_moments([x]), rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_and_cuda_give_the_same_sketch(dtype):
    torch.manual_seed(3)
    ts = [torch.randn(s).to(dtype) for s in (1, 129, 65537, 300001)]
    cpu = ops.sketch_moments(ts, [0, 1, 0, 1], 2, sketch_dim=4096, seed=11)
    gpu = ops.sketch_moments([t.cuda() for t in ts], [0, 1, 0, 1], 2, sketch_dim=4096, seed=11)
    torch.testing.assert_close(gpu[1].cpu(), cpu[1], rtol=0, atol=1e-4)
    torch.testing.assert_close(gpu[0].cpu(), cpu[0], rtol=1e-5, atol=1e-5)


def test_reference_hash_properties():
    k = 256
    bucket, sign = reference.sketch_buckets_and_signs(8 * k, k, seed=2)
    for j in range(8):  # every bucket exactly once per fold, p % 8 kept
        b = bucket[j * k:(j + 1) * k]
        assert sorted(b.tolist()) == list(range(k))
        assert torch.equal(b % 8, torch.arange(k) % 8)
    assert abs(float(sign.mean())) < 0.1


@pytest.mark.parametrize("k", [64, 1024])
def test_sketch_norm_is_unbiased_with_sqrt_2_over_k_spread(k):
    gen = torch.Generator().manual_seed(k)
    ratios = []
    for seed in range(300):
        x = torch.randn(20000, generator=gen, dtype=torch.float64)
        _, y = ops.sketch_moments([x], sketch_dim=k, seed=seed)
        ratios.append(float((y * y).sum() / (x * x).sum()))
    r = torch.tensor(ratios, dtype=torch.float64)
    expected_std = math.sqrt(2.0 / k)
    assert abs(float(r.mean()) - 1.0) < 4 * expected_std / math.sqrt(len(ratios))
    assert 0.8 * expected_std < float(r.std()) < 1.2 * expected_std


def test_structured_column_pattern_is_spread():
    # A weight column: every row has the same nonzero position; rows of length k would put it in
    # one bucket without the per-fold rotation.
    k = 512
    ratios = []
    for seed in range(300):
        w = torch.zeros(256, k, dtype=torch.float64)
        w[:, 5] = torch.randn(256, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        _, y = ops.sketch_moments([w], sketch_dim=k, seed=seed)
        ratios.append(float((y * y).sum() / (w * w).sum()))
    r = torch.tensor(ratios, dtype=torch.float64)
    assert abs(float(r.mean()) - 1.0) < 0.05
    assert float(r.std()) < 0.25


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    ts = [torch.randn(5, 7, device=device), torch.randn(129, device=device, dtype=torch.bfloat16)]
    torch.library.opcheck(torch.ops.gradgeom.sketch_moments, (ts, [0, 1], [0, 0], 2, 64, 3))
    torch.library.opcheck(torch.ops.gradgeom.sketch_moments, (ts, [0, 0], [0, 35], 1, 8, 0))


def test_works_under_torch_compile():
    x = torch.randn(1000)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def f(t):
        return torch.ops.gradgeom.sketch_moments([t * 2], [0], [0], 1, 64, 0)

    mom, sk = f(x)
    rmom, rsk = ops.sketch_moments([x * 2], sketch_dim=64)
    assert torch.equal(sk, rsk) and torch.equal(mom, rmom)


def test_bad_arguments():
    x = torch.randn(10)
    with pytest.raises(ValueError, match="sketch_dim must be a power of two"):
        ops.sketch_moments([x], sketch_dim=100)
    with pytest.raises(ValueError, match="sketch_dim"):
        ops.sketch_moments([x], sketch_dim=16384)
    with pytest.raises(TypeError, match="sketch_dim must be an int"):
        ops.sketch_moments([x], sketch_dim=64.0)
    with pytest.raises(ValueError, match="offsets must have one entry per tensor"):
        ops.sketch_moments([x], offsets=[0, 1], sketch_dim=64)
    with pytest.raises(ValueError, match=r"offsets\[0\] = -1"):
        ops.sketch_moments([x], offsets=[-1], sketch_dim=64)
    with pytest.raises(TypeError, match="dtype"):
        ops.sketch_moments([torch.arange(3)], sketch_dim=64)
    with pytest.raises(ValueError, match="outside"):
        ops.sketch_moments([x], [3], 2, sketch_dim=64)
    # The C++ checks, reached directly.
    with pytest.raises(ValueError, match="sketch_dim must be a power of two"):
        torch.ops.gradgeom.sketch_moments([x], [0], [0], 1, 12, 0)
    with pytest.raises(ValueError, match="offsets must have one entry"):
        torch.ops.gradgeom.sketch_moments([x], [0], [], 1, 64, 0)
    with pytest.raises(ValueError, match=r"offsets\[0\]"):
        torch.ops.gradgeom.sketch_moments([x], [0], [-4], 1, 64, 0)
    with pytest.raises(TypeError, match="dtype"):
        torch.ops.gradgeom.sketch_moments([torch.arange(3)], [0], [0], 1, 64, 0)


def test_empty_list():
    mom, sk = ops.sketch_moments([], num_groups=2, sketch_dim=8)
    assert mom.shape == (2, 6) and sk.shape == (2, 8) and not mom.any() and not sk.any()
