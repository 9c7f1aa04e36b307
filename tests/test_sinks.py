"""TensorBoardSink (read back with TensorBoard's own event reader) and JSONLSink."""

from __future__ import annotations

import json
import math

import pytest

from gradgeom import Action
from gradgeom.controller import Decision
from gradgeom.sinks import JSONLSink, TensorBoardSink


def _decision():
    return Decision(step=7, action=Action.SCALE_LR, lr_scale=0.5, reason="SNR 0.01 below snr_enter 0.05",
                    signals={"snr": 0.01, "gpu_temperature": math.nan}, event="enter:low_snr", index=7)


def test_tensorboard_sink_writes_readable_events(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with TensorBoardSink(tmp_path / "tb") as sink:
        for step in range(5):
            sink.log({"gradgeom/snr/layers.0": 0.1 * step, "gradgeom/snr/nan": math.nan,
                      "gradgeom/controller/lr_scale": 1.0}, step)
        sink.log_decision(_decision())
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    assert "gradgeom/snr/layers.0" in tags["scalars"] and "gradgeom/snr/nan" not in tags["scalars"]
    events = acc.Scalars("gradgeom/snr/layers.0")
    assert [e.step for e in events] == [0, 1, 2, 3, 4]
    assert [e.value for e in events] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    text = [t for t in tags["tensors"] if "decision" in t]
    assert text, tags
    payload = acc.Tensors(text[0])[0]
    assert payload.step == 7
    assert b"scale_lr: SNR 0.01" in payload.tensor_proto.string_val[0]


def test_tensorboard_sink_rejects_non_numbers(tmp_path):
    pytest.importorskip("tensorboard")
    with TensorBoardSink(tmp_path / "tb") as sink, pytest.raises(TypeError, match="must be a number"):
        sink.log({"x": "high"}, 0)


def test_jsonl_sink(tmp_path):
    path = tmp_path / "m" / "metrics.jsonl"
    with JSONLSink(path) as sink:
        sink.log({"a": 1.5, "b": math.inf}, 3)
        sink.log_decision(_decision())
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert lines[0]["step"] == 3 and lines[0]["a"] == 1.5 and lines[0]["b"] is None
    assert lines[1]["decision"]["action"] == "scale_lr" and lines[1]["decision"]["signals"]["gpu_temperature"] is None
    with pytest.raises(ValueError, match="closed"):
        sink.log({"a": 1.0}, 4)
    with JSONLSink(path) as sink:  # appends
        sink.log({"a": 2.0}, 5)
    assert len(path.read_text().splitlines()) == 3
