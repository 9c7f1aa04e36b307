"""Shared timing helpers for the benchmarks: event-timed medians and the copy ceiling."""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from typing import Callable

import torch


def median_ms(fn: Callable[[], object], device: torch.device, warmup: int = 3, reps: int = 20) -> float:
    """Median wall time of fn() in milliseconds (CUDA events on GPU, perf_counter on CPU).

    Each call's result stays alive until its stop mark, so that freeing it (224 row tensors take
    ~80 µs of host time) is not counted: a call that synchronises would otherwise pay it after
    the device is done, one that does not would hide it behind the device."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(reps):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop))
            del out
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            out = fn()
            times.append((time.perf_counter() - t0) * 1e3)
            del out
    return statistics.median(times)


def kernel_ms_by_name(fn: Callable[[], object], reps: int = 5) -> dict[str, float]:
    """GPU time per call of each kernel (and copy) fn() runs, by name, in ms (torch.profiler)."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    per: dict[str, float] = defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per[e.name] += e.device_time / 1e3 / reps
    return dict(per)


def kernel_ms(fn: Callable[[], object], reps: int = 5) -> float:
    """GPU time of fn()'s kernels and copies per call (torch.profiler device durations, summed).

    Unlike :func:`median_ms` this leaves out the host time that launching takes, so it is the
    figure to compare with a copy's bandwidth when the host, not the GPU, bounds a call."""
    return sum(kernel_ms_by_name(fn, reps).values())


def copy_gbps(nbytes: int, device: torch.device) -> float:
    """Device-to-device (or host memcpy) copy bandwidth, counting bytes read + written, in GB/s.

    The buffer is at least 256 MiB, so that a small working set does not measure a cache."""
    nbytes = max(nbytes, 256 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    src.random_(0, 255)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device)
    del src, dst
    return 2 * nbytes / ms / 1e6


def report(label: str, nbytes: int, ms: float, ceiling_gbps: float) -> str:
    gbps = nbytes / ms / 1e6
    return f"{label:<34} {ms:9.3f} ms {gbps:9.1f} GB/s {100 * gbps / ceiling_gbps:6.1f} % of copy"
