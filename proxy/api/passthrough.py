"""OpenAI-compatible routes: the whole pipeline for one generation call.

authenticate -> authorize + meter -> route -> relay -> settle (see metered.py); recording happens in the
app middleware.
"""

from __future__ import annotations

from aiohttp import web

from ..context import CONTEXT
from ..upstream import openai_format
from ..upstream.relay import relay
from .body import read_json_object
from .metered import authorize_and_admit, connection_share, metered_call, request_facts
from .state import GATEWAY, authenticated

ROUTES = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/images/generations",
    "/v1/audio/speech",
)


async def passthrough(request: web.Request) -> web.StreamResponse:
    gateway, ctx = request.app[GATEWAY], request[CONTEXT]
    principal = await authenticated(request)
    body = await read_json_object(request, gateway.config.server.max_body_bytes)
    ctx.model = model = gateway.model(body.get("model"))
    facts = request_facts(request.path, body, len(await request.read()))  # the body is cached by now
    decision, admission = await authorize_and_admit(gateway, ctx, principal, model, facts)
    provider = gateway.providers[model.provider]
    prepared = openai_format.prepare(request.path, body, model.upstream_model, decision.max_output_tokens)
    async with connection_share(gateway, provider, principal.account, decision, admission):
        async with metered_call(gateway, ctx, provider, decision, admission, facts) as outcome:
            return await relay(
                request, provider, request.path, prepared, ctx.request_id, gateway.relay, outcome, admission.headers
            )


def add_routes(app: web.Application) -> None:
    for path in ROUTES:
        app.router.add_post(path, passthrough)
