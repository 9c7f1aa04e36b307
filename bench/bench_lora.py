"""LoRA geometry: gradgeom.lora vs the stock PyTorch ways, on a Llama-7B-sized adapter set.

GPU: 224 adapters of 4096 x 4096 (B [4096, r], A [r, 4096], bf16) at r in {8, 16, 64, 128}.
CPU: 32 adapters of 1024 x 1024 (float32) at r in {8, 16, 64}.

Per r, side by side:
  * gradgeom: the lora_gram op (the whole call, events) and its kernels alone (profiler device
    time; achieved GB/s over the factor bytes and % of a device-to-device copy measured in the
    same run), all Frobenius norms, all singular values
    (method="gram": no host sync; method="auto": exact fallback, one host read);
  * PEFT-style multiply-out: ΔW = B @ A per adapter, then torch.linalg.matrix_norm / svdvals
    (svdvals of a 4096² matrix takes ~1 s: timed on 2 adapters and scaled to the set, marked "≈");
  * the Gram route in stock torch: bmm for BᵀB and A·Aᵀ, then batched torch.linalg.eigh /
    eigvalsh (cuSOLVER; its batched solver falls off a cliff for r > 32).
At r = 16: principal angles between 224 pairs (ours vs batched torch.linalg.qr + svdvals).
Targets on an H100: Frobenius < 0.3 ms, singular values < 1 ms for r <= 128, angles < 2 ms.

    pytest bench/bench_lora.py --benchmark-only -s      # pytest-benchmark tables
    python bench/bench_lora.py                          # one summary table
    python bench/bench_lora.py --angles                 # only the principal-angle and cross-Gram rows
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

if __name__ == "__main__":  # run as a script from anywhere: import gradgeom from this checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import copy_gbps, kernel_ms, median_ms  # noqa: E402

from gradgeom import lora  # noqa: E402

GPU = dict(n=224, d=4096, k=4096, ranks=(8, 16, 64, 128), dtype=torch.bfloat16)
CPU = dict(n=32, d=1024, k=1024, ranks=(8, 16, 64), dtype=torch.float32)
ANGLE_R = 16


def adapters(n, d, k, r, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    Bs = [(torch.randn(d, r, generator=g) / d**0.5).to(device, dtype) for _ in range(n)]
    As = [(torch.randn(r, k, generator=g) / k**0.5).to(device, dtype) for _ in range(n)]
    return Bs, As


def torch_gram_route(Bst, Ast, spectrum: bool):
    """The factored route with stock torch: fp32 bmm Grams, then batched cuSOLVER/LAPACK eigh."""
    b, a = Bst.float(), Ast.float()
    gb = (b.mT @ b).double()
    ga = (a @ a.mT).double()
    if not spectrum:
        return (gb * ga).sum((-2, -1)).sqrt()
    lam, V = torch.linalg.eigh(gb)
    F = V * lam.clamp_min(0).sqrt().unsqueeze(-2)
    return torch.linalg.eigvalsh(F.mT @ ga @ F).clamp_min(0).sqrt().flip(-1)


def multiply_out_fro(Bs, As):
    return torch.stack([torch.linalg.matrix_norm((B @ A).float()) for B, A in zip(Bs, As)])


def multiply_out_svdvals(Bs, As):
    return [torch.linalg.svdvals((B @ A).float()) for B, A in zip(Bs, As)]


def cases(Bs, As, Bst, Ast):
    pairs = list(zip(Bs, As))
    sample = 2
    scale = len(Bs) / sample
    return {
        "gradgeom lora_gram kernel": (lambda: torch.ops.gradgeom.lora_gram(Bs, As), 1.0),
        "gradgeom delta_norm fro": (lambda: lora.delta_norm(pairs), 1.0),
        "gradgeom delta_svdvals gram": (lambda: lora.delta_svdvals(pairs, method="gram"), 1.0),
        "gradgeom delta_svdvals auto": (lambda: lora.delta_svdvals(pairs, method="auto"), 1.0),
        "multiply-out matrix_norm fro": (lambda: multiply_out_fro(Bs, As), 1.0),
        "multiply-out svdvals (≈, 2 timed)": (lambda: multiply_out_svdvals(Bs[:sample], As[:sample]), scale),
        "torch Gram route fro (bmm)": (lambda: torch_gram_route(Bst, Ast, False), 1.0),
        "torch Gram route svdvals (bmm + eigh)": (lambda: torch_gram_route(Bst, Ast, True), 1.0),
    }


def angle_cases(first, second, Bst1, Bst2):
    def torch_qr_angles():
        q1 = torch.linalg.qr(Bst1.float()).Q
        q2 = torch.linalg.qr(Bst2.float()).Q
        return torch.arccos(torch.linalg.svdvals(q1.mT @ q2).clamp(0, 1))

    return {
        "gradgeom principal_angles": lambda: lora.principal_angles(first, second),
        "gradgeom principal_angles gram": lambda: lora.principal_angles(first, second, method="gram"),
        "torch batched qr + svdvals (B only)": torch_qr_angles,
    }


def report(label: str, ms: float, nbytes: int | None = None, ceiling: float | None = None) -> str:
    line = f"  {label:<40s} {ms:10.3f} ms"
    if nbytes is not None and ceiling:
        gbps = nbytes / ms / 1e6
        line += f"   {gbps:8.0f} GB/s  {100 * gbps / ceiling:5.1f} % of copy"
    return line


def run_table(device: torch.device, shape: dict) -> None:
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    for r in shape["ranks"]:
        Bs, As = adapters(shape["n"], shape["d"], shape["k"], r, shape["dtype"], device)
        Bst, Ast = torch.stack(Bs), torch.stack(As)
        nbytes = sum(t.numel() * t.element_size() for t in Bs + As)
        ceiling = copy_gbps(nbytes, device)
        print(f"# {name}, torch {torch.__version__}: {shape['n']} adapters {shape['d']}x{shape['k']} r={r} "
              f"{shape['dtype']}, factors {nbytes / 1e6:.0f} MB; copy {ceiling:.0f} GB/s (read + write)")
        for label, (fn, scale) in cases(Bs, As, Bst, Ast).items():
            ms = median_ms(fn, device, warmup=1 if "svdvals (≈" in label else 3,
                           reps=3 if ("svdvals (≈" in label or "eigh" in label) else 15) * scale
            if "kernel" in label:
                print(report(label.replace("kernel", "call"), ms))
                if device.type == "cuda":  # the kernels alone: the call above is bound by its host side
                    ms = kernel_ms(fn)
            print(report(label, ms, nbytes if "kernel" in label else None, ceiling))
        del Bs, As, Bst, Ast
    run_angles(device, shape)


def cross_gram_cases(Bs, Bs2):
    """B1ᵢᵀ·B2ᵢ in float64: the native kernel principal_angles uses, and the stock way it replaced."""
    return {
        "gradgeom lora_cross_gram kernel": lambda: torch.ops.gradgeom.lora_cross_gram(Bs, Bs2),
        "torch stack + float64 bmm": lambda: torch.stack(Bs).double().mT @ torch.stack(Bs2).double(),
    }


def run_angles(device: torch.device, shape: dict) -> None:
    Bs, As = adapters(shape["n"], shape["d"], shape["k"], ANGLE_R, shape["dtype"], device)
    Bs2 = [(B.float() + 0.1 * torch.randn_like(B.float()) / shape["d"] ** 0.5).to(B.dtype) for B in Bs]
    first = {str(i): p for i, p in enumerate(zip(Bs, As))}
    second = {str(i): p for i, p in enumerate(zip(Bs2, As))}
    print(f"# principal angles, {shape['n']} pairs, r={ANGLE_R}")
    for label, fn in angle_cases(first, second, torch.stack(Bs), torch.stack(Bs2)).items():
        print(report(label, median_ms(fn, device)))
    nbytes = sum(t.numel() * t.element_size() for t in Bs + Bs2)
    ceiling = copy_gbps(nbytes, device)
    print(f"# cross Grams B1ᵢᵀ·B2ᵢ of those pairs, factors {nbytes / 1e6:.0f} MB; copy {ceiling:.0f} GB/s (read + write)")
    for label, fn in cross_gram_cases(Bs, Bs2).items():
        ms = median_ms(fn, device)
        if device.type == "cuda":  # the kernels alone, as for lora_gram above
            ms = kernel_ms(fn)
        print(report(label, ms, nbytes, ceiling))


# --- pytest-benchmark ---------------------------------------------------------------------------


def _setup(device: torch.device, shape: dict, r: int):
    Bs, As = adapters(shape["n"], shape["d"], shape["k"], r, shape["dtype"], device)
    nbytes = sum(t.numel() * t.element_size() for t in Bs + As)
    return Bs, As, torch.stack(Bs), torch.stack(As), nbytes, copy_gbps(nbytes, device)


def _bench(benchmark, device, setup, label):
    Bs, As, Bst, Ast, nbytes, ceiling = setup
    fn, scale = cases(Bs, As, Bst, Ast)[label]

    def timed():
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out  # freed after the timer stops, as in timing.median_ms

    slow = "svdvals (≈" in label or "eigh" in label
    benchmark.pedantic(timed, rounds=3 if slow else 15, warmup_rounds=1 if slow else 3)
    if benchmark.stats is None:  # --benchmark-disable: ran once as a smoke test
        return
    ms = benchmark.stats.stats.median * 1e3 * scale
    benchmark.extra_info.update(ms_for_whole_set=ms)
    if "kernel" in label:
        if device.type == "cuda":  # the kernels alone (the call is bound by its host side)
            ms = kernel_ms(fn)
            benchmark.extra_info.update(kernel_ms=ms)
        gbps = nbytes / ms / 1e6
        benchmark.extra_info.update(gbps=gbps, pct_of_copy=100 * gbps / ceiling)
    print("\n" + report(label, ms, nbytes if "kernel" in label else None, ceiling))


LABELS = list(cases([], [], torch.empty(0), torch.empty(0)))


@pytest.fixture(scope="module", params=GPU["ranks"], ids=lambda r: f"r{r}")
def gpu_setup(request):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return _setup(torch.device("cuda"), GPU, request.param)


@pytest.fixture(scope="module", params=CPU["ranks"], ids=lambda r: f"r{r}")
def cpu_setup(request):
    return _setup(torch.device("cpu"), CPU, request.param)


@pytest.mark.parametrize("label", LABELS)
def test_gpu(benchmark, gpu_setup, label):
    _bench(benchmark, torch.device("cuda"), gpu_setup, label)


@pytest.mark.parametrize("label", LABELS)
def test_cpu(benchmark, cpu_setup, label):
    _bench(benchmark, torch.device("cpu"), cpu_setup, label)


def _angle_pairs(device: str):
    """(device, the angle bench's first and perturbed second B factors, its A factors) at r = ANGLE_R."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    dev = torch.device(device)
    shape = GPU if device == "cuda" else CPU
    Bs, As = adapters(shape["n"], shape["d"], shape["k"], ANGLE_R, shape["dtype"], dev)
    Bs2 = [(B.float() + 0.1 * torch.randn_like(B.float()) / shape["d"] ** 0.5).to(B.dtype) for B in Bs]
    return dev, Bs, Bs2, As


def _pedantic(benchmark, dev: torch.device, fn) -> None:
    def timed():
        out = fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return out  # freed after the timer stops

    benchmark.pedantic(timed, rounds=15, warmup_rounds=3)


@pytest.mark.parametrize("device", ["cuda", "cpu"])
@pytest.mark.parametrize("label", ["gradgeom principal_angles", "torch batched qr + svdvals (B only)"])
def test_angles(benchmark, device, label):
    dev, Bs, Bs2, As = _angle_pairs(device)
    fn = angle_cases({str(i): p for i, p in enumerate(zip(Bs, As))}, {str(i): p for i, p in enumerate(zip(Bs2, As))},
                     torch.stack(Bs), torch.stack(Bs2))[label]
    _pedantic(benchmark, dev, fn)


@pytest.mark.parametrize("device", ["cuda", "cpu"])
@pytest.mark.parametrize("label", list(cross_gram_cases([], [])))
def test_cross_gram(benchmark, device, label):
    dev, Bs, Bs2, _ = _angle_pairs(device)
    fn = cross_gram_cases(Bs, Bs2)[label]
    nbytes = sum(t.numel() * t.element_size() for t in Bs + Bs2)
    ceiling = copy_gbps(nbytes, dev)
    _pedantic(benchmark, dev, fn)
    if benchmark.stats is None:  # --benchmark-disable: ran once as a smoke test
        return
    ms = kernel_ms(fn) if dev.type == "cuda" else benchmark.stats.stats.median * 1e3
    gbps = nbytes / ms / 1e6
    benchmark.extra_info.update(ms=ms, gbps=gbps, pct_of_copy=100 * gbps / ceiling)
    print("\n" + report(label, ms, nbytes, ceiling))


if __name__ == "__main__":
    only_angles = "--angles" in sys.argv[1:]  # just the principal-angle and cross-Gram rows
    run = run_angles if only_angles else run_table
    if torch.cuda.is_available():
        run(torch.device("cuda"), GPU)
    run(torch.device("cpu"), CPU)
