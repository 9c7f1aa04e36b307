"""Which parameters the estimator watches, and which group each belongs to."""

from __future__ import annotations

import re
from typing import Callable, Mapping, Optional, Union

import torch

__all__ = ["LAYER_PATTERN", "layer_index", "layer_group_name", "top_module_name", "resolve_groups", "GroupSpec"]

#: A layer index in a parameter name: ``.layers.N``, ``.h.N``, ``.blocks.N``, ``.block.N``, ``.layer.N``
#: (also at the very start of the name).
LAYER_PATTERN = re.compile(r"(?:^|\.)(layers|h|blocks|block|layer)\.(\d+)(?=\.|$)")

# Wrapper prefixes that say nothing about where a parameter lives (PEFT, torch.compile, DDP,
# FSDP and activation-checkpoint wrappers, HF base models).
_WRAPPERS = {"base_model", "model", "module", "_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module",
             "transformer"}

GroupSpec = Union[str, Mapping[str, str], Callable[[str], Optional[str]]]


def layer_index(name: str) -> Optional[int]:
    """Layer index parsed from a parameter name (first match of :data:`LAYER_PATTERN`), or None."""
    m = LAYER_PATTERN.search(name)
    return int(m.group(2)) if m else None


def _strip_wrappers(name: str) -> list[str]:
    parts = [p for p in name.split(".") if p not in ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")]
    while len(parts) > 2 and parts[0] in _WRAPPERS:
        parts = parts[1:]
    return parts


def top_module_name(name: str) -> str:
    """The first meaningful component of a parameter name: ``model.embed_tokens.weight`` → ``embed_tokens``.

    Wrapper prefixes (``base_model``, ``model``, ``_orig_mod``, ...) are skipped as long as a
    module name follows; a bare parameter (``bias``) is its own group.
    """
    parts = _strip_wrappers(name)
    return parts[0]


def layer_group_name(name: str) -> Optional[str]:
    """``"layers.3"`` for ``...model.layers.3.mlp.up_proj.weight``; None when the name has no index."""
    m = LAYER_PATTERN.search(name)
    return f"{m.group(1)}.{m.group(2)}" if m else None


def _layer_names(names: list[str]) -> dict[str, str]:
    """Layer group names; qualified by the parent module when two stacks share a short name."""
    short: dict[str, str] = {}
    prefix_of: dict[str, set] = {}
    for n in names:
        m = LAYER_PATTERN.search(n)
        if m is None:
            short[n] = top_module_name(n)
            continue
        s = f"{m.group(1)}.{m.group(2)}"
        before = [p for p in _strip_wrappers(n[: m.start()]) if p] if m.start() > 0 else []
        short[n] = s
        prefix_of.setdefault(s, set()).add(before[-1] if before else "")
    out = {}
    for n in names:
        s = short[n]
        if len(prefix_of.get(s, ())) > 1:
            m = LAYER_PATTERN.search(n)
            before = [p for p in _strip_wrappers(n[: m.start()]) if p] if m.start() > 0 else []
            s = f"{before[-1]}.{s}" if before else s
        out[n] = s
    return out


def _module_name(name: str) -> str:
    parts = [p for p in name.split(".") if p not in ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")]
    return ".".join(parts[:-1]) if len(parts) > 1 else parts[0]


def resolve_groups(
    model: torch.nn.Module,
    groups: GroupSpec,
    *,
    include: Optional[str] = None,
    exclude: Optional[str] = None,
    optimizer: Optional[torch.optim.Optimizer] = None,
) -> dict[str, list[tuple[str, torch.nn.Parameter]]]:
    """Group the model's trainable parameters; returns ``{group name: [(param name, param)]}``.

    Parameters are taken once each (tied parameters under their first name), only when
    ``requires_grad``; ``include``/``exclude`` are regexes searched in the parameter name.
    ``groups`` is ``"layer"``, ``"module"``, ``"tensor"``, ``"param_group"`` (needs
    ``optimizer``), a dict ``{group name: regex}`` (first matching entry wins; unmatched
    parameters are not watched) or a callable ``name → group name or None`` (None: not watched).
    Groups keep the order in which their first parameter appears in the model.
    """
    inc = _compile("include", include)
    exc = _compile("exclude", exclude)
    named = [
        (n, p)
        for n, p in model.named_parameters()
        if p.requires_grad and (inc is None or inc.search(n)) and (exc is None or not exc.search(n))
    ]
    names = [n for n, _ in named]
    if isinstance(groups, str):
        if groups == "layer":
            mapping = _layer_names(names)
            assign: Callable[[str], Optional[str]] = mapping.__getitem__
        elif groups == "module":
            assign = _module_name
        elif groups == "tensor":
            assign = lambda n: ".".join(p for p in n.split(".") if p != "_orig_mod")  # noqa: E731
        elif groups == "param_group":
            if optimizer is None:
                raise ValueError('GradientSmoothnessEstimator: groups="param_group" needs optimizer=')
            by_id = {}
            for gi, pg in enumerate(optimizer.param_groups):
                label = str(pg.get("name", f"param_group.{gi}"))
                for p in pg["params"]:
                    by_id.setdefault(id(p), label)
            params = dict(named)
            assign = lambda n: by_id.get(id(params[n]))  # noqa: E731
        else:
            raise ValueError(
                f'GradientSmoothnessEstimator: groups must be "layer", "module", "tensor", "param_group", '
                f"a dict of group name -> regex, or a callable; got {groups!r}"
            )
    elif isinstance(groups, Mapping):
        patterns = [(str(g), _compile(f"groups[{g!r}]", rx)) for g, rx in groups.items()]

        def assign(n: str) -> Optional[str]:
            for g, rx in patterns:
                if rx.search(n):
                    return g
            return None

    elif callable(groups):
        assign = groups
    else:
        raise TypeError(
            f"GradientSmoothnessEstimator: groups must be a str, a dict or a callable, got {type(groups).__name__}"
        )
    out: dict[str, list[tuple[str, torch.nn.Parameter]]] = {}
    for n, p in named:
        g = assign(n)
        if g is None:
            continue
        if not isinstance(g, str):
            raise TypeError(f"GradientSmoothnessEstimator: the groups callable returned {type(g).__name__} for {n!r}; expected str or None")
        out.setdefault(g, []).append((n, p))
    return out


def _compile(what: str, rx: Optional[str]) -> Optional[re.Pattern]:
    if rx is None:
        return None
    if not isinstance(rx, str):
        raise TypeError(f"GradientSmoothnessEstimator: {what} must be a regex string, got {type(rx).__name__}")
    try:
        return re.compile(rx)
    except re.error as e:
        raise ValueError(f"GradientSmoothnessEstimator: {what} is not a valid regex ({rx!r}): {e}") from e
