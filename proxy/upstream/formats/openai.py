"""The OpenAI wire format (kinds `openai`, its alias `http`, and `demo`): addressing, credentials, how to prepare a
request body and where usage is found in answers. The module is the adapter (formats.base.WireFormat)."""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

from ...errors import ApiError
from ...policy.types import Usage
from .. import sse
from .base import SSE_PING, USAGE_OBJECT, PreparedBody, audio_seconds, last_usage_object, multipart_body, token_figure

dialect = "openai"
keepalive = SSE_PING
example_base_url = "https://api.openai.com/v1"

# A usage object naming none of these (`{}`, only `total_tokens`) reports nothing to charge: it counts as absent.
_TOKEN_FIGURES = ("prompt_tokens", "input_tokens", "completion_tokens", "output_tokens")

# Routes whose streams support `stream_options.include_usage`.
_USAGE_STREAM_ROUTES = frozenset({"/v1/chat/completions", "/v1/completions"})
# Routes whose bodies carry a file: multipart/form-data, not JSON (the unified API's speech2text, image2image).
MULTIPART_ROUTES = frozenset({"/v1/audio/transcriptions", "/v1/images/edits"})
# OpenAI's Responses API, called on the gateway's /openai/v1/responses (its /v1/responses is the unified API).
RESPONSES_ROUTE = "/v1/responses"
# The output limit each text route takes; the first is the one to send when the client sent none.
_OUTPUT_LIMIT_FIELDS = {
    "/v1/chat/completions": ("max_completion_tokens", "max_tokens"),
    "/v1/completions": ("max_tokens",),
    RESPONSES_ROUTE: ("max_output_tokens",),
}


def prepare(route: str, body: dict[str, Any], upstream_model: str, max_output_tokens: int = 0) -> PreparedBody:
    """Rewrite the public model id to the upstream's, cap the output per choice at the reservation's bound
    (0: no cap to send), and ask streams for their final usage event. A file-carrying route's body is multipart."""
    out = dict(body, model=upstream_model)
    if route in MULTIPART_ROUTES:
        return multipart_body(out)
    if max_output_tokens > 0:
        _cap_output(route, out, max_output_tokens)
    stream = out.get("stream") is True
    injected = False
    if stream and route in _USAGE_STREAM_ROUTES:
        options = out.get("stream_options")
        options = dict(options) if isinstance(options, dict) else {}
        if options.get("include_usage") is not True:
            options["include_usage"] = True
            out["stream_options"] = options
            injected = True
    return PreparedBody(sse.compact_json(out), stream, injected)


def _cap_output(route: str, body: dict[str, Any], cap: int) -> None:
    """The provider must not produce more than was reserved: lower the client's limits, or send the cap."""
    fields = _OUTPUT_LIMIT_FIELDS.get(route, ())
    present = [name for name in fields if body.get(name) is not None]
    for name in present:
        body[name] = min(body[name], cap)  # validated integers by now (request_facts)
    if fields and not present:
        body[fields[0]] = cap


def usage_of(answer: dict[str, Any]) -> Usage | None:
    """Usage from a JSON answer or a stream chunk; None when the object carries none, or only broken figures
    (then the call is charged an estimate that never undercharges, docs/metering.md)."""
    if "usage" not in answer and isinstance(answer.get("response"), dict):
        answer = answer["response"]  # a Responses API event (response.completed, ...): usage is its Response's
    usage = answer.get("usage")
    if isinstance(usage, dict) and any(usage.get(name) is not None for name in _TOKEN_FIGURES):
        input_tokens = token_figure(usage.get("prompt_tokens", usage.get("input_tokens")))
        output_tokens = token_figure(usage.get("completion_tokens", usage.get("output_tokens")))
        if input_tokens is None or output_tokens is None:
            return None
        return Usage(input_tokens=input_tokens, output_tokens=output_tokens, images=_images(answer))
    images = _images(answer)
    return Usage(images=images) if images else None


def usage_in_tail(data: bytes) -> Usage | None:
    """Usage from the end of an answer too large to parse whole (or a fragment of an oversized event)."""
    usage = last_usage_object(data)
    return usage_of({"usage": usage}) if usage is not None else None


def event_usage(previous: Usage | None, event: bytes, parsed: dict[str, Any] | None = None) -> Usage | None:
    """The stream's usage after this raw SSE event: token counts are the latest reported (some providers repeat
    running totals); each `image_generation.completed` event counts one image. `parsed`: the event's JSON when
    the caller has parsed it already (else it is parsed here, only if it may carry usage)."""
    image_done = _IMAGE_COMPLETED.search(event) is not None
    if not image_done and not may_carry_usage(event):
        return previous
    chunk = parsed if parsed is not None else sse.event_json(event)
    usage = usage_of(chunk) if chunk is not None else usage_in_tail(event)
    if usage is None and not image_done:
        return previous
    tokens = usage or previous or Usage()
    return replace(tokens, images=_images_of(previous) + _images_of(usage) + int(image_done))


def _images_of(usage: Usage | None) -> int:
    return usage.images if usage is not None else 0


def transcription_seconds(answer: dict[str, Any]) -> float | None:
    """The audio length a transcription answer reports (`usage: {"type": "duration", "seconds"}`, whisper's)."""
    usage = answer.get("usage")
    seconds = usage.get("seconds") if isinstance(usage, dict) and usage.get("type") == "duration" else None
    return audio_seconds(seconds)


def is_usage_only_chunk(chunk: dict[str, Any]) -> bool:
    """The extra final chunk `include_usage` produces: usage and no choices."""
    return isinstance(chunk.get("usage"), dict) and chunk.get("choices") == []


# On raw event bytes. A quote inside generated text is escaped (\"), so these cannot match content.
# Content: a chunk with choices, or a Responses API delta (response.output_text.delta, ...function_call_arguments.delta).
_OUTPUT = re.compile(rb'"choices"\s*:\s*\[\s*\{|"type"\s*:\s*"response\.[a-z_.]+\.delta"')
# The Responses API's last event: no `[DONE]` follows it.
_RESPONSE_END = re.compile(rb'"type"\s*:\s*"response\.(?:completed|incomplete|failed)"')
_IMAGE_COMPLETED = re.compile(rb'"type"\s*:\s*"image_generation\.completed"')  # one streamed image, done


def may_carry_usage(event: bytes) -> bool:
    """Whether a raw SSE event can hold a usage object (the only events worth parsing)."""
    return USAGE_OBJECT.search(event) is not None


def is_output_event(event: bytes) -> bool:
    """A raw SSE event carrying generated content: about one token each in OpenAI streams."""
    return _OUTPUT.search(event) is not None


def counts_as_output(chunk: dict[str, Any]) -> bool:
    """A chunk carrying generated content: about one token each in OpenAI streams."""
    choices = chunk.get("choices")
    return isinstance(choices, list) and len(choices) > 0


def _images(answer: dict[str, Any]) -> int:
    data = answer.get("data")
    if isinstance(data, list) and data and isinstance(data[0], dict) and ("url" in data[0] or "b64_json" in data[0]):
        return len(data)
    return 0


def url(base_url: str, route: str, upstream_model: str, stream: bool) -> str:
    """`/v1/chat/completions` -> `<base_url>/chat/completions`; the model travels in the body."""
    return base_url + route.removeprefix("/v1")


def credential_headers(credential: str, header: str | None, scheme: str | None) -> dict[str, str]:
    """`Authorization: Bearer <key>` unless the config names another header or scheme ("" sends the bare key)."""
    scheme = "Bearer" if scheme is None else scheme
    return {header or "Authorization": f"{scheme} {credential}" if scheme else credential}


def ends_stream(event: bytes) -> bool:
    if event.startswith(b"event: response."):  # the Responses API names its events; chat streams do not
        return _RESPONSE_END.search(event) is not None
    return b"[DONE]" in event and sse.event_data(event) == b"[DONE]"


is_injected_usage_event = is_usage_only_chunk
error_body = ApiError.body


def error_event(error: ApiError) -> bytes:
    # The status line is gone; an `error` payload is what OpenAI SDKs surface from a stream.
    return sse.data_event(error.body())
