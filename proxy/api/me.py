"""`GET /v1/me`: who the caller is, its plan and scopes, its balance and rate-limit state."""

from __future__ import annotations

from aiohttp import web

from ..errors import ApiError
from .state import GATEWAY, authenticated


async def me(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    principal = await authenticated(request)
    policy = gateway.policy.current
    decision = policy.plan_decision(principal)
    if not decision.allowed:
        raise ApiError(decision.error_code or "forbidden", decision.error_message or "not allowed")
    state = await gateway.meter.state(principal, decision)
    return web.json_response({
        "principal": {
            "type": principal.kind, "issuer": principal.issuer, "account": principal.account,
            "key_id": principal.key_id, "subject": principal.subject,
        },
        **policy.plan_info(principal),
        **state,
    })


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/me", me)
