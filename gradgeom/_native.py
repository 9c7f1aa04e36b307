"""Loads the compiled extension ``gradgeom._C`` (which registers ``torch.ops.gradgeom.*``)."""

from __future__ import annotations

import torch

try:
    from gradgeom import _C  # noqa: F401  (import registers the operators)
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "gradgeom's native extension gradgeom._C is not built. Install with "
        "`pip install --no-build-isolation .` (or `-e .`) from the repository root, "
        f"with torch already installed. Original error: {exc}"
    ) from exc


def compiled_with_cuda() -> bool:
    """True when this build of gradgeom contains its CUDA kernels."""
    return bool(torch.ops.gradgeom._compiled_with_cuda())
