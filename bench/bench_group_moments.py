"""group_moments vs stock PyTorch on a Llama-shaped list of gradients.

GPU: bf16, hidden 4096, intermediate 11008, 8 layers (72 tensors, 1.62 G elements, 3.24 GB),
grouped per layer. CPU: float32 and bf16, hidden 1024, intermediate 2816, 2 layers.
Every line gives the median time, the achieved GB/s (bytes of gradient read once) and the
percentage of a device-to-device copy measured in the same run (bytes read + written).

    pytest bench/bench_group_moments.py --benchmark-only -s      # pytest-benchmark tables
    python bench/bench_group_moments.py                          # one summary table
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
if __name__ == "__main__":  # run as a script from anywhere: import gradgeom from this checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from timing import copy_gbps, median_ms, report  # noqa: E402

from gradgeom import ops  # noqa: E402


def llama_grads(hidden, inter, layers, dtype, device):
    """One gradient per parameter of a Llama-style decoder stack; group id = layer index."""
    shapes = [(hidden, hidden)] * 4 + [(inter, hidden), (inter, hidden), (hidden, inter), (hidden,), (hidden,)]
    tensors, ids = [], []
    for layer in range(layers):
        for shape in shapes:
            tensors.append(torch.randn(shape, device=device, dtype=torch.float32).to(dtype))
            ids.append(layer)
    return tensors, ids


def naive_stats(tensors):
    """The hand-rolled way: per tensor, sum, sum of squares, max |g|, non-finite count."""
    out = []
    for t in tensors:
        f = t.float()
        out.append(torch.stack([f.sum(), (f * f).sum(), f.abs().amax(), (~torch.isfinite(t)).sum().float()]))
    return torch.stack(out)


def cases(tensors, ids, num_groups):
    return {
        "gradgeom.ops.group_moments": lambda: ops.group_moments(tensors, ids, num_groups),
        "torch._foreach_norm": lambda: torch._foreach_norm(tensors),
        "naive per-tensor torch": lambda: naive_stats(tensors),
    }


def cpu_cases(tensors, ids, num_groups):
    return {
        "gradgeom.ops.group_moments": lambda: ops.group_moments(tensors, ids, num_groups),
        "torch.linalg.vector_norm per tensor": lambda: [torch.linalg.vector_norm(t) for t in tensors],
        "torch.sum per tensor": lambda: [t.sum() for t in tensors],
        "naive per-tensor torch": lambda: naive_stats(tensors),
    }


GPU = dict(hidden=4096, inter=11008, layers=8, dtype=torch.bfloat16)
CPU = dict(hidden=1024, inter=2816, layers=2)


@pytest.fixture(scope="module")
def gpu_setup():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    dev = torch.device("cuda")
    tensors, ids = llama_grads(GPU["hidden"], GPU["inter"], GPU["layers"], GPU["dtype"], dev)
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    ceiling = copy_gbps(nbytes, dev)
    print(f"\n[gpu] {torch.cuda.get_device_name()} torch {torch.__version__}: {len(tensors)} tensors, "
          f"{sum(t.numel() for t in tensors) / 1e9:.3f} G elements, copy {ceiling:.0f} GB/s")
    return tensors, ids, nbytes, ceiling, dev


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def cpu_setup(request):
    dev = torch.device("cpu")
    tensors, ids = llama_grads(CPU["hidden"], CPU["inter"], CPU["layers"], request.param, dev)
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    ceiling = copy_gbps(nbytes, dev)
    print(f"\n[cpu {request.param}] {torch.get_num_threads()} threads: {len(tensors)} tensors, "
          f"{nbytes / 1e6:.0f} MB, copy {ceiling:.1f} GB/s")
    return tensors, ids, nbytes, ceiling, dev


def _run(benchmark, setup, name, table):
    tensors, ids, nbytes, ceiling, dev = setup
    fn = table(tensors, ids, max(ids) + 1)[name]

    def timed():
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(timed, rounds=15, warmup_rounds=3)
    # With --benchmark-disable pytest-benchmark keeps no statistics: time it here instead.
    ms = benchmark.stats.stats.median * 1e3 if benchmark.stats else median_ms(fn, dev)
    benchmark.extra_info.update(gbps=nbytes / ms / 1e6, pct_of_copy=100 * nbytes / ms / 1e6 / ceiling)
    print("\n" + report(name, nbytes, ms, ceiling))


@pytest.mark.parametrize("name", list(cases([], [], 1)))
def test_gpu(benchmark, gpu_setup, name):
    _run(benchmark, gpu_setup, name, cases)


@pytest.mark.parametrize("name", list(cpu_cases([], [], 1)))
def test_cpu(benchmark, cpu_setup, name):
    _run(benchmark, cpu_setup, name, cpu_cases)


def summary(device: torch.device, dtype: torch.dtype, shape: dict) -> None:
    tensors, ids = llama_grads(shape["hidden"], shape["inter"], shape["layers"], dtype, device)
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    ceiling = copy_gbps(nbytes, device)
    table = cases if device.type == "cuda" else cpu_cases
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# {name}, torch {torch.__version__}, {dtype}, {len(tensors)} tensors, "
          f"{nbytes / 1e9:.3f} GB; copy {ceiling:.0f} GB/s (read + write)")
    for label, fn in table(tensors, ids, max(ids) + 1).items():
        print(report(label, nbytes, median_ms(fn, device), ceiling))


if __name__ == "__main__":
    if torch.cuda.is_available():
        summary(torch.device("cuda"), torch.bfloat16, GPU)
    for dt in (torch.float32, torch.bfloat16):
        summary(torch.device("cpu"), dt, CPU)
