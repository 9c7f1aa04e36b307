"""The native composites lora_svdvals / lora_fro against the Python composition they replace
(_lora_core.gram_spectrum over lora_gram), bit for bit, and the lean host path of gradgeom.lora."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import requires_cuda
from gradgeom import _lora_core as core
from gradgeom import lora, lora_ops


def rand(shape, dtype, device, scale=1.0):
    return (torch.randn(shape, dtype=torch.float64, device=device) * scale).to(dtype)


def python_path(Bs, As, flag_ill):
    """What gradgeom.lora computed before the native composite: ``(sv, ill, fro)``."""
    gb, ga = lora_ops.lora_gram(Bs, As)
    info = core.shape_info(Bs, As, gb.device)
    mu, ill = core.gram_spectrum(gb, ga, info.srank, info.fp64, info.kinds, flag_ill=flag_ill)
    if ill is None:
        ill = torch.zeros(len(Bs), dtype=torch.bool, device=gb.device)
    return mu.sqrt(), ill, core.fro(gb, ga)


def assert_same_bits(got, ref):
    assert got.dtype == ref.dtype and got.shape == ref.shape and got.device == ref.device, (got, ref)
    if got.dtype == torch.float64:
        got, ref = got.view(torch.int64), ref.view(torch.int64)  # NaN payloads and signed zeros too
    assert torch.equal(got, ref), (got, ref)


def case(name, device):
    """(Bs, As) of one awkward batch."""
    torch.manual_seed(11)
    f32, bf16, f64 = torch.float32, torch.bfloat16, torch.float64
    if name == "uniform":
        return [rand((40, 8), f32, device) for _ in range(6)], [rand((8, 30), f32, device, 0.3) for _ in range(6)]
    if name == "ragged":
        dims = [(50, 1, 20), (17, 4, 33), (64, 8, 9), (12, 3, 12), (70, 16, 40)]
        return [rand((d, r), bf16, device) for d, r, _ in dims], [rand((r, k), bf16, device) for _, r, k in dims]
    if name == "mixed_fp64":
        dts = [f64, bf16, f64, f32, torch.float16]
        return [rand((30, 6), dt, device) for dt in dts], [rand((6, 25), dt, device) for dt in dts]
    if name == "all_fp64":
        return [rand((30, 6), f64, device) for _ in range(3)], [rand((6, 25), f64, device) for _ in range(3)]
    if name == "zero":
        return [torch.zeros(20, 4, device=device), rand((20, 4), f32, device)], [rand((4, 9), f32, device)] * 2
    if name == "rank_deficient":  # B·A of rank 2 with r = 6: the Gram route cannot resolve σ_3..σ_6
        Bs = [rand((40, 2), f64, device) @ rand((2, 6), f64, device), rand((40, 6), f64, device)]
        Bs.append(Bs[0].float())
        return Bs, [rand((6, 35), f64, device), rand((6, 35), f64, device), rand((6, 35), f32, device)]
    if name == "wide":  # r > min(d, k) for every adapter: one structural rank 3 < R = 8
        return [rand((3, 8), f32, device) for _ in range(3)], [rand((8, 30), f32, device) for _ in range(3)]
    if name == "wide_ragged":  # structural ranks 3, 8, 5, 0 (d = 0)
        dims = [(3, 30), (40, 30), (40, 5), (0, 30)]
        return [rand((d, 8), f32, device) for d, _ in dims], [rand((8, k), f32, device) for _, k in dims]
    if name == "non_finite":
        Bs, As = [rand((20, 4), f32, device) for _ in range(3)], [rand((4, 12), f32, device) for _ in range(3)]
        Bs[0][3, 1] = float("nan")
        As[1][2, 5] = float("inf")
        return Bs, As
    if name == "r0":
        return [torch.zeros(5, 0, device=device)] * 2, [torch.zeros(0, 7, device=device)] * 2
    if name == "r0_mixed":
        return [torch.zeros(5, 0, device=device), rand((5, 4), f32, device)], [torch.zeros(0, 7, device=device), rand((4, 7), f32, device)]
    if name == "large_r":  # R above a block of threads (the fused spectrum kernel loops over its rows)
        dims = [(300, 129, 280, f32), (400, 300, 350, bf16), (200, 70, 90, f64)]
        return [rand((d, r), dt, device) for d, r, _, dt in dims], [rand((r, k), dt, device) for _, r, k, dt in dims]
    if name == "views":  # transposed, sliced and expanded factors
        base = rand((40, 50), f32, device)
        Bs = [base[3:36:2, 1:8], rand((7, 60), f32, device).t(), rand((25, 1), f32, device).expand(25, 7)]
        As = [rand((9, 7), f32, device).t(), rand((7, 70), f32, device)[:, 3:], rand((7, 1), f32, device).expand(7, 12)]
        return Bs, As
    raise ValueError(name)


CASES = ["uniform", "ragged", "mixed_fp64", "all_fp64", "zero", "rank_deficient", "wide", "wide_ragged",
         "non_finite", "r0", "r0_mixed", "large_r", "views"]


@pytest.mark.parametrize("flag_ill", [True, False])
@pytest.mark.parametrize("name", CASES)
def test_lora_svdvals_bits_match_python_path(name, flag_ill, device):
    Bs, As = case(name, device)
    got = lora_ops.lora_svdvals(Bs, As, flag_ill=flag_ill)
    ref = python_path(Bs, As, flag_ill)
    for g, r in zip(got, ref):
        assert_same_bits(g, r)
    R = max(B.shape[1] for B in Bs)
    assert got[0].shape == (len(Bs), R)
    if name == "rank_deficient":
        assert got[1].tolist() == [flag_ill, False, flag_ill]  # fp64 and fp32 thresholds both flag it
    if name == "wide_ragged":
        assert torch.all(got[0][0, 3:] == 0) and torch.all(got[0][2, 5:] == 0) and torch.all(got[0][3] == 0)


@pytest.mark.parametrize("name", CASES)
def test_lora_svdvals_without_fro(name, device):
    Bs, As = case(name, device)
    sv, ill, fro = lora_ops.lora_svdvals(Bs, As, flag_ill=True, with_fro=False)
    ref = lora_ops.lora_svdvals(Bs, As, flag_ill=True)
    assert_same_bits(sv, ref[0])
    assert_same_bits(ill, ref[1])
    assert fro.shape == (0,) and fro.dtype == torch.float64 and fro.device == sv.device


@pytest.mark.parametrize("name", CASES)
def test_lora_fro_bits_match_python_path(name):
    Bs, As = case(name, "cpu")
    assert_same_bits(lora_ops.lora_fro(Bs, As), python_path(Bs, As, False)[2])


def test_non_finite_adapter_does_not_poison_the_others():
    Bs, As = case("non_finite", "cpu")
    sv, ill, fro = lora_ops.lora_svdvals(Bs, As)
    assert torch.isnan(sv[0]).all() and torch.isnan(sv[1]).all() and torch.isfinite(sv[2]).all()
    assert not math.isfinite(fro[0]) and not math.isfinite(fro[1]) and math.isfinite(fro[2])
    assert not ill.any()


def test_no_adapters(device):
    sv, ill, fro = lora_ops.lora_svdvals([], [], device=device)
    assert sv.shape == (0, 0) and ill.shape == (0,) and fro.shape == (0,)
    assert (sv.dtype, ill.dtype, fro.dtype) == (torch.float64, torch.bool, torch.float64)
    assert sv.device.type == ill.device.type == fro.device.type == device.type
    empty = lora_ops.lora_fro((), (), device=device)
    assert empty.shape == (0,) and empty.dtype == torch.float64 and empty.device.type == device.type


def test_opcheck(device):
    Bs, As = case("ragged", device)
    for flag_ill in (True, False):
        torch.library.opcheck(torch.ops.gradgeom.lora_svdvals.default, (Bs, As, flag_ill))
        torch.library.opcheck(torch.ops.gradgeom.lora_svdvals.default, (Bs, As, flag_ill, False))
    torch.library.opcheck(torch.ops.gradgeom.lora_fro.default, (Bs, As))
    Bs, As = case("mixed_fp64", device)
    torch.library.opcheck(torch.ops.gradgeom.lora_svdvals.default, (Bs, As, True))


@pytest.mark.parametrize("op", ["lora_svdvals", "lora_fro"])
def test_bad_input_messages(op):
    """The typed wrapper names itself; the native op reports what its lora_gram call checks."""
    raw = getattr(torch.ops.gradgeom, op)
    native = (lambda Bs, As: raw(Bs, As, True)) if op == "lora_svdvals" else raw
    B, A = torch.randn(5, 3), torch.randn(3, 4)
    for call, name in ((getattr(lora_ops, op), op), (native, "lora_gram")):
        with pytest.raises(ValueError, match=f"{name}: Bs and As must have the same length, got 2 B factors and 1 A factors"):
            call([B, B], [A])
        with pytest.raises(ValueError, match=rf"{name}: Bs\[1\] must be 2-D \[d, r\], got shape"):
            call([B, B.reshape(-1)], [A, A])
        with pytest.raises(ValueError, match=rf"{name}: As\[0\] must be 2-D \[r, k\]"):
            call([B], [A[None]])
        with pytest.raises(ValueError, match=rf"{name}: inner dimension r differs for adapter 0: Bs\[0\] has shape .5, 3. "
                                             rf"\(r = 3\) but As\[0\] has shape .2, 4. \(r = 2\)"):
            call([B], [torch.randn(2, 4)])
        with pytest.raises(TypeError, match=rf"{name}: As\[0\] has dtype .*; expected float32"):
            call([B], [A.long()])
    with pytest.raises(ValueError, match=rf"{op}: all factors must be on one device: As\[1\] is on meta"):
        getattr(lora_ops, op)([B, B], [A, A.to("meta")])
    with pytest.raises(ValueError, match=rf"{op}: all factors must be on one device"):  # the fake (meta) kernel
        native([B, B], [A, A.to("meta")])


def test_rank_limit_message():
    with pytest.raises(ValueError, match="lora_svdvals: ranks above 1024 are not supported, got r = 1025"):
        lora_ops.lora_svdvals([torch.randn(1, 1025)], [torch.randn(1025, 1)])


def test_tolerances_come_from_the_native_library():
    tol = lora_ops.lora_tolerances()
    assert (core.CHOL_TOL_FP32, core.CHOL_TOL_FP64, core.COND_TOL_FP32, core.COND_TOL_FP64) == (
        tol["chol_fp32"], tol["chol_fp64"], tol["cond_fp32"], tol["cond_fp64"])
    assert 0 < tol["chol_fp64"] < tol["chol_fp32"] < 1 and 0 < tol["cond_fp64"] < tol["cond_fp32"] < 1


# --- gradgeom.lora on top of the composites ------------------------------------------------------


@pytest.mark.parametrize("name", ["uniform", "ragged", "mixed_fp64", "wide_ragged", "zero", "r0_mixed"])
def test_lora_api_bits_match_python_path(name):
    Bs, As = case(name, "cpu")
    pairs = list(zip(Bs, As))
    sv, _, fro = python_path(Bs, As, False)
    s = [0.5, -2.0, 1.0, 3.0, 0.25, 1.5][: len(pairs)]
    for got, row, B, si in zip(lora.delta_svdvals(pairs, scaling=s, method="gram"), sv, Bs, s):
        assert_same_bits(got, (row * abs(si))[: B.shape[1]])
    scale = torch.tensor([abs(x) for x in s], dtype=torch.float64)
    assert_same_bits(lora.delta_norm(pairs, scaling=s), fro * scale)
    if sv.shape[1]:
        assert_same_bits(lora.delta_norm(pairs, ord=2, method="gram"), sv[:, 0])
        assert_same_bits(lora.delta_norm(pairs, ord="nuc", method="gram"), sv.sum(-1))
    geo = lora.geometry({str(i): p for i, p in enumerate(pairs)}, method="gram")
    for i, B in enumerate(Bs):
        g = geo[str(i)]
        assert_same_bits(g.svdvals, sv[i, : B.shape[1]])
        assert g.fro == fro[i].item() and g.route == "gram"


def test_auto_recomputes_only_flagged_adapters_exactly():
    Bs, As = case("rank_deficient", "cpu")
    pairs = list(zip(Bs, As))
    gram = lora.delta_svdvals(pairs, method="gram")
    auto = lora.delta_svdvals(pairs, method="auto")
    assert_same_bits(auto[1], gram[1])  # well conditioned: the Gram route's values
    for i in (0, 2):
        assert_same_bits(auto[i], core.qr_svdvals(Bs[i], As[i]))
    assert [g.route for g in lora.geometry(pairs).values()] == ["qr", "gram", "qr"]


class _OpLog(TorchDispatchMode):
    """The ops that Python dispatches (not those a native composite issues from C++)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def test_list_of_pairs_costs_one_native_call():
    Bs, As = case("ragged", "cpu")
    pairs = list(zip(Bs, As))
    with _OpLog() as log:
        lora.delta_norm(pairs)
    assert log.ops == ["gradgeom.lora_fro"]
    with _OpLog() as log:
        lora.delta_svdvals(pairs, method="gram")
    assert log.ops[0] == "gradgeom.lora_svdvals" and log.ops.count("gradgeom.lora_svdvals") == 1
    assert not any(op.startswith(("gradgeom.lora_gram", "gradgeom.psd_cholesky", "aten.linalg")) for op in log.ops)


def test_bad_pairs_still_name_the_pair():
    B, A = torch.randn(5, 3), torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"delta_svdvals: inner dimension r differs for pair 1"):
        lora.delta_svdvals([(B, A), (B, torch.randn(2, 4))], method="gram")
    with pytest.raises(ValueError, match=r"delta_norm: pair\[0\] must hold 2-D factors"):
        lora.delta_norm([(B[None], A)])
    with pytest.raises(TypeError, match=r"delta_norm: A\[1\] must be a torch.Tensor, got str"):
        lora.delta_norm([(B, A), (B, "A")])


# --- CUDA ----------------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("name", ["uniform", "ragged", "mixed_fp64", "rank_deficient", "wide_ragged", "non_finite"])
def test_cuda_bits_match_python_path(name):
    Bs, As = case(name, "cuda")
    for flag_ill in (True, False):
        got = lora_ops.lora_svdvals(Bs, As, flag_ill=flag_ill)
        for g, r in zip(got, python_path(Bs, As, flag_ill)):
            assert_same_bits(g, r)
    assert_same_bits(lora_ops.lora_fro(Bs, As), python_path(Bs, As, False)[2])


@requires_cuda
def test_cuda_lora_paths_do_not_synchronise():
    uniform = [(rand((4096, 16), torch.bfloat16, "cuda"), rand((16, 4096), torch.bfloat16, "cuda")) for _ in range(4)]
    Bs, As = case("mixed_fp64", "cuda")  # ragged dtype flags: one asynchronous upload
    mixed = list(zip(Bs, As)) + list(zip(*case("wide_ragged", "cuda")))  # ragged structural ranks too
    lora.delta_svdvals(mixed, method="gram")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for pairs in (uniform, mixed):
            lora.delta_svdvals(pairs, method="gram")
            lora.delta_norm(pairs)
            lora.delta_norm(pairs, ord="nuc", method="gram", scaling=[2.0] * len(pairs))
        lora_ops.lora_svdvals(*map(list, zip(*mixed)))
    finally:
        torch.cuda.set_sync_debug_mode(0)


# --- the flags read off the tridiagonal matrices before the bisection (CUDA, 33 <= R <= 128) ------


def near_threshold(R, ratio, device):
    """(B [300, R], A [R, 260]) float64 with σ(B·A) = (1, ..., 1, σ_min), σ_min² = ratio times the
    Gram route's ill-conditioning threshold (fp64 tolerance times ‖G_B‖_F·‖G_A‖_F); G_B is a full
    matrix (B's right factor is a random rotation), G_A = I."""
    f64 = torch.float64
    q1 = torch.linalg.qr(torch.randn(300, R, dtype=f64, device=device))[0]
    q2 = torch.linalg.qr(torch.randn(260, R, dtype=f64, device=device))[0]
    rot = torch.linalg.qr(torch.randn(R, R, dtype=f64, device=device))[0]
    tol = lora_ops.lora_tolerances()["cond_fp64"]
    s = torch.ones(R, dtype=f64, device=device)
    s[-1] = math.sqrt(ratio * tol * math.sqrt((R - 1) * R))  # ‖G_B‖_F ≈ √(R - 1), ‖G_A‖_F = √R
    return q1 @ torch.diag(s) @ rot.T, rot @ q2.T


def staged_case(R, device, n_fill=0):
    """(Bs, As, flagged): adapters of largest rank R whose flags come from the tridiagonal stage on
    CUDA, and the indices the Gram route must flag (the rank-deficient ones); ``n_fill`` well
    conditioned adapters are appended (a batch past one wave of the reduction)."""
    torch.manual_seed(R)
    f32, f64 = torch.float32, torch.float64
    Bs, As, flagged = [], [], []

    def add(B, A, flag=False):
        if flag:
            flagged.append(len(Bs))
        Bs.append(B)
        As.append(A)

    add(rand((300, R), f32, device), rand((R, 200), f32, device))
    add(rand((300, 2), f64, device) @ rand((2, R), f64, device), rand((R, 250), f64, device), flag=True)
    add(torch.zeros(300, R, device=device), rand((R, 200), f32, device))  # M = 0: written by step 1
    add(rand((300, R), f64, device), rand((R, 260), f64, device))
    add((rand((300, 3), f64, device) @ rand((3, R), f64, device)).float(), rand((R, 200), f32, device), flag=True)
    add(rand((20, R), f32, device), rand((R, 200), f32, device))  # structural rank 20 < R
    add(rand((300, R // 2), f32, device), rand((R // 2, 90), f32, device))  # padded to R
    nan_B = rand((300, R), f32, device)
    nan_B[7, 1] = float("nan")
    add(nan_B, rand((R, 200), f32, device))
    for ratio in (0.8, 1.25):  # μ_min at 0.8 and 1.25 times the threshold: the error bound must be right
        add(*near_threshold(R, ratio, device), flag=ratio < 1)
    for i in range(n_fill):  # float64: well inside the fp64 threshold, but for one rank-1 adapter near
        # the end (in the reduction's last wave)
        B = rand((3 * R, 1), f64, device) @ rand((1, R), f64, device) if i == n_fill - 3 else rand((3 * R, R), f64, device)
        add(B, rand((R, 3 * R), f64, device), flag=i == n_fill - 3)
    return Bs, As, flagged


@requires_cuda
@pytest.mark.parametrize("R,n_fill", [(33, 0), (64, 0), (80, 0), (100, 0), (128, 0), (100, 140), (128, 140),
                                      (128, 300), (64, 300), (80, 300)])
def test_cuda_flags_before_the_bisection_match_python_path(R, n_fill):
    from gradgeom._native import _C

    Bs, As, flagged = staged_case(R, "cuda", n_fill)
    sv, ill, fro = lora_ops.lora_svdvals(Bs, As, flag_ill=True)
    assert _C._early_flags_pending(ill)
    ref = python_path(Bs, As, True)
    for g, r in zip((sv, ill, fro), ref):
        assert_same_bits(g, r)
    assert ill.nonzero().flatten().tolist() == flagged
    assert _C._early_flags(ill) == flagged  # the host copy queued before the bisection
    assert not _C._early_flags_pending(ill) and _C._early_flags(ill) is None  # taken once
    assert lora._flag_indices(ill) == flagged  # then read the usual way


@requires_cuda
def test_cuda_early_flags_belong_to_the_last_call_only():
    from gradgeom._native import _C

    Bs, As, flagged = staged_case(64, "cuda")
    first = lora_ops.lora_svdvals(Bs, As)[1]
    second = lora_ops.lora_svdvals(Bs[::-1], As[::-1])[1]
    assert not _C._early_flags_pending(first) and _C._early_flags(first) is None
    assert lora._flag_indices(first) == flagged
    assert _C._early_flags(second) == [len(Bs) - 1 - i for i in reversed(flagged)]
    assert not _C._early_flags_pending(lora_ops.lora_svdvals(Bs, As, flag_ill=False)[1])
    small = case("rank_deficient", "cuda")  # R = 6: one fused eigenvalue kernel, flags from the spectrum
    assert not _C._early_flags_pending(lora_ops.lora_svdvals(*small)[1])


@requires_cuda
@pytest.mark.parametrize("R", [64, 128])
def test_cuda_auto_recomputes_the_flagged_rows_exactly(R):
    Bs, As, flagged = staged_case(R, "cuda")
    pairs = list(zip(Bs, As))
    gram = lora.delta_svdvals(pairs, method="gram")
    auto = lora.delta_svdvals(pairs, method="auto")
    for i, (g, a) in enumerate(zip(gram, auto)):
        if i in flagged:
            assert_same_bits(a, core.qr_svdvals(Bs[i], As[i]))
        else:
            assert_same_bits(a, g)
    assert [i for i, g in enumerate(lora.geometry(pairs).values()) if g.route == "qr"] == flagged


@requires_cuda
def test_cuda_flags_before_the_bisection_do_not_synchronise():
    Bs, As, _ = staged_case(128, "cuda", 140)
    lora_ops.lora_svdvals(Bs, As)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sv, ill, _ = lora_ops.lora_svdvals(Bs, As)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert_same_bits(ill, python_path(Bs, As, True)[1])


@requires_cuda
@pytest.mark.parametrize("R", [16, 64, 128])
def test_cuda_lora_svdvals_replays_in_a_cuda_graph(R):
    """Captured (R = 16: one fused eigenvalue kernel; 64, 128: flags off the tridiagonal stage,
    no host copy under capture), then replayed on new values in the same tensors: the same bits as
    an eager call on those values."""
    from gradgeom._native import _C

    Bs, As, _ = staged_case(R, "cuda")
    lora_ops.lora_svdvals(Bs, As)  # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = lora_ops.lora_svdvals(Bs, As)
    assert not _C._early_flags_pending(captured[1])
    torch.manual_seed(R + 1)
    for i in (0, 3, 5):
        Bs[i].copy_(torch.randn_like(Bs[i]))
        As[i].copy_(torch.randn_like(As[i]))
    Bs[1].zero_()
    graph.replay()
    expected = lora_ops.lora_svdvals(Bs, As)
    for got, ref in zip(captured, expected):
        assert_same_bits(got, ref)


def test_early_flags_on_the_cpu_are_none():
    from gradgeom._native import _C

    Bs, As = case("rank_deficient", "cpu")
    ill = lora_ops.lora_svdvals(Bs, As)[1]
    assert _C._early_flags(ill) is None and not _C._early_flags_pending(ill)
    assert not _C._early_flags_pending("ill")
    with pytest.raises(TypeError, match="_early_flags: ill must be a torch.Tensor"):
        _C._early_flags("ill")
