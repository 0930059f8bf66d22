"""Anthropic's Messages API, native: `POST /anthropic/v1/messages` and `/anthropic/v1/messages/count_tokens`.

The Anthropic SDKs work with `base_url=<gateway>/anthropic` and one of our keys or tokens as their API key
(`x-api-key` or `Authorization: Bearer`). Bodies go to a model of an `anthropic` provider with its upstream id and
`max_tokens` lowered to the reservation's bound; answers and SSE events come back as the provider sent them.
Errors of the gateway on these routes are in Anthropic's shape (our code in `error.code`).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ..context import CONTEXT
from ..errors import ApiError
from ..policy.types import RequestFacts
from ..upstream.formats import anthropic as anthropic_format
from ..upstream.formats.anthropic import API_VERSION, COUNT_TOKENS, MESSAGES, PREFIX
from ..upstream.relay import forwarded_headers
from .body import objects_within, read_call_body
from .metered import MAX_OUTPUT_TOKENS, count_param
from .passthrough import relay_generation
from .state import ERROR_SHAPES, GATEWAY, authenticated

_CLIENT_HEADERS = ("anthropic-version", "anthropic-beta")  # passed through; the credential never is
_MEDIA_BLOCKS = frozenset({"image", "document"})  # their tokens are not bounded by the body's bytes (URLs)


async def messages(request: web.Request) -> web.StreamResponse:
    gateway, ctx = request.app[GATEWAY], request[CONTEXT]
    principal = await authenticated(request, api_key_header="x-api-key")
    body, size = await read_call_body(request, gateway.config.server.max_body_bytes)
    ctx.model = model = gateway.model(body.get("model"), "anthropic")
    route = COUNT_TOKENS if request.path == COUNT_TOKENS else MESSAGES
    facts = request_facts(route, body, size)
    forward = forwarded_headers(request, _CLIENT_HEADERS)
    forward.setdefault("anthropic-version", API_VERSION)
    return await relay_generation(request, principal, model, route, body, facts, forward)


def request_facts(route: str, body: dict[str, Any], input_bytes: int) -> RequestFacts:
    """What bounds a Messages call: `max_tokens` (required by Anthropic, so by us before reserving), the body's
    bytes and its image and document blocks. Counting tokens generates nothing."""
    if route == COUNT_TOKENS:
        return RequestFacts(input_bytes=input_bytes, max_output_tokens=0, media_parts=_media_blocks(body))
    max_tokens = count_param(body, "max_tokens", MAX_OUTPUT_TOKENS)
    if max_tokens is None:
        raise ApiError("invalid_request", "max_tokens: Field required (an integer from 1)", param="max_tokens")
    return RequestFacts(
        input_bytes=input_bytes, max_output_tokens=max_tokens, media_parts=_media_blocks(body),
        stream=body.get("stream") is True,
    )


def _media_blocks(body: dict[str, Any]) -> int:
    """Image and document blocks anywhere in the messages (tool results nest them); a `type` that is not a string
    names no block."""
    return sum(1 for node in objects_within(body.get("messages"))
               if isinstance(kind := node.get("type"), str) and kind in _MEDIA_BLOCKS)


def add_routes(app: web.Application) -> None:
    app.router.add_post(MESSAGES, messages)
    app.router.add_post(COUNT_TOKENS, messages)
    app[ERROR_SHAPES].append((PREFIX + "/", anthropic_format.error_body))
