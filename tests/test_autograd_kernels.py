"""Every gradgeom operator has a typed kernel at the Autograd key: it runs below autograd, so its
outputs never require grad, it gives the same bits as without autograd, and torch's boxed
fallback for custom operators is never taken."""

import pytest
import torch

from conftest import DEVICES
from gradgeom import _native  # noqa: F401  (registers torch.ops.gradgeom)

OPS = ["group_moments", "sketch_moments", "lora_gram", "gram_fro", "lora_cross_gram", "sym_eigh", "psd_cholesky",
       "lora_fro", "lora_svdvals", "lora_principal_angles"]


def calls(device, grad):
    """(op name, args) of every op, with one input that requires grad when ``grad``."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device).requires_grad_(grad)

    B1, A1, B2, A2 = rand(9, 3), rand(3, 7), rand(9, 3), rand(3, 7)
    S = rand(2, 4, 4)
    S2 = (S @ S.mT).detach().requires_grad_(grad)
    G = rand(2, 3, 3)
    return [
        ("group_moments", ([rand(5), rand(2, 3)], [0, 1], 2)),
        ("sketch_moments", ([rand(5), rand(2, 3)], [0, 0], [0, 5], 1, 8, 0)),
        ("lora_gram", ([B1], [A1])),
        ("gram_fro", (G, G.detach())),
        ("lora_cross_gram", ([B1], [B2.detach()])),
        ("sym_eigh", (S2, True)),
        ("psd_cholesky", (S2, 1e-14)),
        ("lora_fro", ([B1], [A1])),
        ("lora_svdvals", ([B1], [A1], True)),
        ("lora_principal_angles", ([B1, B2], [A1, A2], True)),
    ]


def outputs(result):
    return list(result) if isinstance(result, tuple) else [result]


def test_every_op_has_an_autograd_kernel():
    assert [c[0] for c in calls("cpu", False)] == OPS
    for name in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"gradgeom::{name}", "Autograd"), name


@pytest.mark.parametrize("device", DEVICES)
def test_outputs_do_not_require_grad_and_keep_their_bits(device):
    for (name, args), (_, plain) in zip(calls(device, True), calls(device, False)):
        op = getattr(torch.ops.gradgeom, name)
        got = outputs(op(*args))
        want = outputs(op(*plain))
        assert not any(t.requires_grad for t in got), name
        assert all(torch.equal(a, b) for a, b in zip(got, want)), name
        with pytest.raises(RuntimeError, match="does not require grad"):
            got[0].sum().backward()


@pytest.mark.parametrize("device", DEVICES)
def test_autograd_registration_check_passes(device):
    for name, args in calls(device, True):
        op = getattr(torch.ops.gradgeom, name).default
        torch.library.opcheck(op, args, test_utils=("test_autograd_registration",))

