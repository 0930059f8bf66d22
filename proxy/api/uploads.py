"""`POST /v1/uploads` (raw body, its Content-Type) and `GET /v1/assets/{id}`: short-lived URLs for model inputs."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from aiohttp import web

from ..assets import Asset
from ..errors import ApiError
from .body import read_raw
from .state import GATEWAY, authenticated

_ALLOWED_MEDIA = ("image/", "audio/", "video/")


async def upload(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    principal = await authenticated(request)
    decision = gateway.policy.current.plan_decision(principal)
    if not decision.allowed:
        raise ApiError(decision.error_code or "forbidden", decision.error_message or "not allowed")
    content_type = request.content_type  # aiohttp's default for a missing header is application/octet-stream
    if not content_type.startswith(_ALLOWED_MEDIA):
        raise ApiError(
            "unsupported_media_type",
            f"Content-Type {content_type!r} is not accepted; send the raw file with an image/*, audio/* or video/* type",
        )
    data = await read_raw(request, gateway.config.server.max_upload_bytes)
    if not data:
        raise ApiError("invalid_request", "the upload is empty; send the file's bytes as the request body")
    asset = gateway.assets.put(data, content_type)
    return web.json_response(describe(asset, asset_url(request, asset)))


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
