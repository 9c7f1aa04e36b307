"""sketch_moments on the GPU: achieved GB/s and % of a device-to-device copy measured in the same
run, beside group_moments and the stock-PyTorch ways (torch._foreach_norm for the moments; a
count-sketch with index_add_ for the sketch).

    pytest bench/bench_sketch_moments.py -s --benchmark-columns=median,iqr

Needs a CUDA device and the CUDA build of gradgeom; skipped otherwise.
"""

from __future__ import annotations

import pytest
import torch

from gradgeom import compiled_with_cuda, ops, reference
from timing import median_ms

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and compiled_with_cuda()),
                                reason="needs a CUDA device and gradgeom's CUDA kernels")


def cuda_ms(fn) -> float:
    return median_ms(fn, torch.device("cuda"))


def llama_grads(hidden=4096, inter=11008, layers=8, dtype=torch.bfloat16):
    """Gradient-shaped tensors of a Llama block stack: 9 tensors per layer (DESIGN §5: 1.62 G elements)."""
    shapes = []
    for _ in range(layers):
        shapes += [(hidden, hidden)] * 4 + [(inter, hidden)] * 2 + [(hidden, inter)] + [(hidden,)] * 2
    ts = [torch.randn(s, device="cuda", dtype=dtype) * 1e-3 for s in shapes]
    ids = [i // 9 for i in range(len(ts))]
    return ts, ids, layers


def _report(name: str, ms: float, bytes_read: int, copy_gbs: float) -> None:
    gbs = bytes_read / ms / 1e6
    print(f"  {name:<44} {ms:8.3f} ms  {gbs:7.0f} GB/s  {100 * gbs / copy_gbs:5.1f} % of copy")


@pytest.mark.parametrize("k", [1024, 4096, 8192])
def test_sketch_moments_llama_bf16(benchmark, k):
    ts, ids, groups = llama_grads()
    n = sum(t.numel() for t in ts)
    nbytes = n * 2
    flat = torch.empty(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(flat)
    copy_ms = cuda_ms(lambda: dst.copy_(flat))
    copy_gbs = 2 * nbytes / copy_ms / 1e6
    del flat, dst
    print(f"\n{torch.cuda.get_device_name()}: {len(ts)} bf16 tensors, {n / 1e9:.2f} G elements, {groups} groups, k={k}")
    print(f"  {'D2D copy (read + write)':<44} {copy_ms:8.3f} ms  {copy_gbs:7.0f} GB/s  100.0 % of copy")
    run_all = lambda: ops.sketch_moments(ts, ids, groups, sketch_dim=k)  # noqa: E731
    _report("sketch_moments, all groups, one launch", cuda_ms(run_all), nbytes, copy_gbs)
    per_group = [([t for t, g in zip(ts, ids) if g == j]) for j in range(groups)]
    run_groups = lambda: [ops.sketch_moments(p, sketch_dim=k) for p in per_group]  # noqa: E731
    _report("sketch_moments, one launch per group", cuda_ms(run_groups), nbytes, copy_gbs)
    _report("group_moments (no sketch), one launch", cuda_ms(lambda: ops.group_moments(ts, ids, groups)), nbytes, copy_gbs)
    _report("stock torch._foreach_norm (norms only)", cuda_ms(lambda: torch._foreach_norm(ts)), nbytes, copy_gbs)
    benchmark.pedantic(lambda: (run_all(), torch.cuda.synchronize()), rounds=10, warmup_rounds=2)


def test_stock_count_sketch_index_add(benchmark):
    """The stock way to count-sketch: precomputed int64 buckets and signs, one index_add_ (atomics)."""
    k = 4096
    n = 1 << 27
    x = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    bucket, sign = reference.sketch_buckets_and_signs(n, k)
    bucket, sign = bucket.cuda(), sign.to("cuda", torch.float32)
    dst = torch.empty_like(x)
    copy_ms = cuda_ms(lambda: dst.copy_(x))
    copy_gbs = 2 * n * 2 / copy_ms / 1e6
    print(f"\n{torch.cuda.get_device_name()}: one bf16 tensor of {n} elements, k={k}")
    print(f"  {'D2D copy (read + write)':<44} {copy_ms:8.3f} ms  {copy_gbs:7.0f} GB/s  100.0 % of copy")
    _report("sketch_moments", cuda_ms(lambda: ops.sketch_moments([x], sketch_dim=k)), 2 * n, copy_gbs)
    stock = lambda: torch.zeros(k, device="cuda").index_add_(0, bucket, x.float() * sign)  # noqa: E731
    _report("stock index_add_ (reads x, 8 B bucket, 4 B sign)", cuda_ms(stock), 2 * n, copy_gbs)
    _, y = ops.sketch_moments([x], sketch_dim=k)
    torch.testing.assert_close(y[0].float(), stock(), rtol=1e-3, atol=1e-2)
    benchmark.pedantic(lambda: (ops.sketch_moments([x], sketch_dim=k), torch.cuda.synchronize()), rounds=10)
