"""Settles the store could not take, kept in a bounded queue and retried in the background until they land,
so that a short store outage does not charge requests that finished during it at their full reserve (each retry
writes the call's ledger record once: the record belongs to the idempotent settle); and
cancels of admits whose answer was lost, so that they hold no slot and are charged nothing."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass
from typing import Callable

from proxy.store.base import AdmitRequest, CallUsage, Reservation, Store, StoreError, StoreScriptError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PendingSettle:
    """One settle to apply: what the request really used (a release is an amount of 0)."""

    reservation: Reservation
    amount: int  # micro-credits
    tokens: int
    usage: CallUsage = CallUsage()  # what its ledger record says beside the charge

    @property
    def reservation_id(self) -> str:
        return self.reservation.request.reservation_id

    async def apply(self, store: Store, now_ms: int) -> None:
        await store.settle(self.reservation, self.amount, self.tokens, now_ms, self.usage)


@dataclass(frozen=True)
class PendingCancel:
    """An admit that failed uncertainly (timed out, cancelled, cut off): the store may still run it; undo it."""

    request: AdmitRequest

    @property
    def reservation_id(self) -> str:
        return self.request.reservation_id

    async def apply(self, store: Store, now_ms: int) -> None:
        await store.cancel(self.request, now_ms)


Pending = PendingSettle | PendingCancel


class PendingSettles:
    """A bounded queue of settles and cancels and the task retrying them with backoff; safe to retry because
    both are idempotent in the store (the ticket), and a late one still corrects an expired, charged hold."""

    def __init__(
        self,
        store: Store,
        clock: Callable[[], float],
        *,
        max_pending: int = 10_000,
        first_delay_s: float = 0.2,
        max_delay_s: float = 5.0,
        on_length: Callable[[int], None] = lambda length: None,
    ) -> None:
        self._store = store
        self._clock = clock
        self._max_pending = max_pending
        self._first_delay_s = first_delay_s
        self._max_delay_s = max_delay_s
        self._on_length = on_length
        self._queue: deque[Pending] = deque()
        self._queued = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, pending: Pending) -> None:
        """Queue a settle; when full, the longest-waiting one is dropped (its hold expires and is charged)."""
        if len(self._queue) >= self._max_pending:
            dropped = self._queue.popleft()
            log.warning(
                "settle queue full (%d): dropped reservation %s; its hold will expire and be charged at the reserve",
                self._max_pending, dropped.reservation_id,
            )
        self._queue.append(pending)
        self._queued.set()
        self._on_length(len(self._queue))

    def start(self) -> None:
        """Start the background retries (in the running loop)."""
        if self._task is None:
            self._task = asyncio.create_task(self._retry_forever())

    async def close(self, flush_timeout_s: float = 2.0) -> None:
        """Stop the background retries, then make one last attempt, bounded in time, to apply what is left."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if not self._queue:
            return
        try:
            await asyncio.wait_for(self.flush(), flush_timeout_s)
        except TimeoutError:
            pass
        if self._queue:
            log.warning("%d settles not applied at shutdown: their holds will expire and be charged at the reserve",
                        len(self._queue))

    async def flush(self) -> bool:
        """Apply queued settles, oldest first, until one fails; True if the queue is empty afterwards."""
        while self._queue:
            pending = self._queue[0]
            try:
                await pending.apply(self._store, int(self._clock() * 1000))
            except StoreScriptError:
                pass  # logged by the store; retrying a refused script would fail forever: the hold's expiry charges it
            except StoreError as exc:
                log.debug("queued %s of %s failed again: %s", type(pending).__name__, pending.reservation_id, exc)
                if self._queue and self._queue[0] is pending:
                    self._queue.rotate(-1)  # to the back: one settle the store keeps refusing must not block the rest
                return False
            if self._queue and self._queue[0] is pending:  # a full queue may have dropped it meanwhile
                self._queue.popleft()
            self._on_length(len(self._queue))
        return True

    async def _retry_forever(self) -> None:
        delay = self._first_delay_s
        while True:
            if not self._queue:
                self._queued.clear()
                await self._queued.wait()
                delay = self._first_delay_s
            await asyncio.sleep(delay)
            if await self.flush():
                log.info("queued settles applied: the store is back")
            else:
                delay = min(2 * delay, self._max_delay_s)
