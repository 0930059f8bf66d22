"""External issuers (Clerk, any OIDC provider): JWKS cache per issuer and verification of their JWTs."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

import aiohttp
import jwt

from proxy.auth.principal import Principal
from proxy.errors import ApiError

log = logging.getLogger(__name__)

# Only asymmetric algorithms: a JWKS holds public keys, so "none" and HS* can never be right.
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
_LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
MAX_JWKS_BYTES = 256 * 1024

# Told (issuer name, succeeded) after every JWKS fetch attempt, e.g. to count fetches in metrics.
FetchObserver = Callable[[str, bool], None]


@dataclass(frozen=True)
class IssuerSettings:
    """One trusted external issuer; `name` appears in errors, metrics and Principal.issuer."""

    name: str
    issuer: str  # exact `iss` value
    jwks_url: str
    plan: str
    audience: str | None = None  # None: the `aud` claim is not checked
    authorized_parties: tuple[str, ...] = ()  # allowed `azp` values; empty: not checked
    algorithms: tuple[str, ...] = ("RS256",)
    plan_claim: str | None = None  # dotted path, e.g. "org_role" or "metadata.plan"
    plan_map: Mapping[str, str] = field(default_factory=dict)  # claim value -> plan; unmapped -> `plan`
    account_claim: str = "sub"  # dotted path of the claim billed as the account
    leeway_s: int = 30
    jwks_cache_ttl_s: float = 300.0
    unknown_kid_cooldown_s: float = 10.0
    fetch_timeout_s: float = 3.0

    def __post_init__(self) -> None:
        where = f"issuers.{self.name}"
        bad = [a for a in self.algorithms if a not in ASYMMETRIC_ALGORITHMS]
        if not self.algorithms or bad:
            raise ValueError(
                f"{where}.algorithms: {bad or 'empty'} not allowed; use asymmetric ones such as RS256 or ES256"
            )
        url = urlsplit(self.jwks_url)
        if url.scheme != "https" and not (url.scheme == "http" and url.hostname in _LOOPBACK_HOSTS):
            raise ValueError(f"{where}.jwks_url: must be an https:// URL (http:// only for localhost)")
        if not self.issuer:
            raise ValueError(f"{where}.issuer: set it to the exact `iss` value of the issuer's tokens")
        if self.fetch_timeout_s <= 0 or self.unknown_kid_cooldown_s < 0 or self.jwks_cache_ttl_s <= 0:
            raise ValueError(f"{where}: fetch_timeout_s and jwks_cache_ttl_s must be > 0, unknown_kid_cooldown_s >= 0")


def claim_at(claims: Mapping[str, Any], path: str) -> Any:
    """The value at a dotted path ("metadata.plan") or None."""
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def _parse_jwks(document: Any, algorithms: tuple[str, ...]) -> dict[str, jwt.PyJWK]:
    """Signing keys by kid; symmetric, encryption and unusable keys are dropped."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("not a JWKS document (no 'keys' list)")
    keys: dict[str, jwt.PyJWK] = {}
    for jwk in document["keys"]:
        if not isinstance(jwk, dict) or not isinstance(jwk.get("kid"), str) or jwk.get("use", "sig") != "sig":
            continue
        if jwk.get("kty") == "oct":
            continue  # never accept a shared secret from a key set
        try:
            key = jwt.PyJWK(jwk)
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError):
            continue
        if key.algorithm_name in algorithms:
            keys[jwk["kid"]] = key
    return keys


class JwksCache:
    """An issuer's keys: fetched lazily, refreshed after a TTL, refetched on an unknown kid at most once per cooldown.

    Concurrent fetches are coalesced into one in-flight request; when the endpoint fails, the last keys stay in use.
    """

    def __init__(
        self, settings: IssuerSettings, session: aiohttp.ClientSession | None = None,
        on_fetch: FetchObserver | None = None,
    ) -> None:
        self._settings = settings
        self._on_fetch = on_fetch
        self._session = session
        self._owns_session = session is None
        self._keys: dict[str, jwt.PyJWK] | None = None  # None: never fetched successfully
        self._fetched_at = 0.0
        self._last_attempt = float("-inf")
        self._inflight: asyncio.Task[None] | None = None

    async def key(self, kid: str) -> jwt.PyJWK:
        """The key for `kid`; 503 auth_unavailable if keys were never obtained, 401 invalid_token if unknown."""
        if self._keys is None:
            await self._fetch_if_allowed()
        elif time.monotonic() - self._fetched_at >= self._settings.jwks_cache_ttl_s and self._may_fetch():
            self._start_fetch()  # stale-while-revalidate: this request goes on with the cached keys
        if self._keys is None:
            raise ApiError(
                "auth_unavailable",
                f"cannot verify the token: the signing keys of issuer {self._settings.name} "
                "could not be fetched; retry later",
            )
        if kid not in self._keys:
            await self._fetch_if_allowed()  # so a key rotated at the issuer works on its first use
        key = self._keys.get(kid)
        if key is None:
            raise ApiError("invalid_token", f"the token's signing key (kid) is not published by issuer {self._settings.name}")
        return key

    async def aclose(self) -> None:
        if self._inflight is not None:
            self._inflight.cancel()
        if self._owns_session and self._session is not None:
            await self._session.close()

    def _may_fetch(self) -> bool:
        return time.monotonic() - self._last_attempt >= self._settings.unknown_kid_cooldown_s

    def _start_fetch(self) -> asyncio.Task[None]:
        if self._inflight is None:
            self._last_attempt = time.monotonic()
            self._inflight = asyncio.get_running_loop().create_task(self._fetch())
            self._inflight.add_done_callback(self._fetch_done)
        return self._inflight

    def _fetch_done(self, task: asyncio.Task[None]) -> None:
        self._inflight = None
        if task.cancelled():
            return  # shutting down: not an outcome of the issuer's endpoint
        error = task.exception()
        if error is not None:
            log.warning("JWKS fetch for issuer %s failed: %s", self._settings.name, error)
        if self._on_fetch is not None:
            self._on_fetch(self._settings.name, error is None)

    async def _fetch_if_allowed(self) -> None:
        """Join the in-flight fetch, or start one unless within the cooldown; failures leave the old keys in place."""
        task = self._inflight or (self._start_fetch() if self._may_fetch() else None)
        if task is None:
            return
        try:
            await asyncio.shield(task)  # one cancelled request must not cancel the fetch for everyone
        except asyncio.CancelledError:
            if not task.cancelled():
                raise
        except Exception:  # noqa: BLE001 - already logged by _fetch_done; the caller decides what missing keys mean
            pass

    async def _fetch(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        timeout = aiohttp.ClientTimeout(total=self._settings.fetch_timeout_s)
        try:
            async with self._session.get(self._settings.jwks_url, timeout=timeout, allow_redirects=False) as response:
                if response.status != 200:
                    raise ValueError(f"HTTP {response.status}")
                body = await response.content.read(MAX_JWKS_BYTES + 1)
                if len(body) > MAX_JWKS_BYTES:
                    raise ValueError("JWKS document too large")
        except asyncio.TimeoutError:
            raise ValueError(f"timed out after {self._settings.fetch_timeout_s}s") from None
        except aiohttp.ClientError as exc:
            raise ValueError(f"{type(exc).__name__}: {exc}") from None
        try:
            document = json.loads(body)
        except RecursionError:
            raise ValueError("JWKS document nests too deeply") from None
        self._keys = _parse_jwks(document, self._settings.algorithms)
        self._fetched_at = time.monotonic()


class IssuerVerifier:
    """Verifies one issuer's JWTs and maps their claims to a Principal."""

    def __init__(
        self, settings: IssuerSettings, session: aiohttp.ClientSession | None = None,
        on_fetch: FetchObserver | None = None,
    ) -> None:
        self.settings = settings
        self.jwks = JwksCache(settings, session, on_fetch)

    async def verify(self, token: str, kid: str) -> Principal:
        """Signature with the issuer's key for `kid`, then iss, aud, exp/nbf (with leeway), azp; claims -> Principal."""
        key = await self.jwks.key(kid)
        s = self.settings
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=list(s.algorithms),
                issuer=s.issuer,
                audience=s.audience,
                leeway=s.leeway_s,
                options={"require": ["iss", "exp", "sub"], "verify_aud": s.audience is not None},
            )
        except jwt.ExpiredSignatureError:
            raise ApiError("token_expired", f"the {s.name} token has expired; get a fresh one") from None
        except jwt.InvalidTokenError as exc:
            raise ApiError("invalid_token", f"the {s.name} token is invalid: {exc}") from None
        self._check_authorized_party(claims)
        return Principal(
            kind="issuer",
            issuer=s.name,
            account=self._account(claims),
            subject=claims["sub"] if isinstance(claims["sub"], str) else None,
            plan=self._plan(claims),
            token_id=claims.get("jti") if isinstance(claims.get("jti"), str) else None,
        )

    async def aclose(self) -> None:
        await self.jwks.aclose()

    def _check_authorized_party(self, claims: Mapping[str, Any]) -> None:
        # Stricter than Clerk's SDK: with parties configured, a token without `azp` is rejected too.
        parties = self.settings.authorized_parties
        if parties and claims.get("azp") not in parties:
            raise ApiError("invalid_token", f"the {self.settings.name} token was issued for another party (azp)")

    def _account(self, claims: Mapping[str, Any]) -> str:
        account = claim_at(claims, self.settings.account_claim)
        if not isinstance(account, str) or not account:
            raise ApiError(
                "invalid_token",
                f"the {self.settings.name} token has no '{self.settings.account_claim}' claim to bill the request to",
            )
        # Namespaced, so one issuer's user can never share a budget with another issuer's or an API key's account.
        return f"{self.settings.name}:{account}"

    def _plan(self, claims: Mapping[str, Any]) -> str:
        if self.settings.plan_claim is None:
            return self.settings.plan
        value = claim_at(claims, self.settings.plan_claim)
        return self.settings.plan_map.get(value, self.settings.plan) if isinstance(value, str) else self.settings.plan
