"""A deadline for a stream's reads that costs no timer per chunk.

Each chunk moves a stream's deadline (the idle bound, the next keep-alive ping). Moving an `asyncio.timeout` per
read, and disarming it while the chunk is handled, made and cancelled one loop timer per chunk (~3 µs on uvloop,
docs/benchmarks.md). Here one timer serves the whole stream: when it fires before the deadline then in force it
re-arms itself for that deadline, so it fires about once per keep-alive period, not once per chunk. It cancels
the reading task only while that task waits in a read, so a deadline never lands in the code handling a chunk.
"""

from __future__ import annotations

import asyncio


class ReadDeadline:
    """Bounds each read of one task: `arm(when)` before the read, `disarm()` after it; a CancelledError out of
    the read is this deadline's when `expired()` says so (like `asyncio.timeout`, a real cancel stays one)."""

    # One per open stream.
    __slots__ = ("_loop", "_task", "_when", "_reading", "_timer", "_timer_at", "_cancelling", "_fired")

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task(self._loop)
        self._when = 0.0  # the deadline of the read in progress
        self._reading = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._cancelling = 0  # the task's cancel requests before ours, when ours is made
        self._fired = False

    def arm(self, when: float) -> None:
        self._when, self._reading = when, True
        if self._timer is None or self._timer_at > when:  # a timer due at or before `when` re-arms itself
            self._start_timer(when)

    def disarm(self) -> None:
        self._reading = False

    def expired(self) -> bool:
        """After a CancelledError out of the read: whether it was this deadline's (then consumed) and not also a
        real cancellation of the task, which must go on."""
        if not self._fired:
            return False
        self._fired = False
        assert self._task is not None
        return self._task.uncancel() <= self._cancelling

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _start_timer(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at = self._loop.call_at(when, self._on_timer), when

    def _on_timer(self) -> None:
        self._timer = None
        if not self._reading or self._task is None:
            return  # the chunk is being handled; the next `arm` starts a timer
        if self._loop.time() < self._when:
            self._start_timer(self._when)  # chunks came since: wait for the deadline in force now
            return
        self._cancelling = self._task.cancelling()
        self._fired = True
        self._task.cancel()
