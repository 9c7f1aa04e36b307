"""Where metrics go from a plain training loop: TensorBoard event files or JSON lines.

Both sinks take the flat dicts that ``GradientSmoothnessEstimator.metrics()`` and
``PauseController.metrics()`` return, plus controller :class:`~gradgeom.controller.Decision`\\ s::

    with TensorBoardSink("runs/exp1") as tb:
        for step in ...:
            ...
            tb.log({**estimator.metrics(), **controller.metrics()}, step)
            tb.log_decision(decision)

TensorBoard is an optional dependency (``pip install tensorboard``); importing this module never
needs it.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Union

__all__ = ["TensorBoardSink", "JSONLSink"]


class _Sink:
    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Record a flat ``{name: float}`` dict (e.g. ``estimator.metrics()``) at ``step``."""
        raise NotImplementedError

    def log_decision(self, decision: Any) -> None:
        """Record a controller :class:`~gradgeom.controller.Decision` (action, reason, signals)."""
        raise NotImplementedError

    def flush(self) -> None:
        """Write buffered records out."""

    def close(self) -> None:
        """Flush and release the file."""

    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class TensorBoardSink(_Sink):
    """Writes scalars (and controller decisions as text) to TensorBoard event files in ``log_dir``
    through ``torch.utils.tensorboard.SummaryWriter``.

    Non-finite values are skipped (TensorBoard would plot them as gaps anyway, and NaN means
    "not yet defined" here, e.g. SNR before two steps are in the window).
    """

    def __init__(self, log_dir: Union[str, Path], **writer_kwargs: Any) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # torch raises ImportError when tensorboard is missing
            raise ImportError(
                "TensorBoardSink needs the tensorboard package: pip install tensorboard"
            ) from exc
        self.log_dir = str(log_dir)
        self._writer = SummaryWriter(log_dir=self.log_dir, **writer_kwargs)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Add every finite scalar of ``metrics`` at global step ``step``."""
        for key, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"TensorBoardSink.log: metrics[{key!r}] must be a number, got {type(value).__name__}")
            if math.isfinite(value):
                self._writer.add_scalar(key, float(value), global_step=int(step))

    def log_decision(self, decision: Any) -> None:
        """Record a controller decision: the action as text under ``gradgeom/controller/decision``."""
        self._writer.add_text(
            "gradgeom/controller/decision",
            f"{decision.action.value}: {decision.reason}",
            global_step=int(decision.step),
        )

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class JSONLSink(_Sink):
    """Appends one JSON object per :meth:`log` call: ``{"step", "time", <metrics>}``; decisions are
    lines with ``"decision": {...}``. Non-finite numbers are written as ``null``."""

    def __init__(self, path: Union[str, Path]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: Optional[Any] = open(self.path, "a", encoding="utf-8")

    def _write(self, record: Mapping[str, Any]) -> None:
        if self._file is None:
            raise ValueError(f"JSONLSink({self.path}): the sink is closed")
        self._file.write(json.dumps(record, allow_nan=False) + "\n")

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Append ``{"step": step, "time": unix seconds, **metrics}``."""
        record: dict[str, Any] = {"step": int(step), "time": time.time()}
        for key, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"JSONLSink.log: metrics[{key!r}] must be a number, got {type(value).__name__}")
            record[key] = float(value) if math.isfinite(value) else None
        self._write(record)

    def log_decision(self, decision: Any) -> None:
        """Append ``{"step", "time", "decision": decision.to_dict()}``."""
        self._write({"step": int(decision.step), "time": time.time(), "decision": decision.to_dict()})

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
