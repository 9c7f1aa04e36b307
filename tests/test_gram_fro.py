"""gram_fro (‖B·A‖_F from the Gram matrices) on CPU and CUDA against its float64 reference."""

import pytest
import torch

from conftest import requires_cuda
from gradgeom import lora_ops, reference

# fp64 sums of up to 10^6 products in a fixed order, against the float64 reference's own order:
# the squares agree to well below 1e-13 of Σ|gb∘ga|.
SQ_RTOL = 1e-13


def assert_fro_close(got, gb, ga):
    ref = reference.gram_fro(gb, ga)
    assert got.dtype == torch.float64 and got.shape == ref.shape and got.device == gb.device
    got, ref = got.cpu(), ref.cpu()
    x, y = (torch.tril(t.detach().cpu()) + torch.tril(t.detach().cpu(), -1).mT for t in (gb, ga))
    scale = (x * y).abs().sum((-2, -1))
    assert torch.all((got.square() - ref.square()).abs() <= SQ_RTOL * scale), (got, ref)


@pytest.mark.parametrize("n,R", [(0, 4), (1, 0), (1, 1), (3, 3), (129, 8), (5, 33), (2, 128), (3, 129), (1, 257), (1, 1024)])
def test_gram_fro_matches_reference(device, n, R):
    gb = torch.randn((n, R, R), dtype=torch.float64, device=device)
    ga = torch.randn((n, R, R), dtype=torch.float64, device=device)
    got = lora_ops.gram_fro(gb, ga)
    assert_fro_close(got, gb, ga)
    assert torch.equal(got, lora_ops.gram_fro(gb, ga))  # same bits again


def test_gram_fro_of_grams_is_the_dense_norm(device):
    Bs = [torch.randn(70, r, device=device) for r in (1, 5, 16)]
    As = [torch.randn(r, 45, device=device) for r in (1, 5, 16)]
    gb, ga = lora_ops.lora_gram(Bs, As)
    got = lora_ops.gram_fro(gb, ga).cpu()
    dense = torch.stack([torch.linalg.matrix_norm(b.cpu().double() @ a.cpu().double()) for b, a in zip(Bs, As)])
    torch.testing.assert_close(got, dense, rtol=1e-5, atol=0)


def test_gram_fro_views_and_lower_triangle_only(device):
    base = torch.randn((3, 131, 133), dtype=torch.float64, device=device)
    gb = base[:, 1:130, 2:131]                                         # unaligned start, row stride 133
    ga = torch.randn((3, 129, 129), dtype=torch.float64, device=device).mT  # transposed view
    assert not gb.is_contiguous() and not ga.is_contiguous()
    got = lora_ops.gram_fro(gb, ga)
    assert_fro_close(got, gb, ga)
    upper = torch.ones(129, 129, dtype=torch.bool, device=device).triu(1)
    junk_b = gb.masked_fill(upper, float("nan"))
    junk_a = ga.masked_fill(upper, float("inf"))
    assert torch.equal(lora_ops.gram_fro(junk_b, junk_a), got)  # the upper triangles are never read


def test_gram_fro_non_finite_and_negative(device):
    gb = torch.ones((5, 2, 2), dtype=torch.float64)
    ga = torch.ones((5, 2, 2), dtype=torch.float64)
    gb[0, 1, 0] = float("inf")                  # Inf·1: +Inf
    gb[1, 1, 1] = float("inf")
    ga[1, 1, 1] = 0.0                           # Inf·0: NaN
    gb[2, 0, 0] = float("nan")                  # NaN
    ga[3] = -1.0                                # a negative sum (rounding of a rank-deficient pair): 0
    got = lora_ops.gram_fro(gb.to(device), ga.to(device)).cpu()
    assert got[0] == float("inf")
    assert torch.isnan(got[1]) and torch.isnan(got[2])
    assert got[3] == 0.0 and got[4] == 2.0
    ref = reference.gram_fro(gb, ga)
    assert torch.equal(got.isnan(), ref.isnan()) and torch.equal(got.nan_to_num(), ref.nan_to_num())


def test_gram_fro_bad_input(device):
    g = torch.zeros((2, 3, 3), dtype=torch.float64, device=device)
    with pytest.raises(ValueError, match="gb must be a batch of square Gram matrices"):
        lora_ops.gram_fro(g[0], g[0])
    with pytest.raises(ValueError, match="gb must be a batch of square Gram matrices"):
        lora_ops.gram_fro(g[:, :2], g[:, :2])
    with pytest.raises(ValueError, match="ga must have gb's shape"):
        lora_ops.gram_fro(g, g[:1])
    with pytest.raises(TypeError, match="must be float64"):
        lora_ops.gram_fro(g, g.float())
    with pytest.raises(TypeError, match="ga must be a torch.Tensor"):
        lora_ops.gram_fro(g, [[1.0]])
    if device.type == "cuda":
        with pytest.raises(ValueError, match="one device"):
            lora_ops.gram_fro(g, g.cpu())


def test_gram_fro_opcheck(device):
    gb = torch.randn((3, 5, 5), dtype=torch.float64, device=device)
    ga = torch.randn((3, 5, 5), dtype=torch.float64, device=device)
    torch.library.opcheck(torch.ops.gradgeom.gram_fro.default, (gb, ga))
    torch.library.opcheck(torch.ops.gradgeom.gram_fro.default, (gb.clone().requires_grad_(), ga))


@requires_cuda
def test_cuda_gram_fro_does_not_synchronise():
    gb = torch.randn((224, 128, 128), dtype=torch.float64, device="cuda")
    ga = torch.randn((224, 128, 128), dtype=torch.float64, device="cuda")
    lora_ops.gram_fro(gb, ga)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = lora_ops.gram_fro(gb, ga)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert_fro_close(got, gb, ga)
