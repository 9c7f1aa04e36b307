"""group_moments kernels (CPU and CUDA) against the float64 reference."""

import math

import pytest
import torch

import gradgeom
from gradgeom import ops, reference
from conftest import requires_cuda

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Relative tolerance of sum-like columns against the exact float64 reference.
RTOL = {torch.float64: 1e-11, torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}
SIZES = [0, 1, 3, 129, 65537, 4096 + 32, 2 * 65536 + 7]


def assert_moments_close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == torch.float64 and got.shape == ref.shape
    got, ref = got.cpu(), ref.cpu()
    assert torch.isfinite(got).all(), got
    rtol = RTOL[dtype]
    assert torch.equal(got[:, 0], ref[:, 0]), (got[:, 0], ref[:, 0])  # finite count
    assert torch.equal(got[:, 5], ref[:, 5]), (got[:, 5], ref[:, 5])  # non-finite count
    assert torch.equal(got[:, 4], ref[:, 4]), (got[:, 4], ref[:, 4])  # max |x| is exact
    torch.testing.assert_close(got[:, 2], ref[:, 2], rtol=rtol, atol=0)
    torch.testing.assert_close(got[:, 3], ref[:, 3], rtol=rtol, atol=1e-300)
    scale = torch.sqrt(ref[:, 0] * ref[:, 2])  # Cauchy-Schwarz bound on |sum|
    assert torch.all((got[:, 1] - ref[:, 1]).abs() <= rtol * scale + 1e-300), (got[:, 1], ref[:, 1])


def rand(n, dtype, device, scale=1.0, offset=0.0):
    return (torch.randn(n, dtype=torch.float64, device=device) * scale + offset).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_single_tensor_matches_reference(device, dtype, n):
    x = rand(n, dtype, device, scale=3.0, offset=0.5)
    got = ops.group_moments([x])
    assert got.device == x.device
    assert_moments_close(got, reference.group_moments([x]), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shift", [1, 2, 3, 5, 7])
def test_unaligned_slices(device, dtype, shift):
    buf = rand(3 * 65536 + 100, dtype, device)
    views = [buf[shift:shift + n] for n in (1, 3, 129, 65537, 2 * 65536 + 5)]
    ids = list(range(len(views)))
    assert_moments_close(ops.group_moments(views, ids), reference.group_moments(views, ids), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_views(device, dtype):
    base = rand(129 * 300, dtype, device).reshape(129, 300)
    views = [
        base.t(),                      # dense, permuted
        base[:, ::2],                  # gapped
        base[3:70, 5:301:3],           # gapped and offset
        base[:1].expand(5, 300),       # overlapping (stride 0): each row counted
        base.reshape(3, 43, 300).permute(2, 0, 1),
    ]
    ids = [0, 1, 2, 3, 3]
    assert_moments_close(ops.group_moments(views, ids), reference.group_moments(views, ids), dtype)


def test_many_tensors_many_groups(device):
    g = torch.Generator().manual_seed(1234)
    tensors, ids = [], []
    num_groups = 41  # some groups stay empty
    for i in range(1200):
        n = int(torch.randint(0, 3000, (1,), generator=g))
        if i % 97 == 0:
            n = 70000
        dtype = DTYPES[i % len(DTYPES)]
        tensors.append(rand(n, dtype, device, scale=float(i % 7 + 1), offset=float(i % 3)))
        ids.append(int(torch.randint(0, num_groups - 3, (1,), generator=g)))
    got = ops.group_moments(tensors, ids, num_groups)
    ref = reference.group_moments(tensors, ids, num_groups)
    assert_moments_close(got, ref, torch.float32)
    assert torch.equal(got[-3:], torch.zeros(3, 6, dtype=torch.float64, device=got.device))


@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_counted_not_summed(device, dtype):
    x = rand(65537 + 300, dtype, device)
    idx = torch.randperm(x.numel(), device=device)[:50]
    specials = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=dtype, device=device)
    x[idx] = specials[torch.arange(50, device=device) % 3]
    y = torch.full((17,), float("nan"), dtype=dtype, device=device)  # a group with no finite element
    got = ops.group_moments([x, y], [0, 1])
    assert got[0, 5].item() == 50 and got[1, 5].item() == 17 and got[1, 0].item() == 0
    assert_moments_close(got, reference.group_moments([x, y], [0, 1]), dtype)


def test_m2_is_stable_for_large_mean(device):
    # Sum of squares minus n*mean^2 would lose every digit here; Chan merging keeps them.
    x = torch.randn(300000, dtype=torch.float64, device=device).to(torch.float32) * 1e-3 + 1e4
    got = ops.group_moments([x])
    ref = reference.group_moments([x])
    torch.testing.assert_close(got[:, 3].cpu(), ref[:, 3].cpu(), rtol=1e-3, atol=0)


def test_deterministic(device):
    tensors = [rand(n, torch.bfloat16, device) for n in (5, 65536 * 3 + 11, 999, 70001)]
    a = ops.group_moments(tensors, [0, 1, 0, 1])
    if device.type == "cpu":
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            b = ops.group_moments(tensors, [0, 1, 0, 1])
        finally:
            torch.set_num_threads(threads)
    else:
        b = ops.group_moments(tensors, [0, 1, 0, 1])
    assert torch.equal(a, b)


def test_empty_inputs(device):
    out = ops.group_moments([], num_groups=3, device=device)
    assert out.shape == (3, 6) and out.dtype == torch.float64 and not out.any()
    out = ops.group_moments([torch.empty(0, 4, device=device)], [1], 2)
    assert torch.equal(out.cpu(), torch.zeros(2, 6, dtype=torch.float64))


def test_default_groups(device):
    tensors = [rand(10, torch.float32, device), rand(20, torch.float32, device)]
    assert ops.group_moments(tensors).shape == (1, 6)
    assert ops.group_moments(tensors, [0, 2]).shape == (3, 6)


def test_opcheck(device):
    tensors = [rand(n, dt, device) for n, dt in ((129, torch.float32), (70000, torch.bfloat16), (3, torch.float16))]
    torch.library.opcheck(torch.ops.gradgeom.group_moments.default, (tensors, [0, 1, 1], 2))


def test_torch_compile_smoke(device):
    @torch.compile(backend="aot_eager", fullgraph=True)
    def f(a, b):
        m = ops.group_moments([a * 2, b], [0, 1], 2)
        return m[:, 2].sqrt()

    a, b = rand(1000, torch.float32, device), rand(77, torch.float32, device)
    want = torch.stack([(a.double() * 2).pow(2).sum().sqrt(), b.double().pow(2).sum().sqrt()])
    torch.testing.assert_close(f(a, b).cpu(), want.cpu(), rtol=1e-5, atol=0)


@pytest.mark.parametrize(
    "call, err, match",
    [
        (lambda: ops.group_moments([torch.ones(3, dtype=torch.int64)]), TypeError, r"tensors\[0\] has dtype Long"),
        (lambda: ops.group_moments([torch.ones(3, dtype=torch.complex64)]), TypeError, r"tensors\[0\] has dtype ComplexFloat"),
        (lambda: ops.group_moments([torch.ones(3)], [0, 1]), ValueError, "one entry per tensor"),
        (lambda: ops.group_moments([torch.ones(3)], [2], 2), ValueError, r"group_ids\[0\] = 2"),
        (lambda: ops.group_moments([torch.ones(3)], [-1], 2), ValueError, r"group_ids\[0\] = -1"),
        (lambda: ops.group_moments([torch.ones(3)], [0], 0), ValueError, "num_groups must be >= 1"),
        (lambda: ops.group_moments(torch.ones(3)), TypeError, "list or tuple"),
        (lambda: ops.group_moments([torch.ones(3), "x"]), TypeError, r"tensors\[1\]"),
    ],
)
def test_bad_input_python(call, err, match):
    with pytest.raises(err, match=match):
        call()


@pytest.mark.parametrize(
    "args, err, match",
    [
        (([torch.ones(3, dtype=torch.int32)], [0], 1), TypeError, r"tensors\[0\] has dtype Int"),
        (([torch.ones(3), torch.ones(2)], [0], 1), ValueError, "one entry per tensor"),
        (([torch.ones(3)], [5], 2), ValueError, r"group_ids\[0\] = 5"),
        (([torch.ones(3)], [0], 0), ValueError, "num_groups must be >= 1"),
    ],
)
def test_bad_input_cpp(args, err, match):
    with pytest.raises(err, match=match):
        torch.ops.gradgeom.group_moments(*args)


@requires_cuda
def test_mixed_devices_rejected():
    with pytest.raises(ValueError, match="one device"):
        ops.group_moments([torch.ones(3, device="cuda"), torch.ones(3)])
    with pytest.raises(ValueError, match="one device"):
        ops.group_moments([torch.ones(3), torch.ones(3, device="cuda")])
    with pytest.raises((ValueError, RuntimeError), match="device"):
        torch.ops.gradgeom.group_moments([torch.ones(3, device="cuda"), torch.ones(3)], [0, 0], 1)


def _periodic_bf16(n: int, device) -> torch.Tensor:
    """x[i] = ((i % 256) - 128) / 16, exact in bf16; n must be a multiple of 256."""
    pattern = ((torch.arange(256, dtype=torch.float32) - 128) / 16).to(torch.bfloat16).to(device)
    x = torch.empty(n, dtype=torch.bfloat16, device=device)
    x.view(-1, 256).copy_(pattern.expand(n // 256, 256))
    return x


def _periodic_expected(n: int, extra_nan: int, big: float) -> list:
    k = torch.arange(256, dtype=torch.float64)
    v = (k - 128) / 16
    periods = n // 256
    # the big value replaces one element with value v[10] (index 2**31 + 10 -> i % 256 == 10)
    count = n - extra_nan
    s = periods * v.sum().item() - v[5].item() * extra_nan - v[10].item() + big
    ss = periods * (v * v).sum().item() - (v[5].item() ** 2) * extra_nan - v[10].item() ** 2 + big * big
    m2 = ss - s * s / count
    return [count, s, ss, m2, big, extra_nan]


def _check_large(device):
    n = 2**31 + 256 * 3
    x = _periodic_bf16(n, device)
    x[2**31 + 5] = float("nan")  # i % 256 == 5
    x[2**31 + 10] = 1000.0       # i % 256 == 10; exactly representable in bf16
    got = ops.group_moments([x]).cpu()[0]
    want = torch.tensor(_periodic_expected(n, 1, 1000.0), dtype=torch.float64)
    assert got[0].item() == want[0] and got[5].item() == 1 and got[4].item() == 1000.0
    torch.testing.assert_close(got[1:4], want[1:4], rtol=1e-6, atol=1e-3)


@pytest.mark.slow
def test_more_than_2_pow_31_elements_cpu():
    _check_large("cpu")


@requires_cuda
@pytest.mark.slow
def test_more_than_2_pow_31_elements_cuda():
    _check_large("cuda")


@requires_cuda
def test_no_host_sync_on_cuda():
    tensors = [torch.randn(n, device="cuda", dtype=torch.bfloat16) for n in (100, 70001, 5)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = ops.group_moments(tensors, [0, 1, 1])
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert_moments_close(out, reference.group_moments(tensors, [0, 1, 1]), torch.bfloat16)


@requires_cuda
def test_cuda_matches_cpu_kernel():
    tensors = [rand(n, torch.float32, "cpu") for n in (1, 65537, 300001)]
    a = ops.group_moments(tensors, [0, 1, 1])
    b = ops.group_moments([t.cuda() for t in tensors], [0, 1, 1]).cpu()
    assert_moments_close(b, a, torch.float32)


def test_compiled_with_cuda_reports_bool():
    assert isinstance(gradgeom.compiled_with_cuda(), bool)
