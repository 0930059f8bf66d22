"""Authenticate a request: pick the verifier by the credential's form and issuer, never by trial and error."""

from __future__ import annotations

import functools
import re
from typing import Callable, Iterable


from proxy.auth.api_keys import ApiKey, KeyIndex, looks_like_key
from proxy.auth.oidc import IssuerVerifier
from proxy.auth.principal import Principal
from proxy.auth.tokens import GatewayClaims, GatewayTokens, key_fingerprint, unverified_parts
from proxy.errors import ApiError

REALM = "edge-proxy"
KeyIndexSource = Callable[[], KeyIndex]  # returns the current index, so a policy reload swaps it atomically

_BEARER = re.compile(r"^Bearer +([A-Za-z0-9\-._~+/]+=*) *$", re.IGNORECASE)
_JWT_SHAPE = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$")
_NOT_DESCRIPTION_CHARS = re.compile(r'[^\x20-\x7e]|["\\]')  # RFC 6750 error_description alphabet


class Authenticator:
    """Turns an Authorization header into a Principal, or raises ApiError (401s carry WWW-Authenticate)."""

    def __init__(self, keys: KeyIndexSource, tokens: GatewayTokens, issuers: Iterable[IssuerVerifier] = ()) -> None:
        self._keys = keys
        self._tokens = tokens
        self._issuers: dict[str, IssuerVerifier] = {}
        for verifier in issuers:
            iss = verifier.settings.issuer
            if iss == tokens.settings.issuer or iss in self._issuers:
                raise ValueError(
                    f"issuers.{verifier.settings.name}.issuer: {iss!r} is already used by another issuer "
                    "or by the gateway itself (auth.issuer); each issuer needs its own `iss` value"
                )
            self._issuers[iss] = verifier

    async def authenticate(self, authorization: str | None) -> Principal:
        """The caller behind a request to a model route: an API key with direct access or any valid JWT."""
        try:
            credential = bearer_credential(authorization)
            if looks_like_key(credential):
                key = self._live_key(credential)
                if not key.allow_direct:
                    raise ApiError(
                        "forbidden",
                        f"API key {key.id} may only mint tokens (POST /v1/tokens); call models with a minted token",
                    )
                return key_principal(key)
            return await self._verify_jwt(credential)
        except ApiError as err:
            raise with_challenge(err) from None

    def authenticate_minting_key(self, authorization: str | None) -> ApiKey:
        """The API key for POST /v1/tokens: keys with allow_direct false are fine here, JWTs are not."""
        try:
            credential = bearer_credential(authorization)
            if not looks_like_key(credential):
                raise ApiError("forbidden", "tokens can only be minted with an API key (sk_...), not with a token")
            return self._live_key(credential)
        except ApiError as err:
            raise with_challenge(err) from None

    async def aclose(self) -> None:
        for verifier in self._issuers.values():
            await verifier.aclose()

    def _live_key(self, credential: str) -> ApiKey:
        key = self._keys().find(credential)
        if key is None:
            raise ApiError("invalid_api_key", "unknown API key")
        if key.disabled:
            raise ApiError("invalid_api_key", f"API key {key.id} is disabled")
        return key

    async def _verify_jwt(self, credential: str) -> Principal:
        known = self._tokens.cached(credential)  # a token of ours verified before: nothing to parse or check again
        if known is not None:
            return self._gateway_principal(known)
        if not _JWT_SHAPE.match(credential):
            raise ApiError("invalid_token", "the credential is neither an API key (sk_...) nor a JWT")
        header, claims = unverified_parts(credential)
        iss = claims.get("iss")
        if not isinstance(iss, str):
            raise ApiError("invalid_token", "the token has no issuer (iss)")
        if iss == self._tokens.settings.issuer:
            return self._gateway_principal(self._tokens.verify(credential, (header, claims)))
        verifier = self._issuers.get(iss)
        if verifier is None:
            raise ApiError("invalid_token", "the token's issuer (iss) is not trusted by this gateway")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise ApiError("invalid_token", "the token has no key id (kid) in its header")
        return await verifier.verify(credential, kid)

    def _gateway_principal(self, claims: GatewayClaims) -> Principal:
        key = self._keys().by_id(claims.key_id)
        # Revoking, disabling or re-keying the API key kills every token minted from it.
        if key is None or key.disabled or key_fingerprint(key) != claims.key_fingerprint:
            raise ApiError("invalid_token", "the API key this token was minted from has been revoked")
        return Principal(
            kind="gateway_token",
            account=key.billing_account,
            plan=key.plan,  # the key's current plan: a policy change applies to live tokens too
            key_id=key.id,
            subject=claims.subject,
            scopes=claims.scopes,
            token_id=claims.token_id,
        )


def bearer_credential(authorization: str | None) -> str:
    """The credential of `Authorization: Bearer <credential>`; 401 missing_credentials when absent or malformed."""
    match = _BEARER.match(authorization or "")
    if match is None:
        raise ApiError("missing_credentials", "send `Authorization: Bearer <API key or token>`")
    return match.group(1)


def with_challenge(err: ApiError) -> ApiError:
    """Add the RFC 6750 `WWW-Authenticate` header to a 401."""
    if err.status == 401:
        if err.code == "missing_credentials":
            challenge = f'Bearer realm="{REALM}"'
        else:
            description = _NOT_DESCRIPTION_CHARS.sub("'", err.message)
            challenge = f'Bearer realm="{REALM}", error="invalid_token", error_description="{description}"'
        err.headers.setdefault("WWW-Authenticate", challenge)
    return err


@functools.lru_cache(maxsize=4096)
def key_principal(key: ApiKey) -> Principal:
    """The principal of a raw API key: one per key record (the record is immutable, and a policy change makes a new
    one), not one per call."""
    return Principal(kind="api_key", account=key.billing_account, plan=key.plan, key_id=key.id)
