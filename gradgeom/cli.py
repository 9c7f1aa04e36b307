"""The ``gradgeom`` command line (``gradgeom demo``; also ``python -m gradgeom demo``)."""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    import torch

    from gradgeom.demo import DemoConfig, run_demo

    torch.set_num_threads(args.threads)
    overrides = {"mode": args.mode, "seed": args.seed}
    if args.steps is not None:
        overrides["steps"] = args.steps
    cfg = DemoConfig.quick(**overrides) if args.quick else DemoConfig(**overrides)
    run_demo(cfg, out_dir=args.out, progress=not args.no_progress)
    if not args.no_controller:
        from gradgeom.demo_controller import run_controller_demo

        print("\nPauseController: a second run with label noise in its middle third (* = controller acted)")
        result = run_controller_demo(args.out, steps=60 if args.quick else 180, seed=args.seed,
                                     progress=not args.no_progress)
        print(f"controller audit log: {result.audit_path}; plot: {result.plot_path}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``gradgeom`` console script; returns the exit status."""
    parser = argparse.ArgumentParser(prog="gradgeom", description="Geometry of training, measured while it happens.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="LoRA-train a tiny random Llama offline and report gradient SNR per layer")
    demo.add_argument("--steps", type=int, default=None, help="optimizer steps (default 200; 20 with --quick)")
    demo.add_argument("--out", default="gradgeom_demo_out", help="folder for metrics.jsonl and snr.png")
    demo.add_argument("--quick", action="store_true", help="a smaller model and fewer steps (a few seconds)")
    demo.add_argument("--mode", default="sketch", choices=["moments", "sketch", "exact", "microbatch"],
                      help="estimator mode (default sketch)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--threads", type=int, default=1,
                      help="torch CPU threads (default 1: the model is tiny, more threads mostly spin)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.add_argument("--no-controller", action="store_true",
                      help="skip the PauseController run (label-noise phase; writes controller_*.jsonl, controller.png)")
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be >= 1")
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
