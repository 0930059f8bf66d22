"""Model discovery: `GET /v1/models` (flat, `?groupBy=capability`, or OpenAI's list), one model's details, and the
same in OpenAI's shapes under `/openai/v1/models`.

`/v1/models` answers the gateway's own shapes (a bare array, or an object by capability) unless the client asks
for OpenAI's (`?format=openai`, or an official OpenAI SDK, whose default User-Agent is `OpenAI/Python <version>`
or `OpenAI/JS <version>`): one base URL then serves both the seeds' clients and `client.models.list()`.
"""

from __future__ import annotations

from typing import Any, Iterable, Literal

from aiohttp import web

from ..catalog import CAPABILITIES, Model
from ..errors import ApiError
from .schema import openapi_document, schema_answer
from .state import GATEWAY, authenticated, from_openai_sdk

Shape = Literal["gateway", "openai"]
_SHAPES: tuple[Shape, ...] = ("gateway", "openai")


def _asked_shape(request: web.Request) -> Shape:
    """`?format=` when given, else OpenAI's for an OpenAI SDK that did not ask to group, else the gateway's."""
    asked = request.query.get("format")
    if asked is None:
        return "openai" if from_openai_sdk(request) and "groupBy" not in request.query else "gateway"
    if asked not in _SHAPES:
        raise ApiError("invalid_request", f"format={asked!r} is not supported; use format=gateway or format=openai",
                       param="format")
    return asked  # type: ignore[return-value]  # checked against _SHAPES


def _capability_filter(request: web.Request) -> str | None:
    capability = request.query.get("capability")
    if capability is not None and capability not in CAPABILITIES:
        raise ApiError("invalid_request", f"capability={capability!r} is not one of {', '.join(CAPABILITIES)}",
                       param="capability")
    return capability


async def _visible(request: web.Request, api_key_header: str | None = None) -> list[Model]:
    """The models the caller may use, of the `?capability=` asked for (every capability without it)."""
    gateway = request.app[GATEWAY]
    principal = await authenticated(request, api_key_header)
    capability = _capability_filter(request)
    visible = gateway.policy.current.visible_models(principal, gateway.models.values())
    return [m for m in visible if capability is None or m.capability == capability]


def openai_model(model: Model) -> dict[str, Any]:
    """A model as OpenAI's `model` object; `created` is 0 (the catalogue has no release date), the gateway's own
    fields (`name`, `capability`) ride along."""
    return {"id": model.id, "object": "model", "created": 0, "owned_by": model.creator,
            "name": model.name, "capability": model.capability}


def openai_list(models: Iterable[Model]) -> dict[str, Any]:
    return {"object": "list", "data": [openai_model(m) for m in models]}


def _grouped(models: list[Model]) -> dict[str, list[dict[str, str]]]:
    grouped: dict[str, list[dict[str, str]]] = {}
    for capability in CAPABILITIES:
        if found := [m.public() for m in models if m.capability == capability]:
            grouped[capability] = found
    return grouped


async def list_models(request: web.Request) -> web.Response:
    models = await _visible(request)
    shape = _asked_shape(request)
    group_by = request.query.get("groupBy")
    if group_by is not None and group_by != "capability":
        raise ApiError("invalid_request", f"groupBy={group_by!r} is not supported; use groupBy=capability",
                       param="groupBy")
    if group_by is not None and shape == "openai":
        raise ApiError("invalid_request", "groupBy=capability has no OpenAI shape; use format=gateway with it",
                       param="groupBy")
    if shape == "openai":
        return web.json_response(openai_list(models))
    return web.json_response(_grouped(models) if group_by else [m.public() for m in models])


async def _permitted_model(request: web.Request, api_key_header: str | None = None, model_id: Any = None) -> Model:
    """The model in the path (or `model_id`); one outside the caller's scopes answers like `decide` would."""
    gateway = request.app[GATEWAY]
    principal = await authenticated(request, api_key_header)
    model = gateway.model(model_id if model_id is not None else request.match_info["model_id"])
    decision = gateway.policy.current.decide(principal, model)
    if not decision.allowed:
        raise ApiError(decision.error_code or "forbidden", decision.error_message or "not allowed")
    return model


async def get_model(request: web.Request) -> web.Response:
    model = await _permitted_model(request)
    shape = _asked_shape(request)
    return web.json_response(openai_model(model) if shape == "openai" else model.public())


async def get_schema(request: web.Request) -> web.Response:
    return web.json_response(openapi_document(await _permitted_model(request)))


async def get_schema_by_query(request: web.Request) -> web.Response:
    """The seeds' form: `GET /v1/models/schema?model=<id>`."""
    model_ids = request.query.getall("model", [])
    if len(model_ids) != 1 or not model_ids[0]:
        raise ApiError("invalid_request", "give the model id once: /v1/models/schema?model=<id>", param="model")
    return web.json_response(schema_answer(await _permitted_model(request, model_id=model_ids[0])))


async def list_openai_models(request: web.Request) -> web.Response:
    return web.json_response(openai_list(await _visible(request)))


async def get_openai_model(request: web.Request) -> web.Response:
    return web.json_response(openai_model(await _permitted_model(request)))


def anthropic_model(model: Model) -> dict[str, Any]:
    """A model as Anthropic's Models API describes one (the catalogue has no release date: the epoch)."""
    return {"type": "model", "id": model.id, "display_name": model.name, "created_at": "1970-01-01T00:00:00Z"}


async def list_anthropic_models(request: web.Request) -> web.Response:
    """What an Anthropic SDK may call at `/anthropic`: the caller's models of `anthropic` providers, one page."""
    data = [anthropic_model(m) for m in await _visible(request, "x-api-key") if m.wire_format == "anthropic"]
    first, last = (data[0]["id"], data[-1]["id"]) if data else (None, None)
    return web.json_response({"data": data, "has_more": False, "first_id": first, "last_id": last})


async def get_anthropic_model(request: web.Request) -> web.Response:
    model = await _permitted_model(request, "x-api-key")
    if model.wire_format != "anthropic":
        raise ApiError("model_not_found", f"model {model.id} is not served by an Anthropic provider; see GET /v1/models")
    return web.json_response(anthropic_model(model))


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/schema", get_schema_by_query)  # before the id routes
    app.router.add_get("/v1/models/{model_id:.+}/schema", get_schema)  # before the catch-all id route
    app.router.add_get("/v1/models/{model_id:.+}", get_model)
    app.router.add_get("/openai/v1/models", list_openai_models)
    app.router.add_get("/openai/v1/models/{model_id:.+}", get_openai_model)
    app.router.add_get("/anthropic/v1/models", list_anthropic_models)
    app.router.add_get("/anthropic/v1/models/{model_id:.+}", get_anthropic_model)
