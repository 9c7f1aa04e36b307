"""The controller demo runs offline and shows the controller acting in the noisy phase only."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

from gradgeom.demo_controller import format_table, run_controller_demo  # noqa: E402


@pytest.fixture
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the model is tiny: more threads only spin
    yield
    torch.set_num_threads(before)


def test_controller_demo_reacts_to_label_noise_and_recovers(tmp_path, one_thread):
    steps = 90
    res = run_controller_demo(tmp_path, steps=steps, progress=False, plot=True, print_table=False)
    recs = res.records
    noisy = [r for r in recs if r["label_noise"] > 0]
    assert (noisy[0]["step"], noisy[-1]["step"]) == (31, 60)
    acted = [r for r in recs if r["action"] != "continue"]
    assert acted, format_table(recs)
    assert acted[0]["step"] > 31 and acted[0]["action"] == "scale_lr", format_table(recs)
    assert min(r["lr_scale"] for r in noisy) < 1.0
    assert all(r["lr_scale"] == 1.0 for r in recs if r["step"] <= 31)
    assert recs[-1]["lr_scale"] == 1.0, format_table(recs)  # recovered exactly after the noise
    audit = [json.loads(x) for x in res.audit_path.read_text().splitlines()]
    assert audit[0]["event"] == "enter:low_snr" and "snr_enter" in audit[0]["reason"]
    assert any(a.get("event") == "exit:low_snr" for a in audit)
    assert len(res.metrics_path.read_text().splitlines()) >= steps
    if res.plot_path is not None:
        assert res.plot_path.stat().st_size > 10_000
    table = format_table(recs, every=30)
    assert "*" in table and "snr_enter" in table


def test_cli_demo_quick_includes_the_controller_run(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from gradgeom.cli import main

    assert main(["demo", "--quick", "--out", str(tmp_path), "--threads", "1", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "PauseController" in printed and "scale_lr" in printed
    assert (tmp_path / "controller_audit.jsonl").read_text().strip()
    assert (tmp_path / "controller.png").stat().st_size > 10_000
