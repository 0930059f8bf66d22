"""The drain loop: every account's ledger stream, through one consumer group, into a sink, at least once.

Each round reads up to `batch_size` records across the streams (this consumer's own unacknowledged records first
after a start, then records another consumer left unacknowledged for `claim_idle_s`, then new ones), sends them
to the sink as one batch, and acknowledges them only once the sink confirmed. A sink that fails gets the same
batch again, with capped exponential backoff, until it takes it or the exporter is stopped; whatever is not
acknowledged when an exporter dies is redelivered.

Which streams a round reads: all of them (SCAN) at the start and every `discover_interval_s`; in between, only
those the gateways' index (proxy/store/ledger_index.py) marked since the last round, and those the last round did
not drain, so a round costs in proportion to the accounts with new records, not to all accounts.
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
# Streams marked in the index up to this long before the last round are read again: the gateways' clocks (which
# score the index) may run behind the exporter's, and a mark lands a little after its score was taken.
INDEX_SLACK_MS = 10_000


@dataclass(frozen=True)
class ExportSettings:
    group: str = "export"
    consumer: str = "exporter"
    prefix: str = "ep"  # the meter's key prefix
    batch_size: int = 500
    poll_interval_s: float = 1.0  # between rounds that found nothing
    discover_interval_s: float = 300.0  # between full SCANs (rounds in between read the gateways' index)
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
        self.counts = ExportCounts()

    def stop(self) -> None:
        """Finish the batch in hand if the sink has confirmed it, then return from `run`."""
        self._stop.set()

    async def run(self, *, once: bool = False) -> ExportCounts:
        """Export until stopped; with `once`, until a round finds nothing left (own, claimable or new)."""
        settings = self._settings
        next_scan = next_claim = 0.0
        since_ms = 0
        backlog: set[str] = set()
        first = True
        while not self._stop.is_set():
            now, round_ms = time.monotonic(), int(time.time() * 1000)
            try:
                if now >= next_scan:  # every stream; also those a gateway that died never put in the index
                    streams = await self._reader.ledger_streams(settings.prefix)
                    next_scan = now + settings.discover_interval_s
                    claim = True
                else:  # those with new records since the last round, and those not drained by it
                    active = await self._reader.active_ledger_streams(since_ms - INDEX_SLACK_MS, settings.prefix)
                    streams = sorted(backlog.union(active))
                    claim = now >= next_claim
                found, backlog = await self._round(streams, own_pending=first, claim=claim)
            except _Stopped:
                break
            except StoreError as exc:  # what was read and not acknowledged is claimed again after claim_idle_s
                self.counts.failures += 1
                log.warning("ledger export: the store failed (%s); retrying", exc)
                next_scan = 0.0
                await self._pause(settings.poll_interval_s)
                continue
            if claim:
                next_claim = now + max(settings.poll_interval_s, settings.claim_idle_s / 2)
            since_ms, first = round_ms, False
            if once and not found:
                break
            if not found:
                await self._pause(self._settings.poll_interval_s)
        return self.counts

    async def _round(self, streams: list[str], *, own_pending: bool, claim: bool) -> tuple[int, set[str]]:
        """Read each stream once, delivering a batch whenever one is full; returns how many records were delivered
        and the streams that may have more."""
        settings = self._settings
        batch: list[LedgerRecord] = []
        delivered = 0
        more: set[str] = set()
        for stream in streams:
            if own_pending:  # what this consumer (same name) had been given before it stopped
                while mine := await self._reader.read_ledger_group(
                    stream, settings.group, settings.consumer, settings.batch_size, pending=True
                ):
                    delivered += await self._deliver(mine)
            if claim:
                room = settings.batch_size - len(batch)
                claimed = await self._reader.claim_ledger(
                    stream, settings.group, settings.consumer, int(settings.claim_idle_s * 1000), room
                )
                batch += claimed
                if len(claimed) == room:
                    more.add(stream)
            if room := settings.batch_size - len(batch):
                fresh = await self._reader.read_ledger_group(stream, settings.group, settings.consumer, room)
                batch += fresh
                if len(fresh) == room:
                    more.add(stream)
            else:
                more.add(stream)
            if len(batch) >= settings.batch_size:
                delivered += await self._deliver(batch)
                batch = []
        if batch:
            delivered += await self._deliver(batch)
        return delivered, more

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
