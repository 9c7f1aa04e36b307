"""Host overhead of gradgeom.lora, measured on the CPU with tiny adapters (kernel time ~0).

For each call prints the median and the least wall time per call, the part of the least spent
outside the CPU compute kernels (host: minus the time inside lora_gram, psd_cholesky, sym_eigh
and the LAPACK calls, which stand for device kernels here), and what the call asks of the
dispatcher. Kernel times come from the profiler (the least over 50 profiled calls), so the
kernels that native composites such as lora_svdvals call from C++ count too. On a shared machine
timings vary by up to ~1.5x from one process to the next and noise only adds time: compare two
versions (which run the same kernels) by their least times over several runs.
  * ops:    aten/custom ops dispatched from Python (each is a launch + dispatch on a GPU host,
            ~5-10 µs; the ops a native composite issues from C++ cost ~3-5 µs each, are not
            counted here, and are part of the host time);
  * upload: host lists turned into tensors (torch.tensor / as_tensor; a pinned H2D copy on GPU);
  * reads:  device-to-host reads (.cpu(), .tolist(), .item(), bool(tensor), nonzero): each is a
            full synchronisation on a GPU host.

    PYTHONPATH=. python bench/host_ops_cpu.py [n] [--profile NAME]
"""

from __future__ import annotations

import contextlib
import cProfile
import os
import pstats
import sys
import time
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gradgeom import lora  # noqa: E402

_READS = {"cpu", "tolist", "item", "__bool__", "nonzero", "__int__", "__float__"}
_UPLOADS = {"tensor", "as_tensor"}


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


class _Calls(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.reads = Counter()
        self.uploads = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in _READS:
            self.reads[name] += 1
        elif name in _UPLOADS:
            self.uploads += 1
        return func(*args, **(kwargs or {}))


def count(fn):
    with _Calls() as calls, _Count() as disp:
        fn()
    return sum(disp.ops.values()), calls.uploads, sum(calls.reads.values()), disp.ops


# The compute kernels (CPU stand-ins for device kernels), as the profiler names them. None of
# them calls another, so their times add up without double counting.
_KERNELS = {f"gradgeom::{name}" for name in ("lora_gram", "psd_cholesky", "sym_eigh")} | {
    f"aten::linalg_{name}" for name in ("eigh", "eigvalsh", "svdvals", "svd", "qr")}


@contextlib.contextmanager
def _quiet_stderr():
    """The profiler's start/stop lines go to file descriptor 2; keep them off the table."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def kernel_us(fn, reps: int = 50) -> float:
    """Time per call inside the compute kernels, in µs, wherever they are called from (directly
    from Python, or from C++ inside a native composite): the least over ``reps`` profiled calls."""
    with _quiet_stderr(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(reps):
            with torch.profiler.record_function("host_ops_cpu.call"):
                fn()
    events = prof.events()
    calls = sorted((e.time_range for e in events if e.name == "host_ops_cpu.call"), key=lambda r: r.start)
    kernels = sorted((e.time_range.start, e.time_range.elapsed_us()) for e in events if e.name in _KERNELS)
    per_call, k = [], 0
    for call in calls:
        spent = 0.0
        while k < len(kernels) and kernels[k][0] < call.end:
            spent += kernels[k][1] if kernels[k][0] >= call.start else 0.0
            k += 1
        per_call.append(spent)
    return min(per_call)


def wall_and_host_us(fn, reps: int = 200) -> tuple[float, float, float]:
    """Median and least wall time per call (not profiled), and host time (least wall minus
    :func:`kernel_us`), in µs. Noise on a shared machine only adds time, so the least values
    are the reproducible ones."""
    for _ in range(5):
        fn()
    walls = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t0)
    walls.sort()
    return walls[reps // 2] * 1e6, walls[0] * 1e6, walls[0] * 1e6 - kernel_us(fn)


def cases(n: int = 224, r: int = 4, d: int = 8):
    g = torch.Generator().manual_seed(0)
    pairs = [(torch.randn(d, r, generator=g), torch.randn(r, d, generator=g)) for _ in range(n)]
    first = {str(i): p for i, p in enumerate(pairs)}
    second = {str(i): (b + 0.1 * torch.randn(b.shape, generator=g), a) for i, (b, a) in enumerate(pairs)}
    scal = [0.5] * n
    return {
        "delta_norm fro": lambda: lora.delta_norm(pairs),
        "delta_norm fro s=list": lambda: lora.delta_norm(pairs, scaling=scal),
        "delta_norm 2 gram": lambda: lora.delta_norm(pairs, ord=2, method="gram"),
        "delta_norm nuc auto": lambda: lora.delta_norm(pairs, ord="nuc"),
        "delta_svdvals gram": lambda: lora.delta_svdvals(pairs, method="gram"),
        "delta_svdvals auto": lambda: lora.delta_svdvals(pairs, method="auto"),
        "geometry dict auto": lambda: lora.geometry(first),
        "principal_angles gram": lambda: lora.principal_angles(first, second, method="gram"),
        "principal_angles auto": lambda: lora.principal_angles(first, second, method="auto"),
    }


def main(argv):
    torch.set_num_threads(1)
    prof = argv[argv.index("--profile") + 1] if "--profile" in argv else None
    n = int(argv[0]) if argv and argv[0].isdigit() else 224
    all_cases = cases(n)
    if prof:
        fn = all_cases[prof]
        fn()
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(20):
            fn()
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(25)
        return
    print(f"# {n} adapters B [8, 4] / A [4, 8] float32, 1 thread, torch {torch.__version__}")
    print(f"{'call':26s} {'wall µs':>8s} {'min µs':>8s} {'host µs':>8s} {'ops':>5s} {'upload':>6s} {'reads':>5s}")
    for label, fn in all_cases.items():
        ops, up, reads, _ = count(fn)
        wall, least, host = wall_and_host_us(fn)
        print(f"{label:26s} {wall:8.0f} {least:8.0f} {host:8.0f} {ops:5d} {up:6d} {reads:5d}")


if __name__ == "__main__":
    main(sys.argv[1:])
