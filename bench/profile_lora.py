"""Where the time of gradgeom.lora goes: host (Python + dispatcher + planning) vs device kernels.

For each call, prints
  * host ms: wall time until the call returns, with the GPU kept busy so nothing waits on it;
  * device ms: the sum of the CUDA kernel (and memcpy) durations the profiler records per call,
    with the top kernels;
  * event ms: what bench_lora.py reports (CUDA events around back-to-back calls).

    python bench/profile_lora.py [r ...]
"""

from __future__ import annotations

import os
import sys
import time

import torch

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_lora import adapters  # noqa: E402
from timing import kernel_ms_by_name, median_ms  # noqa: E402

from gradgeom import lora  # noqa: E402


def host_ms(fn, reps: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    best = []
    for _ in range(reps):
        torch.cuda._sleep(2_000_000)  # keep the GPU busy: the call never waits on it
        t0 = time.perf_counter()
        fn()
        best.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
    best.sort()
    return best[len(best) // 2]


def device_ms(fn, reps: int = 5):
    per = kernel_ms_by_name(fn, reps)
    top = sorted(per.items(), key=lambda kv: -kv[1])[:4]
    return sum(per.values()), top


def main(ranks):
    dev = torch.device("cuda")
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for r in ranks:
        Bs, As = adapters(224, 4096, 4096, r, torch.bfloat16, dev)
        pairs = list(zip(Bs, As))
        cases = {
            "lora_gram op": lambda: torch.ops.gradgeom.lora_gram(Bs, As),
            "delta_norm fro": lambda: lora.delta_norm(pairs),
            "delta_svdvals gram": lambda: lora.delta_svdvals(pairs, method="gram"),
        }
        if r == 16:
            Bs2 = [(B.float() + 0.1 * torch.randn_like(B.float()) / 64).to(B.dtype) for B in Bs]
            first = {str(i): p for i, p in enumerate(pairs)}
            second = {str(i): p for i, p in enumerate(zip(Bs2, As))}
            cases["principal_angles gram"] = lambda: lora.principal_angles(first, second, method="gram")
        for label, fn in cases.items():
            ev = median_ms(fn, dev)
            h = host_ms(fn) if "angles" not in label else float("nan")
            d, top = device_ms(fn)
            tops = "; ".join(f"{name[:48]} {ms:.3f}" for name, ms in top)
            print(f"r={r:3d} {label:<24s} event {ev:7.3f}  host {h:7.3f}  device {d:7.3f} ms | {tops}")


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [8, 16, 64, 128])
