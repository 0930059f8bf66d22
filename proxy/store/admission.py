"""Admission to the shared store: at most `max_in_flight` calls on the wire, a bounded queue for the rest, and
deadlines that count only time spent waiting for Redis, never time this process's own event loop was stalled.

A burst of requests on one replica must show up as latency (or as a clear `overloaded`), not as a Redis
outage: a reply that sat in the socket while the loop was busy with other requests is not a timeout.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import AsyncIterator

from proxy.store.base import StoreOverloaded

# How often the lag monitor wakes while calls are running; its lateness is what the loop was stalled.
LAG_TICK_S = 0.02
# A stalled loop extends a deadline by the stall, but never by more than this (a wedged process must still fail).
MAX_STALL_EXTENSION_S = 5.0


class LoopLag:
    """Cumulative event-loop stall of this process, measured by a ticker that runs only while someone watches."""

    def __init__(self, tick_s: float = LAG_TICK_S) -> None:
        self._tick_s = tick_s
        self._stalled_s = 0.0
        self._watchers = 0
        self._task: asyncio.Task[None] | None = None

    @property
    def stalled_s(self) -> float:
        """Seconds the loop ran late so far (monotonic; compare two readings)."""
        return self._stalled_s

    @asynccontextmanager
    async def watching(self) -> AsyncIterator[None]:
        """Keep the ticker running for the duration of the block."""
        self._watchers += 1
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._tick())
        try:
            yield
        finally:
            self._watchers -= 1

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        while self._watchers > 0:
            due = loop.time() + self._tick_s
            await asyncio.sleep(self._tick_s)
            self._stalled_s += max(0.0, loop.time() - due)


@asynccontextmanager
async def deadline(seconds: float, lag: LoopLag) -> AsyncIterator[None]:
    """Like `asyncio.timeout(seconds)`, but time the event loop was stalled does not count (up to a cap).

    When the budget seems spent, the check first subtracts the stall measured since the start (or its own
    lateness, if larger) and re-arms itself for what is left. The final expiry goes through `asyncio.timeout`
    one loop step later, so a reply that arrived during the stall is delivered rather than cancelled.
    """
    loop = asyncio.get_running_loop()
    started, stall_at_start = loop.time(), lag.stalled_s
    async with lag.watching(), asyncio.timeout(None) as timeout:

        def check(due: float) -> None:
            now = loop.time()
            stalled = min(max(lag.stalled_s - stall_at_start, now - due), MAX_STALL_EXTENSION_S)
            left = seconds - (now - started - stalled)
            if left > 0:
                nonlocal handle
                handle = loop.call_at(now + left, check, now + left)
            else:
                timeout.reschedule(now)

        handle = loop.call_at(started + seconds, check, started + seconds)
        try:
            yield
        finally:
            handle.cancel()


class CallGate:
    """At most `max_in_flight` calls at once (the connection pool size, so no call waits inside the pool);
    up to `max_waiting` more wait in FIFO order for at most `queue_timeout_s`; beyond that StoreOverloaded."""

    def __init__(self, max_in_flight: int, max_waiting: int, queue_timeout_s: float, lag: LoopLag) -> None:
        self._slots = asyncio.Semaphore(max_in_flight)
        self._max_waiting = max_waiting
        self._queue_timeout_s = queue_timeout_s
        self._lag = lag
        self._waiting = 0

    @property
    def waiting(self) -> int:
        return self._waiting

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one in-flight slot for the block; raises StoreOverloaded (nothing was sent) if none comes free."""
        if self._slots.locked():
            await self._wait_for_slot()
        else:
            await self._slots.acquire()  # free: returns at once
        try:
            yield
        finally:
            self._slots.release()

    async def _wait_for_slot(self) -> None:
        if self._waiting >= self._max_waiting:
            raise StoreOverloaded(f"{self._waiting} store calls already waiting", retry_after_s=1)
        self._waiting += 1
        try:
            async with deadline(self._queue_timeout_s, self._lag):
                await self._slots.acquire()
        except TimeoutError:
            raise StoreOverloaded(f"no store connection came free within {self._queue_timeout_s}s", retry_after_s=1) from None
        finally:
            self._waiting -= 1
