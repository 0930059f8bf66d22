"""Where exported ledger records go: a JSON-lines file (or stdout), or an HTTP endpoint with a signed body.

A sink takes one batch as JSON lines (one record per line, `encode`) and returns only once the batch is
durable there; anything else raises SinkError and the exporter sends the same batch again later.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Iterable, Protocol

import aiohttp

from proxy.export.signature import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign
from proxy.store.ledger import RECORD_FIELDS, LedgerRecord

# Record fields written as JSON integers (the stream keeps every value as a string).
INTEGER_FIELDS = frozenset(("ts", "tokens_in", "tokens_out", "images", "seconds_ms", "credits", "reserved", "late"))
INTEGER = re.compile(r"-?[0-9]{1,19}")


class SinkError(Exception):
    """The sink did not confirm the batch; it may or may not have kept it (hence the record ids)."""


class Sink(Protocol):
    async def send(self, body: bytes) -> None:
        """Deliver one batch of JSON lines; return only once the sink has it, else raise SinkError."""
        ...

    async def close(self) -> None: ...


def encode(records: Iterable[LedgerRecord]) -> bytes:
    """One JSON object per line, fields in the ledger's order, numbers as integers, plus the record's stream id.

    A field a record lacks is "" and a number that is not one stays a string: the record still reaches the sink
    as it is in the ledger, instead of stopping the export or being made up."""
    lines = []
    for record in records:
        row: dict[str, str | int] = {}
        for name in RECORD_FIELDS:
            value = record.fields.get(name, "")
            row[name] = int(value) if name in INTEGER_FIELDS and INTEGER.fullmatch(value) else value
        row["stream_id"] = record.id
        lines.append(json.dumps(row, separators=(",", ":"), ensure_ascii=False) + "\n")
    return "".join(lines).encode()


class JsonlSink:
    """Appends to a file, opened per batch (a file renamed away by rotation is not written to again) and fsynced
    before the batch counts as delivered; or writes to stdout."""

    def __init__(self, path: Path | None) -> None:
        self._path = path

    async def send(self, body: bytes) -> None:
        try:
            await asyncio.to_thread(self._write, body)  # a slow disk must not stall the event loop
        except OSError as exc:
            raise SinkError(f"{self._path}: {exc.strerror or exc}") from exc

    def _write(self, body: bytes) -> None:
        if self._path is None:
            sys.stdout.buffer.write(body)
            sys.stdout.buffer.flush()
            return
        with open(self._path, "ab") as file:
            file.write(body)
            file.flush()
            os.fsync(file.fileno())

    async def close(self) -> None:
        """Nothing stays open between batches."""


class HttpSink:
    """POSTs each batch as `application/x-ndjson`, signed (signature.py); any 2xx confirms it."""

    def __init__(self, url: str, secret: bytes, timeout_s: float) -> None:
        self._url = url
        self._secret = secret
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def send(self, body: bytes) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        timestamp = int(time.time())
        headers = {
            "Content-Type": "application/x-ndjson",
            TIMESTAMP_HEADER: str(timestamp),
            SIGNATURE_HEADER: sign(self._secret, timestamp, body),
        }
        try:
            async with self._session.post(self._url, data=body, headers=headers, allow_redirects=False) as response:
                if not 200 <= response.status < 300:  # the start of its answer is enough to log, whatever its size
                    raise SinkError(f"HTTP {response.status}: {await response.content.read(200)!r}")
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise SinkError(f"{type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
