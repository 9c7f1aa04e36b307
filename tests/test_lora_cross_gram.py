"""lora_cross_gram (B1ᵢᵀ·B2ᵢ of ragged factor pairs, float64) on CPU and CUDA against its float64
reference."""

import pytest
import torch

from conftest import at_thread_counts, requires_cuda
from gradgeom import lora_ops, reference

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Both devices widen the factors to float64 and accumulate in float64, so they differ from the
# reference's matmul only by the order of the sums: about sqrt(d)·1e-16 of ‖B1ᵢ‖_F·‖B2ᵢ‖_F. An
# fp32 accumulation would be off by ~1e-8 of that, so 1e-12 leaves room without hiding one.
RTOL = 1e-12


def rand(shape, dtype, device, scale=1.0):
    return (torch.randn(shape, dtype=torch.float64, device=device) * scale).to(dtype)


def rand_int(shape, dtype, device):
    """Integers in [-255, 255]: exact in every input dtype; their products (up to 65025) are not
    representable in fp16/bf16, and sums over 65537 rows exceed fp32's 2^24 but not fp64's 2^53."""
    return torch.randint(-255, 256, shape, device=device).to(dtype)


def padding_mask(B1s, B2s, R):
    """True outside each pair's [:p_i, :q_i] corner."""
    mask = torch.ones((len(B1s), R, R), dtype=torch.bool)
    for i, (x, y) in enumerate(zip(B1s, B2s)):
        mask[i, : x.shape[1], : y.shape[1]] = False
    return mask


def assert_cross_close(got, B1s, B2s):
    """got matches the float64 reference pair by pair, norm-relative, with exact-zero padding."""
    ref = reference.lora_cross_gram(B1s, B2s)
    assert got.dtype == torch.float64 and got.shape == ref.shape
    assert got.device == B1s[0].device
    got, ref = got.cpu(), ref.cpu()
    assert torch.isfinite(got).all()
    assert torch.all(got[padding_mask(B1s, B2s, got.shape[-1])] == 0)
    for i, (x, y) in enumerate(zip(B1s, B2s)):
        scale = x.detach().cpu().double().norm() * y.detach().cpu().double().norm()
        err = (got[i] - ref[i]).norm()
        assert err <= RTOL * scale, (i, float(err / scale.clamp_min(1e-300)))


def assert_matches_and_repeats(B1s, B2s):
    got = lora_ops.lora_cross_gram(B1s, B2s)
    assert_cross_close(got, B1s, B2s)
    assert torch.equal(got, lora_ops.lora_cross_gram(B1s, B2s))  # same input, same bits
    return got


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d,p,q", [(0, 0, 0), (0, 3, 16), (1, 1, 1), (1, 0, 33), (3, 16, 0), (3, 3, 128),
                                   (3, 128, 1), (129, 16, 33), (129, 33, 16), (129, 1, 128), (129, 128, 128),
                                   (129, 0, 3), (65537, 1, 3), (65537, 3, 1), (65537, 16, 3)])
def test_lora_cross_gram_single_matches_reference(device, dtype, d, p, q):
    B1, B2 = rand((d, p), dtype, device), rand((d, q), dtype, device, 0.1)
    got = assert_matches_and_repeats([B1], [B2])
    assert got.shape == (1, max(p, q), max(p, q))


@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_cross_gram_integer_data_is_exact(device, dtype):
    """Integer-valued factors: the float64 products and sums are exact, so the op must give the
    reference's bits on every device (an fp32 product or accumulation would not)."""
    shapes = [(65537, 3, 5), (4099, 33, 16), (129, 128, 1), (1, 1, 1), (0, 2, 3)]
    B1s = [rand_int((d, p), dtype, device) for d, p, _ in shapes]
    B2s = [rand_int((d, q), dtype if i % 2 else torch.bfloat16, device) for i, (d, _, q) in enumerate(shapes)]
    B1s[0] = torch.full((65537, 3), 255.0, dtype=dtype, device=device)  # a column sum of 4.26e9 > 2^24
    B2s[0][:, 0] = 255.0
    got = lora_ops.lora_cross_gram(B1s, B2s)
    ref = reference.lora_cross_gram(B1s, B2s)
    assert got[0, 0, 0] == 65537 * 255 * 255
    assert torch.equal(got.cpu(), ref.cpu())


def test_lora_cross_gram_ragged_mixed_dtypes(device):
    """Different d, p, q and dtype per tensor in one call (p or q 0, d 0, R set by a q)."""
    f32, f64, f16, bf16 = torch.float32, torch.float64, torch.float16, torch.bfloat16
    pairs = [
        ((130, 16, f32), (130, 7, bf16)),
        ((1, 33, bf16), (1, 128, f64)),
        ((65537, 3, f16), (65537, 1, f32)),
        ((129, 0, f64), (129, 5, f16)),
        ((7, 4, bf16), (7, 0, bf16)),
        ((0, 5, f32), (0, 6, f16)),
        ((3, 128, f64), (3, 3, f64)),
        ((300, 1, f16), (300, 1, bf16)),
    ]
    B1s = [rand((d, p), dt, device) for (d, p, dt), _ in pairs]
    B2s = [rand((d, q), dt, device) for _, (d, q, dt) in pairs]
    got = assert_matches_and_repeats(B1s, B2s)
    assert got.shape == (8, 128, 128)
    assert torch.all(got[3] == 0) and torch.all(got[4] == 0) and torch.all(got[5] == 0)


def test_lora_cross_gram_many_pairs(device):
    """Hundreds of small ragged pairs (more than one batch of kernel arguments)."""
    g = torch.Generator().manual_seed(3)
    B1s, B2s = [], []
    for i in range(600):
        d, p, q = (int(v) for v in torch.randint(0, 40, (3,), generator=g))
        B1s.append(torch.randn(d, p % 9, generator=g).to(device, DTYPES[i % 4]))
        B2s.append(torch.randn(d, q % 9, generator=g).to(device, DTYPES[(i // 4) % 4]))
    B1s[17] = torch.randn(2000, 33, generator=g).to(device)
    B2s[17] = torch.randn(2000, 2, generator=g).to(device, torch.bfloat16)
    got = assert_matches_and_repeats(B1s, B2s)
    assert got.shape == (600, 33, 33)


@pytest.mark.parametrize("n", [1, 2, 40])
def test_cpu_lora_cross_gram_bits_do_not_depend_on_threads(n):
    """The CPU kernel shares out whole pairs when there are enough of them, else blocks of rows;
    either way each product sums its blocks in row order in fp64, so the thread count (which picks
    the way) never changes a bit."""
    g = torch.Generator().manual_seed(11)
    B1s = [torch.randn(700 + 97 * i, 3 + 7 * (i % 5), generator=g) for i in range(n)]
    B2s = [torch.randn(B.shape[0], 1 + 5 * (i % 7), generator=g).to(torch.bfloat16) for i, B in enumerate(B1s)]
    got = at_thread_counts(lambda: lora_ops.lora_cross_gram(B1s, B2s))
    for x in got[1:]:
        assert torch.equal(x, got[0])
    assert_cross_close(got[0], B1s, B2s)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_cross_gram_strided_views(device, dtype):
    base = rand((130, 67), dtype, device)
    flat = rand((1 + 129 * 5,), dtype, device)
    B1s = [
        base[1:, ::2],                                    # [129, 34]: row offset, column stride 2
        rand((16, 129), dtype, device).mT,                # transposed view of a [p, d] tensor
        flat[1:].view(129, 5),                            # odd element offset
        rand((9, 131), dtype, device)[:, 1:130].mT,       # transposed, odd offset, row stride 1
        rand((1, 7), dtype, device).expand(129, 7),       # stride-0 rows
        rand((129, 40), dtype, device)[:, 3:3 + 33],      # unaligned columns, p = 33
    ]
    B2s = [
        rand((129, 3), dtype, device),
        base[1:, 1::4],                                   # column offset 1, column stride 4
        rand((40, 129), dtype, device)[::2].mT,           # transposed, column stride 2 rows apart
        rand((129, 1), dtype, device).expand(129, 9),     # stride-0 columns
        rand((129, 128), dtype, device).t().contiguous().t(),  # column-major
        flat[1:].view(129, 5)[:, 1:4],                    # offset 2, row stride 5
    ]
    assert all(x.shape[0] == y.shape[0] == 129 for x, y in zip(B1s, B2s))
    assert sum(not t.is_contiguous() for t in B1s + B2s) >= 10
    assert B1s[2].storage_offset() % 2 == 1 and B1s[3].storage_offset() % 2 == 1
    got = assert_matches_and_repeats(B1s, B2s)
    assert got.shape == (6, 128, 128)
    contiguous = lora_ops.lora_cross_gram([x.contiguous() for x in B1s], [y.contiguous() for y in B2s])
    assert_cross_close(contiguous, B1s, B2s)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_cross_gram_non_finite(device, dtype):
    """A NaN in B1s[i] row k, column j makes out[i, j, :q_i] NaN; an Inf in B2s[i] column c makes
    out[i, :p_i, c] ±Inf (no zero factors); the other entries, the other pairs and the padding
    are unaffected."""
    B1s = [rand((200, 4), dtype, device) for _ in range(4)]
    B2s = [rand((200, q), dtype, device) for q in (3, 6, 2, 5)]
    clean = lora_ops.lora_cross_gram(B1s, B2s).cpu()
    scales = [x.cpu().double().norm() * y.cpu().double().norm() for x, y in zip(B1s, B2s)]
    B1s[0][57, 2] = float("nan")
    B2s[1][199, 4] = float("inf")
    B2s[3][0, 0] = float("nan")
    got = lora_ops.lora_cross_gram(B1s, B2s).cpu()
    ref = reference.lora_cross_gram(B1s, B2s).cpu()
    assert got.shape == (4, 6, 6)
    expect_nan = torch.zeros((4, 6, 6), dtype=torch.bool)
    expect_nan[0, 2, :3] = True
    expect_nan[3, :4, 0] = True
    expect_inf = torch.zeros((4, 6, 6), dtype=torch.bool)
    expect_inf[1, :4, 4] = True
    assert torch.equal(ref.isnan(), expect_nan) and torch.equal(ref.isinf(), expect_inf)
    assert torch.equal(got.isnan(), expect_nan), got.isnan().nonzero().tolist()
    assert torch.equal(got.isinf(), expect_inf), got.isinf().nonzero().tolist()
    assert torch.equal(torch.sign(got[expect_inf]), torch.sign(ref[expect_inf]))
    finite = ~(expect_nan | expect_inf)
    for i in range(4):  # the finite entries are those of the clean input
        assert (got[i][finite[i]] - clean[i][finite[i]]).norm() <= RTOL * scales[i]
    assert torch.equal(got[2], clean[2])  # a clean pair beside non-finite ones: the same bits
    assert torch.all(got[padding_mask(B1s, B2s, 6)] == 0)


def test_lora_cross_gram_padding_is_exactly_zero(device):
    """Entries outside each pair's p_i x q_i corner are exactly 0, even when the output's memory
    held NaN just before (a recycled allocator block)."""
    B1s = [rand((50, p), torch.float32, device) for p in (1, 33, 0, 7)]
    B2s = [rand((50, q), torch.bfloat16, device) for q in (16, 2, 9, 0)]
    for _ in range(3):
        junk = torch.full((4, 33, 33), float("nan"), dtype=torch.float64, device=device)
        del junk
        got = lora_ops.lora_cross_gram(B1s, B2s)
        mask = padding_mask(B1s, B2s, 33)
        assert got.shape == (4, 33, 33)
        assert torch.all(got.cpu()[mask] == 0)
    assert_cross_close(got, B1s, B2s)


def test_lora_cross_gram_empty(device):
    for out in (lora_ops.lora_cross_gram([], []), reference.lora_cross_gram([], [])):
        assert out.shape == (0, 0, 0) and out.dtype == torch.float64 and out.device.type == "cpu"
    out = lora_ops.lora_cross_gram((), (), device=device)
    assert out.shape == (0, 0, 0) and out.dtype == torch.float64 and out.device.type == torch.device(device).type
    assert reference.lora_cross_gram([], [], device=device).device.type == torch.device(device).type
    # Pairs of empty factors: a [n, 0, 0] result on their device.
    e = torch.zeros((0, 0), device=device)
    got = lora_ops.lora_cross_gram([e, e], [e, e.double()])
    assert got.shape == (2, 0, 0) and got.dtype == torch.float64 and got.device.type == torch.device(device).type
    got = lora_ops.lora_cross_gram([torch.zeros((5, 0), device=device)], [torch.zeros((5, 0), device=device)])
    assert got.shape == (1, 0, 0)


def test_lora_cross_gram_op_empty_lists():
    """With no tensor argument the dispatcher has no device to pick a kernel for (as for lora_gram):
    the operator raises, and the functional wrapper returns float64 [0, 0, 0]."""
    with pytest.raises((NotImplementedError, RuntimeError)):
        torch.ops.gradgeom.lora_cross_gram([], [])
    out = lora_ops.lora_cross_gram([], [])
    assert out.shape == (0, 0, 0) and out.dtype == torch.float64 and out.device.type == "cpu"


def cross_gram_calls():
    """The op and the functional wrapper: both must raise the C++ op's errors."""
    return [torch.ops.gradgeom.lora_cross_gram, lora_ops.lora_cross_gram]


@pytest.mark.parametrize("fn", cross_gram_calls(), ids=["op", "wrapper"])
def test_lora_cross_gram_bad_input(device, fn):
    x, y = torch.randn(5, 3, device=device), torch.randn(5, 4, device=device)
    value_errors = [
        ([x, x], [y], "same length"),                   # lists of different lengths
        ([x], [y, y], "same length"),
        ([], [y], "same length"),
        ([x.reshape(-1)], [y], "2-D"),                  # not 2-D
        ([x], [y.reshape(1, 5, 4)], "2-D"),
        ([x, x[None]], [y, y], "2-D"),
        ([x], [torch.randn(6, 4, device=device)], "same number of rows"),  # d differs
        ([x, x], [y, y[1:]], "same number of rows"),
    ]
    for B1s, B2s, what in value_errors:
        with pytest.raises(ValueError, match=f"^lora_cross_gram: .*{what}"):
            fn(B1s, B2s)
    type_errors = [
        ([x.long()], [y]),                              # unsupported dtypes
        ([x], [y.int()]),
        ([x, x.to(torch.bool)], [y, y]),
        ([x.to(torch.complex64)], [y]),
    ]
    for B1s, B2s in type_errors:
        with pytest.raises(TypeError, match="^lora_cross_gram: .*dtype"):
            fn(B1s, B2s)
    if device.type == "cuda":
        for B1s, B2s in (([x], [y.cpu()]), ([x.cpu()], [y]), ([x, x.cpu()], [y, y.cpu()]), ([x, x], [y, y.cpu()])):
            with pytest.raises(ValueError, match="^lora_cross_gram: .*one device"):
                fn(B1s, B2s)


def test_lora_cross_gram_rejects_a_meta_tensor_among_cpu_ones():
    """Tensors on different devices (a meta tensor beside CPU ones) fail before any kernel runs."""
    x, y = torch.randn(5, 3), torch.randn(5, 4)
    for B1s, B2s in (([x], [y.to("meta")]), ([x, x.to("meta")], [y, y.to("meta")])):
        with pytest.raises(ValueError, match="^lora_cross_gram: .*one device"):
            lora_ops.lora_cross_gram(B1s, B2s)


def test_lora_cross_gram_wrapper_matches_op_and_checks_types(device):
    B1s = [rand((33, 4), torch.float32, device), rand((7, 9), torch.bfloat16, device)]
    B2s = [rand((33, 5), torch.float64, device), rand((7, 1), torch.float16, device)]
    got = lora_ops.lora_cross_gram(tuple(B1s), B2s)
    assert torch.equal(got, torch.ops.gradgeom.lora_cross_gram(B1s, B2s))
    assert "lora_cross_gram" in lora_ops.__all__ and "lora_cross_gram" in reference.__all__
    for B1s_, B2s_, name in [
        (B1s[0], B2s, "B1s"),                          # a tensor, not a list
        (B1s, B2s[0], "B2s"),
        (None, B2s, "B1s"),
        (B1s, iter(B2s), "B2s"),                       # not a list or tuple
        ([[1.0, 2.0]], B2s[:1], r"B1s\[0\]"),           # an element that is not a tensor
        (B1s, [B2s[0], 3.0], r"B2s\[1\]"),
        (B1s, [B2s[0], None], r"B2s\[1\]"),
    ]:
        with pytest.raises(TypeError, match=f"^lora_cross_gram: .*{name}"):
            lora_ops.lora_cross_gram(B1s_, B2s_)


def test_lora_cross_gram_opcheck(device):
    B1s = [rand((33, 4), torch.float32, device), rand((7, 9), torch.bfloat16, device), rand((0, 2), torch.float64, device)]
    B2s = [rand((33, 5), torch.float64, device), rand((7, 1), torch.float16, device), rand((0, 3), torch.float32, device)]
    torch.library.opcheck(torch.ops.gradgeom.lora_cross_gram.default, (B1s, B2s))
    grad = [B1s[0].clone().requires_grad_()] + B1s[1:]
    torch.library.opcheck(torch.ops.gradgeom.lora_cross_gram.default, (grad, B2s))
    out = torch.ops.gradgeom.lora_cross_gram(grad, B2s)
    assert not out.requires_grad  # not differentiable: the Autograd kernel runs below autograd
    assert torch.equal(out, torch.ops.gradgeom.lora_cross_gram(B1s, B2s))


@requires_cuda
def test_cuda_lora_cross_gram_does_not_synchronise():
    """Neither a first call on new tensors (its pair table goes up) nor a repeated one waits for
    the GPU."""
    g = torch.Generator().manual_seed(1)
    B1s = [torch.randn(4096, 16, generator=g).to("cuda", torch.bfloat16) for _ in range(224)]
    B2s = [torch.randn(4096, 16 if i % 3 else 33, generator=g).to("cuda", torch.bfloat16) for i in range(224)]
    warm = torch.randn(8, 2, device="cuda")
    lora_ops.lora_cross_gram([warm], [warm])  # CUDA context and lazy initialisation
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = lora_ops.lora_cross_gram(B1s, B2s)
        again = torch.ops.gradgeom.lora_cross_gram(B1s, B2s)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.equal(got, again)
    assert_cross_close(got, B1s, B2s)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_lora_cross_gram_long_and_wide(dtype):
    """Long factors (many row splits merged on the GPU) with wide p, q, and the CPU op on the same
    input: both float64 accumulations, within RTOL of each other and of the reference."""
    g = torch.Generator().manual_seed(2)
    shapes = [(300_001, 16, 33), (65537, 128, 128), (4133, 128, 1), (70_000, 1, 64)]
    B1s = [torch.randn(d, p, generator=g).to("cuda", dtype) for d, p, _ in shapes]
    B2s = [torch.randn(d, q, generator=g).to("cuda", dtype) for d, _, q in shapes]
    got = assert_matches_and_repeats(B1s, B2s)
    cpu = lora_ops.lora_cross_gram([x.cpu() for x in B1s], [y.cpu() for y in B2s])
    assert_cross_close(cpu, [x.cpu() for x in B1s], [y.cpu() for y in B2s])
    for i, (x, y) in enumerate(zip(B1s, B2s)):
        scale = x.double().norm() * y.double().norm()
        assert (got[i].cpu() - cpu[i]).norm() <= RTOL * scale.cpu()
