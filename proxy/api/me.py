"""`GET /v1/me`: who the caller is, its plan and scopes, its balance and rate-limit state, and the models it may
call by the kind of provider serving them."""

from __future__ import annotations

from aiohttp import web

from ..catalog import Model
from ..errors import ApiError
from ..gateway import Gateway
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
        "models_by_provider_kind": _models_by_kind(gateway, policy.visible_models(principal, gateway.models.values())),
    })


def _models_by_kind(gateway: Gateway, models: list[Model]) -> dict[str, list[str]]:
    """`{"openai": ["demo/chat", ...], ...}`: a model served by providers of two kinds is listed under both."""
    by_kind: dict[str, list[str]] = {}
    for model in models:
        for kind in sorted({gateway.provider_kinds[d.provider] for d in model.served_by()}):
            by_kind.setdefault(kind, []).append(model.id)
    return by_kind


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/me", me)
