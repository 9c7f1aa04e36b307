"""GradientSmoothnessEstimator: per-group gradient SNR and noise scale from backward hooks.

Definitions (docs/estimator.md, DESIGN.md §2) — for a group with gradient g ∈ ℝⁿ at step t:

* temporal SNR (modes ``"sketch"`` and ``"exact"``): normalised EMA weights
  w_s = (1−β)β^{t−s}/(1−β^t), μ̂ = Σ w_s g_s, m̂ = Σ w_s ‖g_s‖², c = Σ w_s²;
  tr Σ̂ = (m̂ − ‖μ̂‖²)/(1 − c), ‖μ‖²̂ = ‖μ̂‖² − c·tr Σ̂, SNR = ‖μ‖²̂ / tr Σ̂. ``"exact"`` keeps μ̂
  per element (fp32); ``"sketch"`` keeps y = S·μ̂ ∈ ℝᵏ and takes both ‖μ̂‖² and m̂ in sketch space.
* micro-batch noise scale (mode ``"microbatch"``, McCandlish et al. 2018): from the M
  micro-batch gradients g_i of b examples each, B = M·b, ḡ = mean g_i:
  |G|² = (B‖ḡ‖² − b·mean‖g_i‖²)/(B − b), tr Σ = (mean‖g_i‖² − ‖ḡ‖²)/(1/b − 1/B); both smoothed by
  EMAs, then B_simple = tr Σ / |G|², per-example SNR = |G|²/tr Σ.
* ``"moments"``: per-step moments only (gradient norm, non-finite count, element statistics).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch

from gradgeom import ops
from gradgeom.grouping import GroupSpec, layer_index, resolve_groups
from gradgeom.quality import LayerGradientQuality, SmoothnessThresholds

__all__ = ["GradientSmoothnessEstimator", "MODES"]

MODES = ("moments", "sketch", "exact", "microbatch")
_STATE_VERSION = 1


def _profiled(name: str):
    """record_function(name) while a profiler records; free otherwise."""
    if torch.autograd._profiler_enabled():
        return torch.profiler.record_function(name)
    return contextlib.nullcontext()


class GradientSmoothnessEstimator:
    """Per-group gradient statistics, computed from backward hooks without host synchronisation.

    Args:
        model: the module whose trainable parameters are watched (frozen ones never are).
        groups: ``"layer"`` (index parsed from ``.layers.N``/``.h.N``/``.blocks.N``/``.block.N``/
            ``.layer.N``; other parameters grouped by top module, e.g. ``embed_tokens``,
            ``lm_head``), ``"module"`` (owning module path), ``"tensor"``, ``"param_group"``
            (needs ``optimizer``), a dict ``{group name: regex}`` or a callable
            ``param name → group name or None``.
        mode: ``"sketch"`` (default; temporal SNR from a count-sketch, ``sketch_dim`` floats of
            state per group), ``"exact"`` (temporal SNR from per-element fp32 EMA state),
            ``"microbatch"`` (McCandlish noise scale across gradient-accumulation micro-batches),
            ``"moments"`` (per-step moments only).
        beta: EMA factor in (0, 1); the window is about 1/(1−β) steps.
        sketch_dim: k of the count-sketch, a power of two in [8, 8192].
        include, exclude: regexes searched in parameter names (e.g. ``include=r"lora_"``).
        every: compute on every N-th optimizer step only (hooks are no-ops in between).
        examples_per_microbatch: b, for absolute micro-batch quantities (B_simple in examples);
            default: micro-batches are the unit (b = 1).
        optimizer: when given, :meth:`step` runs automatically after each ``optimizer.step()``.
        grad_scaler: a ``torch.amp.GradScaler``; its (device) scale is divided out of the statistics.
        thresholds: SNR cut points of the ``smoothness`` label.
        seed: selects the sketch's hash functions.
        attach: attach the hooks now (default); otherwise call :meth:`attach` or use ``with``.

    Call :meth:`step` once per optimizer step, after the step's last backward and before
    ``zero_grad()`` (before or after ``optimizer.step()``: it reads the statistics the hooks
    produced and, in ``"exact"`` mode, ``.grad``, which ``optimizer.step()`` leaves in place). With
    ``optimizer=`` it is called from the optimizer's step post-hook. With gradient accumulation
    the hooks run on every backward and the last backward before :meth:`step` (the complete
    accumulated gradient) is the one that counts.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        groups: GroupSpec = "layer",
        mode: str = "sketch",
        beta: float = 0.99,
        sketch_dim: int = 4096,
        include: Optional[str] = None,
        exclude: Optional[str] = None,
        every: int = 1,
        examples_per_microbatch: Optional[int] = None,
        optimizer: Optional[torch.optim.Optimizer] = None,
        grad_scaler: Optional[Any] = None,
        thresholds: SmoothnessThresholds = SmoothnessThresholds(),
        seed: int = 0,
        attach: bool = True,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"GradientSmoothnessEstimator: model must be a torch.nn.Module, got {type(model).__name__}")
        if mode not in MODES:
            raise ValueError(f"GradientSmoothnessEstimator: mode must be one of {MODES}, got {mode!r}")
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 < float(beta) < 1.0:
            raise ValueError(f"GradientSmoothnessEstimator: beta must be a float in (0, 1), got {beta!r}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"GradientSmoothnessEstimator: every must be an int >= 1, got {every!r}")
        if examples_per_microbatch is not None and (
            isinstance(examples_per_microbatch, bool) or not isinstance(examples_per_microbatch, int)
            or examples_per_microbatch < 1
        ):
            raise ValueError(
                f"GradientSmoothnessEstimator: examples_per_microbatch must be None or an int >= 1, got {examples_per_microbatch!r}"
            )
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"GradientSmoothnessEstimator: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if grad_scaler is not None and not hasattr(grad_scaler, "get_scale"):
            raise TypeError(f"GradientSmoothnessEstimator: grad_scaler must be a torch.amp.GradScaler, got {type(grad_scaler).__name__}")
        if not isinstance(thresholds, SmoothnessThresholds):
            raise TypeError(f"GradientSmoothnessEstimator: thresholds must be a SmoothnessThresholds, got {type(thresholds).__name__}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"GradientSmoothnessEstimator: seed must be an int, got {type(seed).__name__}")
        self.mode = mode
        self.beta = float(beta)
        self.sketch_dim = ops.check_sketch_dim("GradientSmoothnessEstimator", sketch_dim)
        self.every = every
        self.examples_per_microbatch = examples_per_microbatch
        self.thresholds = thresholds
        self.seed = seed
        self._model = model
        self._optimizer = optimizer
        self._grad_scaler = grad_scaler
        self._scale: Optional[torch.Tensor] = None

        grouped = resolve_groups(model, groups, include=include, exclude=exclude, optimizer=optimizer)
        if not grouped:
            raise ValueError(
                "GradientSmoothnessEstimator: no trainable parameter matched (check requires_grad, include, exclude, groups)"
            )
        self.group_names: list[str] = list(grouped)
        self._names = [[n for n, _ in grouped[g]] for g in self.group_names]
        self._params = [[p for _, p in grouped[g]] for g in self.group_names]
        self._offsets = []
        for ps in self._params:
            offs, total = [], 0
            for p in ps:
                offs.append(total)
                total += p.numel()
            self._offsets.append(offs)
        self.group_sizes = [sum(p.numel() for p in ps) for ps in self._params]
        self._device = self._params[0][0].device

        self._handles: list[Any] = []
        self._saved_hook_dicts: list[tuple[torch.Tensor, str, Any]] = []
        self._attached = False
        self._step_count = 0
        self._active = True
        self._callback_queued = False
        num_groups = len(self.group_names)
        self._fired: list[set] = [set() for _ in range(num_groups)]
        self._incoming: list[dict] = [dict() for _ in range(num_groups)]
        self._reset_pending()
        self._init_state()
        if attach:
            self.attach()

    # ------------------------------------------------------------------ state
    def _init_state(self) -> None:
        dev, f64 = self._device, torch.float64
        g = len(self.group_names)
        self._state: dict[str, torch.Tensor] = {
            "t": torch.zeros(g, dtype=f64, device=dev),
            "beta_pow": torch.ones(g, dtype=f64, device=dev),
            "last_moments": torch.zeros(g, 6, dtype=f64, device=dev),
            "nonfinite_steps": torch.zeros((), dtype=f64, device=dev),
        }
        if self.mode in ("sketch", "exact"):
            self._state["sq_ema"] = torch.zeros(g, dtype=f64, device=dev)
        if self.mode == "sketch":
            self._state["sketch_ema"] = torch.zeros(g, self.sketch_dim, dtype=f64, device=dev)
        if self.mode == "exact":
            for gi, ps in enumerate(self._params):
                for pi, p in enumerate(ps):
                    self._state[f"mu.{gi}.{pi}"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        if self.mode == "microbatch":
            self._state["signal_ema"] = torch.zeros(g, dtype=f64, device=dev)
            self._state["trace_ema"] = torch.zeros(g, dtype=f64, device=dev)
            self._state["last_microbatches"] = torch.zeros(g, dtype=f64, device=dev)

    def _reset_pending(self) -> None:
        g = len(self.group_names)
        self._pending_moments: list[Optional[torch.Tensor]] = [None] * g
        self._pending_sketch: list[Optional[torch.Tensor]] = [None] * g
        self._pending_scale: Optional[torch.Tensor] = None
        self._micro: list[list[torch.Tensor]] = [[] for _ in range(g)]

    # ------------------------------------------------------------------ hooks
    def attach(self) -> "GradientSmoothnessEstimator":
        """Register the hooks (a no-op when already attached). Returns self."""
        if self._attached:
            return self
        for gi, ps in enumerate(self._params):
            for pi, p in enumerate(ps):
                self._saved_hook_dicts.append((p, "_post_accumulate_grad_hooks", p._post_accumulate_grad_hooks))
                self._handles.append(p.register_post_accumulate_grad_hook(self._make_accumulated_hook(gi, pi)))
                if self.mode == "microbatch":
                    self._saved_hook_dicts.append((p, "_backward_hooks", p._backward_hooks))
                    self._handles.append(p.register_hook(self._make_microbatch_hook(gi, pi)))
        if self._optimizer is not None:
            self._handles.append(self._optimizer.register_step_post_hook(lambda opt, args, kwargs: self.step()))
        self._attached = True
        return self

    def remove(self) -> None:
        """Remove every hook and leave the model as it was before :meth:`attach`."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for p, attr, before in reversed(self._saved_hook_dicts):
            if before is None and not getattr(p, attr):
                setattr(p, attr, None)
        self._saved_hook_dicts.clear()
        for s in self._fired:
            s.clear()
        for d in self._incoming:
            d.clear()
        self._callback_queued = False
        self._attached = False

    @property
    def attached(self) -> bool:
        """True while the hooks are registered."""
        return self._attached

    def __enter__(self) -> "GradientSmoothnessEstimator":
        return self.attach()

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def _queue_end_of_backward(self) -> None:
        if not self._callback_queued:
            self._callback_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)

    def _end_of_backward(self) -> None:
        self._callback_queued = False
        with _profiled("gradgeom::flush"):
            for gi in range(len(self._params)):
                if self._fired[gi]:
                    self._fired[gi].clear()
                    self._launch(gi)
                if self._incoming[gi]:
                    self._launch_microbatch(gi)

    def _make_accumulated_hook(self, gi: int, pi: int) -> Callable[[torch.Tensor], None]:
        fired = self._fired[gi]
        n = len(self._params[gi])

        def hook(param: torch.Tensor) -> None:
            if not self._active:
                return
            with _profiled("gradgeom::grad_ready"):
                self._queue_end_of_backward()
                fired.add(pi)
                if len(fired) == n:
                    fired.clear()
                    self._launch(gi)

        return hook

    def _make_microbatch_hook(self, gi: int, pi: int) -> Callable[[torch.Tensor], None]:
        incoming = self._incoming[gi]
        n = len(self._params[gi])

        def hook(grad: torch.Tensor) -> None:
            if not self._active:
                return None
            with _profiled("gradgeom::microbatch_grad"):
                self._queue_end_of_backward()
                incoming[pi] = grad
                if len(incoming) == n:
                    self._launch_microbatch(gi)
            return None

        return hook

    def _current_scale(self) -> Optional[torch.Tensor]:
        scaler = self._grad_scaler
        if scaler is not None and scaler.is_enabled() and getattr(scaler, "_scale", None) is not None:
            return scaler._scale
        return self._scale

    def _launch(self, gi: int) -> None:
        """Statistics of group gi's accumulated gradients (one fused kernel launch)."""
        with _profiled(f"gradgeom::{self.mode}"):
            grads, offs = [], []
            for p, o in zip(self._params[gi], self._offsets[gi]):
                if p.grad is not None:
                    grads.append(p.grad)
                    offs.append(o)
            if not grads:
                return
            # Straight to the dispatcher (the C++ side checks the arguments): hooks are the hot path.
            ids = [0] * len(grads)
            if self.mode == "sketch":
                mom, sk = torch.ops.gradgeom.sketch_moments(grads, ids, offs, 1, self.sketch_dim, self.seed)
                self._pending_sketch[gi] = sk[0]
            else:
                mom = torch.ops.gradgeom.group_moments(grads, ids, 1)
            self._pending_moments[gi] = mom[0]
            self._pending_scale = self._current_scale()

    def _launch_microbatch(self, gi: int) -> None:
        """Moments of the gradient one micro-batch contributed to group gi."""
        with _profiled("gradgeom::microbatch"):
            incoming = self._incoming[gi]
            grads = list(incoming.values())
            incoming.clear()
            mom = torch.ops.gradgeom.group_moments(grads, [0] * len(grads), 1)
            self._micro[gi].append(mom[0])
            self._pending_scale = self._current_scale()

    # ------------------------------------------------------------------ scale
    def set_grad_scale(self, scale: Union[float, torch.Tensor, None]) -> None:
        """Loss scale the hooks' gradients carry (a device tensor stays on the device; None = 1).

        Statistics are divided by it; a :class:`torch.amp.GradScaler` passed as ``grad_scaler=``
        takes precedence.
        """
        if scale is None:
            self._scale = None
        elif isinstance(scale, torch.Tensor):
            if scale.numel() != 1:
                raise ValueError(f"set_grad_scale: scale must have one element, got shape {tuple(scale.shape)}")
            self._scale = scale
        elif isinstance(scale, (int, float)) and not isinstance(scale, bool):
            if not (math.isfinite(scale) and scale > 0):
                raise ValueError(f"set_grad_scale: scale must be finite and > 0, got {scale}")
            self._scale = self._to_device(torch.tensor(float(scale), dtype=torch.float64))
        else:
            raise TypeError(f"set_grad_scale: scale must be a float or a tensor, got {type(scale).__name__}")

    def _inv_scale(self, scale: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if scale is None:
            return None
        return 1.0 / scale.to(device=self._device, dtype=torch.float64).reshape(())

    def _grads_unscaled_now(self) -> bool:
        """True when a GradScaler has already unscaled .grad for this step (read at step())."""
        scaler, opt = self._grad_scaler, self._optimizer
        if scaler is None or opt is None:
            return False
        state = getattr(scaler, "_per_optimizer_states", {}).get(id(opt))
        return state is not None and getattr(state.get("stage"), "name", "READY") != "READY"

    # ------------------------------------------------------------------ step
    def step(self) -> None:
        """End of an optimizer step: fold this step's statistics into the estimator state.

        Never synchronises with the GPU; a step with non-finite gradients is counted in
        ``nonfinite_steps`` and leaves every EMA unchanged.
        """
        with _profiled("gradgeom::step"):
            if self._active:
                self._commit()
            self._reset_pending()
            for s in self._fired:
                s.clear()
            for d in self._incoming:
                d.clear()
            self._callback_queued = False  # in case a backward raised before its end-of-backward callback
            self._step_count += 1
            self._active = self._step_count % self.every == 0

    def _to_device(self, host: torch.Tensor) -> torch.Tensor:
        """Host tensor → device without waiting (pinned, non-blocking on CUDA)."""
        if self._device.type == "cuda":
            return host.pin_memory().to(self._device, non_blocking=True)
        return host.to(self._device)

    def _present_mask(self, present: Sequence[bool]) -> Optional[torch.Tensor]:
        if all(present):
            return None
        return self._to_device(torch.tensor(present, dtype=torch.bool))

    def _commit(self) -> None:
        st = self._state
        present = [m is not None for m in self._pending_moments]
        if self.mode == "microbatch":
            present = [p and len(mb) >= 2 for p, mb in zip(present, self._micro)]
        if not any(present):
            return
        dev, beta = self._device, self.beta
        zero6 = torch.zeros(6, dtype=torch.float64, device=dev)
        mom = torch.stack([m if m is not None else zero6 for m in self._pending_moments])
        inv = self._inv_scale(self._pending_scale)
        if inv is not None:
            col = torch.stack([torch.ones_like(inv), inv, inv * inv, inv * inv, inv, torch.ones_like(inv)])
            mom = mom * col
        nonfinite = mom[:, 5].sum()
        for mb in self._micro:
            for m in mb:
                nonfinite = nonfinite + m[5]
        ok = nonfinite == 0
        if inv is not None:
            ok = ok & torch.isfinite(inv) & (inv > 0)
        pm = self._present_mask(present)
        upd = ok if pm is None else (pm & ok)
        upd_f = upd.to(torch.float64).expand(len(present))
        st["last_moments"] = mom
        st["nonfinite_steps"] = st["nonfinite_steps"] + (~ok).to(torch.float64)

        if self.mode in ("sketch", "exact"):
            if self.mode == "sketch":
                zerok = torch.zeros(self.sketch_dim, dtype=torch.float64, device=dev)
                y = torch.stack([s if s is not None else zerok for s in self._pending_sketch])
                if inv is not None:
                    y = y * inv
                sq = (y * y).sum(dim=1)
                st["sketch_ema"] = torch.where(upd_f[:, None] > 0, st["sketch_ema"] * beta + y * (1.0 - beta), st["sketch_ema"])
            else:
                sq = mom[:, 2]
                self._update_exact(present, upd_f)
            st["sq_ema"] = torch.where(upd_f > 0, st["sq_ema"] * beta + sq * (1.0 - beta), st["sq_ema"])
        elif self.mode == "microbatch":
            self._update_microbatch(present, mom, upd_f, inv)
        st["beta_pow"] = torch.where(upd_f > 0, st["beta_pow"] * beta, st["beta_pow"])
        st["t"] = st["t"] + upd_f

    def _update_exact(self, present: Sequence[bool], upd_f: torch.Tensor) -> None:
        beta = self.beta
        inv = None if self._grads_unscaled_now() else self._inv_scale(self._pending_scale)
        factor = torch.where(upd_f > 0, beta, 1.0).to(torch.float32)
        weight = upd_f * (1.0 - beta)
        if inv is not None:
            weight = weight * torch.nan_to_num(inv, nan=0.0, posinf=0.0)
        weight = weight.to(torch.float32)
        for gi, ps in enumerate(self._params):
            if not present[gi]:
                continue
            for pi, p in enumerate(ps):
                if p.grad is None:
                    continue
                mu = self._state[f"mu.{gi}.{pi}"]
                clean = torch.nan_to_num(p.grad.detach().to(torch.float32), nan=0.0, posinf=0.0, neginf=0.0)
                mu.mul_(factor[gi]).add_(clean.mul_(weight[gi]))

    def _update_microbatch(self, present: Sequence[bool], mom: torch.Tensor, upd_f: torch.Tensor,
                           inv: Optional[torch.Tensor]) -> None:
        st, beta = self._state, self.beta
        b = float(self.examples_per_microbatch or 1)
        dev = self._device
        signal, trace, counts = [], [], []
        zero = torch.zeros((), dtype=torch.float64, device=dev)
        for gi, mb in enumerate(self._micro):
            if not present[gi]:
                signal.append(zero)
                trace.append(zero)
                counts.append(0.0)
                continue
            m = float(len(mb))
            per_micro = torch.stack([x[2] for x in mb]).sum()
            if inv is not None:
                per_micro = per_micro * inv * inv
            mean_sq = per_micro / m  # mean_i ‖g_i‖²
            gbar_sq = mom[gi, 2] / (m * m)  # ‖ḡ‖², ḡ = (Σ g_i) / M
            signal.append((m * gbar_sq - mean_sq) / (m - 1.0))  # (B‖ḡ‖² − b·mean)/(B − b)
            trace.append((mean_sq - gbar_sq) * (b * m / (m - 1.0)))  # (mean − ‖ḡ‖²)/(1/b − 1/B)
            counts.append(m)
        sig = torch.stack(signal)
        tr = torch.stack(trace)
        keep = upd_f > 0
        st["signal_ema"] = torch.where(keep, st["signal_ema"] * beta + sig * (1.0 - beta), st["signal_ema"])
        st["trace_ema"] = torch.where(keep, st["trace_ema"] * beta + tr * (1.0 - beta), st["trace_ema"])
        st["last_microbatches"] = torch.where(keep, self._to_device(torch.tensor(counts, dtype=torch.float64)),
                                              st["last_microbatches"])

    # ------------------------------------------------------------------ reading
    def _exact_mean_sq(self) -> torch.Tensor:
        tensors, ids = [], []
        for gi, ps in enumerate(self._params):
            for pi in range(len(ps)):
                tensors.append(self._state[f"mu.{gi}.{pi}"])
                ids.append(gi)
        return ops.group_moments(tensors, ids, len(self._params))[:, 2]

    def quality(self) -> dict[str, LayerGradientQuality]:
        """Per-group statistics; the one place that synchronises with the device.

        Returns ``{group name: LayerGradientQuality}``. Temporal modes report ``variance`` =
        tr Σ̂, ``snr`` = ‖μ‖²̂/tr Σ̂ (clipped at 0; the raw value is ``extra["snr_raw"]``),
        ``mean_norm`` = ‖μ̂‖, ``sample_count`` = steps in the EMA; NaN until two steps are in.
        ``"microbatch"`` reports ``variance`` = tr Σ (per example), ``snr`` = |G|²/tr Σ
        (per example; batch SNR = B·snr is ``extra["batch_snr"]``), ``noise_scale`` = B_simple.
        ``"moments"`` fills only ``grad_norm``, ``nonfinite`` and ``extra`` element statistics.
        """
        st = self._state
        cols = [st["t"], st["beta_pow"], st["last_moments"].T]
        if self.mode == "sketch":
            cols += [(st["sketch_ema"] ** 2).sum(dim=1), st["sq_ema"]]
        elif self.mode == "exact":
            cols += [self._exact_mean_sq(), st["sq_ema"]]
        elif self.mode == "microbatch":
            cols += [st["signal_ema"], st["trace_ema"], st["last_microbatches"]]
        table = torch.cat([c.reshape(-1, len(self.group_names)) for c in cols]).to("cpu", torch.float64)
        self._nonfinite_steps_host = float(st["nonfinite_steps"].to("cpu"))
        rows = table.T.tolist()
        return {name: self._quality_row(row) for name, row in zip(self.group_names, rows)}

    def _quality_row(self, row: list[float]) -> LayerGradientQuality:
        t, bp = row[0], row[1]
        count, s, sumsq, m2, maxabs, nonfinite = row[2:8]
        extra = {
            "elements": count,
            "element_mean": s / count if count else float("nan"),
            "element_std": math.sqrt(m2 / count) if count else float("nan"),
            "max_abs": maxabs,
        }
        grad_norm = math.sqrt(sumsq)
        nan = float("nan")
        if self.mode == "moments":
            return LayerGradientQuality(nan, nan, nan, int(t), None, grad_norm, int(nonfinite), "unknown", "moments", extra)
        beta = self.beta
        if self.mode == "microbatch":
            sig_ema, tr_ema, m = row[8:11]
            norm = 1.0 - bp
            signal = sig_ema / norm if t > 0 else nan
            trace = tr_ema / norm if t > 0 else nan
            snr = signal / trace if t > 0 and trace != 0 else nan
            b = float(self.examples_per_microbatch or 1)
            extra.update(signal=signal, snr_raw=snr, batch_size=m * b, batch_snr=snr * m * b)
            b_simple = tr_ema / sig_ema if t > 0 and sig_ema != 0 else nan
            snr_c = max(snr, 0.0) if snr == snr else nan
            return LayerGradientQuality(
                trace, snr_c, math.sqrt(max(signal, 0.0)) if signal == signal else nan, int(t), b_simple, grad_norm,
                int(nonfinite), self._label(snr_c), "microbatch", extra,
            )
        y_sq, sq_ema = row[8], row[9]
        if t < 2:
            mean_norm = math.sqrt(y_sq) / (1.0 - bp) if t > 0 else nan
            return LayerGradientQuality(nan, nan, mean_norm, int(t), None, grad_norm, int(nonfinite), "unknown",
                                        "temporal", extra)
        norm = 1.0 - bp
        mu_sq = y_sq / (norm * norm)  # ‖μ̂‖²
        m_hat = sq_ema / norm  # m̂
        c = (1.0 - beta) * (1.0 + bp) / ((1.0 + beta) * (1.0 - bp))  # Σ w_s²
        trace = (m_hat - mu_sq) / (1.0 - c)
        signal = mu_sq - c * trace
        snr = signal / trace if trace != 0 else nan
        extra.update(signal=signal, snr_raw=snr, window_c=c)
        snr_c = max(snr, 0.0) if snr == snr else nan
        return LayerGradientQuality(trace, snr_c, math.sqrt(mu_sq), int(t), None, grad_norm, int(nonfinite),
                                    self._label(snr_c), "temporal", extra)

    def _label(self, snr: float) -> str:
        return "unknown" if snr != snr else self.thresholds.label(snr)

    def metrics(self, prefix: str = "gradgeom") -> dict[str, float]:
        """Flat logging dict: ``"gradgeom/snr/layers.3"``, ``.../variance/...``, ``.../grad_norm/...``,
        ``.../mean_norm/...``, ``.../noise_scale/...`` (microbatch), ``gradgeom/nonfinite_steps``.
        Synchronises with the device (it calls :meth:`quality`)."""
        out: dict[str, float] = {}
        for name, q in self.quality().items():
            out[f"{prefix}/snr/{name}"] = q.snr
            out[f"{prefix}/variance/{name}"] = q.variance
            out[f"{prefix}/mean_norm/{name}"] = q.mean_norm
            out[f"{prefix}/grad_norm/{name}"] = q.grad_norm
            if q.noise_scale is not None:
                out[f"{prefix}/noise_scale/{name}"] = q.noise_scale
        out[f"{prefix}/nonfinite_steps"] = self._nonfinite_steps_host
        return out

    # ------------------------------------------------------------------ resume
    def _config(self) -> dict:
        return {
            "mode": self.mode,
            "beta": self.beta,
            "sketch_dim": self.sketch_dim,
            "seed": self.seed,
            "every": self.every,
            "groups": list(self.group_names),
            "group_sizes": list(self.group_sizes),
        }

    def state_dict(self) -> dict:
        """Everything needed to resume bit for bit: config, step counter and state tensors (cloned)."""
        return {
            "version": _STATE_VERSION,
            "config": self._config(),
            "step_count": self._step_count,
            "state": {k: v.detach().clone() for k, v in self._state.items()},
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output; the config (mode, beta, sketch_dim, seed, every, groups) must match."""
        if not isinstance(state_dict, Mapping) or "state" not in state_dict or "config" not in state_dict:
            raise ValueError("load_state_dict: expected a dict produced by GradientSmoothnessEstimator.state_dict()")
        if state_dict.get("version") != _STATE_VERSION:
            raise ValueError(f"load_state_dict: unsupported state version {state_dict.get('version')!r}")
        mine = self._config()
        theirs = dict(state_dict["config"])
        for key, value in mine.items():
            if theirs.get(key) != value:
                raise ValueError(f"load_state_dict: config mismatch for {key!r}: saved {theirs.get(key)!r}, this estimator {value!r}")
        saved = state_dict["state"]
        if set(saved) != set(self._state):
            raise ValueError(f"load_state_dict: state keys differ: missing {sorted(set(self._state) - set(saved))}, "
                             f"unexpected {sorted(set(saved) - set(self._state))}")
        for k, v in saved.items():
            cur = self._state[k]
            if tuple(v.shape) != tuple(cur.shape):
                raise ValueError(f"load_state_dict: {k!r} has shape {tuple(v.shape)}, expected {tuple(cur.shape)}")
            self._state[k] = v.detach().to(device=cur.device, dtype=cur.dtype).clone()
        self._step_count = int(state_dict["step_count"])
        self._active = self._step_count % self.every == 0
        self._reset_pending()

    # ------------------------------------------------------------------ per-sample
    @staticmethod
    def per_layer_quality(
        per_sample_gradients: Sequence[Mapping[str, torch.Tensor]],
        *,
        eps: float = 1e-8,
        thresholds: SmoothnessThresholds = SmoothnessThresholds(),
    ) -> dict[int, LayerGradientQuality]:
        """Per-layer quality from N per-sample gradient dicts ``{param name: tensor}``.

        Layers are keyed by the index parsed from the names (``.layers.N``, ``.h.N``,
        ``.blocks.N``, ``.block.N``, ``.layer.N``; names without one are ignored). Per layer, over
        the concatenation of its tensors: ḡ = mean_i g_i, variance = Σ_i‖g_i − ḡ‖²/(N − 1),
        snr = ‖ḡ‖²/(variance + eps), mean_norm = ‖ḡ‖, sample_count = N (definition
        ``"per_sample"``). Fewer than two samples → ``{}``. Computed in float64 with one batched
        :func:`gradgeom.ops.group_moments` call for the deviations and one for the means.
        """
        if isinstance(per_sample_gradients, Mapping) or not isinstance(per_sample_gradients, Sequence):
            raise TypeError("per_layer_quality: per_sample_gradients must be a sequence of dicts {param name: tensor}")
        samples = list(per_sample_gradients)
        for i, s in enumerate(samples):
            if not isinstance(s, Mapping):
                raise TypeError(f"per_layer_quality: per_sample_gradients[{i}] must be a dict, got {type(s).__name__}")
        n = len(samples)
        if n < 2:
            return {}
        names = [k for k in samples[0] if layer_index(k) is not None]
        for i, s in enumerate(samples[1:], 1):
            missing = [k for k in names if k not in s]
            if missing:
                raise ValueError(f"per_layer_quality: per_sample_gradients[{i}] lacks {missing[:3]}")
        if not names:
            return {}
        layers = sorted({layer_index(k) for k in names})
        slot = {l: i for i, l in enumerate(layers)}
        means, mean_ids, devs, dev_ids = [], [], [], []
        for k in names:
            stacked = torch.stack([s[k].detach().to(torch.float64) for s in samples])
            mean = stacked.mean(dim=0)
            g = slot[layer_index(k)]
            means.append(mean)
            mean_ids.append(g)
            devs.append(stacked - mean)
            dev_ids.append(g)
        mean_sq = ops.group_moments(means, mean_ids, len(layers))[:, 2].tolist()
        dev_sq = ops.group_moments(devs, dev_ids, len(layers))[:, 2].tolist()
        out = {}
        for l in layers:
            variance = dev_sq[slot[l]] / (n - 1)
            snr = mean_sq[slot[l]] / (variance + eps)
            out[l] = LayerGradientQuality(
                variance=variance, snr=snr, mean_norm=math.sqrt(mean_sq[slot[l]]), sample_count=n,
                smoothness=thresholds.label(snr), definition="per_sample",
            )
        return out
