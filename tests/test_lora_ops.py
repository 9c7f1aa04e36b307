"""lora_gram and sym_eigh native ops (CPU and CUDA) against their float64 references."""

import math

import pytest
import torch

from conftest import at_thread_counts
from gradgeom import lora_ops, reference

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Gram entries against the exact float64 Gram, relative to sqrt(G_ii·G_jj) (Cauchy-Schwarz):
# fp32 accumulation over blocks of rows, fp64 merge.
# Relative to sqrt(G_ii * G_jj). Inputs of 16/32 bits accumulate in fp32 along rows of up to a few
# thousand elements per thread (then fp64 across splits): rounding grows like sqrt(rows) * 6e-8,
# 2.2e-6 was seen on the H100 with 4128-element rows, so 1e-5 leaves room without hiding a bug.
GRAM_RTOL = {torch.float64: 1e-13, torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}


def rand(shape, dtype, device, scale=1.0):
    return (torch.randn(shape, dtype=torch.float64, device=device) * scale).to(dtype)


def assert_gram_close(got, ref, dtype):
    assert got.dtype == torch.float64 and got.shape == ref.shape
    got, ref = got.cpu(), ref.cpu()
    assert torch.isfinite(got).all()
    d = torch.diagonal(ref, dim1=-2, dim2=-1).clamp_min(0)
    scale = (d.unsqueeze(-1) * d.unsqueeze(-2)).sqrt()
    err = (got - ref).abs()
    assert torch.all(err <= GRAM_RTOL[dtype] * scale + 1e-300), (err / (scale + 1e-300)).max()
    assert torch.equal(got, got.mT)


def assert_grams_match_and_repeat(Bs, As, dtype):
    """lora_gram(Bs, As) matches the float64 reference within dtype's tolerance and a second call
    gives the same bits."""
    gb, ga = lora_ops.lora_gram(Bs, As)
    rb, ra = reference.lora_gram(Bs, As)
    assert_gram_close(gb, rb, dtype)
    assert_gram_close(ga, ra, dtype)
    again = lora_ops.lora_gram(Bs, As)
    assert torch.equal(gb, again[0]) and torch.equal(ga, again[1])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d,k,r", [(1, 1, 1), (7, 3, 2), (129, 65, 8), (4128, 64, 33), (64, 4128, 64), (300, 7, 256),
                                   (65537, 1, 3), (0, 5, 4), (5, 0, 4), (3, 3, 0),
                                   (200, 150, 80), (129, 1, 100)])
def test_lora_gram_single_matches_reference(device, dtype, d, k, r):
    B, A = rand((d, r), dtype, device), rand((r, k), dtype, device, 0.1)
    gb, ga = lora_ops.lora_gram([B], [A])
    rb, ra = reference.lora_gram([B], [A])
    assert gb.device == B.device
    assert_gram_close(gb, rb, dtype)
    assert_gram_close(ga, ra, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_gram_ragged_mixed_and_views(device, dtype):
    base = rand((40, 50), dtype, device)
    Bs = [
        rand((130, 16), dtype, device),
        base[3:36:2, 1:18],                      # gapped view, r = 17
        rand((9, 64), dtype, device).t().contiguous().t(),  # column-major
        rand((1, 1), torch.float32, device),     # mixed dtype in one call
        rand((257, 5), dtype, device).expand(257, 5),
        rand((8, 128), dtype, device)[:, :128],
    ]
    As = [
        rand((16, 7), dtype, device),
        rand((33, 17), dtype, device).t(),       # transposed view
        rand((64, 1), dtype, device),
        rand((1, 4128), torch.bfloat16, device),
        rand((5, 1), dtype, device).expand(5, 300),  # stride-0 columns
        rand((128, 129), dtype, device)[:, 1:],  # unaligned start
    ]
    gb, ga = lora_ops.lora_gram(Bs, As)
    rb, ra = reference.lora_gram(Bs, As)
    assert gb.shape == (6, 128, 128)
    tol = torch.float32 if dtype == torch.float64 else dtype  # adapter 3 is fp32/bf16
    assert_gram_close(gb, rb, tol)
    assert_gram_close(ga, ra, tol)
    assert torch.all(gb[1, 17:] == 0) and torch.all(gb[1, :, 17:] == 0)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("r", [1, 8, 16, 24, 32, 40, 64, 72, 128])
def test_lora_gram_tensor_core_layouts(dtype, r):
    """Dense 16-bit factors with r <= 128 take the tensor-core path on sm_80+, in both layouts
    (columns of X contiguous, rows contiguous), with row tails that end mid-vector and many splits."""
    dev = torch.device("cuda")
    d, k = 4131, 4136
    Bs = [
        rand((d, r), dtype, dev),                      # rows of X contiguous (r % 8 == 0: 16-byte rows)
        rand((r, d), dtype, dev).t(),                  # B stored transposed: columns of X contiguous
        rand((65537, r), dtype, dev, 1e-2),            # many splits
        rand((d, r), dtype, dev, 1e3),
    ]
    As = [
        rand((r, k), dtype, dev, 0.1),                 # columns of X = Aᵀ contiguous
        rand((r, k + 8), dtype, dev)[:, :d],           # view: the last 16-byte copy is partly past the row
        rand((k, r), dtype, dev).t(),                  # A stored transposed: rows of X contiguous
        rand((r, 8), dtype, dev),
    ]
    assert_grams_match_and_repeat(Bs, As, dtype)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("r", [1, 2, 6, 18, 33, 66, 99, 100, 127])
def test_lora_gram_tensor_core_unaligned_lines(dtype, r):
    """Dense 16-bit factors whose lines are not 16-byte aligned still take the tensor cores: with
    4-byte copies where they are 4-byte aligned (even r or k not a multiple of 8, a view starting
    2 elements in), with 2-byte loads where the line stride is odd (odd r, d = 4133 for a
    transposed B, k = 33). All match the reference, and repeat to the bit."""
    dev = torch.device("cuda")
    d, k = 4133, 4130
    Bs = [
        rand((d, r), dtype, dev),                      # rows of X: 2r bytes apart
        rand((d, r + 2), dtype, dev)[:, 2:],           # starts 4 bytes into each row
        rand((r, d), dtype, dev).t(),                  # columns of X contiguous, d odd: 2-byte loads
        rand((65537, r), dtype, dev, 1e-2),            # many splits
    ]
    As = [
        rand((r, k), dtype, dev, 0.1),                 # columns of X = Aᵀ: k = 4130 elements apart
        rand((r, k + 2), dtype, dev)[:, 2:],           # view starting 4 bytes in
        rand((k, r), dtype, dev).t(),                  # A stored transposed: rows of X contiguous
        rand((r, 33), dtype, dev),                     # odd line: 2-byte loads
    ]
    assert_grams_match_and_repeat(Bs, As, dtype)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lora_gram_tensor_core_non_finite(dtype):
    dev = torch.device("cuda")
    B, A = rand((1000, 16), dtype, dev), rand((16, 1000), dtype, dev)
    B[500, 3] = float("nan")
    A[5, 999] = float("inf")
    gb, ga = lora_ops.lora_gram([B], [A])
    rb, ra = reference.lora_gram([B], [A])
    assert torch.equal(torch.isnan(gb.cpu()), torch.isnan(rb.cpu()))
    assert torch.equal(torch.isinf(ga.cpu()), torch.isinf(ra.cpu()))
    assert torch.equal(torch.isnan(ga.cpu()), torch.isnan(ra.cpu()))
    finite = torch.isfinite(rb.cpu())
    assert torch.allclose(gb.cpu()[finite], rb.cpu()[finite], rtol=1e-5, atol=1e-3)


def test_lora_gram_deterministic(device):
    Bs = [rand((4128, 16), torch.bfloat16, device) for _ in range(3)]
    As = [rand((16, 4096), torch.bfloat16, device) for _ in range(3)]
    first = lora_ops.lora_gram(Bs, As)
    for _ in range(3):
        again = lora_ops.lora_gram(Bs, As)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_lora_gram_zero_rank_among_others(device):
    """An r = 0 adapter in a list whose other adapters have r > 0: its Gram is all zeros (a 0 x 0
    block of the padded output) and it leaves the others alone."""
    f32, bf16 = torch.float32, torch.bfloat16
    Bs = [rand((5, 0), f32, device), rand((300, 3), bf16, device), rand((0, 0), f32, device)]
    As = [rand((0, 7), f32, device), rand((3, 290), bf16, device), rand((0, 4), f32, device)]
    gb, ga = lora_ops.lora_gram(Bs, As)
    rb, ra = reference.lora_gram(Bs, As)
    assert gb.shape == (3, 3, 3) and torch.all(gb[0] == 0) and torch.all(ga[2] == 0)
    assert_gram_close(gb, rb, torch.bfloat16)
    assert_gram_close(ga, ra, torch.bfloat16)


def test_lora_gram_empty_list():
    gb, ga = lora_ops.lora_gram([], [])
    assert gb.shape == (0, 0, 0) and ga.shape == (0, 0, 0) and gb.dtype == torch.float64


def test_lora_gram_bad_input():
    B, A = torch.randn(5, 3), torch.randn(3, 4)
    with pytest.raises(ValueError, match="inner dimension r"):
        lora_ops.lora_gram([B], [torch.randn(2, 4)])
    with pytest.raises(ValueError, match="2-D"):
        lora_ops.lora_gram([B.reshape(-1)], [A])
    with pytest.raises(ValueError, match="same length"):
        lora_ops.lora_gram([B, B], [A])
    with pytest.raises(TypeError, match="dtype"):
        lora_ops.lora_gram([B.long()], [A])
    with pytest.raises(ValueError, match="one device"):
        lora_ops.lora_gram([B], [A.to("meta")])
    with pytest.raises(TypeError, match="list or tuple"):
        lora_ops.lora_gram(B, A)
    # The C++ checks, bypassing the Python wrapper.
    with pytest.raises(ValueError, match="inner dimension r"):
        torch.ops.gradgeom.lora_gram([B], [torch.randn(2, 4)])
    with pytest.raises(ValueError, match="2-D"):
        torch.ops.gradgeom.lora_gram([B.reshape(-1)], [A])
    with pytest.raises(ValueError, match="same length"):
        torch.ops.gradgeom.lora_gram([B, B], [A])
    with pytest.raises(TypeError, match="dtype"):
        torch.ops.gradgeom.lora_gram([B.int()], [A.int()])


def test_lora_gram_opcheck(device):
    Bs = [rand((33, 4), torch.float32, device), rand((7, 9), torch.bfloat16, device)]
    As = [rand((4, 5), torch.float32, device), rand((9, 70), torch.bfloat16, device)]
    torch.library.opcheck(torch.ops.gradgeom.lora_gram.default, (Bs, As))


# --- sym_eigh -----------------------------------------------------------------------------------


def sym_batch(batch, n, device, kind):
    X = torch.randn(batch, n, n, dtype=torch.float64, device=device)
    if kind == "indefinite":
        return X + X.mT
    if kind == "psd_lowrank":
        Y = torch.randn(batch, n, max(1, n // 3), dtype=torch.float64, device=device)
        return Y @ Y.mT
    if kind == "repeated":
        Q, _ = torch.linalg.qr(X)
        w = torch.tensor([1.0, 1.0, 2.0, 2.0] * n, dtype=torch.float64, device=device)[:n]
        return Q @ torch.diag_embed(w.expand(batch, n)) @ Q.mT
    if kind == "zero":
        return torch.zeros(batch, n, n, dtype=torch.float64, device=device)
    raise ValueError(kind)


def check_eigh(A, w, V):
    rw, _ = torch.linalg.eigh(A.cpu().double())
    w, V, A = w.cpu(), V.cpu(), A.cpu().double()
    scale = A.flatten(1).norm(dim=1).clamp_min(1e-300)[:, None]
    n = A.shape[-1]
    assert torch.all((w - rw).abs() <= 1e-13 * n * scale), ((w - rw).abs() / scale).max()
    assert torch.all(w[:, 1:] >= w[:, :-1])
    eye = torch.eye(n, dtype=torch.float64)
    assert (V.mT @ V - eye).abs().max() <= 1e-12 * n
    assert ((V * w.unsqueeze(-2)) @ V.mT - A).abs().max() <= 1e-13 * n * scale.max()


def check_eigvals(A, w):
    """Eigenvalues only (Householder + bisection) against LAPACK on the lower triangle: absolute
    error <= 1e-13·n·‖A‖_F (not relative: small eigenvalues of a definite A carry that error too)."""
    a = A.cpu().double()
    a = torch.tril(a) + torch.tril(a, -1).mT
    rw = torch.linalg.eigvalsh(a)
    w = w.cpu()
    assert w.dtype == torch.float64 and w.shape == rw.shape
    n = a.shape[-1]
    scale = a.flatten(1).norm(dim=1)[:, None]
    assert torch.all((w - rw).abs() <= 1e-13 * n * scale), ((w - rw).abs() / scale.clamp_min(1e-300)).max()
    assert torch.all(w[:, 1:] >= w[:, :-1])


@pytest.mark.parametrize("n", [1, 2, 3, 8, 17, 33, 64])
@pytest.mark.parametrize("kind", ["indefinite", "psd_lowrank", "repeated", "zero"])
def test_sym_eigh_matches_lapack(device, n, kind):
    A = sym_batch(3, n, device, kind)
    w, V = lora_ops.sym_eigh(A)
    check_eigh(A, w, V)
    w2, V2 = lora_ops.sym_eigh(A, vectors=False)
    assert V2.numel() == 0
    check_eigvals(A, w2)
    # Jacobi (vectors) and Householder + bisection (values only) agree to the error bound.
    scale = A.flatten(1).norm(dim=1)[:, None]
    assert torch.all((w2 - w).abs() <= 2e-13 * n * scale)


def eig_batch(n, device):
    """Awkward spectra: repeated, clustered, graded, diagonal, rank-deficient, scaled far from 1."""
    g = torch.Generator().manual_seed(n)
    X = torch.randn(8, n, n, dtype=torch.float64, generator=g)
    Q, _ = torch.linalg.qr(X)
    k = torch.arange(n, dtype=torch.float64)
    spectra = torch.stack([
        torch.where(k < n // 2, -1.0, 3.0),            # two eigenvalues, each repeated n/2 times
        1.0 + 1e-10 * k,                                # one tight cluster
        10.0 ** (-k * 14 / max(n - 1, 1)),              # graded 1 .. 1e-14 (positive definite)
        torch.where(k < n // 3, 0.0, k + 1),            # PSD, rank n - n/3
    ])
    A = torch.empty(8, n, n, dtype=torch.float64)
    A[:4] = Q[:4] @ torch.diag_embed(spectra) @ Q[:4].mT
    A[4] = torch.diag(torch.randn(n, dtype=torch.float64, generator=g).round())  # diagonal, ties
    Y = torch.randn(n, max(1, n // 4), dtype=torch.float64, generator=g)
    A[5] = Y @ Y.T                                       # Gram of rank n/4
    A[6] = (X[6] + X[6].T) * 1e-150
    A[7] = (X[7] + X[7].T) * 1e150
    return A.to(device)


# 64 / 65, 96 / 97 and 128 / 129: where the CUDA kernels hand over (tile, rows, regs, packed).
@pytest.mark.parametrize("n", [0, 1, 2, 3, 16, 33, 64, 65, 96, 97, 100, 127, 128, 129, 256])
def test_sym_eigvals_awkward_spectra(device, n):
    A = eig_batch(n, device)
    w, V = lora_ops.sym_eigh(A, vectors=False)
    assert w.shape == (8, n) and V.numel() == 0 and w.device == A.device
    check_eigvals(A, w)
    assert torch.equal(lora_ops.sym_eigh(A, vectors=False)[0], w)  # same input, same bits


@pytest.mark.parametrize("n", [2, 7, 64, 96, 128])
def test_sym_eigvals_zero_minors_and_wide_range(device, n):
    """Sturm counts by the three-term recurrence: exact zero minors (zeros on the diagonal, zero
    off-diagonals, repeated entries) and entries spanning 1e-300 .. 1 in one matrix."""
    g = torch.Generator().manual_seed(7 * n)
    A = torch.zeros(4, n, n, dtype=torch.float64)
    idx = torch.arange(n)
    A[0, idx, idx] = torch.tensor([0.0, 1.0, -1.0, 0.0] * n, dtype=torch.float64)[:n]
    A[1, idx, idx] = 10.0 ** -(300.0 * torch.rand(n, generator=g, dtype=torch.float64)).floor()
    A[1, idx[1:], idx[:-1]] = 10.0 ** -(300.0 * torch.rand(n - 1, generator=g, dtype=torch.float64)).floor()
    A[2, idx[1:], idx[:-1]] = 1.0                      # zero diagonal, unit off-diagonal
    A[3, idx, idx] = torch.randint(-2, 3, (n,), generator=g).double()
    A[3, idx[1:], idx[:-1]] = torch.randint(0, 2, (n - 1,), generator=g).double()  # split points
    w, _ = lora_ops.sym_eigh(A.to(device), vectors=False)
    check_eigvals(A, w)


@pytest.mark.parametrize("n", [1, 2, 5, 40, 96, 100, 128])
def test_sym_eigvals_zero_and_non_finite(device, n):
    X = torch.randn(5, n, n, dtype=torch.float64, device=device)
    A = X + X.mT
    A[0] = 0
    A[1, n - 1, 0] = float("nan")         # lower triangle: read
    A[2, n // 2, n // 2] = float("inf")
    A[3, n - 1, n - 1] = -float("inf")
    if n > 1:
        A[4, 0, n - 1] = float("nan")     # upper triangle: never read
    w, _ = lora_ops.sym_eigh(A, vectors=False)
    assert torch.equal(w[0], torch.zeros_like(w[0]))
    assert torch.isnan(w[1:4]).all()
    if n > 1:
        check_eigvals(A[4:], w[4:])


def test_sym_eigh_reads_lower_triangle_and_float32(device):
    A = sym_batch(2, 9, device, "indefinite")
    noisy = A + torch.triu(torch.randn_like(A), diagonal=1)
    rw = torch.linalg.eigvalsh(A.float().double())
    for vectors in (False, True):
        w, _ = lora_ops.sym_eigh(noisy.float(), vectors=vectors)
        torch.testing.assert_close(w.cpu(), rw.cpu(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", [33, 130])
def test_sym_eigvals_float32_input(device, n):
    A = sym_batch(3, n, device, "psd_lowrank").float()
    w, _ = lora_ops.sym_eigh(A, vectors=False)
    check_eigvals(A.double(), w)


@pytest.mark.parametrize("n", [128] + ([256] if HAS_CUDA else []))
def test_sym_eigh_large(device, n):
    A = sym_batch(1, n, device, "psd_lowrank")
    w, V = lora_ops.sym_eigh(A)
    check_eigh(A, w, V)


def test_sym_eigh_bad_input_and_empty():
    with pytest.raises(ValueError, match="square"):
        lora_ops.sym_eigh(torch.randn(2, 3, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="float32 or float64"):
        lora_ops.sym_eigh(torch.randn(2, 3, 3).half())
    with pytest.raises(ValueError, match="square"):
        torch.ops.gradgeom.sym_eigh(torch.randn(3, 3, dtype=torch.float64), True)
    with pytest.raises(ValueError, match="not supported"):
        torch.ops.gradgeom.sym_eigh(torch.zeros(1, 1025, 1025, dtype=torch.float64), False)
    w, V = lora_ops.sym_eigh(torch.zeros(0, 4, 4, dtype=torch.float64))
    assert w.shape == (0, 4) and V.shape == (0, 4, 4)


def test_sym_eigh_opcheck(device):
    A = sym_batch(2, 6, device, "indefinite")
    torch.library.opcheck(torch.ops.gradgeom.sym_eigh.default, (A, True))
    torch.library.opcheck(torch.ops.gradgeom.sym_eigh.default, (A, False))


@requires_cuda
@pytest.mark.parametrize("n", [8, 64, 128, 256])
def test_cuda_jacobi_vs_eigvalsh_batched(n):
    """The GPU solvers (Jacobi with vectors, Householder + bisection without) against
    torch.linalg.eigvalsh in float64, 224-matrix batches."""
    A = sym_batch(224 if n <= 64 else 32, n, torch.device("cuda"), "psd_lowrank")
    A[::3] = sym_batch(A[::3].shape[0], n, torch.device("cuda"), "indefinite")
    w, V = lora_ops.sym_eigh(A)
    check_eigh(A, w, V)
    w2, _ = lora_ops.sym_eigh(A, vectors=False)
    check_eigvals(A, w2)
    assert torch.equal(lora_ops.sym_eigh(A, vectors=False)[0], w2)  # deterministic


@requires_cuda
@pytest.mark.parametrize("n", [224, 233, 300, 1024])
def test_cuda_eigvals_large(n):
    """Around and above the size whose packed matrix fills shared memory (its leading rows then
    live in a global workspace), against LAPACK and the CPU run of the same algorithm."""
    A = sym_batch(224 if n <= 300 else 2, n, torch.device("cuda"), "indefinite")
    w, _ = lora_ops.sym_eigh(A, vectors=False)
    check_eigvals(A, w)
    w_cpu, _ = lora_ops.sym_eigh(A[:2].cpu(), vectors=False)
    scale = A[:2].flatten(1).norm(dim=1)[:, None].cpu()
    assert torch.all((w[:2].cpu() - w_cpu).abs() <= 2e-13 * n * scale)


@requires_cuda
@pytest.mark.parametrize("n", [64, 80, 100, 128])
def test_cuda_eigvals_batch_past_one_wave(n):
    """Batches larger than one wave of the reduction kernel (at n = 128: one matrix per SM) run
    as full waves and a tail, whose launch bisects the full waves' matrices in spare blocks: the
    same bits as batches small enough for one launch each, on a side stream too, and no host
    sync. n = 64, 80 and 128 take the tile, rows and regs kernels."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    batch = 2 * sms + 37
    A = sym_batch(batch, n, torch.device("cuda"), "psd_lowrank")
    A[::3] = sym_batch(A[::3].shape[0], n, torch.device("cuda"), "indefinite")
    A[5] = float("nan")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        w, _ = lora_ops.sym_eigh(A, vectors=False)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    pieces = torch.cat([lora_ops.sym_eigh(A[i:i + 50], vectors=False)[0] for i in range(0, batch, 50)])
    assert torch.equal(w.view(torch.int64), pieces.view(torch.int64))
    assert torch.isnan(w[5]).all()
    keep = torch.arange(batch) != 5
    check_eigvals(A[keep], w[keep])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        w_side, _ = lora_ops.sym_eigh(A, vectors=False)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(w_side.view(torch.int64), w.view(torch.int64))


@requires_cuda
def test_cuda_ops_do_not_synchronise():
    Bs = [torch.randn(4096, 16, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    As = [torch.randn(16, 4096, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        gb, ga = lora_ops.lora_gram(Bs, As)
        lora_ops.sym_eigh(gb, vectors=True)
    finally:
        torch.cuda.set_sync_debug_mode(0)


# --- psd_cholesky -------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 7, 33, 64, 100, 128, 129])
def test_psd_cholesky_positive_definite_matches_lapack(device, n):
    X = torch.randn(3, n, n + 3, dtype=torch.float64, device=device)
    A = X @ X.mT
    F = lora_ops.psd_cholesky(A)
    ref = reference.psd_cholesky(A)
    torch.testing.assert_close((F @ F.mT).cpu(), (ref @ ref.mT).cpu(), rtol=1e-11, atol=1e-11 * float(A.abs().max()))
    # Row-permuted lower triangular: column j has n - j nonzeros at most.
    assert torch.all((F != 0).sum(-2) <= torch.arange(n, 0, -1, device=F.device))


@pytest.mark.parametrize("n", [4, 16, 65, 128])
def test_psd_cholesky_semidefinite(device, n):
    Y = torch.randn(4, n, n // 3 + 1, dtype=torch.float64, device=device)
    A = Y @ Y.mT                          # rank n/3 + 1
    A[1] = 0                              # zero Gram (LoRA B at init)
    A[2, :, n // 2] = A[2, n // 2, :] = 0  # one zero direction
    A_in = A.float() if n == 16 else A  # float32 input: rounded, so slightly indefinite
    # Cut at the input's noise floor: pivots made of rounding noise would amplify it.
    L = lora_ops.psd_cholesky(A_in, tol=1e-6 if n == 16 else 1e-14)
    assert torch.isfinite(L).all()
    assert torch.equal(L[1], torch.zeros_like(L[1]))
    if n != 16:  # float64 input: exactly the numerical rank (float32 rounding noise has full rank)
        assert torch.all(L[0, :, n // 3 + 1:] == 0)
    err = (L @ L.mT - A_in.double()).abs().amax((-2, -1))
    scale = A.abs().amax((-2, -1)).clamp_min(1e-300)
    # What is left is about tol·max(diag) and the input's own rounding noise.
    tol = 1e-6 if n == 16 else 1e-12
    assert torch.all(err <= tol * scale), err / scale


@pytest.mark.parametrize("n", [4, 37, 64, 100, 128, 130])
def test_psd_cholesky_pivot_order_and_ties(device, n):
    """Largest remaining diagonal first, ties to the smaller row index (a diagonal A keeps its
    diagonal through the steps, so F is a scaled permutation that shows the pivot order)."""
    d = torch.tensor([float(1 + (7 * i) % 5) for i in range(n)], dtype=torch.float64)
    A = torch.diag(d).expand(2, n, n).contiguous()
    A[1, n - 1, n - 1] = 0.0  # zero pivot: dropped, its column stays 0
    F = lora_ops.psd_cholesky(A.to(device)).cpu()
    order = sorted(range(n), key=lambda i: (-d[i].item(), i))
    expect = torch.zeros(n, n, dtype=torch.float64)
    for j, i in enumerate(order):
        expect[i, j] = math.sqrt(d[i])
    assert torch.equal(F[0], expect)
    order1 = [i for i in order if i != n - 1]
    expect1 = torch.zeros(n, n, dtype=torch.float64)
    for j, i in enumerate(order1):
        expect1[i, j] = math.sqrt(d[i])
    assert torch.equal(F[1], expect1)


def test_psd_cholesky_deterministic(device):
    Y = torch.randn(16, 100, 60, dtype=torch.float64, device=device)
    A = Y @ Y.mT
    F = lora_ops.psd_cholesky(A)
    for _ in range(3):
        assert torch.equal(lora_ops.psd_cholesky(A), F)


@requires_cuda
@pytest.mark.parametrize("n", [256, 300])
def test_cuda_psd_cholesky_large_matches_cpu(n):
    """n > 128 runs from global memory on the GPU."""
    for cols in (n + 3, n // 2):  # full rank, then rank n/2
        Y = torch.randn(3, n, cols, dtype=torch.float64)
        A = Y @ Y.mT
        F = lora_ops.psd_cholesky(A.cuda()).cpu()
        assert torch.isfinite(F).all()
        assert ((F @ F.mT - A).abs().max() <= 1e-11 * A.abs().max())


@requires_cuda
@pytest.mark.parametrize("n", [1, 2, 15, 16, 17, 31, 33, 64, 65, 100, 127, 128])
def test_cuda_psd_cholesky_blocked_matches_cpu(n):
    """n <= 128 runs blocked on the GPU (panels of 16 columns, stops inside a panel at the rank
    n/2): the pivots of the CPU run, the same factor to rounding, zeros beyond the numerical
    rank, and an all-NaN F for a non-finite diagonal."""
    g = torch.Generator().manual_seed(n)
    Y = torch.randn(224, n, n + 3, dtype=torch.float64, generator=g)
    Y[1::2, :, n // 2:] = 0  # rank n/2
    A = Y @ Y.mT
    A[5, n // 3, n // 3] = float("nan")
    F = lora_ops.psd_cholesky(A.cuda()).cpu()
    F_cpu = lora_ops.psd_cholesky(A)
    ok = torch.ones(224, dtype=torch.bool)
    ok[5] = False
    assert torch.isnan(F[5]).all() and torch.isfinite(F[ok]).all()
    assert torch.equal(F[ok] != 0, F_cpu[ok] != 0)  # same pivots, same rank cut
    torch.testing.assert_close(F[ok], F_cpu[ok], rtol=1e-9, atol=1e-12 * float(A[ok].abs().max()))
    assert (F[ok] @ F[ok].mT - A[ok]).abs().max() <= 1e-11 * A[ok].abs().max()


def test_psd_cholesky_bad_input_and_opcheck(device):
    with pytest.raises(ValueError, match="square"):
        lora_ops.psd_cholesky(torch.randn(2, 3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="square"):
        torch.ops.gradgeom.psd_cholesky(torch.randn(3, 3, dtype=torch.float64), 1e-14)
    with pytest.raises(TypeError, match="float32 or float64"):
        torch.ops.gradgeom.psd_cholesky(torch.randn(1, 3, 3).half(), 1e-14)
    assert lora_ops.psd_cholesky(torch.zeros(0, 3, 3)).shape == (0, 3, 3)
    X = torch.randn(2, 5, 5, dtype=torch.float64, device=device)
    torch.library.opcheck(torch.ops.gradgeom.psd_cholesky.default, (X @ X.mT, 1e-14))
    for bad in (float("nan"), float("inf")):
        M = X @ X.mT
        M[0, 2, 2] = bad
        F = lora_ops.psd_cholesky(M)
        assert torch.isnan(F[0]).all() and torch.isfinite(F[1]).all()


@requires_cuda
def test_cuda_metadata_cache_follows_data_and_streams():
    """Kernel metadata is cached by content (pointers, shapes, strides): repeated calls on the same
    factors reuse it, in-place changes are still seen, and another stream gets its own upload."""
    dev = torch.device("cuda")
    Bs = [torch.randn(300, r, device=dev, dtype=torch.bfloat16) for r in (4, 16, 33)]
    As = [torch.randn(r, 200, device=dev, dtype=torch.bfloat16) for r in (4, 16, 33)]
    gb1, ga1 = lora_ops.lora_gram(Bs, As)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        gb2, ga2 = lora_ops.lora_gram(Bs, As)  # same table: no upload
        Bs[1].mul_(2)
        gb3, _ = lora_ops.lora_gram(Bs, As)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.equal(gb1, gb2) and torch.equal(ga1, ga2)
    torch.testing.assert_close(gb3[1], 4 * gb1[1], rtol=1e-6, atol=0)
    assert torch.equal(gb3[0], gb1[0]) and torch.equal(gb3[2], gb1[2])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        gb4, ga4 = lora_ops.lora_gram(Bs, As)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(gb4, gb3) and torch.equal(ga4, ga1)
    fresh = [b.clone() for b in Bs]  # other pointers: another table
    assert torch.equal(lora_ops.lora_gram(fresh, As)[0], gb3)


@requires_cuda
def test_cuda_launch_plan_cache_keys_on_every_field_and_evicts():
    """Launch plans are cached by the factors' pointers, shapes, strides and dtypes: factors at the
    same address with another shape, stride or dtype get their own plan, and more lists than the
    cache holds still give the right Grams when they come round again."""
    dev = torch.device("cuda")
    base = torch.randn(400, 40, device=dev, dtype=torch.bfloat16)
    A = torch.randn(40, 50, device=dev, dtype=torch.bfloat16)
    same_address = [base[:rows, :r] for rows in (400, 399, 128) for r in (40, 33, 16)]
    same_address += [base.as_strided((400, 16), (16, 1)), base.as_strided((400, 16), (1, 400)),
                     base.view(torch.float16)[:, :16]]
    lists = [([B], [A[:B.shape[1]].to(B.dtype)]) for B in same_address]
    lists += [([torch.randn(64, 8, device=dev, dtype=torch.bfloat16)], [torch.randn(8, 9, device=dev, dtype=torch.bfloat16)])
              for _ in range(20)]
    for _ in range(2):
        for Bs, As in lists:
            assert_grams_match_and_repeat(Bs, As, Bs[0].dtype)


@requires_cuda
@pytest.mark.parametrize("ranks", [(128, 100, 65), (64, 48, 33, 16, 8, 1)])
def test_cuda_many_ragged_adapters(ranks):
    """90 adapters of a few thousand rows, ragged r, fp16 and bf16 (tensor cores, split rows and
    merged partials) with an fp32 and a strided factor (CUDA cores) and a transposed view with an
    odd offset among them: every Gram matches the float64 reference and identical input gives
    identical bits."""
    g = torch.Generator().manual_seed(5)
    dev = torch.device("cuda")
    Bs, As = [], []
    for i in range(90):
        r = ranks[i % len(ranks)]
        d, k = (int(x) for x in torch.randint(2000, 9000, (2,), generator=g))
        dtype = torch.bfloat16 if i % 3 else torch.float16
        Bs.append(torch.randn(d, r, generator=g).to(dev, dtype))
        As.append(torch.randn(r, k, generator=g).to(dev, dtype) * 0.1)
    Bs[7] = Bs[7].float()  # a CUDA-core job among the tensor-core ones
    r11, k11 = As[11].shape
    As[11] = torch.randn(r11, 2 * k11, generator=g).to(dev, torch.bfloat16)[:, ::2]  # no unit stride: CUDA cores
    As[12] = torch.randn(As[12].shape[1] + 1, As[12].shape[0], generator=g).to(dev, torch.float16)[1:].mT  # odd offset
    gb, ga = lora_ops.lora_gram(Bs, As)
    gb2, ga2 = lora_ops.lora_gram(Bs, As)
    assert torch.equal(gb, gb2) and torch.equal(ga, ga2)
    rb, ra = reference.lora_gram(Bs, As)
    assert_gram_close(gb, rb, torch.bfloat16)
    assert_gram_close(ga, ra, torch.bfloat16)


@requires_cuda
@pytest.mark.parametrize("shape", ["one_long", "many_short", "mixed"])
def test_cuda_wide_grams_long_short_and_many(shape):
    """Tensor-core jobs with 64 < r <= 128 (the wide kernel): one factor long enough to be split
    into a hundred row splits merged in fp64, hundreds of short jobs with r from 72 to 128, and
    long and short ones mixed, both 16-bit dtypes. Every Gram matches the float64 reference,
    is exactly symmetric (assert_gram_close) and repeats to the bit."""
    g = torch.Generator().manual_seed(11)
    dev = torch.device("cuda")
    if shape == "one_long":
        dims = [(300_001, 96, 70)]
    elif shape == "many_short":
        dims = [(1100 + 37 * i, 72 + 8 * (i % 8), 896 + 16 * i) for i in range(300)]
    else:
        dims = [(int(x), 128, 8 * int(y)) for x, y in torch.randint(1, 20_000, (40, 2), generator=g)]
    Bs, As = [], []
    for i, (d, r, k) in enumerate(dims):
        dtype = torch.float16 if i % 2 else torch.bfloat16
        Bs.append(torch.randn(d, r, generator=g).to(dev, dtype))
        As.append((torch.randn(r, k, generator=g) * 0.1).to(dev, dtype))
    assert_grams_match_and_repeat(Bs, As, torch.bfloat16)


def _rows_apart(x: torch.Tensor, line: int) -> torch.Tensor:
    """x [rows, cols] on the GPU with its rows `line` elements apart (a view into a wider buffer)."""
    buf = torch.zeros(x.shape[0], line, dtype=x.dtype, device="cuda")
    buf[:, : x.shape[1]] = x.cuda()
    return buf[:, : x.shape[1]]


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("r", [65, 100, 128])
def test_cuda_wide_gram_kernels_agree_to_the_bit(dtype, r):
    """For 64 < r <= 128, factors whose lines are 16-byte aligned take the wgmma kernel on Hopper
    (the build adds sm_90a to sm_90), others the mma.sync kernel. Both sum the same 64-row chunks
    in the same order, so the same factors laid out both ways give the same Grams bit for bit:
    both layouts, a split whose last chunk is partial, a one-row factor and a job long enough to
    be split and merged. On a 9.0 device the profiler shows which kernel ran."""
    g = torch.Generator().manual_seed(r)
    dims = [(4096, 4096), (4001, 63), (1, 70), (70_001, 130)]  # (d, k)
    Bs = [torch.randn(d, r, generator=g).to(dtype) for d, _ in dims]
    As = [torch.randn(r, k, generator=g).to(dtype) for _, k in dims]
    pad = lambda n: (n + 7) // 8 * 8  # noqa: E731
    aligned = ([_rows_apart(B, pad(r)) for B in Bs], [_rows_apart(A, pad(A.shape[1])) for A in As])
    shifted = ([_rows_apart(B, pad(r) + 2) for B in Bs], [_rows_apart(A, pad(A.shape[1]) + 2) for A in As])
    grams, kernels = [], []
    for Bl, Al in (aligned, shifted):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            grams.append(lora_ops.lora_gram(Bl, Al))
            torch.cuda.synchronize()
        kernels.append({e.name for e in prof.events()})
        assert_grams_match_and_repeat(Bl, Al, dtype)
    assert torch.equal(grams[0][0], grams[1][0]) and torch.equal(grams[0][1], grams[1][1])
    assert any("gram_mma_kernel" in k for k in kernels[1])
    if torch.cuda.get_device_capability() == (9, 0):
        assert any("gram_wgmma_kernel" in k for k in kernels[0])
        assert not any("gram_wgmma_kernel" in k for k in kernels[1])


@pytest.mark.parametrize("n", [1, 2, 40])
def test_cpu_lora_gram_bits_do_not_depend_on_threads(n):
    """The CPU kernel shares out whole jobs when there are enough of them, else blocks of rows;
    either way each Gram sums its blocks in row order in fp64, so the thread count (which picks the
    way) never changes a bit."""
    g = torch.Generator().manual_seed(9)
    Bs = [torch.randn(700 + 97 * i, 3 + 7 * (i % 5), generator=g) for i in range(n)]
    As = [torch.randn(B.shape[1], 600 + 31 * i, generator=g).to(torch.bfloat16) for i, B in enumerate(Bs)]
    got = at_thread_counts(lambda: lora_ops.lora_gram(Bs, As))
    for gb, ga in got[1:]:
        assert torch.equal(gb, got[0][0]) and torch.equal(ga, got[0][1])
    rb, ra = reference.lora_gram(Bs, As)
    assert_gram_close(got[0][0], rb, torch.float32)
    assert_gram_close(got[0][1], ra, torch.bfloat16)
