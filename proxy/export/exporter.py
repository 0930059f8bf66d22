"""The drain loop: every account's ledger stream, through one consumer group, into a sink, at least once.

Each round reads up to `batch_size` records across the streams (this consumer's own unacknowledged records first
after a start, then records another consumer left unacknowledged for `claim_idle_s`, then new ones), sends them
to the sink as one batch, and acknowledges them only once the sink confirmed. A sink that fails gets the same
batch again, with capped exponential backoff, until it takes it or the exporter is stopped; whatever is not
acknowledged when an exporter dies is redelivered. Streams are found by SCAN every `discover_interval_s`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass

from proxy.export.sinks import Sink, SinkError, encode
from proxy.store.base import StoreError
from proxy.store.ledger import LedgerReader, LedgerRecord

log = logging.getLogger("proxy.export")

FIRST_BACKOFF_S = 0.1


@dataclass(frozen=True)
class ExportSettings:
    group: str = "export"
    consumer: str = "exporter"
    prefix: str = "ep"  # the meter's key prefix
    batch_size: int = 500
    poll_interval_s: float = 1.0  # between rounds that found nothing
    discover_interval_s: float = 30.0  # between SCANs for streams of new accounts
    claim_idle_s: float = 60.0  # another consumer's unacknowledged records are taken over after this long
    max_backoff_s: float = 30.0  # cap of the wait between two tries of a batch the sink or the store refused


@dataclass
class ExportCounts:
    exported: int = 0  # records the sink confirmed (a redelivered record counts again)
    batches: int = 0
    failures: int = 0  # tries of a batch that failed (sink or store)
    lost: int = 0  # records trimmed from the ledger before they could be exported


class _Stopped(Exception):
    """Stopped while a batch was waiting for the sink: it stays unacknowledged, for the next run."""


class Exporter:
    def __init__(self, reader: LedgerReader, sink: Sink, settings: ExportSettings) -> None:
        self._reader = reader
        self._sink = sink
        self._settings = settings
        self._stop = asyncio.Event()
        self._streams: list[str] = []
        self.counts = ExportCounts()

    def stop(self) -> None:
        """Finish the batch in hand if the sink has confirmed it, then return from `run`."""
        self._stop.set()

    async def run(self, *, once: bool = False) -> ExportCounts:
        """Export until stopped; with `once`, until a round finds nothing left (own, claimable or new)."""
        settings = self._settings
        next_discovery = next_claim = 0.0
        first = True
        while not self._stop.is_set():
            try:
                now = time.monotonic()
                if now >= next_discovery:
                    self._streams = await self._reader.ledger_streams(settings.prefix)
                    next_discovery = now + settings.discover_interval_s
                claim = now >= next_claim
                found = await self._round(own_pending=first, claim=claim)
                if claim:  # an abandoned record waits at most 1.5 x claim_idle_s
                    next_claim = now + max(settings.poll_interval_s, settings.claim_idle_s / 2)
            except _Stopped:
                break
            except StoreError as exc:  # what was read and not acknowledged is claimed again after claim_idle_s
                self.counts.failures += 1
                log.warning("ledger export: the store failed (%s); retrying", exc)
                await self._pause(settings.poll_interval_s)
                continue
            first = False
            if once and not found:
                break
            if not found:
                await self._pause(self._settings.poll_interval_s)
        return self.counts

    async def _round(self, *, own_pending: bool, claim: bool) -> int:
        """Read every stream once, delivering a batch whenever one is full; returns how many were delivered."""
        settings = self._settings
        batch: list[LedgerRecord] = []
        delivered = 0
        for stream in self._streams:
            if own_pending:  # what this consumer (same name) had been given before it stopped
                while mine := await self._reader.read_ledger_group(
                    stream, settings.group, settings.consumer, settings.batch_size, pending=True
                ):
                    delivered += await self._deliver(mine)
            if claim:
                batch += await self._reader.claim_ledger(
                    stream, settings.group, settings.consumer, int(settings.claim_idle_s * 1000),
                    settings.batch_size - len(batch),
                )
            if room := settings.batch_size - len(batch):
                batch += await self._reader.read_ledger_group(stream, settings.group, settings.consumer, room)
            if len(batch) >= settings.batch_size:
                delivered += await self._deliver(batch)
                batch = []
        if batch:
            delivered += await self._deliver(batch)
        return delivered

    async def _deliver(self, records: list[LedgerRecord]) -> int:
        """Send until the sink confirms (or the exporter stops: the records stay pending), then acknowledge."""
        kept = [record for record in records if record.fields]
        if len(kept) < len(records):
            self.counts.lost += len(records) - len(kept)
            log.error("ledger export: %d records were trimmed from the ledger before they were exported "
                      "(store.usage_retention_days / usage_max_records; export faster)", len(records) - len(kept))
        body = encode(kept)
        backoff = FIRST_BACKOFF_S
        while kept:
            try:
                await self._sink.send(body)
                break
            except SinkError as exc:
                self.counts.failures += 1
                log.warning("ledger export: the sink refused %d records (%s); retrying in %.1f s",
                            len(kept), exc, backoff)
            if await self._pause(backoff * random.uniform(0.5, 1.0)):  # jitter: exporters do not retry in step
                raise _Stopped()
            backoff = min(backoff * 2, self._settings.max_backoff_s)
        await self._ack(records)
        if kept:
            self.counts.exported += len(kept)
            self.counts.batches += 1
            lag_ms = int(time.time() * 1000) - min(int(record.fields["ts"]) for record in kept)
            log.info("ledger export: %d records delivered (oldest %d ms old)", len(kept), lag_ms)
        return len(kept)

    async def _ack(self, records: list[LedgerRecord]) -> None:
        by_stream: dict[str, list[str]] = {}
        for record in records:
            by_stream.setdefault(record.stream, []).append(record.id)
        for stream, ids in by_stream.items():
            await self._reader.ack_ledger(stream, self._settings.group, ids)

    async def _pause(self, seconds: float) -> bool:
        """Wait `seconds`, or less if stopped; True if stopped."""
        try:
            await asyncio.wait_for(self._stop.wait(), seconds)
        except asyncio.TimeoutError:
            return False
        return True
