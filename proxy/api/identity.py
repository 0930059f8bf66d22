"""Identity routes: mint a short-lived token from an API key, publish the keys that verify it."""

from __future__ import annotations

from aiohttp import web

from ..auth.authenticator import key_principal
from ..context import CONTEXT
from ..errors import ApiError
from .body import read_json_object
from .state import GATEWAY, authorization_header

_MAX_TOKEN_REQUEST_BYTES = 16 * 1024


async def create_token(request: web.Request) -> web.Response:
    """`POST /v1/tokens` `{"sub"?, "ttl"?, "scopes"?}` -> `{"token", "expires_at", "expires_in"}`."""
    gateway = request.app[GATEWAY]
    key = gateway.auth.authenticate_minting_key(authorization_header(request))
    body = await read_json_object(request, _MAX_TOKEN_REQUEST_BYTES) if request.body_exists else {}
    policy = gateway.policy.current
    request[CONTEXT].principal = principal = key_principal(key)
    scopes = body.get("scopes")
    if isinstance(scopes, list) and all(isinstance(s, str) for s in scopes):
        if empty := policy.unmatched_scopes(principal, scopes, gateway.models.values()):
            raise ApiError("invalid_request", f"scopes grant no model this key may use: {', '.join(empty)}",
                           param="scopes")
    # A plan may grant models by capability, which no pattern names: the models themselves count as covered.
    key_models = {m.id for m in policy.visible_models(principal, gateway.models.values())}
    minted = gateway.tokens.mint(
        key, key_scopes=policy.token_scopes(principal), key_models=key_models,
        sub=body.get("sub"), ttl=body.get("ttl"), scopes=scopes,
    )
    return web.json_response(minted.as_json(), headers={"Cache-Control": "no-store"})


async def jwks(request: web.Request) -> web.Response:
    return web.json_response(request.app[GATEWAY].tokens.ring.jwks(), headers={"Cache-Control": "max-age=300"})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/tokens", create_token)
    app.router.add_get("/.well-known/jwks.json", jwks)
