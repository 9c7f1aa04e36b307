"""Host overhead of gradgeom.lora, measured on the CPU with tiny adapters (kernel time ~0).

For each call prints the median wall time per call, the part of it spent outside the CPU
compute kernels (host: wall minus the time inside lora_gram, psd_cholesky, sym_eigh and the LAPACK
calls, which stand for device kernels here), and what it asks of the dispatcher:
  * ops:    aten/custom ops dispatched (each is a launch + dispatch on a GPU host, ~5-10 µs);
  * upload: host lists turned into tensors (torch.tensor / as_tensor; a pinned H2D copy on GPU);
  * reads:  device-to-host reads (.cpu(), .tolist(), .item(), bool(tensor), nonzero): each is a
            full synchronisation on a GPU host.

    PYTHONPATH=. python bench/host_ops_cpu.py [n] [--profile NAME]
"""

from __future__ import annotations

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


class _KernelClock:
    """Time spent inside the compute kernels (CPU stand-ins for device kernels), per call."""

    OPS = [(torch.ops.gradgeom, name) for name in ("lora_gram", "psd_cholesky", "sym_eigh")] + [
        (torch.linalg, name) for name in ("eigh", "eigvalsh", "svdvals", "svd", "qr")]

    def __init__(self):
        self.spent = 0.0
        self.saved = []

    def _wrap(self, f):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return f(*args, **kwargs)
            finally:
                self.spent += time.perf_counter() - t0
        return timed

    def __enter__(self):
        for owner, name in self.OPS:
            f = getattr(owner, name)
            self.saved.append((owner, name, f))
            setattr(owner, name, self._wrap(f))
        return self

    def __exit__(self, *exc):
        for owner, name, f in self.saved:
            setattr(owner, name, f)


def wall_and_host_us(fn, reps: int = 200) -> tuple[float, float]:
    """Median wall time and median host time (wall minus kernels) per call, in µs."""
    for _ in range(5):
        fn()
    walls, hosts = [], []
    with _KernelClock() as clock:
        for _ in range(reps):
            clock.spent = 0.0
            t0 = time.perf_counter()
            fn()
            wall = time.perf_counter() - t0
            walls.append(wall)
            hosts.append(wall - clock.spent)
    walls.sort()
    hosts.sort()
    return walls[reps // 2] * 1e6, hosts[reps // 2] * 1e6


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
    print(f"{'call':26s} {'wall µs':>8s} {'host µs':>8s} {'ops':>5s} {'upload':>6s} {'reads':>5s}")
    for label, fn in all_cases.items():
        ops, up, reads, _ = count(fn)
        wall, host = wall_and_host_us(fn)
        print(f"{label:26s} {wall:8.0f} {host:8.0f} {ops:5d} {up:6d} {reads:5d}")


if __name__ == "__main__":
    main(sys.argv[1:])
