"""The controller's audit log: one JSON line per record, to a path (appended) or a text stream."""

from __future__ import annotations

import io
import json
import math
import time
from pathlib import Path
from typing import IO, Any, Optional, Union

__all__ = ["AuditLog", "json_number"]


def json_number(value: Any) -> Any:
    """A JSON-safe number: non-finite floats become None; other values pass through."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value) if math.isfinite(value) else None
    return value


class AuditLog:
    """Appends JSON lines to a path (opened lazily, line-buffered) or a text stream."""

    def __init__(self, target: Union[str, Path, IO[str], None]) -> None:
        self._path: Optional[Path] = None
        self._stream: Optional[IO[str]] = None
        self._owned = False
        if target is None:
            return
        if isinstance(target, (str, Path)):
            self._path = Path(target)
        elif isinstance(target, io.TextIOBase) or callable(getattr(target, "write", None)):
            self._stream = target
        else:
            raise TypeError(f"PauseController: audit_log must be a path or a text stream, got {type(target).__name__}")

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` (with a ``time`` field) as one JSON line; no-op without a target."""
        if self._path is None and self._stream is None:
            return
        if self._stream is None:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            self._stream = open(self._path, "a", encoding="utf-8", buffering=1)
            self._owned = True
        line = {"time": time.time(), **record}
        self._stream.write(json.dumps(line, allow_nan=False, sort_keys=False) + "\n")
        self._stream.flush()

    def close(self) -> None:
        """Close the file if this log opened it (a stream passed in stays open)."""
        if self._owned and self._stream is not None:
            self._stream.close()
            self._stream = None
            self._owned = False
