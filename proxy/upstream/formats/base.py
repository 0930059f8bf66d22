"""The interface every wire format implements: one module per format, chosen by a provider's `kind`.

A wire format knows how to address a model at its provider (URL), how to present the provider's credential
(headers), how to prepare a request body (upstream model id, the output cap from the reservation, asking
streams for their usage), where usage is found in a JSON answer and in an SSE event, and how an error looks
to a client of that format. Everything that can be decided once (header names, URL templates) is, at start-up:
the relay calls these methods per event, so they must stay cheap (byte checks before any JSON parsing).
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any, Protocol

from ...errors import ApiError
from ...policy.types import Usage


class StreamTranslator(Protocol):
    """An upstream stream turned into the client's SSE events as it arrives (converse.StreamTranslation)."""

    usage: Usage | None
    output_chunks: int
    done: bool  # the client has the whole answer
    error: dict[str, Any] | None  # the upstream ended the stream with an error (sent to the client in-band)

    def feed(self, data: bytes) -> bytes:
        ...


class AnswerTranslation(Protocol):
    """How an answer in another dialect reaches the client (e.g. Bedrock Converse -> OpenAI chat)."""

    def answer(self, body: bytes) -> tuple[bytes, Usage | None]:
        """A whole JSON answer in the client's format, and its usage."""
        ...

    def error(self, status: int, error_type: str, body: bytes) -> bytes:
        """An upstream error answer (`error_type`: the provider's name for it) in the client's error shape."""
        ...

    def stream(self) -> StreamTranslator:
        ...


@dataclass(frozen=True, slots=True)
class PreparedBody:
    body: bytes
    stream: bool
    usage_injected: bool  # we asked for a usage event the client did not: drop it before the client sees it
    translation: AnswerTranslation | None = None  # the answer is translated for the client, not relayed as is
    headers: tuple[tuple[str, str], ...] = ()  # sent upstream besides the client's forwarded ones (e.g. a version)

    def without_body(self) -> PreparedBody:
        """How to read the answer, without the bytes sent (a stream may last minutes). Made directly: a
        `dataclasses.replace` costs twice as much."""
        return PreparedBody(b"", self.stream, self.usage_injected, self.translation, self.headers)


@dataclass(frozen=True)
class FilePart:
    """A file in a request body that goes upstream as a multipart/form-data part (an audio file, an image)."""

    data: bytes
    content_type: str
    filename: str


def multipart_body(fields: dict[str, Any]) -> PreparedBody:
    """`fields` as multipart/form-data (RFC 7578): a FilePart is a file part, anything else a text field (lists:
    one field per item, as form clients send arrays). Names and filenames are the gateway's own, never a client's."""
    boundary = secrets.token_hex(16)  # random: no file's bytes can contain it by chance
    out = bytearray()
    for name, value in fields.items():
        for item in value if isinstance(value, list) else [value]:
            out += f"--{boundary}\r\n".encode()
            if isinstance(item, FilePart):
                out += (f'Content-Disposition: form-data; name="{name}"; filename="{item.filename}"\r\n'
                        f"Content-Type: {item.content_type}\r\n\r\n").encode()
                out += item.data
            else:
                out += f'Content-Disposition: form-data; name="{name}"\r\n\r\n{item}'.encode()
            out += b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    content_type = f"multipart/form-data; boundary={boundary}"
    return PreparedBody(bytes(out), stream=False, usage_injected=False, headers=(("Content-Type", content_type),))


class WireFormat(Protocol):
    """One provider wire format (implemented by a module: its top-level names). `dialect` names the request/answer body format it speaks (`openai`,
    `anthropic`, ...): kinds sharing a dialect (e.g. `openai` and `azure_openai`) differ only in addressing and
    credentials, so a model's deployments may mix them and its native routes accept any of them."""

    dialect: str
    example_base_url: str  # named in the config error when base_url is missing
    keepalive: bytes  # written between the events of a quiet stream to keep it open, skipped by the format's SDKs

    def url(self, base_url: str, route: str, upstream_model: str, stream: bool) -> str:
        """Where a call on public `route` for `upstream_model` goes (`base_url` without a trailing slash)."""
        ...

    def credential_headers(self, credential: str, header: str | None, scheme: str | None) -> dict[str, str]:
        """The headers carrying the provider's credential (`header`/`scheme`: the config's override, if any)."""
        ...

    def prepare(self, route: str, body: dict[str, Any], upstream_model: str, max_output_tokens: int = 0) -> PreparedBody:
        """The upstream body: its model id, the output capped at the reservation's bound (0: no cap to send),
        streams asked for their usage."""
        ...

    def usage_of(self, answer: dict[str, Any]) -> Usage | None:
        """Usage from a whole JSON answer; None when it carries none (or only broken figures)."""
        ...

    def usage_in_tail(self, data: bytes) -> Usage | None:
        """Usage from the end of an answer too large to parse whole; None if not found whole there."""
        ...

    def event_usage(self, previous: Usage | None, event: bytes, parsed: dict[str, Any] | None = None) -> Usage | None:
        """The stream's usage after this raw SSE event (`parsed`: its JSON if the caller parsed it already)."""
        ...

    def may_carry_usage(self, event: bytes) -> bool:
        """Whether a raw SSE event can carry usage (the only events worth parsing for it)."""
        ...

    def is_output_event(self, event: bytes) -> bool:
        """A raw SSE event carrying generated content (about one token): the estimate for a stream cut short."""
        ...

    def is_injected_usage_event(self, parsed: dict[str, Any]) -> bool:
        """The usage-only event a prepared body asked for (`usage_injected`): dropped before the client."""
        ...

    def ends_stream(self, event: bytes) -> bool:
        """The event after which the client has the whole answer (and may hang up)."""
        ...

    def error_body(self, error: ApiError) -> dict[str, Any]:
        """A gateway error as a JSON body in this format's error shape (our stable code stays visible)."""
        ...

    def error_event(self, error: ApiError) -> bytes:
        """A gateway error ending an SSE stream whose headers are sent, as this format's clients read it."""
        ...


SSE_PING = b": ping\n\n"  # an SSE comment: every SSE client skips it

MAX_USAGE_TOKENS = 2**31 - 1  # per usage figure: anything more is no real count


# On raw bytes. A quote inside generated text is escaped (\"), so this cannot match content.
USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')


def last_usage_object(data: bytes, key: re.Pattern[bytes] = USAGE_OBJECT) -> dict[str, Any] | None:
    """The last whole `"usage": {...}` object (`key`: the pattern of its key and opening brace, for formats naming
    it otherwise) in the end of an answer too large to parse whole (or a fragment of an oversized event): answers
    put it after their data. None if it is not there whole."""
    matches = list(key.finditer(data))
    if not matches:
        return None
    start = matches[-1].end() - 1
    try:
        usage, _ = json.JSONDecoder().raw_decode(data[start:].decode(errors="replace"))
    except (ValueError, RecursionError):
        return None
    return usage if isinstance(usage, dict) else None


def no_injected_usage_event(parsed: dict[str, Any]) -> bool:
    """`is_injected_usage_event` of formats whose streams always carry usage: nothing is asked for, nothing dropped."""
    return False


def token_figure(value: Any) -> int | None:
    """A usage figure as a token count (absent or null: 0); None if it is broken or hostile: not an integer,
    negative, or beyond any real count (10^400 would also make pricing raise)."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_USAGE_TOKENS:
        return None
    return value


MAX_AUDIO_SECONDS = 7 * 24 * 3600.0  # per usage figure: a week of audio is beyond any one call


def audio_seconds(value: Any) -> float | None:
    """A provider's audio length in seconds; None if it is broken or hostile (not a number, negative, infinite,
    beyond any one call)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if 0 <= value <= MAX_AUDIO_SECONDS else None


_CLIENT_REFUSALS = {400: "invalid_request", 413: "payload_too_large", 429: "rate_limit"}


def provider_refusal(status: int, message: str) -> ApiError:
    """A provider's 4xx answer to a translated call as our error: a refusal of the request stays the client's 400
    (or 413, 429), with the provider's message and status kept; anything else (a bad provider key, an unknown
    upstream model) is the gateway's 502."""
    code = _CLIENT_REFUSALS.get(status, "upstream_error")
    return ApiError(code, f"the provider refused the call: {message}".strip(), upstream_status=status)


def error_message(body: bytes) -> str:
    """The message of a provider's JSON error body (`{"error": {"message": ...}}`), else the body's start."""
    try:
        error = json.loads(body).get("error")
    except (ValueError, RecursionError, AttributeError):
        error = None
    return str(error.get("message", "")) if isinstance(error, dict) else body[:500].decode(errors="replace")


def tool_call_arguments(arguments: Any) -> dict[str, Any] | None:
    """An OpenAI tool call's `arguments` (a JSON text; empty or absent: none) as the object a translation sends on;
    None when it is no JSON object, so the caller refuses it rather than send the call on without its arguments."""
    if not arguments:
        return {}
    if not isinstance(arguments, str):
        return None
    try:
        value = json.loads(arguments)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def answer_object(body: bytes, provider: str) -> dict[str, Any]:
    """A translated call's JSON answer as an object, or the gateway's 502 (`upstream_error`) naming the provider:
    a broken or hostile one (not JSON, nested past Python's stack, not an object) is never a traceback."""
    try:
        answer = json.loads(body)
    except (ValueError, RecursionError):
        answer = None
    if not isinstance(answer, dict):
        raise ApiError("upstream_error", f"{provider} answered a body that is not a JSON object")
    return answer
