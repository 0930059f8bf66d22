"""A local identity provider for tests: serves a JWKS on 127.0.0.1 and signs Clerk-shaped session tokens.

Usage:
    key = RsaKey.generate()
    async with JwksServer([key]) as idp:
        token = key.sign(clerk_claims(idp.issuer))
        ... IssuerSettings(issuer=idp.issuer, jwks_url=idp.jwks_url, ...)
`idp.mode` switches the endpoint between "ok", "error" (HTTP 503) and "hang"; `idp.fetches` counts JWKS requests.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass
from typing import Any, Literal

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

Mode = Literal["ok", "error", "hang"]
JWKS_PATH = "/.well-known/jwks.json"


@dataclass(frozen=True)
class RsaKey:
    """An RS256 signing key of the fake identity provider."""

    kid: str
    private_key: rsa.RSAPrivateKey

    @classmethod
    def generate(cls, kid: str | None = None) -> RsaKey:
        return cls(kid or f"ins_{secrets.token_hex(8)}", rsa.generate_private_key(public_exponent=65537, key_size=2048))

    def jwk(self) -> dict[str, Any]:
        return {**RSAAlgorithm.to_jwk(self.private_key.public_key(), as_dict=True), "kid": self.kid, "alg": "RS256", "use": "sig"}

    def sign(self, claims: dict[str, Any], **header: Any) -> str:
        return jwt.encode(claims, self.private_key, algorithm="RS256", headers={"kid": self.kid, **header})


def clerk_claims(issuer: str, *, sub: str = "user_2abc", azp: str = "https://app.example.com", ttl: int = 60, **extra: Any) -> dict[str, Any]:
    """Claims shaped like a Clerk session token (iss, sub, sid, azp, exp, nbf, iat); `extra` adds or overrides."""
    now = int(time.time())
    claims = {"iss": issuer, "sub": sub, "sid": f"sess_{secrets.token_hex(6)}", "azp": azp,
              "iat": now, "nbf": now - 5, "exp": now + ttl, "jti": secrets.token_hex(10)}
    return {**claims, **extra}


class JwksServer:
    """Serves `keys` as a JWKS at `jwks_url`; the base URL doubles as the issuer, as with Clerk's frontend API."""

    def __init__(self, keys: list[RsaKey]) -> None:
        self.keys = list(keys)
        self.mode: Mode = "ok"
        self.fetches = 0
        self._release = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.issuer = ""

    @property
    def jwks_url(self) -> str:
        return self.issuer + JWKS_PATH

    async def __aenter__(self) -> JwksServer:
        app = web.Application()
        app.router.add_get(JWKS_PATH, self._jwks)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.issuer = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        """Stop serving: later fetches get connection refused."""
        self._release.set()  # let hanging handlers finish so shutdown is prompt
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _jwks(self, request: web.Request) -> web.Response:
        self.fetches += 1
        if self.mode == "hang":
            await self._release.wait()
        if self.mode != "ok":
            return web.json_response({"error": "unavailable"}, status=503)
        return web.json_response({"keys": [key.jwk() for key in self.keys]})
