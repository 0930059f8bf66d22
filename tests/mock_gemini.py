"""A stand-in for the Gemini API (generativelanguage, v1beta) on loopback, speaking its wire format exactly,
scriptable per test.

`POST /v1beta/models/<model>:generateContent` answers a `GenerateContentResponse` as JSON;
`:streamGenerateContent?alt=sse` answers one `data: <GenerateContentResponse>` event per chunk, `\\r\\n\\r\\n`-framed,
each carrying the running `usageMetadata` (the prompt's count) and the last one the `finishReason` and the final
figures; `:countTokens` answers `{"totalTokens": n}`. Errors are `{"error": {"code", "message", "status"}}` with
the API's statuses (a call without `x-goog-api-key` is refused like the real API does). What it received is
recorded, the query included.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from .mock_provider import LoopbackMock, Route
# What the mock reports by default: tool-use prompt tokens count as input, thoughts as output, for the gateway.
USAGE = {"promptTokenCount": 21, "toolUsePromptTokenCount": 4, "candidatesTokenCount": 9, "thoughtsTokenCount": 6}
COUNTED_TOKENS = 14


def total(usage: dict[str, int]) -> int:
    return sum(usage.values())


def error_body(code: int, status: str, message: str, *details: dict[str, Any]) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "status": status, **({"details": list(details)} if details else {})}}


def error_response(code: int, status: str, message: str, *details: dict[str, Any]) -> web.Response:
    return web.json_response(error_body(code, status, message, *details), status=code)


def response(model: str, parts: list[dict[str, Any]], usage: dict[str, int], finish: str | None = "STOP") -> dict[str, Any]:
    """A GenerateContentResponse: one candidate with these parts."""
    candidate: dict[str, Any] = {"content": {"parts": parts, "role": "model"}, "index": 0}
    if finish is not None:
        candidate["finishReason"] = finish
    return {"candidates": [candidate], "usageMetadata": {**usage, "totalTokenCount": total(usage)},
            "modelVersion": model, "responseId": "mock-response-id"}


def event(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data).encode() + b"\r\n\r\n"


def text_event(model: str, text: str, usage: dict[str, int] = USAGE) -> bytes:
    """A chunk before the last: some text, the running usage (the prompt only)."""
    return event(response(model, [{"text": text}], {"promptTokenCount": usage["promptTokenCount"]}, finish=None))


def last_event(model: str, text: str, usage: dict[str, int] = USAGE, finish: str = "STOP") -> bytes:
    return event(response(model, [{"text": text}], usage, finish))


def stream_events(model: str, texts: tuple[str, ...], usage: dict[str, int] = USAGE) -> list[bytes]:
    return [*(text_event(model, t, usage) for t in texts[:-1]), last_event(model, texts[-1], usage)]


async def open_stream(request: web.Request) -> web.StreamResponse:
    answer = web.StreamResponse(headers={"Content-Type": "text/event-stream", "X-Content-Type-Options": "nosniff"})
    await answer.prepare(request)
    return answer


@dataclass
class MockGemini(LoopbackMock):
    texts: tuple[str, ...] = ("Hello", " from", " Gemini")
    usage: dict[str, int] = field(default_factory=lambda: dict(USAGE))

    def routes(self) -> dict[str, Route]:
        # `handler` replaces the default answer of generateContent and streamGenerateContent
        return {
            "/v1beta/models/{model}:generateContent": self._generate,
            "/v1beta/models/{model}:streamGenerateContent": self._generate,
            "/v1beta/models/{model}:countTokens": self._count_tokens,
        }

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        body = await self.record(request)
        if "x-goog-api-key" not in request.headers:
            return error_response(403, "PERMISSION_DENIED", "Method doesn't allow unregistered callers (callers "
                                  "without established identity). Please use API Key or other form of API consumer "
                                  "identity to call this API.")
        if self.handler is not None:
            return await self.handler(request, body)
        model = request.match_info["model"]
        if request.path.endswith(":generateContent"):
            return web.json_response(response(model, [{"text": "".join(self.texts)}], self.usage))
        answer = await open_stream(request)
        for raw in stream_events(model, self.texts, self.usage):
            await answer.write(raw)
        return answer

    async def _count_tokens(self, request: web.Request) -> web.StreamResponse:
        await self.record(request)
        return web.json_response({"totalTokens": COUNTED_TOKENS,
                                  "promptTokensDetails": [{"modality": "TEXT", "tokenCount": COUNTED_TOKENS}]})
