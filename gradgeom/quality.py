"""The per-group result type shared by the estimator, the controller and the integrations."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

__all__ = ["LayerGradientQuality", "SmoothnessThresholds"]


@dataclass(frozen=True)
class SmoothnessThresholds:
    """SNR cut points for the ``smoothness`` label: ``snr >= smooth`` is "smooth",
    ``snr < rugged`` is "rugged", anything between is "mixed"."""

    smooth: float = 1.0
    rugged: float = 0.1

    def __post_init__(self) -> None:
        if not (self.smooth > 0 and self.rugged > 0):
            raise ValueError(f"SmoothnessThresholds: thresholds must be > 0, got smooth={self.smooth}, rugged={self.rugged}")
        if self.rugged > self.smooth:
            raise ValueError(f"SmoothnessThresholds: rugged ({self.rugged}) must not exceed smooth ({self.smooth})")

    def label(self, snr: float) -> str:
        """"smooth", "mixed" or "rugged" for a given SNR (NaN → "rugged")."""
        if snr >= self.smooth:
            return "smooth"
        if snr >= self.rugged:
            return "mixed"
        return "rugged"


@dataclass
class LayerGradientQuality:
    """Gradient statistics of one parameter group.

    Attributes:
        variance: the noise term of the definition in use (``definition``): tr Σ̂ for temporal
            and micro-batch SNR, the unbiased per-sample variance Σ‖g_i − ḡ‖²/(N−1) for
            per-sample quality.
        snr: signal-to-noise ratio ‖μ‖² / variance under ``definition``.
        mean_norm: ‖μ̂‖ (or ‖ḡ‖ for per-sample quality).
        sample_count: steps (temporal), micro-batches (micro-batch) or samples (per-sample).
        noise_scale: B_simple = tr Σ / |G|² where the mode defines it, else None.
        grad_norm: ‖g‖ of the latest step's gradient.
        nonfinite: non-finite elements in the latest step's gradient.
        smoothness: "smooth", "mixed" or "rugged" by :class:`SmoothnessThresholds`.
        definition: which SNR definition produced these numbers (e.g. "temporal", "microbatch",
            "per_sample").
    """

    variance: float
    snr: float
    mean_norm: float
    sample_count: int
    noise_scale: Optional[float] = None
    grad_norm: float = float("nan")
    nonfinite: int = 0
    smoothness: str = "mixed"
    definition: str = ""
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        """The fields as a plain dict (for JSON logging)."""
        return asdict(self)
