"""gradgeom.lora_ops.unboxed_call: the LoRA list ops with their lists read in C++.

It must give the bits torch.ops gives, take the general path (return None) wherever the two could
differ, and leave the public functions' results and errors as they were."""

from __future__ import annotations

import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

from gradgeom import lora, lora_ops
from test_lora_pipeline import assert_same_bits

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def factors(device="cpu", n=5, dtypes=(torch.float32, torch.bfloat16, torch.float64)):
    g = torch.Generator().manual_seed(3)
    shapes = [(40, 4, 30), (7, 1, 64), (129, 8, 3), (33, 3, 33), (64, 16, 65)][:n]
    Bs = [torch.randn(d, r, generator=g).to(device, dtypes[i % len(dtypes)]) for i, (d, r, _) in enumerate(shapes)]
    As = [torch.randn(r, k, generator=g).to(device, dtypes[i % len(dtypes)]) for i, (_, r, k) in enumerate(shapes)]
    return Bs, As


def same_bits(got, ref):
    """assert_same_bits for a tensor, or for each tensor of a tuple."""
    if isinstance(ref, torch.Tensor):
        assert_same_bits(got, ref)
        return
    assert type(got) is tuple and len(got) == len(ref)
    for a, b in zip(got, ref):
        same_bits(a, b)


def each_op(Bs, As):
    """(op code, flag, what torch.ops returns) for every op unboxed_call serves."""
    ops = torch.ops.gradgeom
    yield lora_ops.FRO, False, ops.lora_fro(Bs, As)
    yield lora_ops.GRAM, False, ops.lora_gram(Bs, As)
    for flag in (True, False):
        yield lora_ops.SVDVALS, flag, ops.lora_svdvals(Bs, As, flag)
        yield lora_ops.SVDVALS_NO_FRO, flag, ops.lora_svdvals(Bs, As, flag, False)
    half = len(Bs) // 2
    B2, A2 = Bs[:half], As[:half]
    B2b = [b + 0.5 * torch.randn_like(b) for b in B2]
    yield lora_ops.PRINCIPAL_ANGLES, True, (B2 + B2b, A2 + A2, ops.lora_principal_angles(B2 + B2b, A2 + A2, True))


def check_same_as_torch_ops(device):
    Bs, As = factors(device)
    pairs = list(zip(Bs, As))
    for op, flag, ref in each_op(Bs, As):
        if op == lora_ops.PRINCIPAL_ANGLES:
            b, a, ref = ref
            same_bits(lora_ops.unboxed_call(op, b, a, flag=flag), ref)
            same_bits(lora_ops.unboxed_call(op, tuple(b), tuple(a), flag=flag), ref)
            continue
        same_bits(lora_ops.unboxed_call(op, pairs, flag=flag), ref)
        same_bits(lora_ops.unboxed_call(op, tuple(map(list, pairs)), flag=flag), ref)
        same_bits(lora_ops.unboxed_call(op, Bs, As, flag=flag), ref)


def test_same_bits_as_torch_ops_cpu():
    check_same_as_torch_ops("cpu")


@requires_cuda
def test_same_bits_as_torch_ops_cuda():
    check_same_as_torch_ops("cuda")


def test_parameters_are_plain_tensors():
    Bs, As = factors(n=3)
    params = [(torch.nn.Parameter(b, requires_grad=False), torch.nn.Parameter(a, requires_grad=False)) for b, a in zip(Bs, As)]
    same_bits(lora_ops.unboxed_call(lora_ops.FRO, params), torch.ops.gradgeom.lora_fro(Bs, As))


class PassThrough(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _Tagged(torch.Tensor):
    """A subclass whose __torch_function__ must not be skipped."""


def test_general_path_where_the_shortcut_could_differ():
    Bs, As = factors(n=3)
    pairs = list(zip(Bs, As))
    none = [
        [],  # empty: the result's device is unknown
        (),
        [(Bs[0], As[0], 1.0)],  # not a pair
        [(Bs[0],)],
        [Bs[0]],
        [(Bs[0], "A")],
        [(Bs[0].as_subclass(_Tagged), As[0])],  # a subclass with __torch_function__
        {"q": (Bs[0], As[0])},  # a dict is not a list of pairs
        Bs[0],
    ]
    for bad in none:
        assert lora_ops.unboxed_call(lora_ops.FRO, bad) is None, bad
    assert lora_ops.unboxed_call(lora_ops.FRO, Bs, As[:2]) is None  # lengths differ
    assert lora_ops.unboxed_call(lora_ops.FRO, [(Bs[0], As[1])]) is None  # r differs: the general path names it
    assert lora_ops.unboxed_call(lora_ops.FRO, [(Bs[0][None], As[0])]) is None  # 3-D
    with PassThrough():
        assert lora_ops.unboxed_call(lora_ops.FRO, pairs) is None
    with pytest.raises(ValueError, match="op must be"):
        lora_ops._C._lora_call(7, pairs, None, False, False)


def test_autograd_takes_the_general_path():
    Bs, As = factors(n=3)
    grad_pairs = [(Bs[0].requires_grad_(), As[0])] + list(zip(Bs[1:], As[1:]))
    assert lora_ops.unboxed_call(lora_ops.FRO, grad_pairs) is None
    with torch.no_grad():
        assert lora_ops.unboxed_call(lora_ops.FRO, grad_pairs) is not None
    out = lora_ops.unboxed_call(lora_ops.FRO, grad_pairs, no_grad=True)
    assert out is not None and not out.requires_grad
    fro = lora.delta_norm(grad_pairs)  # still differentiable
    assert fro.requires_grad
    fro.sum().backward()
    assert Bs[0].grad is not None and torch.isfinite(Bs[0].grad).all()


def test_no_reference_leaks():
    Bs, As = factors(n=3)
    pairs = list(zip(Bs, As))
    before = [sys.getrefcount(t) for t in Bs + As]
    for op, flag in ((lora_ops.FRO, False), (lora_ops.SVDVALS, True), (lora_ops.GRAM, False)):
        for _ in range(50):
            out = lora_ops.unboxed_call(op, pairs, flag=flag)
    ref = torch.ops.gradgeom.lora_gram(*map(list, zip(*pairs)))
    assert isinstance(out, tuple) and sys.getrefcount(out) == sys.getrefcount(ref)
    assert [sys.getrefcount(t) for t in out] == [sys.getrefcount(t) for t in ref]
    assert [sys.getrefcount(t) for t in Bs + As] == before


def test_public_functions_give_the_general_path_bits():
    Bs, As = factors()
    pairs = list(zip(Bs, As))
    s = 0.75
    with PassThrough():  # forces the general path
        ref_fro = lora.delta_norm(pairs, scaling=s)
        ref_nuc = lora.delta_norm(pairs, scaling=s, ord="nuc", method="gram")
        ref_sv = lora.delta_svdvals(pairs, scaling=s, method="auto")
    same_bits(lora.delta_norm(pairs, scaling=s), ref_fro)
    same_bits(lora.delta_norm(pairs, scaling=s, ord="nuc", method="gram"), ref_nuc)
    got = lora.delta_svdvals(pairs, scaling=s, method="auto")
    assert len(got) == len(ref_sv)
    for g, r in zip(got, ref_sv):
        same_bits(g, r)
