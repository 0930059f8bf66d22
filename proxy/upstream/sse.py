"""Incremental Server-Sent Events framing: split a byte stream into whole events without re-encoding them."""

from __future__ import annotations

import json
import re
from typing import Any

# An event ends at a blank line; SSE allows \n, \r\n and \r line endings.
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_MAX_PENDING = 1024 * 1024  # an event larger than this is passed on in pieces rather than held whole
_KEEP_TAIL = 64 * 1024  # of such an event, kept for its last piece: a usage object at its end stays whole


class EventSplitter:
    """Feed raw chunks; get back the raw bytes of each event completed so far (terminator included)."""

    __slots__ = ("_pending",)  # one per open stream

    def __init__(self) -> None:
        self._pending = b""

    @property
    def at_boundary(self) -> bool:
        """True when no partial event is held, so a comment can be written without breaking framing."""
        return not self._pending

    def feed(self, chunk: bytes) -> list[bytes]:
        if not self._pending and _is_one_event(chunk):
            return [chunk]  # the usual chunk: exactly one whole event, passed on without a copy
        data = self._pending + chunk
        events: list[bytes] = []
        start = 0
        # The held bytes hold no terminator, so only a terminator that reaches into the new chunk is new:
        # searching from there keeps a large event's pieces linear, not quadratic.
        for match in _EVENT_END.finditer(data, max(0, len(self._pending) - 3)):
            events.append(data[start : match.end()])
            start = match.end()
        self._pending = data[start:]
        if len(self._pending) > _MAX_PENDING:
            # An oversized event (or a malformed upstream) must not make us hold unbounded memory: pass on all
            # but its tail, so that the piece ending the event still carries the usage an OpenAI event ends with.
            events.append(self._pending[:-_KEEP_TAIL])
            self._pending = self._pending[-_KEEP_TAIL:]
        return events

    def flush(self) -> bytes:
        rest, self._pending = self._pending, b""
        return rest


def _is_one_event(chunk: bytes) -> bool:
    """Whether `chunk` is exactly one `\n`-framed event (the usual chunk); byte scans, cheaper than the regex. A
    chunk with a `\r` is left to the regex, which knows every line ending."""
    return chunk.endswith(b"\n\n") and chunk.find(b"\n\n") == len(chunk) - 2 and b"\r" not in chunk


def event_data(event: bytes) -> bytes:
    """The event's `data:` payload (multi-line data joined with newlines)."""
    lines = []
    for line in event.splitlines():
        if line.startswith(b"data:"):
            value = line[5:]
            lines.append(value[1:] if value.startswith(b" ") else value)
    return b"\n".join(lines)


def event_json(event: bytes) -> dict[str, Any] | None:
    """The event's data parsed as a JSON object, or None (e.g. `[DONE]` or a comment)."""
    data = event_data(event)
    return json_object(data) if data.startswith(b"{") else None


def json_object(data: bytes) -> dict[str, Any] | None:
    """`data` parsed as a JSON object, or None (not JSON, nested too deep, or not an object)."""
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def comment(text: str) -> bytes:
    return f": {text}\n\n".encode()


def data_event(payload: dict[str, Any]) -> bytes:
    return b"data: " + compact_json(payload) + b"\n\n"


_COMPACT = json.JSONEncoder(separators=(",", ":"))  # json.dumps with separators would build an encoder per call


def compact_json(value: Any) -> bytes:
    """`value` as JSON without spaces (what goes upstream and into translated answers), from one encoder."""
    return _COMPACT.encode(value).encode()
