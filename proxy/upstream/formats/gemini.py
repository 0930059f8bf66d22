"""The Gemini API wire format (kind `gemini`): `POST <base_url>/models/<model>:generateContent` (JSON),
`:streamGenerateContent?alt=sse` (SSE, one `data:` event per `GenerateContentResponse`) and `:countTokens`, the
credential in `x-goog-api-key`, errors as `{"error": {"code", "message", "status", "details"}}`.

Usage: `usageMetadata` of a JSON answer; in a stream, every chunk may carry running figures and the last one
(the chunk with a `finishReason`) the final ones. Input is `promptTokenCount` (cached tokens included) plus
`toolUsePromptTokenCount`; output is `candidatesTokenCount` plus `thoughtsTokenCount` (thinking is billed as
output). The module is the adapter (formats.base.WireFormat).
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field, replace
from typing import Any

from ...errors import ApiError
from ...policy.types import Usage
from .. import sse
from . import gemini_translate
from .base import PreparedBody, answer_object, last_usage_object, no_injected_usage_event, token_figure

dialect = "gemini"
# A blank line between events: google-genai reads a line that is neither `data:` nor blank as a JSON error body,
# so an SSE comment (`: ping`) would break its streams; SSE clients skip a blank line that ends no event.
keepalive = b"\r\n"
example_base_url = "https://generativelanguage.googleapis.com/v1beta"
PREFIX = "/gemini"  # the gateway's native routes: `/gemini/v1beta/models/<our id>:<method>`
# The routes as aiohttp canonical paths (also their metrics label); `model` is our public model id.
_MODEL_PATH = f"{PREFIX}/{{version}}/models/{{model}}"
GENERATE = f"{_MODEL_PATH}:generateContent"
STREAM = f"{_MODEL_PATH}:streamGenerateContent"
COUNT_TOKENS = f"{_MODEL_PATH}:countTokens"
ROUTES = (GENERATE, STREAM, COUNT_TOKENS)
CHAT_ROUTE = "/v1/chat/completions"  # OpenAI's chat, translated to generateContent (gemini_translate.py)
_INPUT_FIGURES = ("promptTokenCount", "toolUsePromptTokenCount")
_OUTPUT_FIGURES = ("candidatesTokenCount", "thoughtsTokenCount")
# google.rpc.Code names by HTTP status, for the gateway's own errors on the native routes.
_STATUSES = {
    400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 402: "RESOURCE_EXHAUSTED", 403: "PERMISSION_DENIED",
    404: "NOT_FOUND", 405: "UNIMPLEMENTED", 409: "ABORTED", 413: "INVALID_ARGUMENT", 415: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED", 431: "INVALID_ARGUMENT", 499: "CANCELLED", 500: "INTERNAL", 501: "UNIMPLEMENTED",
    502: "UNAVAILABLE", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED",
}
ERROR_DOMAIN = "edge-proxy"  # ErrorInfo.domain of the gateway's own errors; ErrorInfo.reason is our stable code
# On raw event bytes. A quote inside generated text is escaped (\"), so these cannot match content.
_USAGE_OBJECT = re.compile(rb'"usageMetadata"\s*:\s*\{')
_CANDIDATE = re.compile(rb'"candidates"\s*:\s*\[\s*\{')
_FINISHED = re.compile(rb'"finishReason"\s*:\s*"')


def url(base_url: str, route: str, upstream_model: str, stream: bool) -> str:
    """`<base_url>/models/<upstream model>:<method>`; streams ask for SSE (`alt=sse`)."""
    if route == CHAT_ROUTE:
        route = STREAM if stream else GENERATE
    method = route.rsplit(":", 1)[1]
    target = f"{base_url}/{_model_name(upstream_model)}:{method}"
    return target + "?alt=sse" if route == STREAM else target


def _model_name(upstream_model: str) -> str:
    """The API's resource name of a model (`models/<id>`); the config may give the id with or without it."""
    return f"models/{upstream_model.removeprefix('models/')}"


def credential_headers(credential: str, header: str | None, scheme: str | None) -> dict[str, str]:
    """`x-goog-api-key: <key>` unless the config names another header or scheme."""
    return {header or "x-goog-api-key": f"{scheme} {credential}" if scheme else credential}


def prepare(route: str, body: dict[str, Any], upstream_model: str, max_output_tokens: int = 0) -> PreparedBody:
    """`generationConfig.maxOutputTokens` lowered to the reservation's bound, or sent as it (0: no cap to send);
    a countTokens body's nested request names the upstream model. The model is in the URL, not the body.
    An OpenAI chat body is translated (a 400 for what is not), and so will its answer be."""
    if route == CHAT_ROUTE:
        return _prepare_chat(body, upstream_model, max_output_tokens)
    out = dict(body)
    if route == COUNT_TOKENS and isinstance(out.get("generateContentRequest"), dict):
        out["generateContentRequest"] = dict(out["generateContentRequest"], model=_model_name(upstream_model))
    elif max_output_tokens > 0 and route != COUNT_TOKENS:
        config = dict(out.get("generationConfig") or {})  # validated by now: an object or absent (request facts)
        asked = config.get("maxOutputTokens")
        config["maxOutputTokens"] = min(asked, max_output_tokens) if isinstance(asked, int) else max_output_tokens
        out["generationConfig"] = config
    return PreparedBody(sse.compact_json(out), route == STREAM, False)


def usage_from_metadata(metadata: Any, final: bool = True) -> Usage | None:
    """A `usageMetadata` object's tokens; None if absent, naming no figure, or broken."""
    names = (*_INPUT_FIGURES, *_OUTPUT_FIGURES)
    if not isinstance(metadata, dict) or all(metadata.get(name) is None for name in names):
        return None
    figures = [token_figure(metadata.get(name)) for name in names]
    if any(figure is None for figure in figures):
        return None
    counts = [figure or 0 for figure in figures]
    split = len(_INPUT_FIGURES)
    return Usage(input_tokens=sum(counts[:split]), output_tokens=sum(counts[split:]), final=final)


def is_finished(chunk: dict[str, Any]) -> bool:
    """A response whose candidates are done (`finishReason` set): a stream's last chunk."""
    candidates = chunk.get("candidates")
    return isinstance(candidates, list) and any(isinstance(c, dict) and c.get("finishReason") for c in candidates)


def usage_of(answer: dict[str, Any]) -> Usage | None:
    """A response's `usageMetadata`; a countTokens answer (`{"totalTokens": n}`) generated nothing: zero tokens."""
    if "usageMetadata" not in answer and isinstance(answer.get("totalTokens"), int):
        return Usage()
    return usage_from_metadata(answer.get("usageMetadata"))


def usage_in_tail(data: bytes) -> Usage | None:
    """The last whole `usageMetadata` object in the end of an answer too large to parse whole."""
    return usage_from_metadata(last_usage_object(data, _USAGE_OBJECT))


def may_carry_usage(event: bytes) -> bool:
    return _USAGE_OBJECT.search(event) is not None


def event_usage(previous: Usage | None, event: bytes, parsed: dict[str, Any] | None = None) -> Usage | None:
    """Figures are running totals: the latest stand, final once a chunk has its `finishReason`."""
    if not may_carry_usage(event):
        return previous
    chunk = parsed if parsed is not None else sse.event_json(event)
    if chunk is None:
        return previous
    return usage_from_metadata(chunk.get("usageMetadata"), final=is_finished(chunk)) or previous


def is_output_event(event: bytes) -> bool:
    return _CANDIDATE.search(event) is not None


is_injected_usage_event = no_injected_usage_event


def ends_stream(event: bytes) -> bool:
    return _FINISHED.search(event) is not None


def error_body(error: ApiError) -> dict[str, Any]:
    """Google's error shape (what google-genai raises from); our stable code is the ErrorInfo's `reason`, its
    details (param, upstream status...) the ErrorInfo's metadata."""
    info = {
        "@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": error.code, "domain": ERROR_DOMAIN,
        "metadata": {name: str(value) for name, value in error.details.items()},
    }
    status = _STATUSES.get(error.status, "INTERNAL" if error.status >= 500 else "FAILED_PRECONDITION")
    return {"error": {"code": error.status, "message": error.message, "status": status, "details": [info]}}


def error_event(error: ApiError) -> bytes:
    """An SSE event whose data is the error body: google-genai raises a chunk starting `{"error":`."""
    return sse.data_event(error_body(error))


def _prepare_chat(body: dict[str, Any], upstream_model: str, max_output_tokens: int) -> PreparedBody:
    stream = body.get("stream") is True
    options = body.get("stream_options")
    include_usage = stream and isinstance(options, dict) and options.get("include_usage") is True
    request = gemini_translate.chat_request(body)
    prepared = prepare(STREAM if stream else GENERATE, request, upstream_model, max_output_tokens)
    return replace(prepared, translation=ChatTranslation(upstream_model, include_usage))


@dataclass(frozen=True)
class ChatTranslation:
    """How Gemini's answer to a translated chat call reaches its OpenAI client (PreparedBody.translation)."""

    model: str  # named in the answers, as OpenAI names the model that answered
    include_usage: bool  # the client asked for the usage chunk (stream_options.include_usage)

    def answer(self, body: bytes) -> tuple[bytes, Usage | None]:
        answer = answer_object(body, "Gemini")
        completion = gemini_translate.chat_completion(answer, self.model, _completion_id(), int(time.time()))
        return sse.compact_json(completion), usage_of(answer)

    def error(self, status: int, error_type: str, body: bytes) -> bytes:
        return sse.compact_json(gemini_translate.error_from_gemini(status, body).body())

    def stream(self) -> "ChatStream":
        chunks = gemini_translate.ChatChunks(self.model, _completion_id(), int(time.time()), self.include_usage)
        return ChatStream(chunks)


@dataclass
class ChatStream:
    """A Gemini SSE stream in, OpenAI chunk SSE events out, each event as soon as it is whole; usage and output
    read from Gemini's own events (as on the native route). Ends with `[DONE]` after the chunk with a finishReason."""

    chunks: gemini_translate.ChatChunks
    usage: Usage | None = None
    output_chunks: int = 0
    done: bool = False
    error: dict[str, Any] | None = None  # an error event: the OpenAI error the stream ended with
    _splitter: sse.EventSplitter = field(default_factory=sse.EventSplitter)

    def feed(self, data: bytes) -> bytes:
        return b"".join(self._event(event) for event in self._splitter.feed(data))

    def _event(self, event: bytes) -> bytes:
        if self.done:
            return b""
        if is_output_event(event):
            self.output_chunks += 1
        chunk = sse.event_json(event)
        self.usage = event_usage(self.usage, event, chunk)
        if chunk is None:
            return b""
        if "error" in chunk:
            error = chunk["error"]
            status = error.get("code") if isinstance(error, dict) and isinstance(error.get("code"), int) else 500
            self.error = gemini_translate.error_from_gemini(status, sse.event_data(event)).body()
            self.done = True
            return sse.data_event(self.error)
        out = b"".join(sse.data_event(c) for c in self.chunks.chunks(chunk))
        if is_finished(chunk):
            self.done = True
            out += b"".join(sse.data_event(c) for c in self.chunks.final()) + b"data: [DONE]\n\n"
        return out


def _completion_id() -> str:
    return f"chatcmpl-{os.urandom(12).hex()}"
