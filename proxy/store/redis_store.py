"""The shared store: one Lua script per admission decision, exact across any number of replicas."""

from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable, Sequence, TypeVar

from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError, ResponseError

from proxy.store import lua
from proxy.store.admission import CallGate, Deadline, LoopLag
from proxy.store.autopipeline import AutoPipeline
from proxy.store.gcra import Step, limit_states
from proxy.store.redis_client import Credentials, RedisMode, connect
from proxy.store.alerts import GROUP, FreshAlerts, OutboxEntry, outbox_key
from proxy.store.ledger import LedgerRecord, day_of, parse_id, stream_key, usage_expiry
from proxy.store.ledger_index import LedgerIndexer, index_key
from proxy.store.base import (
    AdmitCancelled,
    Adjustment,
    AdmitRequest,
    AdmitResult,
    Balance,
    CallUsage,
    CreditSpec,
    Denial,
    LedgerSpec,
    DenialKind,
    Reservation,
    StoreError,
    StoreOverloaded,
    StoreScriptError,
    check_adjust,
    check_admit,
    check_renew,
    check_settle,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

_DENIALS: dict[int, DenialKind] = {1: "rate_limit", 2: "concurrency", 3: "credits"}
_CANCELLED = 4  # the admit script found the tombstone of its cancel


class RedisStore:
    """Redis-backed store; raises StoreError when Redis fails and StoreOverloaded when too many calls wait.

    Calls pass a CallGate first (at most `max_connections` on the wire, `max_waiting_calls` more queued for at
    most `queue_timeout_s`), so no call ever waits inside the connection pool. A call on the wire is given up
    after `connect_timeout_s + op_timeout_s` (room to open a connection when no idle one is left), not counting
    time this process's event loop was stalled: a busy replica is not a Redis outage. The script calls on the wire
    together share round trips (autopipeline.py), each still bounded and answered on its own.
    """

    def __init__(
        self,
        url: str,
        *,
        mode: RedisMode = "standalone",
        credentials: Credentials = Credentials(),
        connect_timeout_s: float = 0.25,
        op_timeout_s: float = 0.5,
        max_connections: int = 64,
        max_waiting_calls: int = 1000,
        queue_timeout_s: float = 2.0,
    ) -> None:
        # No client-side retries (the breaker decides what happens next) and no client-side timeouts: redis-py
        # would count event-loop stalls against them; `Deadline` below does not. A connection interrupted with
        # replies unread is closed, so a late reply can never be read by the next call.
        self._client = connect(url, mode, max_connections, credentials)
        # The scripts of concurrent calls share round trips (autopipeline.py). Not on a cluster: RedisCluster
        # routes each call by its slot and follows MOVED/ASK itself, which batches would have to redo per node.
        cluster = isinstance(self._client, RedisCluster)
        self._pipeline = None if cluster else AutoPipeline(self._client, max_connections)
        self._wire_timeout_s = connect_timeout_s + op_timeout_s
        self._lag = LoopLag()
        self._gate = CallGate(max_connections, max_waiting_calls, queue_timeout_s, self._lag)
        # Registered once; calls go by EVALSHA and reload the script on NOSCRIPT (e.g. after a restart).
        self._admit = self._client.register_script(lua.ADMIT)
        self._settle = self._client.register_script(lua.SETTLE)
        self._renew = self._client.register_script(lua.RENEW)
        self._cancel = self._client.register_script(lua.CANCEL)
        self._adjust = self._client.register_script(lua.ADJUST)
        self._ack_alerts = self._client.register_script(lua.ACK_ALERTS)
        self._fresh_alerts = FreshAlerts()
        self._healthy = True
        self._index = LedgerIndexer(self._write_index)

    @property
    def fresh_alerts(self) -> FreshAlerts:
        return self._fresh_alerts

    @property
    def auto_pipeline(self) -> AutoPipeline | None:
        """The batching of script calls (None on a cluster); its counters say how many calls shared a write."""
        return self._pipeline

    @property
    def healthy(self) -> bool:
        """Whether the last operation reached Redis."""
        return self._healthy

    async def admit(self, request: AdmitRequest) -> AdmitResult:
        return await self._run_admit(request, dry=False)

    async def peek(self, request: AdmitRequest) -> AdmitResult:
        return await self._run_admit(request, dry=True)

    async def settle(
        self, reservation: Reservation, amount: int, tokens: int, now_ms: int, usage: CallUsage | None = None
    ) -> bool:
        check_settle(amount, tokens, now_ms, usage)
        request = reservation.request
        keys, args = _settle_call(request, amount, tokens, now_ms, usage or CallUsage())
        try:
            settled, fired = await self._call(lambda: self._script(self._settle, keys, args))
        finally:  # even if the answer was lost: the record may be written
            self._index.note(request.ledger)
        if fired and request.ledger is not None:
            self._fresh_alerts.note(outbox_key(request.ledger.prefix), int(fired))
        return bool(settled)

    async def cancel(self, request: AdmitRequest, now_ms: int) -> bool:
        check_settle(0, 0, now_ms)
        keys, args = _settle_call(request, 0, 0, now_ms, CallUsage(), "cancelled")
        tombstone_ms = 2 * request.ttl_ms  # as long as the ticket of the admit would have lived
        try:
            return bool(await self._call(lambda: self._script(self._cancel, keys, [*args, tombstone_ms])))
        finally:
            self._index.note(request.ledger)

    async def renew(self, reservation: Reservation, ttl_ms: int, now_ms: int) -> bool:
        check_renew(ttl_ms, now_ms)
        req = reservation.request
        args = [now_ms, req.reservation_id, ttl_ms, int(req.lease is not None), int(req.credits is not None)]
        return bool(await self._call(lambda: self._script(self._renew, _fixed_keys(req), args)))

    async def ledger_streams(self, prefix: str = "ep") -> list[str]:
        """Every account's ledger stream, by SCAN (one bounded call per page)."""
        return await self._streams(stream_key(f"{prefix}:{{*}}"))

    async def alert_streams(self, prefix: str = "ep") -> list[str]:
        """Every account's alert outbox that holds alerts (an emptied one is deleted), by SCAN."""
        return await self._streams(outbox_key(f"{prefix}:{{*}}"))

    async def _streams(self, pattern: str) -> list[str]:
        streams: set[str] = set()
        cluster = isinstance(self._client, RedisCluster)
        for node in self._client.get_primaries() if cluster else [None]:  # a cluster scans each primary
            target = {"target_nodes": node} if cluster else {}
            cursor = 0
            while True:
                cursor, keys = await self._call(lambda: self._client.scan(
                    cursor, match=pattern, count=1000, _type="stream", **target))
                if cluster:
                    cursor = cursor[node.name]
                streams.update(key.decode() for key in keys)
                if cursor == 0:
                    break
        return sorted(streams)

    async def active_ledger_streams(self, since_ms: int, prefix: str = "ep") -> list[str]:
        streams = await self._call(lambda: self._client.zrangebyscore(index_key(prefix), since_ms, "+inf"))
        return sorted(stream.decode() for stream in streams)

    async def _write_index(self, index: str, streams: dict[str, int], drop_below_ms: int) -> None:
        async def write() -> None:
            pipe = self._client.pipeline(transaction=False)  # one key: one slot, one node
            pipe.zadd(index, streams, gt=True)  # a replica whose clock lags never moves a stream back
            pipe.zremrangebyscore(index, "-inf", f"({drop_below_ms}")
            await pipe.execute()

        await self._call(write)

    async def read_alerts(self, stream: str, consumer: str, count: int, min_idle_ms: int) -> list[OutboxEntry]:
        """Pending to `consumer` (XREADGROUP 0), idle with another consumer (XAUTOCLAIM), new (XREADGROUP >)."""

        async def read() -> list[tuple[bytes, dict[bytes, bytes] | None]]:
            try:
                return await self._read_alerts(stream, consumer, count, min_idle_ms)
            except ResponseError as exc:
                if not str(exc).startswith("NOGROUP"):
                    raise
            try:  # a new outbox (or one emptied and deleted since): its group starts at its first entry
                await self._client.xgroup_create(stream, GROUP, id="0")
            except ResponseError as exc:
                if "requires the key to exist" in str(exc):
                    return []  # delivered and deleted meanwhile
                if not str(exc).startswith("BUSYGROUP"):
                    raise
            return await self._read_alerts(stream, consumer, count, min_idle_ms)

        entries = await self._call(read)
        return [OutboxEntry(stream, eid.decode(), {k.decode(): v.decode() for k, v in (fields or {}).items()})
                for eid, fields in entries]

    async def _read_alerts(
        self, stream: str, consumer: str, count: int, min_idle_ms: int
    ) -> list[tuple[bytes, dict[bytes, bytes] | None]]:
        found: dict[bytes, dict[bytes, bytes] | None] = {}
        for _, entries in await self._client.xreadgroup(GROUP, consumer, {stream: "0"}, count=count):
            found.update(entries)
        _, claimed, *_ = await self._client.xautoclaim(stream, GROUP, consumer, min_idle_ms, count=count)
        found.update((eid, fields) for eid, fields in claimed)
        for _, entries in await self._client.xreadgroup(GROUP, consumer, {stream: ">"}, count=count):
            found.update(entries)
        return sorted(found.items(), key=lambda item: parse_id(item[0].decode()))[:count]

    async def ack_alerts(self, stream: str, ids: list[str]) -> None:
        if ids:
            await self._call(lambda: self._script(self._ack_alerts, [stream], [GROUP, *ids]))

    async def read_ledger(self, stream: str, after: str = "0-0", count: int = 100) -> list[LedgerRecord]:
        entries = await self._call(lambda: self._client.xrange(stream, min=f"({after}", max="+", count=count))
        return [_record(stream, eid, fields) for eid, fields in entries]

    async def read_ledger_group(
        self, stream: str, group: str, consumer: str, count: int = 100, *, pending: bool = False
    ) -> list[LedgerRecord]:
        async def read() -> list[Any]:
            try:
                return await self._client.xreadgroup(group, consumer, {stream: "0" if pending else ">"}, count=count)
            except ResponseError as exc:
                if not str(exc).startswith("NOGROUP"):
                    raise
            try:  # a new group starts at the stream's first record
                await self._client.xgroup_create(stream, group, id="0")
            except ResponseError as exc:
                if "requires the key to exist" in str(exc):
                    return []  # no stream (no record yet, or all expired)
                if not str(exc).startswith("BUSYGROUP"):
                    raise
            return await self._client.xreadgroup(group, consumer, {stream: "0" if pending else ">"}, count=count)

        reply = await self._call(read)
        return [_record(stream, eid, fields or {}) for _, entries in reply for eid, fields in entries]

    async def claim_ledger(
        self, stream: str, group: str, consumer: str, min_idle_ms: int, count: int = 100
    ) -> list[LedgerRecord]:
        async def claim() -> list[Any]:
            try:
                return await self._client.xautoclaim(stream, group, consumer, min_idle_ms, "0-0", count=count)
            except ResponseError as exc:
                if str(exc).startswith("NOGROUP"):
                    return ["0-0", [], []]  # no stream or no group yet: nothing was ever delivered
                raise

        reply = await self._call(claim)
        found = [_record(stream, eid, fields or {}) for eid, fields in reply[1]]
        return found + [_record(stream, eid, {}) for eid in (reply[2] if len(reply) > 2 else [])]

    async def ack_ledger(self, stream: str, group: str, ids: list[str]) -> int:
        if not ids:
            return 0
        return int(await self._call(lambda: self._client.xack(stream, group, *ids)))

    async def read_usage(self, keys: list[str]) -> list[dict[str, str]]:
        async def read() -> list[Any]:
            pipe = self._client.pipeline(transaction=False)
            for key in keys:
                pipe.hgetall(key)
            return await pipe.execute()

        replies = await self._call(read) if keys else []
        return [{name.decode(): value.decode() for name, value in reply.items()} for reply in replies]

    async def adjust_credits(self, ledger_key: str, delta: int, expire_at_ms: int, audit: Adjustment) -> int:
        check_adjust(delta, expire_at_ms, audit)
        args = [audit.now_ms, delta, expire_at_ms, *_ledger_args(audit.ledger, audit.now_ms), audit.record_id,
                audit.reason, audit.actor]
        try:
            return int(await self._call(lambda: self._script(self._adjust, [ledger_key], args)))
        finally:  # even if the answer was lost: the record may be written
            self._index.note(audit.ledger)

    async def ping(self) -> bool:
        try:
            return bool(await self._call(self._client.ping))
        except StoreOverloaded:
            return self._healthy  # busy, not down: calls are being answered
        except StoreError:
            return False

    async def close(self) -> None:
        await self._index.close()
        if self._pipeline is not None:
            await self._pipeline.close()
        await self._client.aclose()
        await self._lag.close()

    async def _run_admit(self, req: AdmitRequest, *, dry: bool) -> AdmitResult:
        check_admit(req)
        credits = req.credits
        args: list[int | str] = [
            req.now_ms,
            req.reservation_id,
            req.ttl_ms,
            int(dry),
            req.lease.limit if req.lease else -1,
            credits.budget if credits else -1,
            credits.amount if credits else 0,
            credits.expire_at_ms if credits else 0,
            *_ledger_args(req.ledger, req.now_ms),
        ]
        for spec in req.limits:
            cost = 0 if dry else spec.cost
            step = Step.of(cost, spec.window_ms, spec.limit) if cost <= spec.limit else Step(0, 0)
            args += [spec.limit, spec.window_ms, step.whole, step.rem, int(cost <= spec.limit)]
        keys = [*_fixed_keys(req), *(spec.key for spec in req.limits)]
        try:
            reply = await self._call(lambda: self._script(self._admit, keys, args))
        finally:  # an admit charges expired holds, each with its record
            self._index.note(req.ledger)
        return _parse_admit(req, reply, dry=dry)

    def _script(self, script: AsyncScript, keys: list[str], args: list[int | str]) -> Awaitable[Any]:
        if self._pipeline is None:
            return script(keys=keys, args=args)
        return self._pipeline.evalsha(script, keys, args)

    async def _call(self, send: Callable[[], Awaitable[T]]) -> T:
        """Run one Redis call through the gate and within the wire deadline; every failure becomes StoreError.

        A failure on the wire is uncertain (Redis may have run the call); StoreOverloaded from the gate is not.
        """
        async with self._gate:
            try:
                async with Deadline(self._wire_timeout_s, self._lag):
                    result = await send()
            except ResponseError as exc:
                if not _is_script_error(exc):
                    self._healthy = False  # e.g. OOM or READONLY: Redis cannot serve us
                    raise StoreError(f"redis: {type(exc).__name__}") from exc
                log.error("metering script failed (a bug; nothing was written): %s", exc)
                raise StoreScriptError(f"redis script: {exc}") from exc
            except (RedisError, OSError, TimeoutError) as exc:
                self._healthy = False
                raise StoreError(f"redis: {type(exc).__name__}") from exc
        self._healthy = True
        return result


def _is_script_error(exc: ResponseError) -> bool:
    """An error raised inside a script (Redis names the script in the message), as opposed to a refusal."""
    return "user_script" in str(exc)


def _fixed_keys(req: AdmitRequest) -> list[str]:
    """Ticket, lease, ledger, holds; absent parts reuse the ticket key (same slot, never touched)."""
    placeholder = req.ticket_key
    return [
        req.ticket_key,
        req.lease.key if req.lease else placeholder,
        req.credits.ledger_key if req.credits else placeholder,
        req.credits.holds_key if req.credits else placeholder,
    ]


def _ledger_args(lg: LedgerSpec | None, now_ms: int) -> list[int | str]:
    """The usage ledger's block of ARGV (lua.LEDGER_ARGS): where records and aggregates go, and who for."""
    if lg is None:
        return [0, "", "", 0, 1, 0, 1, "", "", "", "", ""]
    return [
        1, lg.prefix, day_of(now_ms), usage_expiry(now_ms, lg.retention_ms), lg.max_records,
        max(0, now_ms - lg.retention_ms), lg.retention_ms, lg.request_id, lg.account, lg.key_id, lg.user, lg.model,
    ]


def _alert_args(credits: CreditSpec | None) -> list[int | str]:
    """The budget alerts' block of the settle's ARGV (lua.ALERT_ARGS)."""
    alerts = credits.alerts if credits else None
    if credits is None or alerts is None or not alerts.levels:
        return ["", "", 1, 0]
    levels = ",".join(f"{points}:{amount}" for points, amount in alerts.levels)
    return [alerts.budget_id, levels, alerts.keep_ms, credits.budget]


def _record(stream: str, eid: bytes, fields: dict[bytes, bytes]) -> LedgerRecord:
    return LedgerRecord(stream, eid.decode(), {name.decode(): value.decode() for name, value in fields.items()})


def _settle_call(
    req: AdmitRequest, amount: int, tokens: int, now_ms: int, usage: CallUsage, outcome: str = ""
) -> tuple[list[str], list[int | str]]:
    """KEYS and ARGV of the settle script (and of cancel, which settles at 0 with outcome `cancelled`)."""
    token_limits = [spec for spec in req.limits if spec.tokens]
    credits = req.credits
    args: list[int | str] = [
        now_ms,
        req.reservation_id,
        amount,
        int(req.lease is not None),
        int(credits is not None),
        credits.expire_at_ms if credits else 0,
        *_ledger_args(req.ledger, now_ms),
        outcome or usage.outcome, usage.provider, usage.deployment, usage.tokens_in, usage.tokens_out,
        usage.images, usage.seconds_ms, *_alert_args(credits),
    ]
    for spec in token_limits:
        step = Step.of(tokens - req.estimated_tokens, spec.window_ms, spec.limit)
        args += [spec.limit, step.whole, step.rem]
    return [*_fixed_keys(req), *(spec.key for spec in token_limits)], args


def _parse_admit(req: AdmitRequest, reply: Sequence[int], *, dry: bool) -> AdmitResult:
    allowed, kind, index, retry, in_flight, spent, held = (int(v) for v in reply[:7])
    if kind == _CANCELLED:
        raise AdmitCancelled()
    tats = [None if int(ms) < 0 else (int(ms), int(num)) for ms, num in zip(reply[7::2], reply[8::2])]
    states = limit_states(req, tats)
    balance = Balance(req.credits.budget, spent, held) if req.credits else None
    denial = None
    if kind:
        retry_after = retry if kind == 1 and retry >= 0 else None
        denial = Denial(_DENIALS[kind], index, retry_after)
    reservation = Reservation(req) if allowed and not dry else None
    return AdmitResult(bool(allowed), states, in_flight, balance, denial, reservation)
