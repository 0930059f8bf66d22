"""`POST /v1/uploads` (raw body, its Content-Type) and `GET /v1/assets/{id}`: short-lived URLs for model inputs."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any

from aiohttp import web

from ..assets import Asset, AssetStoreFull
from ..context import CONTEXT
from ..errors import ApiError
from ..policy.types import Decision
from .body import read_raw
from .state import GATEWAY, authenticated

_ALLOWED_MEDIA = ("image/", "audio/", "video/")


async def upload(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    principal = await authenticated(request)
    decision = upload_decision(gateway.policy.current.plan_decision(principal))
    if not decision.allowed:
        raise ApiError(decision.error_code or "forbidden", decision.error_message or "not allowed")
    content_type = request.content_type  # aiohttp's default for a missing header is application/octet-stream
    if not content_type.startswith(_ALLOWED_MEDIA):
        raise ApiError(
            "unsupported_media_type",
            f"Content-Type {content_type!r} is not accepted; send the raw file with an image/*, audio/* or video/* type",
        )
    admission = await gateway.meter.admit(principal, "", decision, request[CONTEXT].request_id)
    try:
        answer = keep_asset(request, await _read_upload(request), content_type)
    finally:
        # Shielded: a client that hangs up cancels the handler, and its concurrency slot must still be freed.
        await asyncio.shield(admission.release())
    return web.json_response(answer, headers=admission.headers)


async def _read_upload(request: web.Request) -> bytes:
    """The body, read within the asset store's receiving budget (else 503 overloaded) and the upload limit (413)."""
    gateway = request.app[GATEWAY]
    max_bytes = gateway.config.server.max_upload_bytes
    declared = request.content_length
    try:
        # A chunked body may grow to the limit: it holds the limit's worth of the budget.
        with gateway.assets.receiving(min(max_bytes, declared if declared is not None else max_bytes)):
            data = await read_raw(request, max_bytes)
    except AssetStoreFull as full:
        raise overloaded(full) from None
    if not data:
        raise ApiError("invalid_request", "the upload is empty; send the file's bytes as the request body")
    return data


def upload_decision(plan: Decision) -> Decision:
    """An upload counts as one request against the plan's request limits and holds a concurrency slot while it is
    received. It has no model (model-scoped limits do not apply), uses no tokens and costs no credits."""
    limits = tuple(rule for rule in plan.rate_limits if rule.unit == "requests" and "model" not in rule.per)
    return replace(plan, rate_limits=limits, budget=None)


def keep_asset(request: web.Request, data: bytes, content_type: str) -> dict[str, Any]:
    """Keep `data` as an asset of the caller's account and describe it, or 503 overloaded when there is no room."""
    principal = request[CONTEXT].principal
    assert principal is not None  # authenticated before anything is kept
    try:
        asset = request.app[GATEWAY].assets.put(data, content_type, principal.account)
    except AssetStoreFull as full:
        raise overloaded(full) from None
    return describe(asset, asset_url(request, asset))


def overloaded(full: AssetStoreFull) -> ApiError:
    return ApiError(
        "overloaded", f"{full}; retry after {full.retry_after_s}s",
        headers={"Retry-After": str(full.retry_after_s)}, retry_after=full.retry_after_s,
    )


async def serve_asset(request: web.Request) -> web.Response:
    """No credential needed: the id is the capability (128 random bits), and it expires."""
    gateway = request.app[GATEWAY]
    asset = gateway.assets.get(request.match_info["asset_id"])
    if asset is None:
        raise ApiError("not_found", "no such asset; asset URLs expire, upload the file again")
    return web.Response(
        body=asset.data,
        content_type=asset.content_type,
        headers={
            "Cache-Control": f"private, max-age={gateway.assets.seconds_left(asset)}",
            # Uploaded bytes are served from the gateway's origin: never let them run as a page (e.g. SVG script).
            "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": "default-src 'none'; sandbox",
        },
    )


def asset_url(request: web.Request, asset: Asset) -> str:
    base = request.app[GATEWAY].config.server.public_url or f"{request.scheme}://{request.host}"
    return f"{base.rstrip('/')}/v1/assets/{asset.id}"


def describe(asset: Asset, url: str) -> dict[str, Any]:
    expires = datetime.fromtimestamp(asset.expires_at, timezone.utc).isoformat(timespec="seconds")
    return {"url": url, "expires_at": expires, "content_type": asset.content_type, "bytes": len(asset.data)}


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/uploads", upload)
    app.router.add_get("/v1/assets/{asset_id}", serve_asset)
