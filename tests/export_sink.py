"""A receiver of the ledger exporter's HTTP sink on loopback: checks each batch's signature as docs/usage.md tells
receivers to, keeps every record it accepted (duplicates included), and can be told to fail or to hang."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from aiohttp import web

from proxy.export.signature import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify

SECRET = "s3cret-for-the-export-tests-0123456789"


class ExportReceiver:
    def __init__(self, secret: str = SECRET) -> None:
        self.secret = secret.encode()
        self.records: list[dict[str, Any]] = []  # every record of every accepted batch, in arrival order
        self.batches = 0
        self.refused = 0  # batches answered 401 (bad signature)
        self.fail_next = 0  # answer this many batches 503
        self.fail_body = b'{"error": "down"}'
        self.hang_after: int | None = None  # after this many accepted batches, keep the next ones but never answer
        self.hung = asyncio.Event()
        self._release = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self, port: int = 0) -> ExportReceiver:
        app = web.Application()
        app.router.add_post("/ingest", self._ingest)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        bound = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{bound}/ingest"
        return self

    async def stop(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()

    def unique_ids(self) -> set[str]:
        return {record["id"] for record in self.records}

    async def _ingest(self, request: web.Request) -> web.Response:
        body = await request.read()
        signed = verify(self.secret, request.headers.get(TIMESTAMP_HEADER, ""),
                        request.headers.get(SIGNATURE_HEADER, ""), body, time.time())
        if not signed:
            self.refused += 1
            return web.json_response({"error": "bad signature"}, status=401)
        if self.fail_next:
            self.fail_next -= 1
            return web.Response(body=self.fail_body, status=503)
        records = [json.loads(line) for line in body.decode().splitlines()]
        self.records += records  # kept before the answer: a sink that stored the batch and then lost the reply
        if self.hang_after is not None and self.batches >= self.hang_after:
            self.hung.set()
            await self._release.wait()
        self.batches += 1
        return web.json_response({"accepted": len(records)})
