"""OpenAI-compatible routes: the whole pipeline for one generation call."""

from __future__ import annotations

from aiohttp import web

from ..context import CONTEXT
from ..upstream import openai_format
from ..upstream.relay import RelayOutcome, relay
from .body import read_json_object
from .state import GATEWAY

ROUTES = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/images/generations",
    "/v1/audio/speech",
)


async def passthrough(request: web.Request) -> web.StreamResponse:
    gateway, ctx = request.app[GATEWAY], request[CONTEXT]
    ctx.principal = await gateway.authenticate(request)
    body = await read_json_object(request, gateway.config.server.max_body_bytes)
    ctx.model = model = gateway.model(body.get("model"))
    provider = gateway.providers[model.provider]
    prepared = openai_format.prepare(request.path, body, model.upstream_model)
    ctx.outcome = RelayOutcome()
    return await relay(request, provider, request.path, prepared, ctx.request_id, gateway.relay, ctx.outcome)


def add_routes(app: web.Application) -> None:
    for path in ROUTES:
        app.router.add_post(path, passthrough)
