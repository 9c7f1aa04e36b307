"""Estimator + controller state as one blob, for checkpoint formats that want JSON."""

from __future__ import annotations

import base64
import io
from typing import Any, Optional

import torch

__all__ = ["collect_state", "restore_state", "encode_state", "decode_state"]


def collect_state(estimator: Any, controller: Optional[Any]) -> dict[str, Any]:
    """``{"estimator": ..., "controller": ... or None}`` from the objects' ``state_dict()``."""
    return {
        "estimator": estimator.state_dict(),
        "controller": None if controller is None else controller.state_dict(),
    }


def restore_state(state: dict[str, Any], estimator: Any, controller: Optional[Any]) -> None:
    """Load what :func:`collect_state` produced; a missing controller part leaves the controller fresh."""
    estimator.load_state_dict(state["estimator"])
    if controller is not None and state.get("controller") is not None:
        controller.load_state_dict(state["controller"])


def encode_state(state: dict[str, Any]) -> str:
    """``torch.save`` → base64 text (tensors included; ``weights_only``-loadable)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_state(text: str) -> dict[str, Any]:
    """Inverse of :func:`encode_state`; tensors are loaded on the CPU (consumers move them)."""
    return torch.load(io.BytesIO(base64.b64decode(text.encode("ascii"))), map_location="cpu", weights_only=True)
