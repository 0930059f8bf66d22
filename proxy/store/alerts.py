"""The budget alerts' outbox: one stream per account (`<prefix>:al`, the account's hash tag, so the settle script
that claims an alert appends it in the same atomic step), drained by every replica's AlertDelivery
(proxy/alerts.py) through one consumer group; `_Outbox` is MemoryStore's equivalent.

At least once: an entry stays pending to the consumer that read it until acknowledged (delivered or given up);
another consumer takes it over once it has been idle `min_idle_ms` (its reader died). Acknowledged entries are
deleted, and an empty outbox with them, so the streams that exist are those with alerts to deliver.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Protocol

GROUP = "alerts"
MAX_PER_ACCOUNT = 10_000  # outbox entries kept per account (approximate in Redis: MAXLEN ~)

# An outbox entry's fields, in the order both stores write them; every value is a string.
ALERT_FIELDS = (
    "id", "ts", "account", "budget", "threshold_bp", "budget_micro", "spent_micro", "key", "user", "request_id",
)


def outbox_key(prefix: str) -> str:
    return f"{prefix}:al"


@dataclass(frozen=True)
class OutboxEntry:
    """One alert as read back: its outbox, its stream id and its fields (none if trimmed before it was read)."""

    stream: str
    id: str
    fields: dict[str, str]


class FreshAlerts:
    """Outboxes this process's settles appended to, and how many alerts they claimed: the delivery loop reads them
    at once instead of waiting for its next sweep, and counts each alert fired once (by the replica that claimed
    it)."""

    def __init__(self) -> None:
        self._streams: set[str] = set()
        self._fired = 0
        self._event = asyncio.Event()

    def note(self, stream: str, fired: int) -> None:
        self._streams.add(stream)
        self._fired += fired
        self._event.set()

    async def wait(self, timeout_s: float) -> tuple[set[str], int]:
        """The outboxes noted since the last call and the alerts claimed, waiting up to `timeout_s` for one."""
        try:
            await asyncio.wait_for(self._event.wait(), timeout_s)
        except asyncio.TimeoutError:
            pass
        self._event.clear()
        streams, fired, self._streams, self._fired = self._streams, self._fired, set(), 0
        return streams, fired


class AlertOutbox(Protocol):
    """What AlertDelivery reads the outboxes through (both stores, and ResilientStore)."""

    @property
    def fresh_alerts(self) -> FreshAlerts:
        ...

    async def alert_streams(self, prefix: str = "ep") -> list[str]:
        """The outboxes that hold alerts now."""
        ...

    async def read_alerts(self, stream: str, consumer: str, count: int, min_idle_ms: int) -> list[OutboxEntry]:
        """Up to `count` entries for `consumer`: those pending to it, those pending to another consumer for at least
        `min_idle_ms` (taken over), and new ones."""
        ...

    async def ack_alerts(self, stream: str, ids: list[str]) -> None:
        """Delete delivered (or given up) entries; the outbox goes once empty."""
        ...


@dataclass
class _Outbox:
    """MemoryStore's outbox of one account: entries by id, and who read each one when."""

    entries: dict[tuple[int, int], dict[str, str]] = field(default_factory=dict)
    pending: dict[tuple[int, int], tuple[str, int]] = field(default_factory=dict)  # id -> (consumer, read at ms)
    last: tuple[int, int] = (0, 0)

    def add(self, now_ms: int, fields: dict[str, str]) -> None:
        ms = max(now_ms, self.last[0])
        self.last = (ms, self.last[1] + 1 if ms == self.last[0] else 0)
        self.entries[self.last] = fields
        while len(self.entries) > MAX_PER_ACCOUNT:
            oldest = next(iter(self.entries))
            del self.entries[oldest]
            self.pending.pop(oldest, None)

    def read(self, consumer: str, count: int, min_idle_ms: int, now_ms: int) -> list[tuple[str, dict[str, str]]]:
        mine = [eid for eid, (owner, read_at) in self.pending.items()
                if owner == consumer or now_ms - read_at >= min_idle_ms]
        fresh = [eid for eid in self.entries if eid not in self.pending]
        taken = sorted(mine + fresh)[:count]
        for eid in taken:
            self.pending[eid] = (consumer, now_ms)
        return [(f"{eid[0]}-{eid[1]}", self.entries[eid]) for eid in taken]

    def ack(self, ids: list[tuple[int, int]]) -> None:
        for eid in ids:
            self.entries.pop(eid, None)
            self.pending.pop(eid, None)
