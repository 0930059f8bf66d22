"""Uploads and asset URLs: short-lived, signed URLs for model inputs and generated outputs.

- `POST /v1/uploads` with a raw body (its Content-Type): kept at once, answered with its asset URL.
- `POST /v1/uploads` with a JSON body `{filename, content_type, size}`: a presigned upload (`PUT upload_url`)
  and the `asset_url` the file will have; `PUT /v1/uploads/{id}?...&sig=` then takes the bytes with no other
  credential, within the signed type and size.
- `GET /v1/assets/{id}?exp=&sig=`: the bytes; no credential, the signature is the capability.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any

from aiohttp import web

from ..assets import Asset, AssetExists, AssetStoreError, AssetStoreFull, valid_asset_id
from ..assets.signing import expiry_param
from ..auth.principal import Principal
from ..context import CONTEXT
from ..errors import ApiError
from ..policy.types import Decision
from .body import read_json_object, read_raw
from .state import GATEWAY, authenticated

log = logging.getLogger("edge_proxy")

# A bare media type (no parameters): what a presigned PUT's Content-Type must then equal.
_ALLOWED_MEDIA = re.compile(r"^(image|audio|video)/[A-Za-z0-9][A-Za-z0-9.+-]{0,100}$")
_MAX_FILENAME = 255


async def upload(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    principal = await authenticated(request)
    decision = upload_decision(gateway.policy.current.plan_decision(principal))
    if not decision.allowed:
        raise ApiError(decision.error_code or "forbidden", decision.error_message or "not allowed")
    presign = request.content_type == "application/json"
    if not presign:
        media_type(request.content_type)  # aiohttp's default for a missing header is application/octet-stream
    admission = await gateway.meter.admit(principal, "", decision, request[CONTEXT].request_id)
    try:
        if presign:
            answer = await _presigned_upload(request, principal)
        else:
            answer = await keep_asset(request, await _read_upload(request, gateway.config.server.max_upload_bytes),
                                      request.content_type)
    finally:
        # Shielded: a client that hangs up cancels the handler, and its concurrency slot must still be freed.
        await asyncio.shield(admission.release())
    return web.json_response(answer, headers=admission.headers)


def media_type(content_type: str) -> str:
    if not _ALLOWED_MEDIA.match(content_type):
        raise ApiError(
            "unsupported_media_type",
            f"Content-Type {content_type!r} is not accepted; send the raw file with an image/*, audio/* or video/* type",
        )
    return content_type


async def _presigned_upload(request: web.Request, principal: Principal) -> dict[str, Any]:
    """A signed PUT URL for one file of the declared type and at most the declared size, and its asset URL."""
    gateway = request.app[GATEWAY]
    body = await read_json_object(request, gateway.config.server.max_body_bytes)
    content_type = body.get("content_type")
    if not isinstance(content_type, str):
        raise ApiError("invalid_request", "`content_type` (e.g. image/png) is required", param="content_type")
    media_type(content_type)
    size, max_bytes = body.get("size"), gateway.config.server.max_upload_bytes
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ApiError("invalid_request", "`size` must be the file's length in bytes, an integer of at least 1",
                       param="size")
    if size > max_bytes:
        raise ApiError("payload_too_large", f"a file of {size} bytes exceeds the upload limit of {max_bytes} bytes",
                       max_bytes=max_bytes)
    filename = body.get("filename")
    if filename is not None and (not isinstance(filename, str) or len(filename) > _MAX_FILENAME):
        raise ApiError("invalid_request", f"`filename` must be a string of at most {_MAX_FILENAME} characters",
                       param="filename")
    assets, now = gateway.assets, time.time()
    asset_id = assets.new_id(principal.account)
    upload_expires = int(now + gateway.config.assets.upload_url_ttl_s)
    # The asset URL is issued now, before the object exists: it lasts as a URL issued at upload time would.
    pending = Asset(asset_id, principal.account, content_type, b"", now + gateway.config.assets.ttl_s)
    base = public_base(request)
    return {
        "upload_url": assets.put_url(base, asset_id, principal.account, content_type, size, upload_expires),
        "method": "PUT",
        "headers": {"Content-Type": content_type},
        "expires_at": _iso(upload_expires),
        "max_bytes": size,
        "asset_url": assets.get_url(base, pending),
        "asset_expires_at": _iso(assets.url_expiry(pending)),
        "content_type": content_type,
        **({"filename": filename} if filename is not None else {}),
    }


async def presigned_put(request: web.Request) -> web.Response:
    """Take the bytes of a presigned upload: the URL's signature authorises exactly this id, type and size."""
    gateway, query = request.app[GATEWAY], request.query
    asset_id = request.match_info["asset_id"]
    expires = expiry_param(query.get("exp"))
    size_text, content_type, account = query.get("size", ""), query.get("type", ""), query.get("acct", "")
    gateway.assets.check_put(asset_id, account, content_type, size_text, expires, query.get("sig", ""))
    if request.content_type != content_type:
        raise ApiError("unsupported_media_type",
                       f"this upload URL takes Content-Type {content_type!r}, not {request.content_type!r}")
    data = await _read_upload(request, int(size_text))
    try:
        asset = await gateway.assets.store.put(data, content_type, account, asset_id)
    except AssetExists:
        raise ApiError("asset_exists", "this upload URL was used already; ask POST /v1/uploads for a new one") from None
    except (AssetStoreFull, AssetStoreError, ValueError) as exc:
        raise _not_kept(exc) from None
    return web.json_response(describe(request, asset))


async def _read_upload(request: web.Request, max_bytes: int) -> bytes:
    """The body, read within the receiving budget (else 503 overloaded) and `max_bytes` (413)."""
    declared = request.content_length
    try:
        # A chunked body may grow to the limit: it holds the limit's worth of the budget.
        with request.app[GATEWAY].assets.receiving.hold(min(max_bytes, declared if declared is not None else max_bytes)):
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


async def keep_asset(request: web.Request, data: bytes, content_type: str) -> dict[str, Any]:
    """Keep `data` as an asset of the caller's account and describe it, or 503 when there is no room."""
    principal = request[CONTEXT].principal
    assert principal is not None  # authenticated before anything is kept
    assets = request.app[GATEWAY].assets
    try:
        asset = await assets.store.put(data, content_type, principal.account)
    except (AssetStoreFull, AssetStoreError, ValueError) as exc:
        raise _not_kept(exc) from None
    return describe(request, asset)


async def output_url(request: web.Request, url: str) -> str:
    """A provider's output URL as the client gets it (Assets.output_url: re-hosted when configured)."""
    principal = request[CONTEXT].principal
    if principal is None:
        return url
    return await request.app[GATEWAY].assets.output_url(url, principal.account, public_base(request))


def _not_kept(exc: Exception) -> ApiError:
    if isinstance(exc, AssetStoreFull):
        return overloaded(exc)
    if isinstance(exc, AssetStoreError):
        return unreachable()
    return ApiError("payload_too_large", f"{exc}; the asset cannot be kept")


def unreachable() -> ApiError:
    return ApiError("store_unavailable", "the asset store cannot be reached; retry shortly")


def overloaded(full: AssetStoreFull) -> ApiError:
    return ApiError(
        "overloaded", f"{full}; retry after {full.retry_after_s}s",
        headers={"Retry-After": str(full.retry_after_s)}, retry_after=full.retry_after_s,
    )


async def serve_asset(request: web.Request) -> web.StreamResponse:
    """No credential needed: the signed URL is the capability, and it expires. The bytes are sent as the backend
    reads them (an S3 object is never held whole), behind a Content-Length, so a cut reads as incomplete."""
    gateway, query = request.app[GATEWAY], request.query
    asset_id = request.match_info["asset_id"]
    expires = expiry_param(query.get("exp"))
    gateway.assets.check_get(asset_id, expires, query.get("sig", ""))
    try:
        body = await gateway.assets.store.open(asset_id) if valid_asset_id(asset_id) else None
    except AssetStoreError:
        raise unreachable() from None
    if body is None:
        raise ApiError("not_found", "no such asset; assets expire, upload the file again")
    try:
        response = web.StreamResponse(headers={
            "Cache-Control": f"private, max-age={max(0, int(min(expires, body.asset.expires_at) - time.time()))}",
            # Uploaded bytes are served from the gateway's origin: never let them run as a page (e.g. SVG script).
            "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": "default-src 'none'; sandbox",
        })
        response.content_type, response.content_length = body.asset.content_type, body.size
        await response.prepare(request)
        if request.method != "HEAD":
            try:
                async for chunk in body.chunks:
                    await response.write(chunk)
            except AssetStoreError as exc:  # the headers are sent: cut the connection, short of Content-Length
                log.warning("asset %s cut mid-answer: %s", asset_id, exc)
                response.force_close()
                return response
        await response.write_eof()
        return response
    finally:
        await body.chunks.aclose()
        body.release()


async def delete_asset(request: web.Request) -> web.Response:
    """The owner's account removes an asset before it expires (e.g. an input once the generation is done)."""
    gateway, asset_id = request.app[GATEWAY], request.match_info["asset_id"]
    principal = await authenticated(request)
    try:
        asset = await gateway.assets.store.get(asset_id) if valid_asset_id(asset_id) else None
        if asset is None or asset.account != principal.account:  # another account's asset is not there for you
            raise ApiError("not_found", "no such asset of your account")
        await gateway.assets.store.delete(asset_id)
    except AssetStoreError:
        raise unreachable() from None
    return web.Response(status=204)


def public_base(request: web.Request) -> str:
    """Where clients reach the gateway: `server.public_url`, else this request's scheme and host."""
    return request.app[GATEWAY].config.server.public_url or f"{request.scheme}://{request.host}"


def describe(request: web.Request, asset: Asset) -> dict[str, Any]:
    """A stored asset as clients see it: its signed URL, when that URL stops working, its type and size."""
    assets = request.app[GATEWAY].assets
    return {"url": assets.get_url(public_base(request), asset), "expires_at": _iso(assets.url_expiry(asset)),
            "content_type": asset.content_type, "bytes": len(asset.data)}


def _iso(unix_seconds: float) -> str:
    return datetime.fromtimestamp(unix_seconds, timezone.utc).isoformat(timespec="seconds")


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/uploads", upload)
    app.router.add_put("/v1/uploads/{asset_id}", presigned_put)
    app.router.add_get("/v1/assets/{asset_id}", serve_asset)
    app.router.add_delete("/v1/assets/{asset_id}", delete_asset)
