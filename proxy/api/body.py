"""Reading request bodies: size-limited, JSON objects only, with catalogue errors."""

from __future__ import annotations

import json
from typing import Any, Iterator, Mapping

from aiohttp import web

from ..errors import ApiError

_READ_CHUNK = 64 * 1024


async def read_json_object(request: web.Request, max_bytes: int) -> dict[str, Any]:
    """The body as a JSON object, or 413 / 400 errors that say what is wrong (the raw bytes stay cached on the
    request: `request.read()` returns them again).

    The Content-Type is not enforced: `curl -d` sends form-encoded by default, and the body decides.
    """
    if request.content_length is not None and request.content_length > max_bytes:
        raise _too_large(max_bytes)
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise _too_large(max_bytes) from None
    return _json_object(raw)


async def read_call_body(request: web.Request, max_bytes: int) -> tuple[dict[str, Any], int]:
    """A generation call's body as a JSON object, and its size in bytes; errors as `read_json_object`'s. The raw
    bytes are not cached on the request, which an open stream keeps for as long as it lasts."""
    raw = await read_raw(request, max_bytes)
    return _json_object(raw), len(raw)


def _json_object(raw: bytes) -> dict[str, Any]:
    if not raw:
        raise ApiError("invalid_request", "the request body is empty; send a JSON object")
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError("invalid_request", f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise ApiError("invalid_request", "the request body nests JSON too deeply") from None
    if not isinstance(body, dict):
        raise ApiError("invalid_request", "the request body must be a JSON object")
    return body


def _reject_constant(name: str) -> None:
    # Python accepts NaN and Infinity; JSON does not, and forwarding them would send the provider invalid JSON.
    raise ValueError(f"{name} is not a JSON number")


async def read_raw(request: web.Request, max_bytes: int) -> bytes:
    """The raw body, refused with 413 as soon as it passes `max_bytes`, whatever the app's `client_max_size`."""
    if request.content_length is not None and request.content_length > max_bytes:
        raise _too_large(max_bytes)
    body = bytearray()
    async for chunk in request.content.iter_chunked(_READ_CHUNK):
        body += chunk
        if len(body) > max_bytes:
            raise _too_large(max_bytes)
    return bytes(body)


def _too_large(max_bytes: int) -> ApiError:
    return ApiError("payload_too_large", f"the request body exceeds {max_bytes} bytes", max_bytes=max_bytes)


def objects_within(root: Any) -> Iterator[dict[str, Any]]:
    """Every JSON object nested anywhere in `root` (itself included), walked without recursion: a body nested
    deeper than Python's stack still counts."""
    pending = [root]
    while pending:
        node = pending.pop()
        if isinstance(node, list):
            pending.extend(node)
        elif isinstance(node, dict):
            yield node
            pending.extend(v for v in node.values() if isinstance(v, (list, dict)))


def known_query(query: Mapping[str, str], known: frozenset[str]) -> None:
    """400 `invalid_request` naming a query parameter that is not in `known`, or one given more than once."""
    for name in query:
        if name not in known:
            raise ApiError("invalid_request", f"unknown parameter {name!r}; use {', '.join(sorted(known))}",
                           param=name)
        if len(query.getall(name)) > 1:  # type: ignore[attr-defined]
            raise ApiError("invalid_request", f"{name} is given more than once", param=name)
