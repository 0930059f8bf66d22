"""Builds the aiohttp application: middlewares (request id, errors, CORS) and the routes."""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

from aiohttp import web

from .api import (
    admin, anthropic, elevenlabs, gemini, health, identity, jobs, me, models, passthrough, responses, uploads,
    usage, webhooks,
)
from .api.state import ERROR_SHAPES, GATEWAY
from .config import Config, ServerSettings
from .context import CONTEXT, RequestContext, request_id_for, route_name
from .errors import ApiError
from .gateway import Gateway, build_gateway
from .record import CLIENT_CLOSED, record

log = logging.getLogger("edge_proxy")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_EXPOSED_HEADERS = (
    "X-Request-Id, Retry-After, RateLimit-Limit, RateLimit-Remaining, RateLimit-Reset, X-Credits-Balance, Location, "
    "Preference-Applied"
)
_HTTP_ERROR_CODES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


def error_response(error: ApiError, request: web.Request | None = None) -> web.Response:
    """The error as JSON: ours, or the shape the request's route family registered (ERROR_SHAPES)."""
    shapes = request.app.get(ERROR_SHAPES, ()) if request is not None else ()
    body = next((shape for prefix, shape in shapes if request.path.startswith(prefix)), ApiError.body)(error)
    return web.json_response(body, status=error.status, headers=error.headers)


def _from_http_exception(exc: web.HTTPException) -> ApiError:
    code = _HTTP_ERROR_CODES.get(exc.status, "invalid_request" if exc.status < 500 else "internal_error")
    message = {"not_found": "no such route", "method_not_allowed": f"method not allowed; use {exc.headers.get('Allow', '')}"}
    return ApiError(code, message.get(code, exc.reason))


@web.middleware
async def context_and_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Give each request its context, turn every failure into a catalogue JSON error, and record it."""
    ctx = RequestContext(request_id=request_id_for(request), route=route_name(request))
    request[CONTEXT] = ctx
    status = CLIENT_CLOSED  # unless an answer is produced below; a cancelled handler means the client left
    try:
        response = await _answer(request, handler, ctx)
        status = response.status
        return response
    finally:
        gateway = request.app[GATEWAY]
        server = gateway.config.server
        record(gateway.metrics, request, ctx, status,
               server.access_log and request.path not in server.access_log_skip_paths)


async def _answer(request: web.Request, handler: Handler, ctx: RequestContext) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        ctx.error = exc
    except ConnectionResetError:
        if request.transport is not None and not request.transport.is_closing():
            raise
        # The client hung up as its answer was being written: aiohttp raises this instead of cancelling the
        # handler when the transport is closing but not yet lost. Nothing can be sent; a 499, not a bug.
        raise asyncio.CancelledError from None
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        ctx.error = _from_http_exception(exc)
    except Exception:
        log.exception("unhandled error", extra={"request_id": ctx.request_id})
        ctx.error = ApiError("internal_error", "internal error; quote the X-Request-Id when reporting it")
    return error_response(ctx.error, request)


def cors_middleware(server: ServerSettings) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Answer preflights without authentication, for the configured origins only."""
    allowed = frozenset(server.cors_allow_origins)

    @web.middleware
    async def cors(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if (
            request.method == "OPTIONS"
            and origin
            and "Access-Control-Request-Method" in request.headers
            and ("*" in allowed or origin in allowed)
        ):
            return web.Response(
                status=204,
                headers={
                    "Access-Control-Allow-Methods": "GET, POST, PUT, DELETE, OPTIONS",  # PUT, DELETE: assets
                    "Access-Control-Allow-Headers": request.headers.get(
                        "Access-Control-Request-Headers", "Authorization, Content-Type"
                    ),
                    "Access-Control-Max-Age": "600",
                },
            )
        return await handler(request)

    return cors


def _stamp_headers(allowed_origins: frozenset[str]) -> Callable[[web.Request, web.StreamResponse], Awaitable[None]]:
    """Add X-Request-Id and CORS headers to every response, streamed ones included, just before they are sent."""

    async def stamp(request: web.Request, response: web.StreamResponse) -> None:
        ctx = request.get(CONTEXT)
        if ctx is not None:
            response.headers["X-Request-Id"] = ctx.request_id
        origin = request.headers.get("Origin")
        if origin and ("*" in allowed_origins or origin in allowed_origins):
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = _EXPOSED_HEADERS
            response.headers.add("Vary", "Origin")

    return stamp


def create_app(config: Config, gateway: Gateway | None = None) -> web.Application:
    gateway = gateway or build_gateway(config)
    app = web.Application(
        middlewares=[*gateway.tracing.middlewares(), context_and_errors, cors_middleware(config.server)],
        client_max_size=config.server.max_body_bytes,
    )
    app[GATEWAY] = gateway
    app[ERROR_SHAPES] = []
    app.on_response_prepare.append(_stamp_headers(frozenset(config.server.cors_allow_origins)))

    async def lifecycle(app: web.Application):  # type: ignore[no-untyped-def]
        await gateway.start()
        yield
        await gateway.close()

    async def drain(app: web.Application) -> None:
        gateway.draining = True  # /readyz turns 503 while streams in flight finish

    app.cleanup_ctx.append(lifecycle)
    app.on_shutdown.append(drain)
    for routes in (admin, health, identity, jobs, me, models, passthrough, responses, uploads, usage, anthropic, gemini,
                   elevenlabs, webhooks):
        routes.add_routes(app)
    return app
