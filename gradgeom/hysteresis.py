"""A two-threshold trigger with patience and minimum dwell, the building block of the controller's rules."""

from __future__ import annotations

import math
from typing import Any, Optional

__all__ = ["Hysteresis"]


class Hysteresis:
    """Tracks whether a scalar signal is in its "bad" state.

    ``direction="below"``: the state is entered when the value is ``< enter`` for ``patience``
    consecutive readings, and left when it is ``>= exit`` after at least ``min_dwell`` readings in
    the state (``exit > enter``). ``direction="above"``: entered when ``> enter`` for
    ``patience`` readings, left when ``<= exit`` (``exit <= enter``). Readings that are ``None``
    or NaN change nothing. ``t`` is the caller's clock (the controller's update count).
    """

    def __init__(self, enter: float, exit: float, *, direction: str, patience: int = 1, min_dwell: int = 0) -> None:
        if direction not in ("below", "above"):
            raise ValueError(f"Hysteresis: direction must be 'below' or 'above', got {direction!r}")
        self.enter = float(enter)
        self.exit = float(exit)
        self.direction = direction
        self.patience = int(patience)
        self.min_dwell = int(min_dwell)
        self.active = False
        self.streak = 0
        self.entered_at: Optional[int] = None

    def _past_enter(self, value: float) -> bool:
        return value < self.enter if self.direction == "below" else value > self.enter

    def _past_exit(self, value: float) -> bool:
        return value >= self.exit if self.direction == "below" else value <= self.exit

    def update(self, value: Optional[float], t: int) -> Optional[str]:
        """Feed one reading at time ``t``; returns "enter", "exit" or None (no transition)."""
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return None
        if not self.active:
            self.streak = self.streak + 1 if self._past_enter(value) else 0
            if self.streak >= self.patience:
                self.active = True
                self.entered_at = t
                self.streak = 0
                return "enter"
            return None
        if self._past_exit(value) and t - (self.entered_at or 0) >= self.min_dwell:
            self.active = False
            self.entered_at = None
            self.streak = 0
            return "exit"
        return None

    def state_dict(self) -> dict[str, Any]:
        """JSON-safe state: ``active``, ``streak``, ``entered_at``."""
        return {"active": self.active, "streak": self.streak, "entered_at": self.entered_at}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.active = bool(state["active"])
        self.streak = int(state["streak"])
        self.entered_at = None if state["entered_at"] is None else int(state["entered_at"])
