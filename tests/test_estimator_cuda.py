"""The estimator on a GPU: no host synchronisation in hooks or step(), identical training, CPU parity."""

import copy

import pytest
import torch
import torch.nn as nn

from gradgeom import GradientSmoothnessEstimator, compiled_with_cuda

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and compiled_with_cuda()), reason="needs a CUDA device and gradgeom's CUDA kernels"
)

MODES = ["moments", "sketch", "exact", "microbatch"]


def make_model(seed=0):
    torch.manual_seed(seed)
    layers = nn.ModuleDict({"layers": nn.ModuleList([nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256))
                                                     for _ in range(3)])})
    model = nn.Sequential()
    model.body = layers
    model.head = nn.Linear(256, 10)
    return model


def forward(model, x):
    for layer in model.body["layers"]:
        x = x + layer(x)
    return model.head(x)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("amp", ["bf16", "fp16_scaler"])
def test_no_host_sync_during_backward_and_step(mode, amp):
    model = make_model().cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda") if amp == "fp16_scaler" else None
    dtype = torch.float16 if amp == "fp16_scaler" else torch.bfloat16
    est = GradientSmoothnessEstimator(model, mode=mode, grad_scaler=scaler)
    x = torch.randn(64, 256, device="cuda")
    y = torch.randint(0, 10, (64,), device="cuda")
    for _ in range(4):
        with torch.autocast("cuda", dtype=dtype):
            losses = [nn.functional.cross_entropy(forward(model, x[i::2]), y[i::2]) / 2 for i in range(2)]
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for loss in losses:
                (scaler.scale(loss) if scaler else loss).backward()
            est.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
    q = est.quality()
    assert set(q) == {"layers.0", "layers.1", "layers.2", "head"}
    if mode != "moments":
        assert all(v.sample_count >= 3 for v in q.values())


@pytest.mark.parametrize("mode", MODES)
def test_training_bit_identical_on_gpu(mode):
    a = make_model(1).cuda()
    b = copy.deepcopy(a)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (a, b)]
    est = GradientSmoothnessEstimator(a, mode=mode, optimizer=opts[0])
    gen = torch.Generator(device="cuda").manual_seed(0)
    for _ in range(5):
        x = torch.randn(32, 256, device="cuda", generator=gen)
        for m, o in zip((a, b), opts):
            for i in range(2):
                forward(m, x[i::2]).square().mean().backward()
            o.step()
            o.zero_grad(set_to_none=True)
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), n
    est.quality()


@pytest.mark.parametrize("mode", ["sketch", "exact"])
def test_cpu_and_gpu_estimates_agree_and_state_moves(mode):
    cpu_model = make_model(2)
    gpu_model = copy.deepcopy(cpu_model).cuda()
    ec = GradientSmoothnessEstimator(cpu_model, mode=mode, sketch_dim=1024)
    eg = GradientSmoothnessEstimator(gpu_model, mode=mode, sketch_dim=1024)
    gen = torch.Generator().manual_seed(0)
    for _ in range(6):
        x = torch.randn(16, 256, generator=gen)
        forward(cpu_model, x).square().mean().backward()
        forward(gpu_model, x.cuda()).square().mean().backward()
        ec.step()
        eg.step()
        cpu_model.zero_grad()
        gpu_model.zero_grad()
    qc, qg = ec.quality(), eg.quality()
    for k in qc:
        assert qg[k].snr == pytest.approx(qc[k].snr, rel=1e-3)
        assert qg[k].variance == pytest.approx(qc[k].variance, rel=1e-3)
    # GPU state resumes on the CPU (same hash on both devices).
    ec2 = GradientSmoothnessEstimator(cpu_model, mode=mode, sketch_dim=1024, attach=False)
    ec2.load_state_dict(eg.state_dict())
    for k, v in ec2.quality().items():
        assert v.snr == pytest.approx(qg[k].snr, rel=1e-12)
