"""Discovery of LoRA adapters in a model (HF PEFT layout, found by duck typing).

A PEFT LoRA layer holds, per adapter name: ``lora_A[name]`` / ``lora_B[name]`` (modules with a
``.weight``; Linear, or ConvNd with A's kernel flattened into k and B a 1×…×1 conv) or
``lora_embedding_A[name]`` / ``lora_embedding_B[name]`` (parameters), and ``scaling[name]``,
the factor its forward applies (α/r, α/√r with rsLoRA, with ``rank_pattern``/``alpha_pattern``
already resolved). ``r``, ``lora_alpha`` and ``use_rslora`` dicts record how it was derived.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn


@dataclass
class FoundAdapter:
    """One adapter: ΔW = scaling · B · A, B ``[d, r]``, A ``[r, k]`` (views of the parameters)."""

    name: str
    module: str
    adapter: str
    B: torch.Tensor
    A: torch.Tensor
    scaling: float
    base_weight: Optional[torch.Tensor]


def _weight(m: Any) -> Optional[torch.Tensor]:
    if isinstance(m, torch.Tensor):
        return m
    w = getattr(m, "weight", None)
    return w if isinstance(w, torch.Tensor) else None


def _base_weight(layer: nn.Module) -> Optional[torch.Tensor]:
    base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else getattr(layer, "base_layer", None)
    w = getattr(base, "weight", None)
    if isinstance(w, torch.Tensor) and w.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        return w
    return None


def _pairs_of(layer: nn.Module) -> list[tuple[str, Any, Any]]:
    found = []
    for a_attr, b_attr in (("lora_A", "lora_B"), ("lora_embedding_A", "lora_embedding_B")):
        da, db = getattr(layer, a_attr, None), getattr(layer, b_attr, None)
        if isinstance(da, (nn.ModuleDict, nn.ParameterDict)) and isinstance(db, (nn.ModuleDict, nn.ParameterDict)):
            for key in da.keys():
                if key in db:
                    found.append((key, db[key], da[key]))
    return found


def discover(model: nn.Module, adapter_name: Optional[str] = None) -> list[FoundAdapter]:
    """Every LoRA adapter in ``model`` (optionally only ``adapter_name``), in module order.

    Names are ``"{module}.{adapter}"``, e.g. ``base_model.model.model.layers.0.self_attn.q_proj.default``.
    Grouped convolutions (ΔW is not a single product B·A) are skipped with a warning.
    """
    out: list[FoundAdapter] = []
    for mod_name, layer in model.named_modules():
        scaling = getattr(layer, "scaling", None)
        if not isinstance(scaling, dict):
            continue
        for key, b_mod, a_mod in _pairs_of(layer):
            if adapter_name is not None and key != adapter_name:
                continue
            B, A = _weight(b_mod), _weight(a_mod)
            if B is None or A is None or key not in scaling:
                continue
            base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else None
            if getattr(base, "groups", 1) > 1:
                warnings.warn(f"gradgeom.lora: skipping {mod_name}.{key}: grouped convolution (groups > 1)")
                continue
            B2 = B.reshape(B.shape[0], -1)
            A2 = A.reshape(A.shape[0], -1)
            if B2.shape[1] != A2.shape[0]:
                warnings.warn(
                    f"gradgeom.lora: skipping {mod_name}.{key}: B {tuple(B.shape)} and A {tuple(A.shape)} "
                    "do not form a product B·A"
                )
                continue
            out.append(FoundAdapter(f"{mod_name}.{key}", mod_name, key, B2, A2, float(scaling[key]), _base_weight(layer)))
    return out


def _pattern_value(patterns: dict, module_name: str, default: Any) -> Any:
    """PEFT's rule: a key of rank_pattern / alpha_pattern is a regex that must match the whole
    module name or a suffix of it starting after a dot."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module_name):
            return value
    return default


def scaling_from_config(config: Any, module_name: str) -> float:
    """The scaling PEFT derives for ``module_name`` from a ``LoraConfig``: alpha and r from
    ``alpha_pattern`` / ``rank_pattern`` when a pattern matches, else ``lora_alpha`` / ``r``;
    α/√r when ``use_rslora``, else α/r."""
    from gradgeom.lora import scaling

    r = _pattern_value(getattr(config, "rank_pattern", None) or {}, module_name, config.r)
    alpha = _pattern_value(getattr(config, "alpha_pattern", None) or {}, module_name, config.lora_alpha)
    return scaling(alpha, r, rslora=bool(getattr(config, "use_rslora", False)))
