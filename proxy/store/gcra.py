"""GCRA arithmetic (the Lua script in `lua.py` mirrors these lines operation by operation)."""

from __future__ import annotations

import math

from proxy.store.base import EPSILON_MS, LimitState


def gcra_take(tat: float | None, now: int, interval: float, window: int, cost: int) -> tuple[float | None, int | None]:
    """Return (new arrival time, None) if `cost` fits now, else (None, ms to wait; None if it never fits)."""
    start = now if tat is None or tat < now else tat
    new_tat = start + cost * interval
    allow_at = new_tat - window
    if allow_at <= now + EPSILON_MS:
        return new_tat, None
    if cost * interval > window + EPSILON_MS:
        return None, None
    return None, math.ceil(allow_at - now - EPSILON_MS)


def gcra_state(tat: float | None, now: int, interval: float, window: int) -> LimitState:
    """Units still admissible now and ms until the limit is full again."""
    busy = 0.0 if tat is None or tat < now else tat - now
    remaining = math.floor((window - busy + EPSILON_MS) / interval)
    return LimitState(remaining=max(0, remaining), reset_ms=max(0, math.ceil(busy - EPSILON_MS)))


def gcra_adjust(tat: float | None, now: int, interval: float, delta_units: int) -> float | None:
    """Move the arrival time by `delta_units` (settle: actual minus estimate); None when the key is idle."""
    start = now if tat is None or tat < now else tat
    new_tat = start + delta_units * interval
    return new_tat if new_tat > now else None
