"""The native composite lora_principal_angles against the Python composition it replaces
(_lora_core.gram_bases + cross_grams + cosines over lora_gram), bit for bit. On CUDA the
composite fuses the elementwise steps (csrc/cuda/gram_stage.cu): the Grassmann distance then
sums its squares in its own order (compared to a few ulps) and the non-finite flag is the
canonical NaN (compared as NaN or 0); every other entry keeps its bits."""

import pytest
import torch

from conftest import requires_cuda
from gradgeom import _lora_core as core
from gradgeom import lora_ops
from test_lora_pipeline import assert_same_bits, rand


def python_path(Bs, As, flag_ill):
    """What gradgeom.lora.principal_angles computed on the device before the native composite."""
    n = len(Bs) // 2
    gb, ga = lora_ops.lora_gram(Bs, As)
    device = gb.device
    info = core.shape_info(Bs, As, device, with_rank=flag_ill)
    R = gb.shape[-1]
    T, rank, ill = core.gram_bases(gb, ga, info.srank, info.fp64, info.rank)
    nonfinite = (gb * 0 + ga * 0).sum((-2, -1))
    X = core.cross_grams(Bs[:n], Bs[n:], R, device)
    cos = core.cosines(T[:n].mT @ X @ T[n:])
    K = cos.shape[-1]
    m = torch.minimum(rank[:n], rank[n:])
    live = torch.arange(K, device=device) < m.unsqueeze(-1)
    theta = torch.where(live, torch.arccos(cos), 0.0)
    cols = [theta.square().sum(-1).sqrt(), rank[:n], rank[n:], nonfinite[:n] + nonfinite[n:]]
    if ill is not None:
        cols.append(ill[:n] | ill[n:])
    return torch.cat([theta, torch.stack(cols, 1)], 1)


def pairs_case(name, device):
    """(first, second): lists of (B, A) pairs, matched by position (same d)."""
    torch.manual_seed(5)
    f32, bf16, f64 = torch.float32, torch.bfloat16, torch.float64

    def pair(d, r, k, dt=f32, scale=1.0):
        return rand((d, r), dt, device, scale), rand((r, k), dt, device)

    if name == "uniform":
        return [pair(40, 8, 30) for _ in range(5)], [pair(40, 8, 30) for _ in range(5)]
    if name == "ragged":  # different d per pair, different r and k between the sides
        dims = [(50, 1, 20, 3, 9), (17, 4, 33, 4, 5), (64, 8, 9, 2, 64), (129, 16, 40, 16, 40)]
        return ([pair(d, r1, k1, bf16) for d, r1, k1, _, _ in dims],
                [pair(d, r2, k2, bf16) for d, _, _, r2, k2 in dims])
    if name == "same_space":  # second = first with A rotated: every angle ~0
        first = [pair(60, 6, 20, f64) for _ in range(3)]
        return first, [(B * 3.0, torch.linalg.qr(torch.randn(6, 6, dtype=f64, device=device))[0] @ A) for B, A in first]
    if name == "mixed_dtypes":
        dts = [f64, bf16, f32, torch.float16]
        return [pair(30, 6, 25, dt) for dt in dts], [pair(30, 6, 25, dt) for dt in reversed(dts)]
    if name == "zero_and_rank_deficient":
        first = [(torch.zeros(20, 4, device=device), rand((4, 9), f32, device)), pair(20, 4, 9)]
        B = rand((20, 2), f64, device) @ rand((2, 6), f64, device)  # rank 2 with r = 6
        return first + [(B, rand((6, 15), f64, device))], [pair(20, 4, 9), pair(20, 4, 9), pair(20, 6, 15, f64)]
    if name == "wide":  # r > min(d, k)
        return [pair(3, 8, 30) for _ in range(3)], [pair(3, 5, 2) for _ in range(3)]
    if name == "non_finite":
        first, second = [pair(20, 4, 12) for _ in range(3)], [pair(20, 4, 12) for _ in range(3)]
        first[0][0][3, 1] = float("nan")
        second[1][1][2, 5] = float("inf")
        return first, second
    if name == "r0":
        z = (torch.zeros(5, 0, device=device), torch.zeros(0, 7, device=device))
        return [z, pair(5, 3, 7)], [pair(5, 2, 7), z]
    if name == "large_r":  # R above a block of threads, ranks not a multiple of anything
        return [pair(320, 129, 300), pair(300, 260, 290, f64)], [pair(320, 131, 64), pair(300, 257, 300)]
    if name == "r0_only":  # R = 0: no directions on either side
        z = (torch.zeros(5, 0, device=device), torch.zeros(0, 7, device=device))
        return [z, z], [z, z]
    if name == "views":
        base = rand((40, 50), f32, device)
        first = [(base[3:36:2, 1:8], rand((9, 7), f32, device).t()), (rand((7, 25), f32, device).t(), rand((7, 70), f32, device)[:, 3:])]
        second = [(rand((17, 1), f32, device).expand(17, 7), rand((7, 12), f32, device)), pair(25, 7, 66)]
        return first, second
    raise ValueError(name)


CASES = ["uniform", "ragged", "same_space", "mixed_dtypes", "zero_and_rank_deficient", "wide", "non_finite", "r0",
         "r0_only", "large_r", "views"]


def flat(first, second):
    return [p[0] for p in first] + [p[0] for p in second], [p[1] for p in first] + [p[1] for p in second]


@pytest.mark.parametrize("flag_ill", [False, True])
@pytest.mark.parametrize("name", CASES)
def test_native_angles_match_python_bits(device, name, flag_ill):
    first, second = pairs_case(name, device)
    got = lora_ops.lora_principal_angles(first, second, flag_ill=flag_ill)
    assert_same_rows(got, python_path(*flat(first, second), flag_ill), 5 if flag_ill else 4)
    R = max(p[0].shape[1] for p in first + second)
    assert got.shape == (len(first), R + (5 if flag_ill else 4))


def assert_same_rows(got, ref, extra):
    """Bit for bit on the CPU. On CUDA (``extra`` columns after the K angles): the angles, ranks
    and flags bit for bit, the distance to 4 ulps (its own order of summation), the non-finite
    column as NaN or 0."""
    if got.device.type == "cpu":
        return assert_same_bits(got, ref)
    assert got.shape == ref.shape and got.dtype == ref.dtype == torch.float64, (got, ref)
    K = ref.shape[1] - extra
    exact = [*range(K), K + 1, K + 2] + ([K + 4] if extra == 5 else [])
    assert_same_bits(got[:, exact], ref[:, exact])
    torch.testing.assert_close(got[:, K], ref[:, K], rtol=4 * 2.0**-52, atol=0, equal_nan=True)
    bad, bad_ref = got[:, K + 3], ref[:, K + 3]
    assert torch.equal(bad.isnan(), bad_ref.isnan()) and torch.all(bad.nan_to_num(0.0) == 0), (bad, bad_ref)


def test_native_angles_same_space_and_orthogonal(device):
    """Known answers: a rotated A keeps the column space (angles ~0); disjoint coordinate
    subspaces are orthogonal (angles π/2)."""
    first, second = pairs_case("same_space", device)
    out = lora_ops.lora_principal_angles(first, second, flag_ill=False).cpu()
    assert out[:, :6].abs().max() < 1e-6 and torch.equal(out[:, 7], torch.full((3,), 6.0, dtype=torch.float64))
    e = torch.eye(8, dtype=torch.float64, device=device)
    A = rand((2, 5), torch.float64, device)
    out = lora_ops.lora_principal_angles([(e[:, :2], A)], [(e[:, 2:4], A)], flag_ill=False).cpu()
    torch.testing.assert_close(out[0, :2], torch.full((2,), torch.pi / 2, dtype=torch.float64), rtol=0, atol=1e-7)


def test_native_angles_bad_input():
    B, A = torch.randn(10, 3), torch.randn(3, 4)
    with pytest.raises(ValueError, match="different dimensions"):
        lora_ops.lora_principal_angles([(B, A)], [(torch.randn(11, 3), A)])
    with pytest.raises(ValueError, match="same length"):
        lora_ops.lora_principal_angles([(B, A)], [])
    with pytest.raises(ValueError, match="even count"):
        torch.ops.gradgeom.lora_principal_angles([B, B, B], [A, A, A], False)
    with pytest.raises(ValueError, match="inner dimension"):
        lora_ops.lora_principal_angles([(B, A)], [(B, torch.randn(4, 4))])
    with pytest.raises(TypeError, match="dtype"):
        lora_ops.lora_principal_angles([(B, A)], [(B.int(), A)])
    out = lora_ops.lora_principal_angles([], [])
    assert out.shape == (0, 5)


def test_native_angles_opcheck(device):
    first, second = pairs_case("ragged", device)
    Bs, As = flat(first, second)
    for flag_ill in (False, True):
        torch.library.opcheck(torch.ops.gradgeom.lora_principal_angles.default, (Bs, As, flag_ill))


@requires_cuda
def test_cuda_native_angles_do_not_synchronise():
    first, second = pairs_case("ragged", torch.device("cuda"))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        lora_ops.lora_principal_angles(first, second, flag_ill=True)
    finally:
        torch.cuda.set_sync_debug_mode(0)
