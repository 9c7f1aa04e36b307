"""gradgeom.lora functional API against a float64 dense SVD of the materialised ΔW = s·B·A."""

import math

import pytest
import torch

from gradgeom import lora

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Frobenius norm from fp32-accumulated Grams (fp64 for fp64 input), relative.
FRO_RTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}
# Singular values with method="auto": relative error per value, plus an absolute floor
# relative to σ_max (the Gram route keeps adapters above its conditioning threshold; the rest
# take the exact float64 QR route).
SV_RTOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-4, torch.bfloat16: 1e-4}
SV_ATOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-6, torch.bfloat16: 1e-6}


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def rand(shape, dtype, device, scale=1.0):
    return (torch.randn(shape, dtype=torch.float64, device=device) * scale).to(dtype)


def dense_svdvals(B, A, s=1.0):
    """float64 dense SVD of s·B·A, padded with zeros to r."""
    W = s * (B.detach().cpu().double() @ A.detach().cpu().double())
    sv = torch.linalg.svdvals(W) if W.numel() else torch.zeros(0, dtype=torch.float64)
    r = B.shape[-1]
    out = torch.zeros(W.shape[:-2] + (r,), dtype=torch.float64)
    m = min(r, sv.shape[-1])
    out[..., :m] = sv[..., :m]
    return out


def assert_sv_close(got, ref, dtype):
    got = got.detach().cpu()
    assert got.dtype == torch.float64 and got.shape == ref.shape, (got.shape, ref.shape)
    assert torch.isfinite(got).all()
    smax = ref[..., :1].clamp_min(1e-300)
    err = (got - ref).abs()
    ok = err <= SV_RTOL[dtype] * ref + SV_ATOL[dtype] * smax
    assert ok.all(), (err / smax).max()


# d, k in {1, 7, 64, 4096 + 32}, r in {1, 2, 8, 16, 33, 64, 128, 256} (r > min(d, k) included);
# every dtype on the small shapes, float32 and bfloat16 on the large ones (CPU time).
SHAPES_ALL = [(1, 1, 1), (7, 7, 2), (64, 7, 8), (7, 64, 16), (64, 64, 33), (1, 4128, 8)]
SHAPES_LARGE = [(64, 64, 64), (4128, 7, 8), (4128, 64, 33), (64, 4128, 64), (4128, 1, 128), (64, 64, 128),
                (64, 4128, 256)]
CASES = [(dt, *s) for s in SHAPES_ALL for dt in DTYPES] + [
    (dt, *s) for s in SHAPES_LARGE for dt in (torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("dtype,d,k,r", CASES)
def test_svdvals_and_norms_match_dense(device, dtype, d, k, r):
    B, A = rand((d, r), dtype, device), rand((r, k), dtype, device, 0.3)
    s = 0.7
    ref = dense_svdvals(B, A, s)
    sv = lora.delta_svdvals(B, A, scaling=s)
    assert sv.shape == (r,) and sv.device == B.device
    assert_sv_close(sv, ref, dtype)
    assert torch.all(sv[min(d, k, r):] == 0)  # r > min(d, k): exact zeros beyond
    fro = lora.delta_norm(B, A, scaling=s)
    assert fro.shape == () and fro.dtype == torch.float64
    torch.testing.assert_close(fro.cpu(), ref.norm(), rtol=FRO_RTOL[dtype], atol=0)
    torch.testing.assert_close(lora.delta_norm(B, A, scaling=s, ord=2).cpu(), ref[0],
                               rtol=SV_RTOL[dtype], atol=SV_ATOL[dtype] * float(ref[0]))
    torch.testing.assert_close(lora.delta_norm(B, A, scaling=s, ord="nuc").cpu(), ref.sum(),
                               rtol=SV_RTOL[dtype], atol=SV_ATOL[dtype] * float(ref.sum()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_square_adapter(device, dtype):
    """d = k = 4128: against the dense float64 ΔW. A full SVD of 4128² is too slow for CI, so the
    dense reference is the SVD of ΔW·Q, Q an orthonormal basis of ΔW's row space found from the
    dense matrix (randomised range finder; exact here since rank ΔW = 16 < 32 probes)."""
    d = k = 4128
    B, A = rand((d, 16), dtype, device), rand((16, k), dtype, device)
    W = B.cpu().double() @ A.cpu().double()
    torch.testing.assert_close(lora.delta_norm(B, A).cpu(), torch.linalg.matrix_norm(W), rtol=FRO_RTOL[dtype], atol=0)
    Q, _ = torch.linalg.qr(W.T @ torch.randn(d, 32, dtype=torch.float64))
    ref = torch.linalg.svdvals(W @ Q)[:16]
    assert_sv_close(lora.delta_svdvals(B, A), ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rank_deficient_and_zero(device, dtype):
    d, k, r = 96, 80, 16
    B = (rand((d, 6), torch.float64, device) @ rand((6, r), torch.float64, device)).to(dtype)  # rank 6 (before rounding)
    A = rand((r, k), dtype, device)
    ref = dense_svdvals(B, A)
    assert_sv_close(lora.delta_svdvals(B, A), ref, dtype)
    assert_sv_close(lora.delta_svdvals(B, A, method="qr"), ref, dtype)
    g = lora.geometry({"x": (B, A)})["x"]
    assert g.route == "qr"  # the Gram route cannot resolve the tiny values: exact fallback
    # The Gram route alone is only accurate to ~sqrt(u)·σ_max on such an adapter.
    gram = lora.delta_svdvals(B, A, method="gram").cpu()
    assert ((gram - ref).abs() <= 3e-3 * ref[0]).all()
    # Zero adapter (B = 0 at LoRA init): zeros, never NaN.
    Z = torch.zeros(d, r, dtype=dtype, device=device)
    for method in ("auto", "gram", "qr"):
        assert torch.equal(lora.delta_svdvals(Z, A, method=method).cpu(), torch.zeros(r, dtype=torch.float64))
    for ord in ("fro", 2, "nuc"):
        assert lora.delta_norm(Z, A, ord=ord).item() == 0.0
    gz = lora.geometry({"z": (Z, A, 2.0)})["z"]
    assert (gz.fro, gz.spectral, gz.nuclear, gz.stable_rank, gz.effective_rank) == (0.0, 0.0, 0.0, 0.0, 0.0)


def test_batched_leading_dims_and_broadcast(device):
    B = rand((2, 3, 40, 8), torch.float32, device)
    A = rand((3, 8, 50), torch.float32, device)  # broadcasts over the first dim
    s = torch.tensor([[0.5], [2.0]])
    sv = lora.delta_svdvals(B, A, scaling=s)
    assert sv.shape == (2, 3, 8)
    fro = lora.delta_norm(B, A, scaling=s)
    assert fro.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            ref = dense_svdvals(B[i, j], A[j], float(s[i, 0]))
            assert_sv_close(sv[i, j], ref, torch.float32)
            torch.testing.assert_close(fro[i, j].cpu(), ref.norm(), rtol=1e-5, atol=0)
    empty = lora.delta_norm(B[:0], A)
    assert empty.shape == (0, 3)


def test_ragged_list_of_pairs(device):
    shapes = [(64, 7, 8), (1, 4128, 2), (33, 33, 33), (7, 1, 16), (0, 5, 3), (200, 150, 128)]
    dtypes = [torch.bfloat16, torch.float32, torch.float16, torch.float64, torch.float32, torch.float32]
    pairs = [(rand((d, r), dt, device), rand((r, k), dt, device)) for (d, k, r), dt in zip(shapes, dtypes)]
    scal = [1.0, 0.5, 2.0, 4.0, 1.0, 1 / 16]
    svs = lora.delta_svdvals(pairs, scaling=scal)
    fro = lora.delta_norm(pairs, scaling=scal)
    spec = lora.delta_norm(pairs, scaling=scal, ord=2)
    assert isinstance(svs, list) and fro.shape == (6,)
    for i, ((B, A), s, dt) in enumerate(zip(pairs, scal, dtypes)):
        ref = dense_svdvals(B, A, s)
        assert svs[i].shape == (B.shape[1],)
        assert_sv_close(svs[i], ref, dt)
        torch.testing.assert_close(fro[i].cpu(), ref.norm(), rtol=FRO_RTOL[dt], atol=0)
        torch.testing.assert_close(spec[i].cpu(), ref[0] if ref.numel() else ref.sum(), rtol=SV_RTOL[dt], atol=1e-300)
    assert lora.delta_norm([]).shape == (0,)
    assert lora.delta_svdvals([]) == []


@pytest.mark.parametrize("ord", ["fro", 2, "nuc"])
def test_gradients_match_autograd_through_dense_product(device, ord):
    torch.manual_seed(1)
    B0, A0 = rand((30, 6), torch.float64, device), rand((6, 20), torch.float64, device)

    def dense(B, A):
        W = 0.25 * (B @ A)
        return torch.linalg.matrix_norm(W, ord=ord)

    B1, A1 = B0.clone().requires_grad_(), A0.clone().requires_grad_()
    lora.delta_norm(B1, A1, scaling=0.25, ord=ord).backward()
    B2, A2 = B0.clone().requires_grad_(), A0.clone().requires_grad_()
    dense(B2, A2).backward()
    torch.testing.assert_close(B1.grad, B2.grad, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(A1.grad, A2.grad, rtol=1e-8, atol=1e-10)
    # Batched and list inputs, float32 parameters.
    Bb = rand((3, 30, 6), torch.float32, device).requires_grad_()
    Ab = rand((3, 6, 20), torch.float32, device).requires_grad_()
    lora.delta_norm(Bb, Ab, ord=ord).sum().backward()
    Bd, Ad = Bb.detach().double().requires_grad_(), Ab.detach().double().requires_grad_()
    torch.linalg.matrix_norm(Bd @ Ad, ord=ord).sum().backward()
    torch.testing.assert_close(Bb.grad.double(), Bd.grad, rtol=1e-5, atol=1e-6)
    Bl = [b.detach().clone().requires_grad_() for b in Bb]
    lora.delta_norm([(b, a.detach()) for b, a in zip(Bl, Ab)], ord=ord).sum().backward()
    for b, ref in zip(Bl, Bd.grad):
        torch.testing.assert_close(b.grad.double(), ref, rtol=1e-5, atol=1e-6)


def test_gradient_at_zero_adapter_is_finite(device):
    B = torch.zeros(10, 4, device=device, requires_grad=True)
    A = torch.randn(4, 8, device=device, requires_grad=True)
    n = lora.delta_norm(B, A)
    n.backward()
    assert n.item() == 0.0 and torch.isfinite(B.grad).all() and torch.isfinite(A.grad).all()


def test_scaling():
    assert lora.scaling(16, 8) == 2.0
    assert lora.scaling(16, 64, rslora=True) == 2.0
    with pytest.raises(ValueError, match="r must be a positive int"):
        lora.scaling(16, 0)


def test_geometry_fields_from_pairs(device):
    B, A = rand((50, 8), torch.float32, device), rand((8, 40), torch.float32, device)
    g = lora.geometry([(B, A, 0.5)])["0"]
    ref = dense_svdvals(B, A, 0.5)
    assert g.rank == 8 and g.shape == (50, 40) and g.scaling == 0.5 and g.relative is None
    assert_sv_close(g.svdvals, ref, torch.float32)
    assert math.isclose(g.fro, float(ref.norm()), rel_tol=1e-5)
    assert math.isclose(g.spectral, float(ref[0]), rel_tol=1e-4)
    assert math.isclose(g.nuclear, float(ref.sum()), rel_tol=1e-4)
    assert math.isclose(g.stable_rank, float(ref.square().sum() / ref[0] ** 2), rel_tol=1e-4)
    p = ref.square() / ref.square().sum()
    assert math.isclose(g.effective_rank, math.exp(float(-(p * p.log()).sum())), rel_tol=1e-4)
    assert set(g.as_dict()) >= {"fro", "spectral", "nuclear", "svdvals", "stable_rank", "effective_rank", "rank",
                                "scaling", "relative"}


def dense_angles(B1, A1, B2, A2):
    def basis(B, A):
        U, S, _ = torch.linalg.svd(B.cpu().double() @ A.cpu().double(), full_matrices=False)
        rank = int((S > 1e-10 * S[0]).sum()) if S.numel() and S[0] > 0 else 0
        return U[:, :rank]

    U1, U2 = basis(B1, A1), basis(B2, A2)
    m = min(U1.shape[1], U2.shape[1])
    c = torch.linalg.svdvals(U1.T @ U2)[:m].clamp(0, 1)
    return torch.arccos(c)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_principal_angles_match_dense(device, dtype):
    torch.manual_seed(2)
    first, second, expect = {}, {}, {}
    for name, (d, k, r, eps) in {"a": (64, 48, 8, 0.3), "b": (200, 30, 16, 1.0), "c": (40, 40, 4, 0.05),
                                 "wide": (5, 30, 8, 0.5), "one": (1, 9, 2, 1.0)}.items():
        B1, A1 = rand((d, r), dtype, device), rand((r, k), dtype, device)
        B2 = (B1.double() + eps * rand((d, r), torch.float64, device)).to(dtype)
        A2 = rand((r, k), dtype, device)
        first[name], second[name] = (B1, A1), (B2, A2)
        expect[name] = dense_angles(B1, A1, B2, A2)
    got = lora.principal_angles(first, second)
    tol = 1e-6 if dtype == torch.float64 else 2e-3
    for name, ref in expect.items():
        pa = got[name]
        assert pa.angles.shape == ref.shape, (name, pa.angles.shape, ref.shape)
        assert (pa.angles - ref).abs().max() <= tol, (name, pa.angles, ref)
        assert math.isclose(pa.distance, float(ref.norm()), abs_tol=tol * math.sqrt(ref.numel() + 1))
    same = lora.principal_angles(first, first)
    assert all(p.angles.max() < 5e-3 if p.angles.numel() else True for p in same.values())
    # Zero update: no angles, distance 0, no NaN.
    z = lora.principal_angles({"z": (torch.zeros(10, 3, device=device), rand((3, 4), torch.float32, device))},
                              {"z": (rand((10, 3), torch.float32, device), rand((3, 4), torch.float32, device))})["z"]
    assert z.angles.numel() == 0 and z.distance == 0.0 and z.rank_1 == 0 and z.rank_2 == 3
    # Every adapter of rank r = 0: nothing to compare, on every route.
    empty = (torch.zeros(6, 0, device=device), torch.zeros(0, 5, device=device))
    for method in ("auto", "gram", "qr"):
        e = lora.principal_angles({"e": empty}, {"e": empty}, method=method)["e"]
        assert e.angles.numel() == 0 and e.distance == 0.0 and (e.rank_1, e.rank_2) == (0, 0), (method, e)


def test_principal_angles_orthogonal_and_identical_subspaces(device):
    Q, _ = torch.linalg.qr(torch.randn(30, 8, dtype=torch.float64))
    B1, B2 = Q[:, :4].to(device), Q[:, 4:].to(device)
    A = torch.randn(4, 12, dtype=torch.float64, device=device)
    pa = lora.principal_angles([(B1, A)], [(B2, A)])["0"]
    torch.testing.assert_close(pa.angles, torch.full((4,), math.pi / 2, dtype=torch.float64), rtol=0, atol=1e-7)
    pa = lora.principal_angles([(B1, A)], [(B1 @ torch.randn(4, 4, dtype=torch.float64, device=device), A)])["0"]
    assert pa.angles.max() < 1e-6


def test_principal_angles_results_behave_as_the_dataclass(device):
    """Gram-route results hold their angles as views of one host table, cut on first read: they
    must still be PrincipalAngles in every way a user can see (repr, replace, copy, pickle, setting
    angles), and two reads give the same tensor."""
    import copy
    import dataclasses
    import pickle

    torch.manual_seed(3)
    pairs1 = [(rand((20, r), torch.float64, device), rand((r, 9), torch.float64, device)) for r in (3, 5)]
    pairs2 = [(rand((20, r), torch.float64, device), rand((r, 9), torch.float64, device)) for r in (4, 5)]
    got = lora.principal_angles(pairs1, pairs2, method="gram")
    for name, (r1, r2) in {"0": (3, 4), "1": (5, 5)}.items():
        pa = got[name]
        assert isinstance(pa, lora.PrincipalAngles) and pa.route == "gram"
        assert (pa.rank_1, pa.rank_2) == (r1, r2) and pa.angles.shape == (min(r1, r2),)
        assert pa.angles is pa.angles and pa.angles.device.type == "cpu" and pa.angles.dtype == torch.float64
        assert repr(pa).startswith("PrincipalAngles(angles=tensor(")
        assert math.isclose(pa.distance, float(pa.angles.norm()), rel_tol=1e-12, abs_tol=1e-15)
        moved = dataclasses.replace(pa, distance=-1.0)
        assert moved.distance == -1.0 and torch.equal(moved.angles, pa.angles) and moved.route == "gram"
        assert dataclasses.replace(pa, route="qr").route == "qr"
        for twin in (copy.deepcopy(pa), pickle.loads(pickle.dumps(pa))):
            assert torch.equal(twin.angles, pa.angles) and twin.distance == pa.distance
        assert dataclasses.asdict(pa)["angles"].shape == (min(r1, r2),)
    pa = got["0"]
    pa.angles = torch.zeros(2, dtype=torch.float64)
    assert torch.equal(pa.angles, torch.zeros(2, dtype=torch.float64))


def test_bad_input_errors():
    B, A = torch.randn(5, 3), torch.randn(3, 4)
    with pytest.raises(ValueError, match="inner dimension r"):
        lora.delta_norm(B, torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"\[\.\.\., d, r\]"):
        lora.delta_norm(torch.randn(5), A)
    with pytest.raises(ValueError, match="2-D"):
        lora.delta_svdvals([(torch.randn(2, 5, 3), A)])
    with pytest.raises(ValueError, match="one device"):
        lora.delta_norm(B, A.to("meta"))
    with pytest.raises(ValueError, match="one device"):
        lora.delta_norm([(B, A), (B.to("meta"), A.to("meta"))])
    with pytest.raises(ValueError, match="ord"):
        lora.delta_norm(B, A, ord=1)
    with pytest.raises(ValueError, match="method"):
        lora.delta_svdvals(B, A, method="svd")
    with pytest.raises(TypeError, match="dtype"):
        lora.delta_norm(B.long(), A)
    with pytest.raises(TypeError, match="pairs"):
        lora.delta_norm(B)
    with pytest.raises(ValueError, match="do not broadcast"):
        lora.delta_norm(torch.randn(2, 5, 3), torch.randn(3, 3, 4))
    with pytest.raises(ValueError, match="missing"):
        lora.principal_angles({"x": (B, A)}, {"y": (B, A)})
    with pytest.raises(ValueError, match="different dimensions"):
        lora.principal_angles({"x": (B, A)}, {"x": (torch.randn(6, 3), A)})
    with pytest.raises(TypeError, match="nn.Module"):
        lora.geometry(42)
    with pytest.raises(ValueError, match="'x'.*inner dimension r"):
        lora.geometry({"ok": (B, A), "x": (B, torch.randn(2, 4))})
    with pytest.raises(ValueError, match="'x'.*2-D"):
        lora.principal_angles({"x": (B[None], A)}, {"x": (B[None], A)})
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        lora.geometry({"x": (B, "A")})
    with pytest.raises(TypeError, match="'x'.*B must be a torch.Tensor"):
        lora.principal_angles({"x": (B, A)}, {"x": ("B", A)})
    with pytest.raises(TypeError, match="'y'.*must be a torch.Tensor"):
        lora.principal_angles({"x": (B, A), "y": (B, A)}, {"x": (B, A), "y": (B, [1.0])})
    with pytest.raises(ValueError, match="'y'.*inner dimension r"):  # named after the native op's error
        lora.principal_angles({"x": (B, A), "y": (B, A)}, {"y": (B, torch.randn(2, 4)), "x": (B, A)})


@requires_cuda
def test_cuda_gram_paths_do_not_synchronise():
    pairs = [(torch.randn(4096, r, device="cuda", dtype=torch.bfloat16),
              torch.randn(r, 4096, device="cuda", dtype=torch.bfloat16)) for r in (8, 16, 64, 128)]
    B = torch.randn(8, 512, 16, device="cuda")
    A = torch.randn(8, 16, 512, device="cuda")
    lora.delta_norm(pairs)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        lora.delta_norm(pairs, scaling=[1.0, 2.0, 3.0, 4.0])
        lora.delta_norm(B, A, scaling=2.0)
        lora.delta_svdvals(pairs, method="gram")
        lora.delta_norm(B, A, ord=2, method="gram")
    finally:
        torch.cuda.set_sync_debug_mode(0)


@requires_cuda
@pytest.mark.parametrize("r", [8, 16, 64, 128, 256])
def test_cuda_matches_cpu(r):
    pairs = [(rand((4096 + 32, r), torch.bfloat16, "cpu"), rand((r, 1000), torch.bfloat16, "cpu")) for _ in range(3)]
    cpu = lora.delta_svdvals(pairs)
    gpu = lora.delta_svdvals([(b.cuda(), a.cuda()) for b, a in pairs])
    for c, g, (b, a) in zip(cpu, gpu, pairs):
        ref = dense_svdvals(b, a)
        assert_sv_close(g, ref, torch.bfloat16)
        assert_sv_close(c, ref, torch.bfloat16)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_factors_propagate(device, bad):
    """A NaN/Inf in a factor shows up as NaN/Inf, never as a silent 0, and does not poison the
    other adapters of the same call."""
    B, A = rand((20, 4), torch.float32, device), rand((4, 12), torch.float32, device)
    Bb = B.clone()
    Bb[3, 1] = bad
    pairs = [(Bb, A), (B, A)]
    fro = lora.delta_norm(pairs).cpu()
    assert not torch.isfinite(fro[0]) and torch.isfinite(fro[1])
    for method in ("gram", "auto", "qr"):
        sv = lora.delta_svdvals(pairs, method=method)
        assert not torch.isfinite(sv[0].cpu()).all(), method
        assert_sv_close(sv[1], dense_svdvals(B, A), torch.float32)
    g = lora.geometry({"bad": (Bb, A), "ok": (B, A)})
    assert math.isnan(g["bad"].effective_rank) and not math.isfinite(g["bad"].fro)
    assert math.isfinite(g["ok"].effective_rank)
    pa = lora.principal_angles({"x": (Bb, A), "y": (B, A)}, {"x": (B, A), "y": (B, A)})
    assert math.isnan(pa["x"].distance) and pa["y"].distance < 5e-3


# --- host fast paths: a batch whose adapters share shape, dtype and scaling takes Python scalars
# instead of per-adapter device tensors; it must give the same bits as the general (ragged) path.

def _uniform_pairs(device, n=6, d=40, k=30, r=8, dtype=torch.float32):
    torch.manual_seed(5)
    return [(rand((d, r), dtype, device), rand((r, k), dtype, device, 0.3)) for _ in range(n)]


@pytest.mark.parametrize("extra", ["smaller_r", "float64", "wide", "larger_d"])
@pytest.mark.parametrize("d", [40, 5])  # 5: every adapter has r > d (one structural rank, below R)
def test_uniform_batch_matches_ragged_batch_bitwise(device, extra, d):
    """The same adapters, alone (uniform fast path) and with one odd adapter appended (per-adapter
    ranks / dtype flags on the device, cross Grams per shape group): identical results for the
    shared adapters."""
    pairs = _uniform_pairs(device, d=d)
    odd = {"smaller_r": (rand((40, 4), torch.float32, device), rand((4, 30), torch.float32, device)),
           "float64": (rand((40, 8), torch.float64, device), rand((8, 30), torch.float64, device)),
           "wide": (rand((45 - d, 8), torch.float32, device), rand((8, 30), torch.float32, device)),
           "larger_d": (rand((64, 8), torch.float32, device), rand((8, 30), torch.float32, device))}[extra]
    if d < 8 and extra == "larger_d":
        odd = (rand((7, 8), torch.float32, device), odd[1])  # still wide, another structural rank
    ragged = pairs + [odd]
    n = len(pairs)
    for method in ("gram", "auto"):
        for a, b in zip(lora.delta_svdvals(pairs, method=method), lora.delta_svdvals(ragged, method=method)[:n]):
            assert torch.equal(a, b), (method, a, b)
        for ord in (2, "nuc"):
            assert torch.equal(lora.delta_norm(pairs, ord=ord, method=method),
                               lora.delta_norm(ragged, ord=ord, method=method)[:n])
        g1 = lora.geometry({str(i): p for i, p in enumerate(pairs)}, method=method)
        g2 = lora.geometry({str(i): p for i, p in enumerate(ragged)}, method=method)
        for name, g in g1.items():
            a, b = g.as_dict(), g2[name].as_dict()
            assert a == b, (name, a, b)
        second = [(B + 0.1 * torch.randn_like(B), A) for B, A in ragged]
        p1 = lora.principal_angles(pairs, second[:n], method=method)
        p2 = lora.principal_angles(ragged, second, method=method)
        for name, pa in p1.items():
            pb = p2[name]
            assert torch.equal(pa.angles, pb.angles) and (pa.distance, pa.rank_1, pa.rank_2, pa.route) == (
                pb.distance, pb.rank_1, pb.rank_2, pb.route), name
    assert torch.equal(lora.delta_norm(pairs), lora.delta_norm(ragged)[:n])


def test_wide_uniform_batch_pads_with_exact_zeros(device):
    """Every adapter with r > min(d, k) (one structural rank for all, below R): zeros beyond it."""
    pairs = _uniform_pairs(device, d=5, k=30, r=8)
    for method in ("gram", "auto", "qr"):
        for (B, A), sv in zip(pairs, lora.delta_svdvals(pairs, method=method)):
            assert torch.all(sv[5:] == 0)
            assert_sv_close(sv, dense_svdvals(B, A), torch.float32)


@pytest.mark.parametrize("grad", [False, True])
def test_scaling_float_list_and_tensor_agree(device, grad):
    pairs = _uniform_pairs(device, n=4)
    if grad:
        pairs = [(B.double().requires_grad_(), A.double()) for B, A in pairs]
    n = len(pairs)
    same = [-0.5, [-0.5] * n, [-0.5, -0.5, -0.5, -0.5], torch.full((n,), -0.5), torch.tensor(-0.5)]
    varying = [[0.5, 1, -2.0, 3.0], (0.5, 1.0, -2.0, 3.0), torch.tensor([0.5, 1.0, -2.0, 3.0], dtype=torch.float64)]
    for group in (same, varying):
        svs = [lora.delta_svdvals(pairs, scaling=s) for s in group]
        norms = [lora.delta_norm(pairs, scaling=s, ord=o) for s in group for o in ("fro", 2)]
        for sv in svs[1:]:
            assert all(torch.equal(a.detach(), b.detach()) for a, b in zip(svs[0], sv))
        for i in range(2, len(norms)):
            assert torch.equal(norms[i].detach(), norms[i % 2].detach())
    ref = lora.delta_svdvals(pairs)
    for i, s in enumerate(varying[0]):
        assert torch.allclose(svs[0][i].detach(), abs(s) * ref[i].detach(), rtol=1e-14, atol=0)
    B = torch.stack([p[0] for p in pairs])
    A = torch.stack([p[1] for p in pairs])
    assert torch.equal(lora.delta_norm(B, A, scaling=-0.5).detach(), lora.delta_norm(B, A, scaling=torch.tensor(-0.5)).detach())
    with pytest.raises(ValueError, match=r"scaling of shape \(3,\) does not match \(4,\)"):
        lora.delta_norm(pairs, scaling=[1.0, 1.0, 1.0])


def test_geometry_batched_stats_match_per_adapter_stats():
    """geometry reads its derived numbers off one batch; they equal lora._stats row by row."""
    from gradgeom.lora import _stats, _stats_by_rank

    torch.manual_seed(7)
    sv = torch.rand(12, 8, dtype=torch.float64).sort(-1, descending=True).values * 3
    sv[1] = 0.0                                  # ΔW = 0
    sv[2, 5:] = 0.0                              # rank deficient
    sv[3, 2] = float("nan")                      # non-finite factor
    sv[4, 6:] = 0.0
    ranks = [8, 8, 8, 8, 6, 8, 3, 3, 0, 8, 1, 8]
    fro = [float(sv[j, :r].square().sum().sqrt()) for j, r in enumerate(ranks)]
    fro[5] = float("inf")
    got = _stats_by_rank(sv, fro, ranks)
    for j, r in enumerate(ranks):
        ref = _stats(sv[j, :r].clone(), fro[j])
        assert all((a == b) or (math.isnan(a) and math.isnan(b)) for a, b in zip(got[j], ref)), (j, got[j], ref)


def test_principal_angles_auto_routes(device):
    """method="auto": pairs the Gram route resolves keep it (the vectorised path when none is
    flagged), a flagged pair goes exact, and the Gram pairs' results are those of "gram"."""
    torch.manual_seed(4)
    good = {name: (rand((64, 8), torch.float32, device), rand((8, 48), torch.float32, device)) for name in "abc"}
    moved = {name: ((B.double() + 0.3 * rand(B.shape, torch.float64, device)).float(), A) for name, (B, A) in good.items()}
    B = (rand((96, 6), torch.float64, device) @ rand((6, 16), torch.float64, device)).float()  # rank 6 of 16
    ill = {"ill": (B, rand((16, 80), torch.float32, device))}
    ill2 = {"ill": ((B.double() + 0.1 * rand(B.shape, torch.float64, device)).float(), ill["ill"][1])}
    gram = lora.principal_angles(good, moved, method="gram")
    auto = lora.principal_angles(good, moved, method="auto")
    assert [p.route for p in auto.values()] == ["gram"] * 3
    for name in good:
        assert torch.equal(auto[name].angles, gram[name].angles) and auto[name].distance == gram[name].distance
    mixed = lora.principal_angles({**good, **ill}, {**moved, **ill2}, method="auto")  # R = 16 now: other rounding
    assert [p.route for p in mixed.values()] == ["gram"] * 3 + ["qr"]
    for name in good:
        torch.testing.assert_close(mixed[name].angles, gram[name].angles, rtol=0, atol=1e-12)
