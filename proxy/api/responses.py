"""`POST /v1/responses`: unified generation. `{"model", ...inputs}` in; always a `text/event-stream` out.

Events: `generation.status` {"status": "queued"|"running"}, `generation.delta` {"delta"} (text, as the upstream
streams it), `generation.completed` {"output"}, `generation.failed` {"error"}. Anything refused before the
stream starts (401, 402, 403, 404, 429, 400) is a plain JSON error. Metered exactly like the passthrough
routes: decide, admit, and a shielded settle of what the upstream really used.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from contextlib import AsyncExitStack
from dataclasses import dataclass
from functools import partial
from typing import Any, AsyncIterator, Awaitable, Callable, Mapping

from aiohttp import web

from ..catalog import Model
from ..context import CONTEXT
from ..errors import ApiError
from ..upstream import sse
from ..upstream.formats import openai as openai_format
from ..upstream.body_usage import BodyUsage
from ..upstream.relay import OpenedCall, RelayOutcome, read_chunks, upstream_failure, usage_from_the_rest
from .body import read_json_object
from .inputs import validate_inputs
from .metered import authorize_and_admit, metered_call, request_facts
from .routed import open_routed
from .schema import INPUTS
from .state import GATEWAY, authenticated, from_openai_sdk
from .uploads import keep_asset, output_url

# Nearest OpenAI image size per aspect ratio (the sizes OpenAI-format image models accept).
_IMAGE_SIZES = {"1:1": "1024x1024", "16:9": "1792x1024", "9:16": "1024x1792", "4:3": "1536x1024", "3:4": "1024x1536"}
_UPSTREAM_HEADERS = {"Content-Type": "application/json"}


@dataclass(frozen=True)
class UpstreamCall:
    route: str
    body: dict[str, Any]


def _text_call(inputs: dict[str, Any]) -> UpstreamCall:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": inputs["prompt"]}], "stream": True}
    body.update({k: inputs[k] for k in ("max_tokens", "temperature") if k in inputs})
    return UpstreamCall("/v1/chat/completions", body)


def _image_call(inputs: dict[str, Any]) -> UpstreamCall:
    size = _IMAGE_SIZES[inputs["aspect_ratio"]]
    return UpstreamCall("/v1/images/generations", {"prompt": inputs["prompt"], "n": inputs["n"], "size": size})


def _speech_call(inputs: dict[str, Any]) -> UpstreamCall:
    return UpstreamCall("/v1/audio/speech", {"input": inputs["input"], "voice": inputs["voice"]})


_CALLS: dict[str, Callable[[dict[str, Any]], UpstreamCall]] = {
    "text2text": _text_call, "text2image": _image_call, "text2speech": _speech_call,
}


def upstream_call(model: Model, inputs: dict[str, Any]) -> UpstreamCall:
    """Validate the inputs against the model's schema and map them to an OpenAI-format call."""
    build = _CALLS.get(model.capability)
    if build is None:
        raise ApiError(
            "invalid_request",
            f"{model.capability} models are not supported by /v1/responses yet; supported: {', '.join(_CALLS)}",
            param="model",
        )
    schema = INPUTS[model.capability]
    validate_inputs(inputs, schema)
    defaults = {name: rule["default"] for name, rule in schema["properties"].items() if "default" in rule}
    return build({**defaults, **inputs})


class EventStream:
    """The client's event stream; `events_out` counts what was sent."""

    def __init__(self, response: web.StreamResponse, outcome: RelayOutcome) -> None:
        self.response = response
        self._outcome = outcome

    @classmethod
    async def open(cls, request: web.Request, headers: Mapping[str, str], outcome: RelayOutcome) -> "EventStream":
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers,
        })
        await response.prepare(request)
        return cls(response, outcome)

    async def send(self, event: str, data: dict[str, Any]) -> None:
        payload = json.dumps(data, separators=(",", ":"))
        await self.response.write(f"event: {event}\ndata: {payload}\n\n".encode())
        self._outcome.events_out += 1

    async def ping(self) -> None:
        await self.response.write(sse.comment("ping"))


@dataclass
class UpstreamAnswer:
    """What a reader needs to turn the upstream's answer into the `completed` output."""

    chunks: AsyncIterator[bytes | None]  # None: the upstream is quiet, time for a keep-alive ping
    content_type: str
    events: EventStream
    outcome: RelayOutcome  # readers note usage and output here, for settle
    keep: Callable[[bytes, str], Awaitable[dict[str, Any]]]  # stores bytes as an asset; returns its description
    keep_url: Callable[[str], Awaitable[str]]  # a provider's output URL as the client gets it (maybe re-hosted)
    max_bytes: int


async def _text_output(answer: UpstreamAnswer) -> dict[str, Any]:
    """Forward each content delta as soon as its SSE event is complete; note usage on the side."""
    splitter, parts = sse.EventSplitter(), []
    async for chunk in answer.chunks:
        if chunk is None:
            await answer.events.ping()
            continue
        for event in splitter.feed(chunk):
            data = sse.event_json(event)
            answer.outcome.usage = openai_format.event_usage(answer.outcome.usage, event, data)
            if data is None:
                continue  # `[DONE]`, comments, pieces of an oversized event
            if "error" in data:
                raise ApiError("upstream_error", f"the provider failed mid-stream: {_message(data['error'])}")
            if openai_format.counts_as_output(data):
                answer.outcome.output_chunks += 1
            if delta := _delta_text(data):
                parts.append(delta)
                answer.outcome.bytes_out += len(delta.encode())
                await answer.events.send("generation.delta", {"delta": delta})
    return {"text": "".join(parts)}


async def _image_output(answer: UpstreamAnswer) -> dict[str, Any]:
    """URLs from an images/generations answer; base64 images are kept as assets so the client gets URLs too."""
    result = _json_object(await _read_all(answer))
    answer.outcome.usage = openai_format.usage_of(result)
    items = [item for item in result.get("data") or () if isinstance(item, dict)]
    urls = [await answer.keep_url(item["url"]) if isinstance(item.get("url"), str) else await _keep_b64(answer, item)
            for item in items]
    if not urls:
        raise ApiError("upstream_error", "the provider's answer carries no image")
    return {"url": urls[0], "urls": urls}


async def _speech_output(answer: UpstreamAnswer) -> dict[str, Any]:
    """The audio, kept as an asset: the client gets a short-lived URL like for uploads."""
    audio = await _read_all(answer)
    length = BodyUsage(answer.content_type, openai_format)
    length.feed(audio)
    answer.outcome.seconds = length.seconds()
    return await answer.keep(audio, answer.content_type or "audio/mpeg")


_READERS: dict[str, Callable[[UpstreamAnswer], Awaitable[dict[str, Any]]]] = {
    "text2text": _text_output, "text2image": _image_output, "text2speech": _speech_output,
}


async def _read_all(answer: UpstreamAnswer) -> bytes:
    body = bytearray()
    async for chunk in answer.chunks:
        if chunk is None:
            await answer.events.ping()
            continue
        body += chunk
        answer.outcome.bytes_out += len(chunk)
        if len(body) > answer.max_bytes:
            raise ApiError("upstream_error", f"the provider's answer exceeds {answer.max_bytes} bytes")
    return bytes(body)


async def _keep_b64(answer: UpstreamAnswer, item: dict[str, Any]) -> str:
    try:
        image = base64.b64decode(item.get("b64_json") or "", validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise ApiError("upstream_error", "the provider's image is neither a URL nor valid base64") from None
    return str((await answer.keep(image, "image/png"))["url"])


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        raise ApiError("upstream_error", "the provider's answer is not JSON") from None
    if not isinstance(value, dict):
        raise ApiError("upstream_error", "the provider's answer is not a JSON object")
    return value


def _delta_text(chunk: dict[str, Any]) -> str:
    choices = chunk.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return ""
    delta = choices[0].get("delta")
    content = delta.get("content") if isinstance(delta, dict) else None
    return content if isinstance(content, str) else ""


def _pointed_to_openai_v1(request: web.Request, error: ApiError) -> ApiError:
    """An OpenAI SDK with `base_url=<gateway>/v1` sends OpenAI's Responses API body here: say where that API is."""
    if not from_openai_sdk(request):
        return error
    hint = (" (POST /v1/responses is the gateway's unified generation API; for OpenAI's Responses API, give the "
            "SDK base_url=<gateway>/openai/v1)")
    return ApiError(error.code, error.message + hint, headers=error.headers, **error.details)


def _message(error: Any) -> str:
    return str(error.get("message", "")) if isinstance(error, dict) else str(error)


async def responses(request: web.Request) -> web.StreamResponse:
    gateway, ctx = request.app[GATEWAY], request[CONTEXT]
    principal = await authenticated(request)
    body = await read_json_object(request, gateway.config.server.max_body_bytes)
    ctx.model = model = gateway.model(body.get("model"), "openai")
    try:
        call = upstream_call(model, {k: v for k, v in body.items() if k != "model"})
    except ApiError as exc:
        raise _pointed_to_openai_v1(request, exc) from None
    facts = request_facts(call.route, call.body, len(await request.read()))  # the body is cached by now
    decision, admission = await authorize_and_admit(gateway, ctx, principal, model, facts)
    async with metered_call(gateway, ctx, decision, admission, facts) as outcome:
        events = await EventStream.open(request, admission.headers, outcome)
        outcome.response = events.response
        await events.send("generation.status", {"status": "queued"})
        try:
            async with AsyncExitStack() as call_scope:
                opened = await open_routed(
                    gateway, ctx, principal, decision, facts, call.route, call.body, _UPSTREAM_HEADERS, call_scope
                )
                output = await _generate(request, opened, model.capability, events, outcome)
        except ApiError as exc:
            outcome.error_code = outcome.error_code or exc.code
            await events.send("generation.failed", exc.body())
        else:
            await events.send("generation.completed", {"output": output})
    await events.response.write_eof()
    return events.response


async def _generate(
    request: web.Request, call: OpenedCall, capability: str, events: EventStream, outcome: RelayOutcome,
) -> dict[str, Any]:
    """Read the opened call's answer into the `completed` output; fills `outcome` for settle."""
    gateway, upstream = request.app[GATEWAY], call.upstream
    try:
        outcome.status = upstream.status
        if upstream.status >= 400:
            raise await upstream_failure(call.provider, upstream)
        await events.send("generation.status", {"status": "running"})

        output = await _READERS[capability](UpstreamAnswer(
            chunks=read_chunks(upstream, call.provider.timeouts, gateway.relay.keepalive_s, call.ends_at),
            content_type=upstream.content_type, events=events, outcome=outcome, keep=partial(keep_asset, request),
            keep_url=partial(output_url, request),
            max_bytes=gateway.config.server.max_upload_bytes,
        ))
        outcome.completed = True
        return output
    except asyncio.CancelledError:
        if capability == "text2text":
            await usage_from_the_rest(upstream, call.provider.format, outcome)
        raise
    finally:
        # A finished body lets the connection go back to the pool; anything else must not be reused.
        if outcome.completed:
            upstream.release()
        else:
            upstream.close()


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/responses", responses)
