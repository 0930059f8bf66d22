"""The Anthropic Messages wire format (kind `anthropic`): `POST /v1/messages` (JSON or SSE) and
`POST /v1/messages/count_tokens`, credential in `x-api-key`, errors as `{"type": "error", "error": {...}}`.

Usage: a JSON answer's `usage`; in a stream, `message_start.message.usage` (the input, not final) then
`message_delta.usage` (cumulative, final). Input tokens include cache writes and reads
(`cache_creation_input_tokens`, `cache_read_input_tokens`), priced as input. The module is the adapter
(formats.base.WireFormat).
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

from ...errors import ApiError
from ...policy.types import Usage
from .. import sse
from . import anthropic_translate
from .base import SSE_PING, USAGE_OBJECT, PreparedBody, last_usage_object, no_injected_usage_event, token_figure

dialect = "anthropic"
keepalive = SSE_PING
example_base_url = "https://api.anthropic.com"
PREFIX = "/anthropic"  # the gateway's native routes: `/anthropic/v1/messages` -> `<base_url>/v1/messages`
MESSAGES = f"{PREFIX}/v1/messages"
COUNT_TOKENS = f"{PREFIX}/v1/messages/count_tokens"
CHAT_ROUTE = "/v1/chat/completions"  # OpenAI chat calls to Anthropic models, translated (anthropic_translate.py)
API_VERSION = "2023-06-01"  # sent as `anthropic-version` when the client names none
_INPUT_FIGURES = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
# Anthropic's error types by HTTP status, for the gateway's own errors on the native routes.
_ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 402: "billing_error", 403: "permission_error",
    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
    502: "api_error", 503: "overloaded_error", 504: "timeout_error",
}
# At the start of raw event bytes: Anthropic names every event (`event: <type>`), and its SDK reads only those.
_OUTPUT_EVENT = re.compile(rb"event: ?content_block_delta\r?\n")
_LAST_EVENT = re.compile(rb"event: ?message_stop\r?\n")


def url(base_url: str, route: str, upstream_model: str, stream: bool) -> str:
    """`/anthropic/v1/messages` (and a translated chat call) -> `<base_url>/v1/messages` (base_url e.g.
    `https://api.anthropic.com`)."""
    return base_url + (MESSAGES if route == CHAT_ROUTE else route).removeprefix(PREFIX)


def credential_headers(credential: str, header: str | None, scheme: str | None) -> dict[str, str]:
    """`x-api-key: <key>` unless the config names another header or scheme."""
    return {header or "x-api-key": f"{scheme} {credential}" if scheme else credential}


def prepare(route: str, body: dict[str, Any], upstream_model: str, max_output_tokens: int = 0) -> PreparedBody:
    """The upstream model id, and `max_tokens` lowered to the reservation's bound (0: no cap to send). An OpenAI
    chat body (CHAT_ROUTE) is translated to a Messages body, `max_tokens` set to the bound when the client named
    none (Anthropic requires it), and its answer is translated back (anthropic_translate.py)."""
    translated = route == CHAT_ROUTE
    out = dict(anthropic_translate.chat_request(body) if translated else body, model=upstream_model)
    if max_output_tokens > 0 and route in (MESSAGES, CHAT_ROUTE):
        asked = out.get("max_tokens")  # validated by now: an integer (request_facts)
        out["max_tokens"] = min(asked, max_output_tokens) if isinstance(asked, int) else max_output_tokens
    encoded, stream = sse.compact_json(out), out.get("stream") is True
    if not translated:
        return PreparedBody(encoded, stream, False)
    translation = anthropic_translate.ChatTranslation(upstream_model, anthropic_translate.wants_usage(body))
    return PreparedBody(encoded, stream, False, translation, (("anthropic-version", API_VERSION),))


def _usage(figures: Any, final: bool = True) -> Usage | None:
    """A `usage` object's tokens (cache writes and reads as input); None if absent or broken."""
    if not isinstance(figures, dict) or all(figures.get(name) is None for name in (*_INPUT_FIGURES, "output_tokens")):
        return None
    inputs = [token_figure(figures.get(name)) for name in _INPUT_FIGURES]
    output = token_figure(figures.get("output_tokens"))
    if output is None or any(part is None for part in inputs):
        return None
    return Usage(input_tokens=sum(part or 0 for part in inputs), output_tokens=output, final=final)


def usage_of(answer: dict[str, Any]) -> Usage | None:
    """A message's `usage`; a count_tokens answer (`{"input_tokens": n}`) generated nothing: zero tokens."""
    if "usage" not in answer and answer.get("type") is None and isinstance(answer.get("input_tokens"), int):
        return Usage()
    return _usage(answer.get("usage"))


def usage_in_tail(data: bytes) -> Usage | None:
    return _usage(last_usage_object(data))


def may_carry_usage(event: bytes) -> bool:
    return USAGE_OBJECT.search(event) is not None


def event_usage(previous: Usage | None, event: bytes, parsed: dict[str, Any] | None = None) -> Usage | None:
    """`message_start` gives the input (not final: output grows); `message_delta` gives cumulative counts, final.
    Its input figures, when it has them, are cumulative too: the larger input sum stands."""
    if not may_carry_usage(event):
        return previous
    data = parsed if parsed is not None else sse.event_json(event)
    if data is None:
        return previous
    kind = data.get("type")
    if kind == "message_start" and isinstance(data.get("message"), dict):
        return _usage(data["message"].get("usage"), final=False) or previous
    if kind != "message_delta":
        return previous
    usage = _usage(data.get("usage"))
    if usage is None:
        return previous
    return replace(usage, input_tokens=max(usage.input_tokens, previous.input_tokens if previous else 0))


def is_output_event(event: bytes) -> bool:
    return _OUTPUT_EVENT.match(event) is not None


is_injected_usage_event = no_injected_usage_event


def ends_stream(event: bytes) -> bool:
    return _LAST_EVENT.match(event) is not None


def error_body(error: ApiError) -> dict[str, Any]:
    """Anthropic's error shape; our stable code stays in `error.code` beside Anthropic's `type`."""
    kind = _ERROR_TYPES.get(error.status, "invalid_request_error" if error.status < 500 else "api_error")
    return {"type": "error", "error": {**error.details, "type": kind, "message": error.message, "code": error.code}}


def error_event(error: ApiError) -> bytes:
    """`event: error`: the Anthropic SDKs raise it from a stream (they skip events without a name)."""
    return b"event: error\ndata: " + sse.compact_json(error_body(error)) + b"\n\n"
