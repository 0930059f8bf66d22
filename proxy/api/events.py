"""The event stream of `POST /v1/responses`: named SSE events, each carrying the call's `request_id`."""

from __future__ import annotations

import json
from typing import Any, Mapping

from aiohttp import web

from ..upstream import sse
from ..upstream.relay import RelayOutcome


class EventStream:
    """The client's event stream; `events_out` counts what was sent."""

    def __init__(self, response: web.StreamResponse, outcome: RelayOutcome, request_id: str) -> None:
        self.response = response
        self._outcome = outcome
        self._request_id = request_id

    @classmethod
    async def open(
        cls, request: web.Request, headers: Mapping[str, str], outcome: RelayOutcome, request_id: str
    ) -> "EventStream":
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers,
        })
        await response.prepare(request)
        return cls(response, outcome, request_id)

    async def send(self, event: str, data: dict[str, Any]) -> None:
        payload = json.dumps({"request_id": self._request_id, **data}, separators=(",", ":"))
        await self.response.write(f"event: {event}\ndata: {payload}\n\n".encode())
        self._outcome.events_out += 1

    async def ping(self) -> None:
        await self.response.write(sse.comment("ping"))
