"""A stand-in for Anthropic's Messages API on loopback, speaking its wire format exactly, scriptable per test.

`POST /v1/messages` answers a message as JSON or, with `"stream": true`, as named SSE events in the API's
order: message_start (input usage, output 1), content_block_start, ping, content_block_delta..., content_block_stop,
message_delta (cumulative output usage), message_stop. `POST /v1/messages/count_tokens` answers
`{"input_tokens": n}`. Errors are `{"type": "error", "error": {"type", "message"}}` with the API's statuses (a
request without `anthropic-version` is refused like the real API does). What it received is recorded.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from .mock_provider import LoopbackMock, Route
# What the mock reports by default: cache writes and reads count as input for the gateway.
USAGE = {"input_tokens": 21, "cache_creation_input_tokens": 5, "cache_read_input_tokens": 3, "output_tokens": 9}
COUNTED_TOKENS = 14


def event(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


def error_body(kind: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": message}}


def error_response(status: int, kind: str, message: str, **headers: str) -> web.Response:
    return web.json_response(error_body(kind, message), status=status, headers={"request-id": "req_mock", **headers})


def message(model: str, texts: tuple[str, ...], usage: dict[str, int]) -> dict[str, Any]:
    return {
        "id": "msg_mock", "type": "message", "role": "assistant", "model": model,
        "content": [{"type": "text", "text": "".join(texts)}], "stop_reason": "end_turn", "stop_sequence": None,
        "usage": usage,
    }


def start_events(model: str, usage: dict[str, int]) -> list[bytes]:
    """Everything before the first text delta."""
    started = {**message(model, (), {**usage, "output_tokens": 1}), "content": [], "stop_reason": None}
    return [
        event("message_start", {"type": "message_start", "message": started}),
        event("content_block_start", {"type": "content_block_start", "index": 0,
                                       "content_block": {"type": "text", "text": ""}}),
        event("ping", {"type": "ping"}),
    ]


def delta_event(text: str) -> bytes:
    return event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                         "delta": {"type": "text_delta", "text": text}})


def end_events(usage: dict[str, int]) -> list[bytes]:
    return [
        event("content_block_stop", {"type": "content_block_stop", "index": 0}),
        event("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                "usage": {"output_tokens": usage["output_tokens"]}}),
        event("message_stop", {"type": "message_stop"}),
    ]


def stream_events(model: str, texts: tuple[str, ...], usage: dict[str, int]) -> list[bytes]:
    return [*start_events(model, usage), *(delta_event(t) for t in texts), *end_events(usage)]


async def open_stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                           "Cache-Control": "no-cache", "request-id": "req_mock"})
    await response.prepare(request)
    return response


async def cut_after_two_deltas(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
    """A stream whose connection breaks after two text deltas (no message_delta: no final usage)."""
    response = await open_stream(request)
    for raw in (*start_events(body["model"], USAGE), delta_event("one"), delta_event("two")):
        await response.write(raw)
    await asyncio.sleep(0.1)
    assert request.transport is not None
    request.transport.close()  # the provider's connection breaks mid-stream
    return response


def endless(closed: asyncio.Event) -> Handler:
    """A stream of deltas that never ends; `closed` is set once the gateway hangs up on it."""

    async def answer(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        response = await open_stream(request)
        try:
            for raw in start_events(body["model"], USAGE):
                await response.write(raw)
            while True:
                await response.write(delta_event("tick"))
                await asyncio.sleep(0.05)
        except (asyncio.CancelledError, ConnectionResetError):
            closed.set()
            raise

    return answer


@dataclass
class MockAnthropic(LoopbackMock):
    texts: tuple[str, ...] = ("Hello", " from", " Claude")
    usage: dict[str, int] = field(default_factory=lambda: dict(USAGE))

    def routes(self) -> dict[str, Route]:
        # `handler` replaces the default answer of /v1/messages
        return {"/v1/messages": self._messages, "/v1/messages/count_tokens": self._count_tokens}

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        body = await self.record(request)
        if "anthropic-version" not in request.headers:
            return error_response(400, "invalid_request_error", "anthropic-version: header is required")
        if self.handler is not None:
            return await self.handler(request, body)
        if not body.get("stream"):
            return web.json_response(message(body["model"], self.texts, self.usage), headers={"request-id": "req_mock"})
        response = await open_stream(request)
        for raw in stream_events(body["model"], self.texts, self.usage):
            await response.write(raw)
        return response

    async def _count_tokens(self, request: web.Request) -> web.StreamResponse:
        await self.record(request)
        return web.json_response({"input_tokens": COUNTED_TOKENS})
