"""OpenAI-compatible routes, under `/v1` and under the `/openai/v1` base URL: the whole pipeline for one
generation call.

authenticate -> authorize + meter -> route (routed.py) -> relay -> settle (metered.py); recording happens in
the app middleware.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from aiohttp import web

from ..auth.principal import Principal
from ..catalog import Model
from ..context import CONTEXT
from ..policy.types import RequestFacts, Usage
from ..upstream.formats import TRANSLATED
from ..upstream.formats.openai import RESPONSES_ROUTE
from ..upstream.relay import forwarded_headers, relay
from .body import read_call_body
from .metered import authorize_and_admit, metered_call, request_facts
from .routed import open_routed
from .state import GATEWAY, authenticated

ROUTES = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/images/generations",
    "/v1/audio/speech",
)
OPENAI_PREFIX = "/openai"  # `<gateway>/openai/v1`: OpenAI's whole surface as an SDK's base URL (docs/api.md)
# Only under the prefix: the gateway's own /v1/responses is the unified generation API (responses.py).
OPENAI_ONLY_ROUTES = (RESPONSES_ROUTE,)


def openai_route(request: web.Request) -> str:
    """The OpenAI route the request's matched path names: `/openai/v1/x` is `/v1/x`."""
    resource = request.match_info.route.resource
    assert resource is not None  # a handler runs only on a matched route
    return resource.canonical.removeprefix(OPENAI_PREFIX)


async def passthrough(request: web.Request) -> web.StreamResponse:
    gateway, ctx = request.app[GATEWAY], request[CONTEXT]
    principal = await authenticated(request)
    body, size = await read_call_body(request, gateway.config.server.max_body_bytes)
    route = openai_route(request)
    ctx.model = model = gateway.model(body.get("model"), "openai", TRANSLATED.get(route, ()))
    facts = request_facts(route, body, size)
    return await relay_generation(request, principal, model, route, body, facts, forwarded_headers(request))


async def relay_generation(
    request: web.Request, principal: Principal, model: Model, route: str, body: dict[str, Any], facts: RequestFacts,
    forward: Mapping[str, str], headers_usage: Callable[[Mapping[str, str]], Usage | None] | None = None,
) -> web.StreamResponse:
    """Decide and admit, then open the call on a deployment and relay its answer as the provider sent it, inside
    `metered_call` (the same for every native route: the model's wire format is the route's). `headers_usage`:
    usage the answer's headers state (ElevenLabs' characters), kept unless its body carries some. `body` is emptied
    once the call is opened: nothing after needs it, and the handler's frames would keep it while the stream lasts."""
    gateway, ctx = request.app[GATEWAY], request[CONTEXT]
    decision, admission = await authorize_and_admit(gateway, ctx, principal, model, facts)
    async with metered_call(gateway, ctx, decision, admission, facts) as outcome:
        call, attempt = await open_routed(gateway, ctx, principal, decision, facts, route, body, forward)
        body.clear()
        async with attempt:
            if headers_usage is not None and call.upstream.status < 400:
                outcome.usage = headers_usage(call.upstream.headers)
            return await relay(request, call, gateway.relay, outcome, admission.headers)


def add_routes(app: web.Application) -> None:
    for path in ROUTES:
        app.router.add_post(path, passthrough)
    for path in ROUTES + OPENAI_ONLY_ROUTES:
        app.router.add_post(OPENAI_PREFIX + path, passthrough)
