"""A stand-in for an OpenAI-format provider on loopback, scriptable per test.

It speaks the real wire format (JSON answers, SSE chunks with a final usage chunk and `[DONE]`)
and records what it received, so tests can check what the gateway forwarded.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Coroutine, Self

from aiohttp import web

Handler = Callable[[web.Request, dict[str, Any]], Awaitable[web.StreamResponse]]  # a test's script: request, body
Route = Callable[[web.Request], Awaitable[web.StreamResponse]]


def chat_chunk(content: str, *, finish: str | None = None, with_null_usage: bool = False) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1700000000, "model": "mock-up",
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": finish}],
    }
    if with_null_usage:
        chunk["usage"] = None
    return chunk


def usage_chunk(prompt: int, completion: int) -> dict[str, Any]:
    return {
        "id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1700000000, "model": "mock-up",
        "choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                                 "total_tokens": prompt + completion},
    }


def sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {data}\n\n".encode()


RESPONSE_ID, MESSAGE_ID = "resp_0a1b2c3d4e5f", "msg_0a1b2c3d4e5f"


def response_object(model: str, status: str, text: str | None, usage: dict[str, Any] | None) -> dict[str, Any]:
    """An OpenAI Responses API `response` object; `text` None: no output item yet."""
    output = [] if text is None else [{
        "id": MESSAGE_ID, "type": "message", "status": "completed", "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
    }]
    return {
        "id": RESPONSE_ID, "object": "response", "created_at": 1741290958, "status": status, "background": False,
        "error": None, "incomplete_details": None, "instructions": None, "max_output_tokens": None,
        "model": model, "output": output, "parallel_tool_calls": True, "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None}, "service_tier": "default", "store": True,
        "temperature": 1.0, "text": {"format": {"type": "text"}, "verbosity": "medium"}, "tool_choice": "auto",
        "tools": [], "top_p": 1.0, "truncation": "disabled", "usage": usage, "user": None, "metadata": {},
    }


def responses_usage(input_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {"input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens}


def named_sse(payload: dict[str, Any]) -> bytes:
    """A Responses API event: named after its `type`, as OpenAI sends them."""
    return f"event: {payload['type']}\ndata: {json.dumps(payload)}\n\n".encode()


def responses_events(model: str, tokens: tuple[str, ...], usage: tuple[int, int]) -> list[bytes]:
    """A streamed Responses API answer, event for event as OpenAI's: created, in_progress, the message item and
    its text part opened, one delta per token, then each closed, and `response.completed` carrying the usage."""
    text = "".join(tokens)
    at = {"item_id": MESSAGE_ID, "output_index": 0, "content_index": 0}
    item = response_object(model, "completed", text, None)["output"][0]
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": response_object(model, "in_progress", None, None)},
        {"type": "response.in_progress", "response": response_object(model, "in_progress", None, None)},
        {"type": "response.output_item.added", "output_index": 0, "item": {**item, "status": "in_progress", "content": []}},
        {"type": "response.content_part.added", **at, "part": {"type": "output_text", "text": "", "annotations": []}},
        *({"type": "response.output_text.delta", **at, "delta": token, "logprobs": []} for token in tokens),
        {"type": "response.output_text.done", **at, "text": text, "logprobs": []},
        {"type": "response.content_part.done", **at, "part": item["content"][0]},
        {"type": "response.output_item.done", "output_index": 0, "item": item},
        {"type": "response.completed", "response": response_object(model, "completed", text, responses_usage(*usage))},
    ]
    return [named_sse({**event, "sequence_number": n}) for n, event in enumerate(events)]


async def serve_on_loopback(app: web.Application) -> tuple[web.AppRunner, str]:
    """Serve a mock provider's app on a free loopback port (a hang-up cancels its handler, as at a real
    provider); returns its runner (to clean up) and its origin URL."""
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


class LoopbackServer:
    """A mock provider's server on loopback and the tasks it started on its own (webhooks it delivers):
    `stop` cancels the tasks, waits for them, then stops the server."""

    def __init__(self) -> None:
        self._runner: web.AppRunner | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, app: web.Application) -> str:
        """Serve `app`; returns its origin URL."""
        self._runner, url = await serve_on_loopback(app)
        return url

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    query: dict[str, str] = field(default_factory=dict)


@dataclass
class LoopbackMock:
    """A mock provider's server: its `routes()` (POST path -> handler) on a free loopback port; `record` keeps
    what each call sent (path, headers, query, JSON body); `handler`, when a test sets it, replaces the default
    answer of the routes that honour it."""

    received: list[Received] = field(default_factory=list)
    handler: Handler | None = None
    url: str = ""  # the origin
    _runner: web.AppRunner | None = None

    def routes(self) -> dict[str, Route]:
        raise NotImplementedError

    async def start(self) -> Self:
        app = web.Application()
        for path, handle in self.routes().items():
            app.router.add_post(path, handle)
        self._runner, self.url = await serve_on_loopback(app)
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def record(self, request: web.Request) -> dict[str, Any]:
        body = await form_fields(request) if request.content_type == "multipart/form-data" else await request.json()
        self.received.append(Received(request.path, dict(request.headers), body, dict(request.query)))
        return body


@dataclass(frozen=True)
class UploadedFile:
    """A file part of a multipart request, as a provider receives it."""

    filename: str
    content_type: str
    data: bytes


async def form_fields(request: web.Request) -> dict[str, Any]:
    """A multipart/form-data body: text fields as strings, file parts as UploadedFile; a name sent several times
    (`image[]`) as the list of its values."""
    fields: dict[str, Any] = {}
    for name, value in (await request.post()).items():
        is_file = isinstance(value, web.FileField)
        part = UploadedFile(value.filename, value.content_type, value.file.read()) if is_file else value
        if name in fields:
            earlier = fields[name]
            fields[name] = [*earlier, part] if isinstance(earlier, list) else [earlier, part]
        else:
            fields[name] = part
    return fields


@dataclass
class MockProvider(LoopbackMock):
    """Default behaviour: an OpenAI chat answer (JSON or SSE); tests replace `handler` to script others."""

    tokens: tuple[str, ...] = ("Hello", " from", " the", " mock")

    def routes(self) -> dict[str, Route]:
        return {"/v1/{tail:.*}": self._dispatch}

    async def start(self) -> Self:
        await super().start()
        self.url += "/v1"
        return self

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        body = await self.record(request)
        if self.handler is not None:
            return await self.handler(request, body)
        return await self.default(request, body)

    async def default(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        if request.path.endswith("/embeddings"):
            return web.json_response({"object": "list", "model": body["model"],
                                      "data": [{"object": "embedding", "index": 0, "embedding": [0.5, 0.25]}],
                                      "usage": {"prompt_tokens": 3, "total_tokens": 3}})
        if request.path.endswith("/images/generations"):
            return web.json_response({"created": 1700000000, "data": [{"url": "http://127.0.0.1/img.png"}]})
        if request.path.endswith("/audio/speech"):
            return web.Response(body=b"RIFF....WAVEfmt ", content_type="audio/wav")
        if request.path.endswith("/audio/transcriptions"):  # whisper's JSON answer, its usage in seconds
            return web.json_response({"text": "hello from the upload", "usage": {"type": "duration", "seconds": 3}})
        if request.path.endswith("/images/edits"):
            return web.json_response({"created": 1700000000, "data": [{"url": "http://127.0.0.1/edited.png"}]})
        if request.path.endswith("/responses"):
            return await self.responses(request, body)
        if not body.get("stream"):
            return web.json_response({
                "id": "chatcmpl-mock", "object": "chat.completion", "created": 1700000000, "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(self.tokens)},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 7, "completion_tokens": len(self.tokens), "total_tokens": 7 + len(self.tokens)},
            })
        include_usage = (body.get("stream_options") or {}).get("include_usage") is True
        response = await open_sse(request)
        for i, token in enumerate(self.tokens):
            finish = "stop" if i == len(self.tokens) - 1 else None
            await response.write(sse(chat_chunk(token, finish=finish, with_null_usage=include_usage)))
        if include_usage:
            await response.write(sse(usage_chunk(7, len(self.tokens))))
        await response.write(sse("[DONE]"))
        return response


    async def responses(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        """OpenAI's Responses API: 7 input tokens, one output token per token of `tokens`."""
        usage = (7, len(self.tokens))
        if not body.get("stream"):
            return web.json_response(response_object(body["model"], "completed", "".join(self.tokens),
                                                     responses_usage(*usage)))
        response = await open_sse(request)
        for event in responses_events(body["model"], self.tokens, usage):
            await response.write(event)
        return response


async def open_sse(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    return response


async def wait_for(event: asyncio.Event, seconds: float = 5.0) -> None:
    await asyncio.wait_for(event.wait(), seconds)


def endless_stream(cancelled: asyncio.Event) -> Handler:
    """A handler that streams `tick` chunks until the gateway hangs up, then sets `cancelled`."""

    async def endless(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        response = await open_sse(request)
        try:
            while True:
                await response.write(sse(chat_chunk("tick")))
                await asyncio.sleep(0.05)
        except (asyncio.CancelledError, ConnectionResetError):
            cancelled.set()
            raise

    return endless


def gated_two_chunks(seen_first: asyncio.Event, usage: tuple[int, int] | None = None) -> Handler:
    """Chunk "one", then chunk "two" only once the test has seen the first at the client: buffering deadlocks."""

    async def two_chunks(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        response = await open_sse(request)
        await response.write(sse(chat_chunk("one")))
        await wait_for(seen_first)
        tail = sse(usage_chunk(*usage)) if usage else b""
        await response.write(sse(chat_chunk("two", finish="stop")) + tail + sse("[DONE]"))
        return response

    return two_chunks


async def stalls_after_one_chunk(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
    """Chunk "one", then silence longer than any test's idle timeout."""
    response = await open_sse(request)
    await response.write(sse(chat_chunk("one")))
    await asyncio.sleep(30)
    return response
