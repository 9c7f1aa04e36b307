"""`gradgeom demo --quick` end to end, and the controller hook of run_demo."""

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("matplotlib")

from gradgeom.cli import main  # noqa: E402
from gradgeom.demo import DemoConfig, run_demo  # noqa: E402


def test_demo_quick_writes_jsonl_png_and_table(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path), "--threads", "1", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "layers.0" in printed and "smoothness" in printed
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines and lines[-1]["step"] == DemoConfig.quick().steps
    assert {"loss", "gradgeom/snr/layers.0", "gradgeom/snr/layers.1", "gradgeom/nonfinite_steps"} <= set(lines[-1])
    assert any(isinstance(r["gradgeom/snr/layers.0"], float) for r in lines)
    png = (tmp_path / "snr.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_controller_can_scale_lr_and_stop(tmp_path):
    torch.set_num_threads(1)
    seen = []

    def factory(estimator, optimizer):
        def controller(step, quality):
            seen.append((step, sorted(quality)))
            return {"lr_scale": 0.5, "stop": step >= 4}

        controller.optimizer = optimizer
        return controller

    cfg = DemoConfig.quick(steps=12, log_every=2)
    summary = run_demo(cfg, out_dir=tmp_path, progress=False, controller_factory=factory, echo=lambda s: None)
    assert [s for s, _ in seen] == [2, 4]
    assert summary["history"][-1]["step"] == 4
    assert summary["history"][-1]["controller"] == {"lr_scale": 0.5, "stop": True}


def test_bad_cli_arguments():
    with pytest.raises(SystemExit):
        main(["demo", "--steps", "0"])
    with pytest.raises(SystemExit):
        main(["nope"])
