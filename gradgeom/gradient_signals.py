"""Controller signals from an estimator's ``quality()``: pooled per-step SNR, gradient norm, non-finite count."""

from __future__ import annotations

import math
from typing import Any, Mapping

__all__ = ["gradient_signals"]


def gradient_signals(quality: Mapping[str, Any]) -> dict[str, float]:
    """Pool an estimator's ``quality()`` dict into controller signals.

    SNR here is always per optimizer step: temporal modes report it directly; ``microbatch`` mode
    reports per-example SNR, so its ``extra["batch_snr"]`` (B times that, clipped at 0) is used.

    Returns ``snr_global`` (Σ snr_g·var_g / Σ var_g: the SNR of the concatenated gradient),
    ``snr_min`` (worst group), ``grad_norm`` (‖g‖ of the whole latest gradient), ``nonfinite``
    (non-finite elements over all groups), ``noise_scale`` (largest group B_simple, NaN if no
    group defines one) and ``snr/<group>`` for every group. All values are Python floats.
    """
    signal_sum = 0.0
    noise_sum = 0.0
    grad_sq = 0.0
    nonfinite = 0
    snr_min = math.inf
    noise_scale = math.nan
    out: dict[str, float] = {}
    for name, q in quality.items():
        snr = _step_snr(q)
        var = float(q.variance)
        out[f"snr/{name}"] = snr
        nonfinite += int(q.nonfinite)
        if math.isfinite(snr) and math.isfinite(var) and var > 0:
            signal_sum += snr * var
            noise_sum += var
        if not math.isnan(snr):
            snr_min = min(snr_min, snr)
        gn = float(q.grad_norm)
        if math.isfinite(gn):
            grad_sq += gn * gn
        if q.noise_scale is not None and math.isfinite(float(q.noise_scale)):
            noise_scale = float(q.noise_scale) if math.isnan(noise_scale) else max(noise_scale, float(q.noise_scale))
    out["snr_global"] = signal_sum / noise_sum if noise_sum > 0 else math.nan
    out["snr_min"] = snr_min if snr_min != math.inf else math.nan
    out["grad_norm"] = math.sqrt(grad_sq) if quality else math.nan
    out["nonfinite"] = float(nonfinite)
    out["noise_scale"] = noise_scale
    return out


def _step_snr(q: Any) -> float:
    if getattr(q, "definition", "") == "microbatch":
        batch_snr = (getattr(q, "extra", None) or {}).get("batch_snr")
        if batch_snr is not None:
            value = float(batch_snr)
            return max(value, 0.0) if value == value else value
    return float(q.snr)
