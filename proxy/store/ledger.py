"""The usage ledger's layout and its reader interface (docs/usage.md).

Per account (one hash tag, so one Redis Cluster slot): a stream of records `<prefix>:lg`, and daily aggregates
`<prefix>:us:a:<YYYYMMDD>` (the account, by model) and `<prefix>:us:u:<user>:<YYYYMMDD>` (one user, by model),
whose fields are `<metric>:<model>`. The settle script (lua.py) and MemoryStore write them the same way; the
`_Stream` below is MemoryStore's stream, with the Redis semantics exporters rely on (ids, trimming, groups).
"""

from __future__ import annotations

import functools
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Protocol

DAY_MS = 86_400_000

# The aggregated metrics, in the order of the API's JSON; every record adds to each (calls: 1 per call charged).
METRICS = ("calls", "credits", "tokens_in", "tokens_out", "images", "seconds_ms")

# A record's fields, in the order both stores write them; every value is a string (integers in plain digits).
RECORD_FIELDS = (
    "id", "request_id", "ts", "account", "key", "user", "model", "provider", "deployment",
    "tokens_in", "tokens_out", "images", "seconds_ms", "credits", "reserved", "outcome", "late", "reason", "actor",
)
# The outcomes of a balance changed by an admin (no call): recorded, but not usage, so not in the aggregates.
ADJUSTMENTS = ("topup", "adjustment")


def stream_key(prefix: str) -> str:
    return f"{prefix}:lg"


def account_usage_key(prefix: str, day: str) -> str:
    return f"{prefix}:us:a:{day}"


def user_usage_key(prefix: str, user: str, day: str) -> str:
    return f"{prefix}:us:u:{user}:{day}"


def day_of(now_ms: int) -> str:
    """The UTC day of a clock reading, as in the aggregate keys: YYYYMMDD."""
    return _day_label(now_ms // DAY_MS)


@functools.lru_cache(maxsize=4)
def _day_label(day: int) -> str:
    """Formatted once a day, not on every settle (a datetime and strftime: ~6 µs)."""
    return datetime.fromtimestamp(day * DAY_MS / 1000, timezone.utc).strftime("%Y%m%d")


def usage_expiry(now_ms: int, retention_ms: int) -> int:
    """When the aggregates of `now_ms`'s day may vanish: the end of that day plus the retention."""
    return (now_ms // DAY_MS + 1) * DAY_MS + retention_ms


@dataclass(frozen=True)
class LedgerRecord:
    """One record as read back: the stream it came from, its stream id (ordered), and its fields."""

    stream: str
    id: str
    fields: dict[str, str]


class LedgerReader(Protocol):
    """What exporters read the ledger through (both stores). At-least-once: read with a consumer group, deliver,
    then ack; a consumer that dies before its ack gets its records again with `pending=True`. Records carry an
    idempotent `id` field (the reservation, `:expired` for a hold charged at expiry) for the sink to dedupe."""

    async def ledger_streams(self, prefix: str = "ep") -> list[str]:
        """The ledger streams that exist now (one per account that has records) under the meter's key prefix."""
        ...

    async def active_ledger_streams(self, since_ms: int, prefix: str = "ep") -> list[str]:
        """The streams appended to since `since_ms` (ms since the epoch, by the gateways' clocks), as far as the
        gateways' index knows (ledger_index.py); `ledger_streams` finds the rest."""
        ...

    async def read_ledger(self, stream: str, after: str = "0-0", count: int = 100) -> list[LedgerRecord]:
        """Up to `count` records of `stream` with ids after `after`, oldest first."""
        ...

    async def read_ledger_group(
        self, stream: str, group: str, consumer: str, count: int = 100, *, pending: bool = False
    ) -> list[LedgerRecord]:
        """Up to `count` records for `consumer` of `group` (created at the stream's start if new): new ones, or,
        with `pending`, those delivered to this consumer and not acknowledged yet."""
        ...

    async def claim_ledger(
        self, stream: str, group: str, consumer: str, min_idle_ms: int, count: int = 100
    ) -> list[LedgerRecord]:
        """Take over up to `count` records of `group` delivered to any consumer at least `min_idle_ms` ago and not
        acknowledged (a consumer that died): they become `consumer`'s, delivered now. A record trimmed meanwhile
        comes back without fields and is no longer pending."""
        ...

    async def ack_ledger(self, stream: str, group: str, ids: list[str]) -> int:
        """Acknowledge delivered records; returns how many were pending."""
        ...

    async def read_usage(self, keys: list[str]) -> list[dict[str, str]]:
        """The daily aggregate hashes under `keys` (absent ones empty), in one round trip."""
        ...


@dataclass
class _Group:
    last: tuple[int, int] = (0, 0)
    pending: dict[tuple[int, int], tuple[str, float]] = field(default_factory=dict)  # id -> consumer, delivered at


class _Stream:
    """An append-only stream with Redis's ids (`ms-seq`, strictly increasing), trimming and consumer groups."""

    def __init__(self) -> None:
        self.entries: deque[tuple[tuple[int, int], dict[str, str]]] = deque()
        self.groups: dict[str, _Group] = {}
        self._last = (0, 0)

    @property
    def last_ms(self) -> int:
        """When the last record was appended (its id's time)."""
        return self._last[0]

    def add(self, now_ms: int, fields: dict[str, str], max_len: int, min_ms: int) -> str:
        ms = max(now_ms, self._last[0])
        self._last = (ms, self._last[1] + 1 if ms == self._last[0] else 0)
        self.entries.append((self._last, fields))
        while len(self.entries) > max_len or (self.entries and self.entries[0][0][0] < min_ms):
            self.entries.popleft()
        return _format(self._last)

    def after(self, after: tuple[int, int], count: int) -> list[tuple[tuple[int, int], dict[str, str]]]:
        return [entry for entry in self.entries if entry[0] > after][:count]

    def read_group(self, group: str, consumer: str, count: int, pending: bool) -> list[tuple[str, dict[str, str]]]:
        state = self.groups.setdefault(group, _Group())
        if pending:
            mine = sorted(eid for eid, (owner, _) in state.pending.items() if owner == consumer)[:count]
            present, now = dict(self.entries), time.monotonic()
            for eid in mine:  # delivered again now: not idle (as in Redis)
                state.pending[eid] = (consumer, now)
            return [(_format(eid), present.get(eid, {})) for eid in mine]  # trimmed: no fields, as in Redis
        fresh = self.after(state.last, count)
        delivered = time.monotonic()
        for eid, _ in fresh:
            state.pending[eid] = (consumer, delivered)
        if fresh:
            state.last = fresh[-1][0]
        return [(_format(eid), fields) for eid, fields in fresh]

    def claim(self, group: str, consumer: str, min_idle_ms: int, count: int) -> list[tuple[str, dict[str, str]]]:
        """XAUTOCLAIM from the start: idle pending records become `consumer`'s; trimmed ones leave the pending list."""
        state = self.groups.get(group)
        if state is None:
            return []
        now = time.monotonic()
        idle = sorted(eid for eid, (_, at) in state.pending.items() if (now - at) * 1000 >= min_idle_ms)[:count]
        present = dict(self.entries)
        for eid in idle:
            if eid in present:
                state.pending[eid] = (consumer, now)
            else:
                del state.pending[eid]
        return [(_format(eid), present.get(eid, {})) for eid in idle]

    def ack(self, group: str, ids: list[str]) -> int:
        state = self.groups.get(group)
        if state is None:
            return 0
        return sum(1 for eid in {parse_id(i) for i in ids} if state.pending.pop(eid, None) is not None)


def parse_id(text: str) -> tuple[int, int]:
    """A stream id `ms-seq` (or `ms`); ValueError if it is not one."""
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def _format(eid: tuple[int, int]) -> str:
    return f"{eid[0]}-{eid[1]}"
