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
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, AsyncIterator, Awaitable, Callable, Mapping

from aiohttp import web

from ..catalog import Model
from ..context import CONTEXT
from ..errors import ApiError
from ..policy.types import Usage
from ..upstream import sse
from ..upstream.formats import WireFormat, elevenlabs
from ..upstream.formats import openai as openai_format
from ..upstream.formats.base import FilePart
from ..upstream.body_usage import BodyUsage, wav_seconds
from ..upstream.relay import OpenedCall, RelayOutcome, read_chunks, upstream_failure, usage_from_the_rest
from .body import read_json_object
from .events import EventStream
from .inputs import checked_inputs
from .jobs import generate_job
from .media import media_fetcher, media_input
from .metered import authorize_and_admit, metered_call, request_facts
from .routed import open_routed
from .schema import INPUTS
from .state import GATEWAY, authenticated, from_openai_sdk
from .uploads import keep_asset, output_url

# Nearest OpenAI image size per aspect ratio (the sizes OpenAI-format image models accept).
_IMAGE_SIZES = {"1:1": "1024x1024", "16:9": "1792x1024", "9:16": "1024x1792", "4:3": "1536x1024", "3:4": "1024x1536"}
# Image edits take fewer sizes (gpt-image-1's); without an aspect ratio the provider keeps the input's shape.
_EDIT_SIZES = {"1:1": "1024x1024", "16:9": "1536x1024", "4:3": "1536x1024", "9:16": "1024x1536", "3:4": "1024x1536"}
_UPSTREAM_HEADERS = {"Content-Type": "application/json"}
_AUDIO, _IMAGE = ("audio/", "video/"), ("image/",)
_OPENAI_VOICE = "alloy"
_ELEVENLABS_VOICE = "JBFqnCBsd6RMkjVDRZzb"  # a premade voice every ElevenLabs account has


@dataclass(frozen=True)
class UpstreamCall:
    route: str
    body: dict[str, Any]
    characters: int = 0  # text to speak, bounding a per-character price
    seconds: float | None = None  # the input audio's length where it is known, bounding a per-second price


async def _text_call(request: web.Request, inputs: dict[str, Any]) -> UpstreamCall:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": inputs["prompt"]}], "stream": True}
    body.update({k: inputs[k] for k in ("max_tokens", "temperature") if k in inputs})
    return UpstreamCall("/v1/chat/completions", body)


async def _image_call(request: web.Request, inputs: dict[str, Any]) -> UpstreamCall:
    size = _IMAGE_SIZES[inputs["aspect_ratio"]]
    return UpstreamCall("/v1/images/generations", {"prompt": inputs["prompt"], "n": inputs["n"], "size": size})


async def _image_edit_call(request: web.Request, inputs: dict[str, Any]) -> UpstreamCall:
    param, urls = _image_urls(inputs)
    images = [await media_input(request, url, param, _IMAGE) for url in urls]
    body: dict[str, Any] = {"prompt": inputs["prompt"]}
    body.update({"image": images[0]} if len(images) == 1 else {"image[]": images})  # OpenAI's names for one, several
    if "aspect_ratio" in inputs:
        body["size"] = _EDIT_SIZES[inputs["aspect_ratio"]]
    return UpstreamCall("/v1/images/edits", body)


def _image_urls(inputs: dict[str, Any]) -> tuple[str, list[Any]]:
    """The input images: `image_urls` (the seeds' name) or one `image_url`, never both."""
    if ("image_urls" in inputs) == ("image_url" in inputs):
        raise ApiError("invalid_request", "give the input images as `image_urls` (or one `image_url`), not both",
                       param="image_urls")
    return ("image_urls", inputs["image_urls"]) if "image_urls" in inputs else ("image_url", [inputs["image_url"]])


async def _speech_call(request: web.Request, inputs: dict[str, Any]) -> UpstreamCall:
    text = inputs["input"]
    return UpstreamCall("/v1/audio/speech", {"input": text, "voice": inputs.get("voice", _OPENAI_VOICE)}, len(text))


async def _transcription_call(request: web.Request, inputs: dict[str, Any]) -> UpstreamCall:
    audio = await media_input(request, inputs["audio_url"], "audio_url", _AUDIO)
    return UpstreamCall("/v1/audio/transcriptions", {"file": audio}, seconds=_known_length(audio))


async def _elevenlabs_speech_call(request: web.Request, inputs: dict[str, Any]) -> UpstreamCall:
    voice, text = inputs.get("voice", _ELEVENLABS_VOICE), inputs["input"]
    return UpstreamCall(elevenlabs.speech_route(voice), {"text": text}, len(text))


async def _elevenlabs_transcription_call(request: web.Request, inputs: dict[str, Any]) -> UpstreamCall:
    audio = await media_input(request, inputs["audio_url"], "audio_url", _AUDIO, by_url=True)
    body = {"file": audio} if isinstance(audio, FilePart) else {"cloud_storage_url": audio}
    return UpstreamCall(elevenlabs.SPEECH_TO_TEXT_ROUTE, body, seconds=_known_length(audio))


def _known_length(audio: FilePart | str) -> float | None:
    """A WAV's length from its header (other formats, and URLs, are bounded by the plan's `max_seconds`)."""
    return wav_seconds(audio.data[:4096], len(audio.data)) if isinstance(audio, FilePart) else None


# (the model's wire format, its capability) -> the provider call its inputs map to.
_CALLS: dict[tuple[str, str], Callable[[web.Request, dict[str, Any]], Awaitable[UpstreamCall]]] = {
    ("openai", "text2text"): _text_call, ("openai", "text2image"): _image_call,
    ("openai", "image2image"): _image_edit_call, ("openai", "text2speech"): _speech_call,
    ("openai", "speech2text"): _transcription_call,
    ("elevenlabs", "text2speech"): _elevenlabs_speech_call, ("elevenlabs", "speech2text"): _elevenlabs_transcription_call,
}
_DIALECTS = tuple({dialect for dialect, _ in _CALLS if dialect != "openai"})


async def upstream_call(request: web.Request, model: Model, inputs: dict[str, Any]) -> UpstreamCall:
    """Validate the inputs against the model's schema and map them to a call in its provider's wire format."""
    build = _CALLS.get((model.wire_format, model.capability))
    if build is None:
        supported = sorted(capability for dialect, capability in _CALLS if dialect == model.wire_format)
        raise ApiError(
            "invalid_request",
            f"{model.capability} models of {model.wire_format} providers are not supported by /v1/responses yet; "
            f"supported: {', '.join(supported) or 'none'}",
            param="model",
        )
    return await build(request, checked_inputs(inputs, INPUTS[model.capability]))


@dataclass
class UpstreamAnswer:
    """What a reader needs to turn the upstream's answer into the `completed` output."""

    chunks: AsyncIterator[bytes | None]  # None: the upstream is quiet, time for a keep-alive ping
    content_type: str
    events: EventStream
    outcome: RelayOutcome  # readers note usage and output here, for settle
    headers: Mapping[str, str]  # the provider's response headers
    format: WireFormat  # the provider's wire format, which reads usage from its answers
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
    """The audio, kept as an asset: the client gets a short-lived URL like for uploads. Characters billed are the
    provider's figure where it states one (ElevenLabs), noted before reading: a cut answer was billed too."""
    answer.outcome.usage = elevenlabs.character_usage(answer.headers)
    audio = await _read_all(answer)
    length = BodyUsage(answer.content_type, openai_format)
    length.feed(audio)
    answer.outcome.seconds = length.seconds()
    return await answer.keep(audio, answer.content_type or "audio/mpeg")


async def _transcript_output(answer: UpstreamAnswer) -> dict[str, Any]:
    """The transcript's text (and language, when the provider names it); the audio's length for settle."""
    result = _json_object(await _read_all(answer))
    text = result.get("text")
    if not isinstance(text, str):
        raise ApiError("upstream_error", "the provider's answer carries no transcript text")
    seconds = openai_format.transcription_seconds(result)  # whisper's duration, where the format has no usage
    answer.outcome.usage = answer.format.usage_of(result) or (Usage(seconds=seconds) if seconds is not None else None)
    language = result.get("language_code", result.get("language"))
    return {"text": text, **({"language": language} if isinstance(language, str) else {})}


_READERS: dict[str, Callable[[UpstreamAnswer], Awaitable[dict[str, Any]]]] = {
    "text2text": _text_output, "text2image": _image_output, "text2speech": _speech_output,
    "image2image": _image_output, "speech2text": _transcript_output,
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
    ctx.model = model = gateway.model(body.get("model"))
    if gateway.runs_as_job(model):
        return await generate_job(request, principal, model, body)
    gateway.model(model.id, "openai", _DIALECTS)  # the other calls: OpenAI's wire format or a dialect above
    try:
        call = await upstream_call(request, model, {k: v for k, v in body.items() if k != "model"})
    except ApiError as exc:
        raise _pointed_to_openai_v1(request, exc) from None
    facts = request_facts(call.route, call.body, len(await request.read()))  # the body is cached by now
    facts = replace(facts, characters=call.characters, seconds=call.seconds)
    decision, admission = await authorize_and_admit(gateway, ctx, principal, model, facts)
    async with metered_call(gateway, ctx, decision, admission, facts) as outcome:
        events = await EventStream.open(request, admission.headers, outcome, ctx.request_id)
        outcome.response = events.response
        await events.send("generation.status", {"status": "queued"})
        try:
            opened, attempt = await open_routed(
                gateway, ctx, principal, decision, facts, call.route, call.body, _UPSTREAM_HEADERS
            )
            async with attempt:
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
            keep_url=partial(output_url, request), max_bytes=gateway.config.server.max_upload_bytes,
            headers=upstream.headers, format=call.provider.format,
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
    app.cleanup_ctx.append(media_fetcher)
