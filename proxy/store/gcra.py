"""GCRA in exact integer arithmetic (the Lua script in `lua.py` mirrors the arrival-time steps line by line).

A limit of `limit` units per `window` ms has the emission interval T = window / limit ms, rarely whole. A
theoretical arrival time (tat) is therefore kept as a pair `(ms, num)` meaning `ms + num / limit`, with
`0 <= num < limit`, and every step is integer addition and comparison: no rounding anywhere, so a burst
admits exactly `limit` and `RateLimit-Remaining` is exact. Products such as `cost * window` are computed
here in Python (arbitrary precision) and handed to the script as small integers.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.store.base import AdmitRequest, LimitState

Tat = tuple[int, int]  # (ms, num): ms + num / limit

# A settle may push a limit at most this far into debt (about 8 900 years): beyond it nothing changes for
# anyone alive, and the bound keeps every time an exact integer in Lua's doubles (below 2**53).
MAX_SHIFT_MS = 2**48


@dataclass(frozen=True)
class Step:
    """`units · T` as `whole ms + rem / limit` (0 <= rem < limit), for `units` in [-MAX, MAX]."""

    whole: int
    rem: int

    @classmethod
    def of(cls, units: int, window_ms: int, limit: int) -> Step:
        whole, rem = divmod(units * window_ms, limit)  # floor division: rem >= 0 also for a negative shift
        if abs(whole) > MAX_SHIFT_MS:
            return cls(MAX_SHIFT_MS if whole > 0 else -MAX_SHIFT_MS, 0)
        return cls(whole, rem)


def start_of(tat: Tat | None, now: int) -> Tat:
    """The later of the arrival time and now."""
    return tat if tat is not None and tat >= (now, 0) else (now, 0)


def shifted(tat: Tat, step: Step, limit: int) -> Tat:
    ms, num = tat[0] + step.whole, tat[1] + step.rem
    return (ms + 1, num - limit) if num >= limit else (ms, num)


def ceil_ms(tat: Tat) -> int:
    return tat[0] + (1 if tat[1] else 0)


def gcra_take(tat: Tat | None, now: int, limit: int, window: int, cost: int) -> tuple[Tat | None, int | None]:
    """Return (new arrival time, None) if `cost` fits now, else (None, ms to wait; None if it never fits)."""
    if cost > limit:
        return None, None
    new_tat = shifted(start_of(tat, now), Step.of(cost, window, limit), limit)
    wait = ceil_ms(new_tat) - window - now  # new_tat - window <= now, in whole ms since `now` is whole
    return (new_tat, None) if wait <= 0 else (None, wait)


def gcra_state(tat: Tat | None, now: int, limit: int, window: int) -> LimitState:
    """Units still admissible now (floor((window - busy) / T)) and ms until the limit is full again."""
    busy_ms, busy_num = (0, 0) if tat is None or tat < (now, 0) else (tat[0] - now, tat[1])
    free = window * limit - (busy_ms * limit + busy_num)  # (window - busy) in units of 1/limit ms
    return LimitState(remaining=max(0, free // window), reset_ms=ceil_ms((busy_ms, busy_num)))


def limit_states(req: AdmitRequest, tats: list[Tat | None]) -> tuple[LimitState, ...]:
    """The state of each of the request's limits, given their arrival times."""
    return tuple(gcra_state(tat, req.now_ms, spec.limit, spec.window_ms) for spec, tat in zip(req.limits, tats))


def gcra_adjust(tat: Tat | None, now: int, limit: int, window: int, delta_units: int) -> Tat | None:
    """Move the arrival time by `delta_units` (settle: actual minus estimate); None when the key is idle."""
    new_tat = shifted(start_of(tat, now), Step.of(delta_units, window, limit), limit)
    return new_tat if new_tat > (now, 0) else None
