"""Model discovery: `GET /v1/models` (flat or `?groupBy=capability`) and one model's details."""

from __future__ import annotations

from aiohttp import web

from ..catalog import CAPABILITIES, Model
from ..errors import ApiError
from .schema import openapi_document
from .state import GATEWAY, authenticated


async def list_models(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    principal = await authenticated(request)
    visible = gateway.policy.current.visible_models(principal, gateway.models.values())
    models = [m.public() for m in visible]
    group_by = request.query.get("groupBy")
    if group_by is None:
        return web.json_response(models)
    if group_by != "capability":
        raise ApiError("invalid_request", f"groupBy={group_by!r} is not supported; use groupBy=capability")
    grouped: dict[str, list[dict[str, str]]] = {}
    for capability in CAPABILITIES:
        if found := [m for m in models if m["capability"] == capability]:
            grouped[capability] = found
    return web.json_response(grouped)


async def _permitted_model(request: web.Request) -> Model:
    """The model in the path; one outside the caller's scopes answers like `decide` would."""
    gateway = request.app[GATEWAY]
    principal = await authenticated(request)
    model = gateway.model(request.match_info["model_id"])
    decision = gateway.policy.current.decide(principal, model)
    if not decision.allowed:
        raise ApiError(decision.error_code or "forbidden", decision.error_message or "not allowed")
    return model


async def get_model(request: web.Request) -> web.Response:
    return web.json_response((await _permitted_model(request)).public())


async def get_schema(request: web.Request) -> web.Response:
    return web.json_response(openapi_document(await _permitted_model(request)))


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model_id:.+}/schema", get_schema)  # before the catch-all id route
    app.router.add_get("/v1/models/{model_id:.+}", get_model)
