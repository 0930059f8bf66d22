"""The in-process store: the same semantics as the Redis scripts, for a single process.

Atomicity comes from the event loop: no method awaits between reading and writing.
"""

from __future__ import annotations

import heapq
import time
from typing import Any, Callable

from proxy.store.base import (
    Adjustment,
    AdmitCancelled,
    AdmitRequest,
    AdmitResult,
    Balance,
    CallUsage,
    CreditSpec,
    Denial,
    LimitSpec,
    LedgerSpec,
    LimitState,
    Reservation,
    check_adjust,
    check_admit,
    check_renew,
    check_settle,
)
from proxy.store.alerts import FreshAlerts, OutboxEntry, _Outbox, outbox_key
from proxy.store.gcra import Tat, ceil_ms, gcra_adjust, gcra_take, limit_states
from proxy.store.ledger import (
    ADJUSTMENTS,
    METRICS,
    RECORD_FIELDS,
    LedgerRecord,
    _Stream,
    account_usage_key,
    day_of,
    parse_id,
    stream_key,
    usage_expiry,
    user_usage_key,
)

# The ticket of a cancelled admit (see Store.cancel).
_TOMBSTONE = "cancelled"

# At most this many expired holds are charged per call, as in the Lua script (bounded work per request).
SWEEP_BATCH = 100


class _Keyspace:
    """A dict of keys with millisecond expiry, purged lazily by a heap of deadlines.

    A changed or dropped deadline leaves its old heap entry behind (skipped when popped); once stale entries
    outnumber live ones the heap is rebuilt from the live deadlines, so it never holds more than
    2 × live keys + COMPACT_SLACK entries, at amortised O(1) per change."""

    COMPACT_SLACK = 1024

    def __init__(self) -> None:
        self._values: dict[str, Any] = {}
        self._expiry: dict[str, int] = {}
        self._deadlines: list[tuple[int, str]] = []

    def __len__(self) -> int:
        return len(self._values)

    @property
    def heap_size(self) -> int:
        """Entries in the deadline heap, stale ones included (bounded, see the class docstring)."""
        return len(self._deadlines)

    def purge(self, now: int) -> None:
        """Drop every key whose deadline has passed (like Redis expiry)."""
        while self._deadlines and self._deadlines[0][0] <= now:
            deadline, key = heapq.heappop(self._deadlines)
            if self._expiry.get(key) == deadline:
                self.delete(key)

    def get(self, key: str) -> Any:
        return self._values.get(key)

    def put(self, key: str, value: Any) -> None:
        """Set a value, keeping any expiry (like HINCRBY/ZADD on an existing key)."""
        self._values[key] = value

    def expire_at(self, key: str, deadline: int) -> None:
        """Set the key's deadline; an unchanged deadline adds no heap entry (ledgers are re-expired often)."""
        if key in self._values and self._expiry.get(key) != deadline:
            self._expiry[key] = deadline
            heapq.heappush(self._deadlines, (deadline, key))
            if len(self._deadlines) > 2 * len(self._expiry) + self.COMPACT_SLACK:
                self._deadlines = [(when, name) for name, when in self._expiry.items()]
                heapq.heapify(self._deadlines)

    def ttl_at_least(self, key: str, deadline: int) -> None:
        """Extend the expiry to `deadline` if it is shorter (never shorten)."""
        if self._expiry.get(key, 0) < deadline:
            self.expire_at(key, deadline)

    def items(self) -> list[tuple[str, Any]]:
        return list(self._values.items())

    def delete(self, key: str) -> None:
        self._values.pop(key, None)
        self._expiry.pop(key, None)


class MemoryStore:
    """Single-process store; asyncio-safe because every operation runs without awaiting."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._keys = _Keyspace()
        self._clock = clock  # for the alert outbox's idle times (every other operation is given its `now`)
        self._fresh_alerts = FreshAlerts()

    @property
    def healthy(self) -> bool:
        return True

    @property
    def deadline_entries(self) -> int:
        """Size of the expiry heap, for tests and benchmarks."""
        return self._keys.heap_size

    def key_count(self, now_ms: int) -> int:
        """Live keys (the in-memory DBSIZE), for tests and benchmarks."""
        self._keys.purge(now_ms)
        return len(self._keys)

    async def ping(self) -> bool:
        return True

    async def adjust_credits(self, ledger_key: str, delta: int, expire_at_ms: int, audit: Adjustment) -> int:
        check_adjust(delta, expire_at_ms, audit)
        self._keys.purge(audit.now_ms)
        ledger = self._keys.get(ledger_key) or {"spent": 0, "held": 0}
        ledger["spent"] -= delta
        self._keys.put(ledger_key, ledger)
        if expire_at_ms:
            self._keys.expire_at(ledger_key, expire_at_ms)
        self._record(audit.ledger, audit.now_ms, {
            "id": audit.record_id, "request_id": audit.ledger.request_id, "key": "", "user": "", "model": "",
            "provider": "", "deployment": "", "tokens_in": 0, "tokens_out": 0, "images": 0, "seconds_ms": 0,
            "credits": -delta, "reserved": 0, "outcome": "topup" if delta > 0 else "adjustment", "late": 0,
            "reason": audit.reason, "actor": audit.actor,
        })
        return int(ledger["spent"])

    async def close(self) -> None:
        return None

    async def admit(self, request: AdmitRequest) -> AdmitResult:
        check_admit(request)
        return self.admit_now(request, dry=False)

    async def peek(self, request: AdmitRequest) -> AdmitResult:
        check_admit(request)
        return self.admit_now(request, dry=True)

    async def settle(
        self, reservation: Reservation, amount: int, tokens: int, now_ms: int, usage: CallUsage | None = None
    ) -> bool:
        check_settle(amount, tokens, now_ms, usage)
        return self.settle_now(reservation.request, amount, tokens, now_ms, usage or CallUsage())

    async def renew(self, reservation: Reservation, ttl_ms: int, now_ms: int) -> bool:
        check_renew(ttl_ms, now_ms)
        return self.renew_now(reservation.request, ttl_ms, now_ms)

    async def cancel(self, request: AdmitRequest, now_ms: int) -> bool:
        check_settle(0, 0, now_ms)
        return self.cancel_now(request, now_ms)

    def admit_now(self, req: AdmitRequest, *, dry: bool) -> AdmitResult:
        """The body of the admit script: check all, then take all or nothing."""
        now = req.now_ms
        self._keys.purge(now)
        if not dry and self._keys.get(req.ticket_key) is not None:
            raise AdmitCancelled()  # the tombstone of its cancel: take nothing
        tats = [self._tat(spec) for spec in req.limits]
        new_tats: list[Tat | None] = []
        worst: Denial | None = None
        for index, (spec, tat) in enumerate(zip(req.limits, tats)):
            new_tat, retry = gcra_take(tat, now, spec.limit, spec.window_ms, 0 if dry else spec.cost)
            new_tats.append(new_tat)
            if new_tat is None and _waits_longer(retry, worst):
                worst = Denial("rate_limit", index, retry)
        in_flight = self._live_leases(req, now)
        balance = self._balance(req, now)
        if worst is None and not dry:
            worst = self._lease_or_credit_denial(req, in_flight, balance)
        if worst is not None or dry:
            return AdmitResult(worst is None, limit_states(req, tats), in_flight, balance, worst)
        for spec, tat in zip(req.limits, new_tats):
            self._store_tat(spec, tat, now)
        return self._take(req, limit_states(req, new_tats), in_flight, balance)

    def settle_now(
        self, req: AdmitRequest, amount: int, tokens: int, now: int, usage: CallUsage, outcome: str = ""
    ) -> bool:
        """The body of the settle script: a no-op unless the ticket still exists; writes the ledger record."""
        self._keys.purge(now)
        ticket = self._keys.get(req.ticket_key)
        if ticket is None or _TOMBSTONE in ticket:
            self._keys.delete(req.ticket_key)
            return False
        if req.lease is not None:
            leases = self._keys.get(req.lease.key) or {}
            leases.pop(req.reservation_id, None)
            if not leases:
                self._keys.delete(req.lease.key)
        credits, late = amount, False  # without a budget, the record carries the call's price
        if req.credits is not None:
            late = not self._settle_credits(req, ticket["amt"], amount, now)
            credits = amount - ticket["amt"] if late else amount
            self._claim_alerts(req, now)
        self._keys.delete(req.ticket_key)  # after the sweep, which may record this very call's expired hold from it
        if req.ledger is not None:
            self._record(req.ledger, now, {
                "id": req.reservation_id, "request_id": req.ledger.request_id, "key": req.ledger.key_id,
                "user": req.ledger.user, "model": req.ledger.model, "provider": usage.provider,
                "deployment": usage.deployment, "tokens_in": usage.tokens_in, "tokens_out": usage.tokens_out,
                "images": usage.images, "seconds_ms": usage.seconds_ms, "credits": credits,
                "reserved": ticket["amt"], "outcome": outcome or usage.outcome, "late": int(late),
            })
        for spec in req.limits:
            if spec.tokens:
                new_tat = gcra_adjust(self._tat(spec), now, spec.limit, spec.window_ms, tokens - req.estimated_tokens)
                self._store_tat(spec, new_tat, now)
        return True

    def cancel_now(self, req: AdmitRequest, now: int) -> bool:
        """The body of the cancel script: settle at 0 if the admit ran, then leave a tombstone in its ticket."""
        undone = self.settle_now(req, 0, 0, now, CallUsage(), "cancelled")
        self._keys.put(req.ticket_key, {_TOMBSTONE: True})
        self._keys.expire_at(req.ticket_key, now + 2 * req.ttl_ms)
        return undone

    def renew_now(self, req: AdmitRequest, ttl: int, now: int) -> bool:
        """The body of the renew script: push the lease and hold expiry to now + ttl unless either is gone."""
        self._keys.purge(now)
        ticket = self._keys.get(req.ticket_key)
        if ticket is None or _TOMBSTONE in ticket:
            return False
        leases: dict[str, int] = (self._keys.get(req.lease.key) or {}) if req.lease else {}
        holds: dict[str, int] = (self._keys.get(req.credits.holds_key) or {}) if req.credits else {}
        hold = f"{ticket['amt']}:{req.reservation_id}"
        if req.lease is not None and leases.get(req.reservation_id, 0) <= now:
            return False
        if req.credits is not None and holds.get(hold, 0) <= now:
            return False
        expiry = now + ttl
        if req.lease is not None:
            leases[req.reservation_id] = expiry
            self._keys.ttl_at_least(req.lease.key, expiry)
        if req.credits is not None:
            holds[hold] = expiry
        # the ticket must outlive the renewed hold, so that the final settle still finds it
        self._keys.expire_at(req.ticket_key, now + 2 * ttl)
        return True

    def _tat(self, spec: LimitSpec) -> Tat | None:
        """The arrival time in units of this limit; one kept under another limit rounds up to the next ms."""
        stored: tuple[int, int, int] | None = self._keys.get(spec.key)
        if stored is None:
            return None
        ms, num, limit = stored
        return (ms, num) if limit == spec.limit else (ceil_ms((ms, num)), 0)

    def _store_tat(self, spec: LimitSpec, tat: Tat | None, now: int) -> None:
        if tat is None or tat <= (now, 0):
            self._keys.delete(spec.key)
            return
        self._keys.put(spec.key, (tat[0], tat[1], spec.limit))
        self._keys.expire_at(spec.key, ceil_ms(tat))

    def _live_leases(self, req: AdmitRequest, now: int) -> int:
        if req.lease is None:
            return 0
        leases: dict[str, int] = self._keys.get(req.lease.key) or {}
        for member in [m for m, expiry in leases.items() if expiry <= now]:
            del leases[member]
        if not leases:
            self._keys.delete(req.lease.key)
        return len(leases)

    def _balance(self, req: AdmitRequest, now: int) -> Balance | None:
        if req.credits is None:
            return None
        ledger = self._sweep_holds(req, now)
        return Balance(req.credits.budget, ledger["spent"], ledger["held"])

    def _sweep_holds(self, req: AdmitRequest, now: int) -> dict[str, int]:
        """Charge expired holds at their reserved amount (see docs/metering.md), each with its ledger record, and
        return the ledger."""
        assert req.credits is not None
        credits = req.credits
        ledger: dict[str, int] = self._keys.get(credits.ledger_key) or {"spent": 0, "held": 0}
        holds: dict[str, int] = self._keys.get(credits.holds_key) or {}
        expired = sorted((expiry, member) for member, expiry in holds.items() if expiry <= now)[:SWEEP_BATCH]
        for _, member in expired:
            amount, rid = member.split(":", 1)
            reserved = int(amount)
            ledger["held"] -= reserved
            ledger["spent"] += reserved
            del holds[member]
            if req.ledger is not None:
                self._record_expired(req.ledger, rid, reserved, now)
        if expired:
            self._keys.put(credits.ledger_key, ledger)
        if not holds:
            self._keys.delete(credits.holds_key)
        return ledger

    @staticmethod
    def _lease_or_credit_denial(req: AdmitRequest, in_flight: int, balance: Balance | None) -> Denial | None:
        if req.lease is not None and in_flight >= req.lease.limit:
            return Denial("concurrency")
        if req.credits is not None and balance is not None:
            if balance.spent + balance.held + req.credits.amount > balance.budget:
                return Denial("credits")
        return None

    def _take(
        self, req: AdmitRequest, states: tuple[LimitState, ...], in_flight: int, balance: Balance | None
    ) -> AdmitResult:
        now, expiry = req.now_ms, req.now_ms + req.ttl_ms
        if req.lease is not None:
            leases = self._keys.get(req.lease.key) or {}
            leases[req.reservation_id] = expiry
            self._keys.put(req.lease.key, leases)
            self._keys.ttl_at_least(req.lease.key, expiry)
            in_flight += 1
        amount = 0
        if req.credits is not None and balance is not None:
            amount = req.credits.amount
            self._hold(req.credits, req.reservation_id, expiry, now)
            balance = Balance(balance.budget, balance.spent, balance.held + amount)
        ticket: dict[str, Any] = {"amt": amount}
        if req.ledger is not None:  # who the call is for, should its hold expire (the sweep records it from here)
            ticket.update(q=req.ledger.request_id, k=req.ledger.key_id, u=req.ledger.user, m=req.ledger.model)
        self._keys.put(req.ticket_key, ticket)
        self._keys.expire_at(req.ticket_key, now + 2 * req.ttl_ms)
        return AdmitResult(True, states, in_flight, balance, reservation=Reservation(req))

    def _hold(self, credits: CreditSpec, reservation_id: str, expiry: int, now: int) -> None:
        ledger = self._keys.get(credits.ledger_key) or {"spent": 0, "held": 0}
        ledger["held"] += credits.amount
        holds = self._keys.get(credits.holds_key) or {}
        holds[f"{credits.amount}:{reservation_id}"] = expiry
        self._keys.put(credits.ledger_key, ledger)
        self._keys.put(credits.holds_key, holds)
        self._expire_ledger(credits)

    def _settle_credits(self, req: AdmitRequest, reserved: int, amount: int, now: int) -> bool:
        """Charge `amount` for the hold; False if the hold had expired (and was charged at `reserved`)."""
        assert req.credits is not None
        credits = req.credits
        ledger = self._sweep_holds(req, now)
        holds = self._keys.get(credits.holds_key) or {}
        live = holds.pop(f"{reserved}:{req.reservation_id}", None) is not None
        if live:
            ledger["held"] -= reserved
            ledger["spent"] += amount
        else:  # the hold expired and was charged at `reserved`: correct that charge to the actual amount
            ledger["spent"] += amount - reserved
        if not holds:
            self._keys.delete(credits.holds_key)
        self._keys.put(credits.ledger_key, ledger)
        self._expire_ledger(credits)
        return live

    def _claim_alerts(self, req: AdmitRequest, now: int) -> None:
        """Claim the thresholds `spent` has reached, once per credit ledger, into the account's outbox (as the Lua
        `claim_alerts`)."""
        credits, lg = req.credits, req.ledger
        if credits is None or credits.alerts is None or lg is None:
            return
        ledger = self._keys.get(credits.ledger_key)
        key = outbox_key(lg.prefix)
        fired = 0
        for points, amount in credits.alerts.levels:
            claim = f"al:{points}"
            if ledger["spent"] >= amount and claim not in ledger:
                ledger[claim] = now
                outbox = self._keys.get(key) or _Outbox()
                outbox.add(now, {
                    "id": f"{credits.alerts.budget_id}/{points}", "ts": str(now), "account": lg.account,
                    "budget": credits.alerts.budget_id, "threshold_bp": str(points),
                    "budget_micro": str(credits.budget), "spent_micro": str(ledger["spent"]), "key": lg.key_id,
                    "user": lg.user, "request_id": lg.request_id,
                })
                self._keys.put(key, outbox)
                fired += 1
        if fired:
            self._keys.expire_at(key, now + credits.alerts.keep_ms)
            self._fresh_alerts.note(key, fired)

    @property
    def fresh_alerts(self) -> FreshAlerts:
        return self._fresh_alerts

    async def alert_streams(self, prefix: str = "ep") -> list[str]:
        return sorted(key for key, value in self._keys.items()
                      if isinstance(value, _Outbox) and value.entries and key.startswith(f"{prefix}:{{"))

    async def read_alerts(self, stream: str, consumer: str, count: int, min_idle_ms: int) -> list[OutboxEntry]:
        found = self._keys.get(stream)
        if not isinstance(found, _Outbox):
            return []
        now = int(self._clock() * 1000)
        return [OutboxEntry(stream, eid, fields) for eid, fields in found.read(consumer, count, min_idle_ms, now)]

    async def ack_alerts(self, stream: str, ids: list[str]) -> None:
        found = self._keys.get(stream)
        if isinstance(found, _Outbox):
            found.ack([parse_id(eid) for eid in ids])
            if not found.entries:
                self._keys.delete(stream)

    def _record_expired(self, spec: LedgerSpec, rid: str, reserved: int, now: int) -> None:
        """The record of a hold charged at expiry; who it was for comes from its ticket, if still there."""
        ticket = self._keys.get(f"{spec.prefix}:tk:{rid}") or {}
        self._record(spec, now, {
            "id": f"{rid}:expired", "request_id": ticket.get("q", ""), "key": ticket.get("k", ""),
            "user": ticket.get("u", ""), "model": ticket.get("m", ""), "provider": "", "deployment": "",
            "tokens_in": 0, "tokens_out": 0, "images": 0, "seconds_ms": 0, "credits": reserved,
            "reserved": reserved, "outcome": "expired", "late": 0,
        })

    def _record(self, spec: LedgerSpec, now: int, values: dict[str, Any]) -> None:
        """Append a record to the account's stream and add it to the day's aggregates (as the Lua `record`)."""
        fields = {name: str(values.get(name, "")) for name in RECORD_FIELDS}
        fields.update(ts=str(now), account=spec.account)
        key = stream_key(spec.prefix)
        stream = self._keys.get(key) or _Stream()
        stream.add(now, fields, spec.max_records, now - spec.retention_ms)
        self._keys.put(key, stream)
        self._keys.expire_at(key, now + spec.retention_ms)
        if values["outcome"] in ADJUSTMENTS:
            return  # a balance change, not usage
        undone = values["outcome"] in ("released", "cancelled")  # nothing billable; late: takes back its expiry's count
        counted = (1 if not undone else 0) if values["late"] == 0 else (-1 if undone else 0)
        day, expiry = day_of(now), usage_expiry(now, spec.retention_ms)
        keys = [account_usage_key(spec.prefix, day)]
        if values["user"]:
            keys.append(user_usage_key(spec.prefix, values["user"], day))
        for usage_key in keys:
            totals: dict[str, int] = self._keys.get(usage_key) or {}
            for metric in METRICS:
                delta = counted if metric == "calls" else int(values[metric])
                if delta:
                    name = f"{metric}:{values['model']}"
                    totals[name] = totals.get(name, 0) + delta
            if totals:
                self._keys.put(usage_key, totals)
                self._keys.expire_at(usage_key, expiry)

    async def ledger_streams(self, prefix: str = "ep") -> list[str]:
        return sorted(
            key for key, value in self._keys.items() if isinstance(value, _Stream) and key.startswith(f"{prefix}:{{")
        )

    async def active_ledger_streams(self, since_ms: int, prefix: str = "ep") -> list[str]:
        streams = [(stream, self._keys.get(stream)) for stream in await self.ledger_streams(prefix)]
        return [stream for stream, found in streams if isinstance(found, _Stream) and found.last_ms >= since_ms]

    async def read_ledger(self, stream: str, after: str = "0-0", count: int = 100) -> list[LedgerRecord]:
        found = self._keys.get(stream)
        if not isinstance(found, _Stream):
            return []
        return [LedgerRecord(stream, f"{eid[0]}-{eid[1]}", fields) for eid, fields in found.after(parse_id(after), count)]

    async def read_ledger_group(
        self, stream: str, group: str, consumer: str, count: int = 100, *, pending: bool = False
    ) -> list[LedgerRecord]:
        found = self._keys.get(stream)
        if not isinstance(found, _Stream):
            return []
        return [LedgerRecord(stream, eid, fields) for eid, fields in found.read_group(group, consumer, count, pending)]

    async def claim_ledger(
        self, stream: str, group: str, consumer: str, min_idle_ms: int, count: int = 100
    ) -> list[LedgerRecord]:
        found = self._keys.get(stream)
        if not isinstance(found, _Stream):
            return []
        return [LedgerRecord(stream, eid, fields) for eid, fields in found.claim(group, consumer, min_idle_ms, count)]

    async def ack_ledger(self, stream: str, group: str, ids: list[str]) -> int:
        found = self._keys.get(stream)
        return found.ack(group, ids) if isinstance(found, _Stream) else 0

    async def read_usage(self, keys: list[str]) -> list[dict[str, str]]:
        return [{name: str(value) for name, value in (self._keys.get(key) or {}).items()} for key in keys]

    def _expire_ledger(self, credits: CreditSpec) -> None:
        if credits.expire_at_ms:
            self._keys.expire_at(credits.ledger_key, credits.expire_at_ms)
            self._keys.expire_at(credits.holds_key, credits.expire_at_ms)


def _waits_longer(retry: int | None, current: Denial | None) -> bool:
    """Report the limit the caller must wait longest for; one that never fits outranks all."""
    if current is None:
        return True
    if current.retry_after_ms is None:
        return False
    return retry is None or retry > current.retry_after_ms
