"""Under torch.distributed every rank adopts rank 0's decision (gloo, 2 CPU processes)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from controller_fakes import FakeMachine, ScriptedEstimator

    from gradgeom import PauseController, PausePolicy

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    est = ScriptedEstimator()
    audit = os.path.join(out_dir, f"audit{rank}.jsonl")
    ctrl = PauseController(est, policy=PausePolicy(warmup_steps=0, patience=1, snr_enter=0.1, snr_exit=0.3),
                           system=FakeMachine(), sleep=None, audit_log=audit)
    # Rank 1 sees a noisy local gradient; rank 0 does not. Both must follow rank 0.
    snrs = {0: [1.0, 1.0, 0.01, 0.01], 1: [0.01, 0.01, 1.0, 1.0]}[rank]
    got = []
    for snr in snrs:
        est.set(snr)
        d = ctrl.update()
        got.append((d.action.value, d.lr_scale))
    torch.save(got, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_ranks_follow_rank_zero(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    assert r0 == r1 == [("continue", 1.0), ("continue", 1.0), ("scale_lr", 0.5), ("scale_lr", 0.25)]
    assert (tmp_path / "audit0.jsonl").exists() and not (tmp_path / "audit1.jsonl").exists()
