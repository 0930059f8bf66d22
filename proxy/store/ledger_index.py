"""The index of active ledger streams, so that exporters read only the accounts with new records.

An account's stream lives in its own Redis Cluster slot, so the script that appends a record cannot also write a
shared index (another slot). Instead each gateway process notes which accounts' streams its store calls may have
appended to (a settle, a cancel, or an admit that charged expired holds) and, every FLUSH_INTERVAL_S, adds them
to one sorted set per key prefix, `<prefix>:lgix` (member: the stream, score: the flush time in ms), in one call
off the hot path. The score is taken after the records were written, so an exporter that asks for the streams
marked since its last round (less a slack for clocks) finds every stream written meanwhile. A process that dies
before its flush loses its last marks: exporters also scan all streams now and then (docs/usage.md, "Exporters").
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable

from proxy.store.base import LedgerSpec, StoreError
from proxy.store.ledger import stream_key

log = logging.getLogger(__name__)

FLUSH_INTERVAL_S = 1.0

# index key, {stream: score ms}, scores below this ms are dropped (older than the ledger's retention)
IndexWrite = Callable[[str, dict[str, int], int], Awaitable[None]]


def index_key(prefix: str = "ep") -> str:
    """The index of the ledger streams under a key prefix (the meter's, without an account)."""
    return f"{prefix}:lgix"


def _index_of(stream: str) -> str:
    """`ep:{acme}:lg` -> `ep:lgix`."""
    return index_key(stream.partition(":{")[0])


class LedgerIndexer:
    def __init__(self, write: IndexWrite) -> None:
        self._write = write
        self._noted: dict[str, int] = {}  # stream -> its ledger's retention, ms
        self._task: asyncio.Task[None] | None = None

    def note(self, spec: LedgerSpec | None) -> None:
        """Remember that a store call may have appended to this ledger (a dict write; the flush does the I/O)."""
        if spec is None:
            return
        self._noted[stream_key(spec.prefix)] = spec.retention_ms
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._flush_every_interval())

    async def flush(self) -> None:
        noted, self._noted = self._noted, {}
        now_ms = int(time.time() * 1000)
        by_index: dict[str, dict[str, int]] = {}
        for stream in noted:
            by_index.setdefault(_index_of(stream), {})[stream] = now_ms
        for index, streams in by_index.items():
            oldest = now_ms - max(noted[stream] for stream in streams)
            try:
                await self._write(index, streams, oldest)
            except (StoreError, asyncio.CancelledError) as exc:
                for stream in streams:  # marked at the next flush (or the final one, at close)
                    self._noted.setdefault(stream, noted[stream])
                if isinstance(exc, asyncio.CancelledError):
                    raise
                log.debug("ledger index not written (%s); retrying at the next flush", exc)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._noted:
            await self.flush()

    async def _flush_every_interval(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_S)
            if self._noted:
                await self.flush()
