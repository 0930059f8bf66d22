"""A circuit breaker: stop calling a failing store, probe it again after a cooldown, recover by itself."""

from __future__ import annotations

import time
from typing import Callable, Literal

BreakerState = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    """Opens after `failure_threshold` consecutive failures; after `reset_after_s` lets one probe through."""

    def __init__(
        self,
        *,
        failure_threshold: int = 3,
        reset_after_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[BreakerState], None] = lambda state: None,
    ) -> None:
        self._threshold = failure_threshold
        self._reset_after_s = reset_after_s
        self._clock = clock
        self._on_change = on_change
        self._state: BreakerState = "closed"
        self._failures = 0
        self._opened_at = 0.0

    @property
    def state(self) -> BreakerState:
        return self._state

    def allow(self) -> bool:
        """May a call go to the store now? In half-open state only the single probe may."""
        if self._state == "closed":
            return True
        if self._state == "open" and self._clock() - self._opened_at >= self._reset_after_s:
            self._set("half_open")
            return True
        return False

    def success(self) -> None:
        self._failures = 0
        self._set("closed")

    def failure(self) -> None:
        self._failures += 1
        if self._state == "half_open" or self._failures >= self._threshold:
            self._opened_at = self._clock()
            self._set("open")

    def abandon(self) -> None:
        """A call ended without a verdict (cancelled): free the probe slot so the next call probes."""
        if self._state == "half_open":
            self._set("open")

    def _set(self, state: BreakerState) -> None:
        if state != self._state:
            self._state = state
            self._on_change(state)
