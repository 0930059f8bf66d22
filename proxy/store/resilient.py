"""A store that survives its backend: circuit breaker, fail-closed or fail-open (local limits) per concern."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Awaitable, Callable, Literal, TypeVar

from proxy.store.base import (
    Adjustment,
    AdmitRequest,
    AdmitResult,
    CallUsage,
    NullObserver,
    Reservation,
    Store,
    StoreError,
    StoreObserver,
    StoreScriptError,
    StoreOverloaded,
    StoreUnavailable,
)
from proxy.store.alerts import AlertOutbox, FreshAlerts, OutboxEntry
from proxy.store.breaker import CircuitBreaker
from proxy.store.ledger import LedgerReader, LedgerRecord
from proxy.store.memory import MemoryStore

log = logging.getLogger(__name__)

FailMode = Literal["closed", "open"]
T = TypeVar("T")


class ResilientStore:
    """Wraps a shared store; while it is down, refuses (closed) or limits locally (open).

    `fail_rate_limits` covers rate limits and concurrency; `fail_credits` covers budgets. Fail-open
    credits admit without a budget check (nothing local knows what was spent), so the default is closed.
    """

    def __init__(
        self,
        primary: Store,
        *,
        breaker_failures: int = 3,
        breaker_reset_s: float = 2.0,
        fail_rate_limits: FailMode = "open",
        fail_credits: FailMode = "closed",
        observer: StoreObserver | None = None,
    ) -> None:
        self._primary = primary
        self._observer = observer or NullObserver()
        self._breaker = CircuitBreaker(
            failure_threshold=breaker_failures, reset_after_s=breaker_reset_s, on_change=self._observer.on_breaker
        )
        self._fail_rate_limits = fail_rate_limits
        self._fail_credits = fail_credits
        self._fallback = MemoryStore()

    @property
    def healthy(self) -> bool:
        """False while the breaker is open (for readiness)."""
        return self._breaker.state != "open"

    @property
    def breaker_state(self) -> str:
        return self._breaker.state

    async def admit(self, request: AdmitRequest) -> AdmitResult:
        """Admit on the shared store, else per the fail modes. If the shared admit failed uncertainly (it may
        still run there), the answer says so (`shared_uncertain`, or StoreUnavailable with certain=False)."""
        ok, result = await self._attempt("admit", lambda: self._primary.admit(request))
        if ok:
            return result
        uncertain = isinstance(result, StoreError) and not result.certain
        outcome = await self._fallback.admit(self._degraded(request, "admit", certain=not uncertain))
        reservation = outcome.reservation and dataclasses.replace(outcome.reservation, fallback=True)
        return dataclasses.replace(outcome, reservation=reservation, shared_uncertain=uncertain)

    async def peek(self, request: AdmitRequest) -> AdmitResult:
        ok, result = await self._attempt("peek", lambda: self._primary.peek(request))
        if ok:
            return result
        return await self._fallback.peek(self._degraded(request, "peek"))

    async def settle(
        self, reservation: Reservation, amount: int, tokens: int, now_ms: int, usage: CallUsage | None = None
    ) -> bool:
        """Settle where the reservation was taken; raises StoreError if the shared store is down (the meter queues
        the settle and retries it)."""
        if reservation.fallback:
            return await self._fallback.settle(reservation, amount, tokens, now_ms, usage)
        return await self._shared("settle", lambda: self._primary.settle(reservation, amount, tokens, now_ms, usage))

    async def cancel(self, request: AdmitRequest, now_ms: int) -> bool:
        """Cancel a lost admit on the shared store (fallback admits never get lost); raises StoreError if it is
        down, and the meter retries."""
        return await self._shared("cancel", lambda: self._primary.cancel(request, now_ms))

    # The usage ledger lives only in the shared store (calls admitted by the local fallback write no record).
    async def ledger_streams(self, prefix: str = "ep") -> list[str]:
        return await self._shared("ledger", lambda: self._reader.ledger_streams(prefix))

    async def active_ledger_streams(self, since_ms: int, prefix: str = "ep") -> list[str]:
        return await self._shared("ledger", lambda: self._reader.active_ledger_streams(since_ms, prefix))

    async def read_ledger(self, stream: str, after: str = "0-0", count: int = 100) -> list[LedgerRecord]:
        return await self._shared("ledger", lambda: self._reader.read_ledger(stream, after, count))

    async def read_ledger_group(
        self, stream: str, group: str, consumer: str, count: int = 100, *, pending: bool = False
    ) -> list[LedgerRecord]:
        return await self._shared(
            "ledger", lambda: self._reader.read_ledger_group(stream, group, consumer, count, pending=pending)
        )

    async def claim_ledger(
        self, stream: str, group: str, consumer: str, min_idle_ms: int, count: int = 100
    ) -> list[LedgerRecord]:
        return await self._shared(
            "ledger", lambda: self._reader.claim_ledger(stream, group, consumer, min_idle_ms, count)
        )

    async def ack_ledger(self, stream: str, group: str, ids: list[str]) -> int:
        return await self._shared("ledger", lambda: self._reader.ack_ledger(stream, group, ids))

    async def read_usage(self, keys: list[str]) -> list[dict[str, str]]:
        return await self._shared("usage", lambda: self._reader.read_usage(keys))

    # Budget alerts are claimed and kept only in the shared store, like the ledger.
    @property
    def fresh_alerts(self) -> FreshAlerts:
        return self._outbox.fresh_alerts

    async def alert_streams(self, prefix: str = "ep") -> list[str]:
        return await self._shared("alerts", lambda: self._outbox.alert_streams(prefix))

    async def read_alerts(self, stream: str, consumer: str, count: int, min_idle_ms: int) -> list[OutboxEntry]:
        return await self._shared("alerts", lambda: self._outbox.read_alerts(stream, consumer, count, min_idle_ms))

    async def ack_alerts(self, stream: str, ids: list[str]) -> None:
        await self._shared("alerts", lambda: self._outbox.ack_alerts(stream, ids))

    @property
    def _outbox(self) -> AlertOutbox:
        return self._primary  # type: ignore[return-value]  # both shared stores implement AlertOutbox

    @property
    def _reader(self) -> LedgerReader:
        return self._primary  # type: ignore[return-value]  # both shared stores implement LedgerReader

    async def _shared(self, op: str, call: Callable[[], Awaitable[T]]) -> T:
        """Call the shared store through the breaker; StoreError if it is down (nothing local can answer)."""
        ok, result = await self._attempt(op, call)
        if not ok:
            raise StoreError("store unavailable")
        return result  # type: ignore[no-any-return]

    async def renew(self, reservation: Reservation, ttl_ms: int, now_ms: int) -> bool:
        """Renew where the reservation was taken; False (never an error) if the shared store is down."""
        if reservation.fallback:
            return await self._fallback.renew(reservation, ttl_ms, now_ms)
        try:
            ok, result = await self._attempt("renew", lambda: self._primary.renew(reservation, ttl_ms, now_ms))
        except StoreScriptError:
            return False  # logged and counted; the settle decides what is charged
        except StoreOverloaded:
            return False  # this replica is busy: the next heartbeat tries again
        if not ok:
            # The next heartbeat retries; if none gets through, the hold expires and is charged by the rule.
            log.debug("renew of reservation %s skipped: store unavailable", reservation.request.reservation_id)
        return ok and result

    async def adjust_credits(self, ledger_key: str, delta: int, expire_at_ms: int, audit: Adjustment) -> int:
        """Only on the shared store: a top-up kept in a replica's fallback would be lost; StoreError if it is down."""
        return await self._shared("adjust", lambda: self._primary.adjust_credits(ledger_key, delta, expire_at_ms,
                                                                                 audit))

    async def ping(self) -> bool:
        ok, result = await self._attempt("ping", self._checked_ping, probe=False)  # a ping is its own probe
        return ok and result

    async def close(self) -> None:
        await self._primary.close()

    async def _checked_ping(self) -> bool:
        if not await self._primary.ping():
            raise StoreError("ping failed")
        return True

    def _degraded(self, request: AdmitRequest, op: str, *, certain: bool = True) -> AdmitRequest:
        """The request to run locally, or StoreUnavailable if a concern it touches fails closed (`certain`:
        whether the shared store surely did not run it)."""
        if request.credits is not None and self._fail_credits == "closed":
            self._observer.on_op(op, 0.0, "refused")
            raise StoreUnavailable("store unavailable; credits fail closed", certain=certain)
        if (request.limits or request.lease) and self._fail_rate_limits == "closed":
            self._observer.on_op(op, 0.0, "refused")
            raise StoreUnavailable("store unavailable; rate limits fail closed", certain=certain)
        self._observer.on_op(op, 0.0, "fallback")
        return dataclasses.replace(request, credits=None, ledger=None)

    async def _attempt(self, op: str, call: Callable[[], Awaitable[T]], *, probe: bool = True) -> tuple[bool, Any]:
        """Call the shared store if the breaker allows: (True, result); (False, None) when the breaker skipped
        it, (False, the StoreError) when it failed.

        Only failures on the wire count against the breaker. A StoreScriptError is raised on: Redis answered, so
        it counts as a success (a bug in a script must not turn every request of the replica into 503s).
        StoreOverloaded (this replica is busy) passes through without a verdict. After the cooldown one caller
        probes with a PING before its own call goes out.
        """
        if not self._breaker.allow():
            return False, None
        started = time.perf_counter()
        try:
            if probe and self._breaker.state == "half_open" and not await self._primary.ping():
                raise StoreError("probe failed", certain=True)
            result = await call()
        except StoreScriptError:
            self._breaker.success()
            self._observer.on_op(op, time.perf_counter() - started, "script_error")
            raise
        except StoreOverloaded:
            self._breaker.abandon()
            self._observer.on_op(op, time.perf_counter() - started, "overloaded")
            raise
        except StoreError as exc:
            self._breaker.failure()
            self._observer.on_op(op, time.perf_counter() - started, "error")
            return False, exc
        except BaseException:
            self._breaker.abandon()
            raise
        self._breaker.success()
        self._observer.on_op(op, time.perf_counter() - started, "ok")
        return True, result
