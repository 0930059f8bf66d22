"""Admission to the shared store: at most `max_in_flight` calls on the wire, a bounded queue for the rest, and
deadlines that count only time spent waiting for Redis, never time this process's own event loop was busy.

A burst of requests on one replica must show up as latency (or as a clear `overloaded`), not as a Redis
outage: a reply that sat in the socket while the loop was busy with other requests is not a timeout.
"""

from __future__ import annotations

import asyncio
import time
from types import TracebackType

from proxy.store.base import StoreOverloaded

# How often the lag monitor wakes while calls are running; its lateness is what the loop was stalled.
LAG_TICK_S = 0.02
# A busy or stalled loop extends a deadline by that time, but never by more than this (a wedged process must
# still fail).
MAX_STALL_EXTENSION_S = 5.0


class LoopLag:
    """Cumulative event-loop stall of this process, measured by a ticker that runs only while someone watches."""

    def __init__(self, tick_s: float = LAG_TICK_S) -> None:
        self._tick_s = tick_s
        self._stalled_s = 0.0
        self._watchers = 0
        self._task: asyncio.Task[None] | None = None

    def mark(self) -> tuple[float, float]:
        """A reading to measure from (see `busy_since`)."""
        return self._stalled_s, time.process_time()

    def busy_since(self, mark: tuple[float, float]) -> float:
        """Seconds since `mark` that this process could not have been waiting for a reply: the CPU it spent (the
        loop serving other requests, in short steps or long), or the lateness of the ticker (the loop blocked,
        or the process not scheduled), whichever is more."""
        stalled_at, cpu_at = mark
        return max(self._stalled_s - stalled_at, time.process_time() - cpu_at)

    def watch(self) -> None:
        """Keep the ticker running until the matching `unwatch`."""
        self._watchers += 1
        if self._task is None or self._task.done():
            # The first tick is due from now: a stall that starts before the ticker first runs counts too.
            loop = asyncio.get_running_loop()
            self._task = loop.create_task(self._tick(loop.time()))

    def unwatch(self) -> None:
        self._watchers -= 1

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _tick(self, started: float) -> None:
        loop = asyncio.get_running_loop()
        self._stalled_s += max(0.0, loop.time() - started - self._tick_s)
        while self._watchers > 0:
            due = loop.time() + self._tick_s
            await asyncio.sleep(self._tick_s)
            self._stalled_s += max(0.0, loop.time() - due)


class Deadline:
    """Like `asyncio.timeout(seconds)`, but time this process was busy or stalled does not count (up to a cap).

    When the budget seems spent, the check subtracts what `lag` measured since the start (or its own lateness,
    if larger) and re-arms itself for what is left. The final expiry goes through `asyncio.timeout` one loop
    step later, so a reply that arrived while the loop was busy is delivered rather than cancelled.
    A class rather than a generator-based context manager: it wraps every store call, twice per request.
    """

    __slots__ = ("_seconds", "_lag", "_loop", "_started", "_mark", "_timeout", "_handle")

    def __init__(self, seconds: float, lag: LoopLag) -> None:
        self._seconds = seconds
        self._lag = lag

    async def __aenter__(self) -> None:
        self._loop = loop = asyncio.get_running_loop()
        self._timeout = asyncio.timeout(None)
        await self._timeout.__aenter__()
        self._started, self._mark = loop.time(), self._lag.mark()
        self._lag.watch()
        due = self._started + self._seconds
        self._handle = loop.call_at(due, self._check, due)

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        self._handle.cancel()
        self._lag.unwatch()
        return await self._timeout.__aexit__(kind, exc, tb)

    def _check(self, due: float) -> None:
        now = self._loop.time()
        busy = min(max(self._lag.busy_since(self._mark), now - due), MAX_STALL_EXTENSION_S)
        left = self._seconds - (now - self._started - busy)
        if left > 0:
            self._handle = self._loop.call_at(now + left, self._check, now + left)
        else:
            self._timeout.reschedule(now)


class CallGate:
    """At most `max_in_flight` calls at once (the connection pool size, so no call waits inside the pool);
    up to `max_waiting` more wait in FIFO order for at most `queue_timeout_s`; beyond that StoreOverloaded."""

    def __init__(self, max_in_flight: int, max_waiting: int, queue_timeout_s: float, lag: LoopLag) -> None:
        self._slots = asyncio.Semaphore(max_in_flight)
        self._max_waiting = max_waiting
        self._queue_timeout_s = queue_timeout_s
        self._lag = lag
        self._waiting = 0

    async def __aenter__(self) -> None:
        """Hold one in-flight slot for the block (`async with gate:`); raises StoreOverloaded (nothing was sent)
        if none comes free."""
        if self._slots.locked():
            await self._wait_for_slot()
        else:
            await self._slots.acquire()  # free: returns at once

    async def __aexit__(self, *exc: object) -> None:
        self._slots.release()

    async def _wait_for_slot(self) -> None:
        if self._waiting >= self._max_waiting:
            raise StoreOverloaded(f"{self._waiting} store calls already waiting", retry_after_s=1)
        self._waiting += 1
        try:
            async with Deadline(self._queue_timeout_s, self._lag):
                await self._slots.acquire()
        except TimeoutError:
            message = f"no store connection came free within {self._queue_timeout_s}s"
            raise StoreOverloaded(message, retry_after_s=1) from None
        finally:
            self._waiting -= 1
