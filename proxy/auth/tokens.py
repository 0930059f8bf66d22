"""Gateway-minted JWTs: asymmetric signing keys with rotation, minting from an API key, strict verification."""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import logging
import os
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Collection, Iterable, Sequence

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from jwt.algorithms import ECAlgorithm, OKPAlgorithm

from proxy.auth.api_keys import ApiKey
from proxy.errors import ApiError

log = logging.getLogger(__name__)

# Custom claims of a gateway token (besides iss, aud, sub, iat, nbf, exp, jti).
CLAIM_KEY_ID = "key_id"
CLAIM_KEY_FINGERPRINT = "key_fp"  # ties the token to the key's current secret: rotating the secret kills it
CLAIM_PLAN = "plan"
CLAIM_SCOPES = "scopes"

# Verified tokens remembered by their exact text (until they expire), so a client that reuses its token pays for the
# signature check once, not on every call (an ES256 verification is most of a token's cost). Bounded: least recently
# used first out, by count and by size (a key with many long scopes mints long tokens).
VERIFIED_TOKENS_CACHED = 10_000
VERIFIED_TOKEN_CHARS_CACHED = 16 * 1024 * 1024

MAX_SUBJECT_LENGTH = 256
MAX_SCOPES = 64
MAX_SCOPE_LENGTH = 200
_GLOB_CHARS = frozenset("*?[")


class KeyConfigError(ValueError):
    """A signing key setting is wrong; the message names the setting and the fix."""


@dataclass(frozen=True)
class SigningKeySettings:
    """Where one signing key's PEM comes from: a file path or the name of an env var (never inline YAML)."""

    file: str | None = None
    env: str | None = None
    active: bool = False


@dataclass(frozen=True)
class TokenSettings:
    """Claims and lifetimes of gateway tokens."""

    issuer: str
    audience: str
    default_ttl_s: int = 300
    max_ttl_s: int = 3600
    leeway_s: int = 5


@dataclass(frozen=True)
class SigningKey:
    """One asymmetric key; `private_key` is None for verification-only keys."""

    kid: str
    algorithm: str  # "ES256" or "EdDSA"
    public_key: ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey
    private_key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | None = None

    @classmethod
    def from_key(cls, key: Any) -> SigningKey:
        """Wrap a cryptography key object (private or public); the kid is its RFC 7638 thumbprint."""
        private = key if isinstance(key, (ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey)) else None
        public = private.public_key() if private is not None else key
        if isinstance(public, ec.EllipticCurvePublicKey) and isinstance(public.curve, ec.SECP256R1):
            algorithm = "ES256"
        elif isinstance(public, ed25519.Ed25519PublicKey):
            algorithm = "EdDSA"
        else:
            raise KeyConfigError("unsupported signing key type: use an EC P-256 key (ES256) or an Ed25519 key (EdDSA)")
        return cls(kid=jwk_thumbprint(_public_jwk(public)), algorithm=algorithm, public_key=public, private_key=private)

    @classmethod
    def from_pem(cls, pem: bytes) -> SigningKey:
        """Load a PEM private key, or a PEM public key for a verification-only key."""
        if b"PRIVATE KEY" in pem:
            return cls.from_key(serialization.load_pem_private_key(pem, password=None))
        return cls.from_key(serialization.load_pem_public_key(pem))

    @classmethod
    def generate(cls) -> SigningKey:
        return cls.from_key(ec.generate_private_key(ec.SECP256R1()))

    def private_pem(self) -> bytes:
        """The private key as PKCS#8 PEM, for `from_pem` in another process (worker processes get it on a pipe)."""
        if self.private_key is None:
            raise KeyConfigError(f"key {self.kid} is verification-only: it has no private half")
        return self.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def public_jwk(self) -> dict[str, str]:
        """The public half as a JWK with kid, alg and use."""
        return {**_public_jwk(self.public_key), "kid": self.kid, "alg": self.algorithm, "use": "sig"}


def _public_jwk(public_key: Any) -> dict[str, str]:
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return OKPAlgorithm.to_jwk(public_key, as_dict=True)
    return ECAlgorithm.to_jwk(public_key, as_dict=True)


# RFC 7638: the thumbprint covers only the required members of each key type.
_THUMBPRINT_MEMBERS = {"EC": ("crv", "kty", "x", "y"), "OKP": ("crv", "kty", "x"), "RSA": ("e", "kty", "n")}


def jwk_thumbprint(jwk: dict[str, Any]) -> str:
    """RFC 7638 SHA-256 JWK thumbprint, base64url without padding."""
    members = {name: jwk[name] for name in _THUMBPRINT_MEMBERS[jwk["kty"]]}
    canonical = json.dumps(members, separators=(",", ":"), sort_keys=True).encode()
    return base64.urlsafe_b64encode(hashlib.sha256(canonical).digest()).rstrip(b"=").decode()


def load_signing_key(settings: SigningKeySettings, where: str) -> SigningKey:
    """Read one key's PEM from its file or env var; `where` names the setting in errors (e.g. auth.signing_keys[0])."""
    if bool(settings.file) == bool(settings.env):
        raise KeyConfigError(f"{where}: set exactly one of 'file' (path to a PEM key) or 'env' (name of an env var holding it)")
    if settings.env:
        pem = os.environ.get(settings.env)
        if not pem:
            raise KeyConfigError(f"{where}: env var {settings.env} is not set; export it with the PEM key, or use 'file'")
        source, data = f"env var {settings.env}", pem.encode()
    else:
        try:
            source, data = f"file {settings.file}", Path(settings.file).read_bytes()  # type: ignore[arg-type]
        except OSError as exc:
            raise KeyConfigError(f"{where}: cannot read key file {settings.file}: {exc.strerror}; fix the path") from None
    try:
        return SigningKey.from_pem(data)
    except KeyConfigError as exc:
        raise KeyConfigError(f"{where} ({source}): {exc}") from None
    except (ValueError, TypeError):
        raise KeyConfigError(
            f"{where} ({source}): not a PEM key; create one with "
            "`openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out signing-key.pem`"
        ) from None


class KeyRing:
    """One active signing key plus older verification-only keys, looked up by kid."""

    def __init__(self, active: SigningKey, older: Iterable[SigningKey] = ()) -> None:
        if active.private_key is None:
            raise KeyConfigError("the active signing key must be a private key")
        self.active = active
        self._by_kid = {key.kid: key for key in (*older, active)}

    @classmethod
    def from_settings(cls, keys: Sequence[SigningKeySettings], where: str = "auth.signing_keys") -> KeyRing:
        """Load configured keys; with none, an ephemeral key (fine for one process, wrong for several replicas)."""
        if not keys:
            log.warning(
                "no signing key configured (%s): using an ephemeral key; tokens die on restart and "
                "multi-replica deployments MUST configure a shared key",
                where,
            )
            return cls(SigningKey.generate())
        loaded = [load_signing_key(k, f"{where}[{i}]") for i, k in enumerate(keys)]
        actives = [key for key, setting in zip(loaded, keys) if setting.active or len(keys) == 1]
        if len(actives) != 1:
            raise KeyConfigError(f"{where}: mark exactly one key with 'active: true' (found {len(actives)})")
        return cls(actives[0], loaded)

    def get(self, kid: str) -> SigningKey | None:
        return self._by_kid.get(kid)

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        """The public JWKS of every key, active first: the body of GET /.well-known/jwks.json."""
        ordered = [self.active, *(k for k in self._by_kid.values() if k is not self.active)]
        return {"keys": [key.public_jwk() for key in ordered]}


@dataclass(frozen=True)
class MintedToken:
    token: str
    expires_at: int  # unix seconds
    expires_in: int  # seconds

    def as_json(self) -> dict[str, Any]:
        return {"token": self.token, "expires_at": self.expires_at, "expires_in": self.expires_in}


@dataclass(frozen=True)
class GatewayClaims:
    """The verified content of a gateway token."""

    key_id: str
    key_fingerprint: str
    plan: str
    scopes: tuple[str, ...]
    subject: str | None
    token_id: str
    expires_at: int


def key_fingerprint(api_key: ApiKey) -> str:
    """A short, non-reversible tag of the key's secret hash (64 bits), so a re-keyed id invalidates old tokens."""
    return api_key.hash.removeprefix("sha256:")[:16]


def is_scope_pattern(scope: str) -> bool:
    return any(ch in _GLOB_CHARS for ch in scope)


def scope_matches(pattern: str, model_id: str) -> bool:
    """Does a scope (a model id, or an fnmatch glob such as "openai/*") grant this model id? Case-sensitive."""
    return fnmatch.fnmatchcase(model_id, pattern)


def scope_is_covered(requested: str, key_patterns: Iterable[str], key_models: Collection[str] = frozenset()) -> bool:
    """A literal model id is covered if the key may use it (`key_models`, which includes models its plan grants by
    capability) or some key pattern matches it; a glob only if a key pattern equals it."""
    if is_scope_pattern(requested):
        return requested in key_patterns
    return requested in key_models or any(scope_matches(pattern, requested) for pattern in key_patterns)


def narrow_scopes(
    requested: object, key_scopes: Sequence[str], key_models: Collection[str] = frozenset()
) -> tuple[str, ...]:
    """The scopes a token gets: the key's own if none requested, else the requested ones if all are covered."""
    if requested is None:
        return tuple(key_scopes)
    if not isinstance(requested, list) or not requested or not all(isinstance(s, str) and s for s in requested):
        raise ApiError("invalid_request", "scopes must be a non-empty list of model ids or patterns", param="scopes")
    if len(requested) > MAX_SCOPES or any(len(s) > MAX_SCOPE_LENGTH for s in requested):
        raise ApiError("invalid_request", f"at most {MAX_SCOPES} scopes of {MAX_SCOPE_LENGTH} characters each", param="scopes")
    uncovered = [s for s in requested if not scope_is_covered(s, key_scopes, key_models)]
    if uncovered:
        raise ApiError(
            "invalid_request",
            f"scopes may only narrow the key's scopes; not covered: {', '.join(uncovered)}",
            param="scopes",
        )
    return tuple(dict.fromkeys(requested))  # dedupe, keep order


def _checked_ttl(ttl: object, settings: TokenSettings) -> int:
    if ttl is None:
        return min(settings.default_ttl_s, settings.max_ttl_s)
    if isinstance(ttl, bool) or not isinstance(ttl, int) or ttl <= 0:
        raise ApiError("invalid_request", "ttl must be a positive integer number of seconds", param="ttl")
    return min(ttl, settings.max_ttl_s)


def _checked_subject(sub: object) -> str | None:
    if sub is None:
        return None
    if not isinstance(sub, str) or not sub or len(sub) > MAX_SUBJECT_LENGTH or not sub.isprintable():
        raise ApiError("invalid_request", f"sub must be a printable string of 1-{MAX_SUBJECT_LENGTH} characters", param="sub")
    return sub


class GatewayTokens:
    """Mints and verifies the gateway's own JWTs with a KeyRing."""

    def __init__(
        self, settings: TokenSettings, ring: KeyRing, clock: Callable[[], float] = time.time,
        cache_size: int = VERIFIED_TOKENS_CACHED, cache_chars: int = VERIFIED_TOKEN_CHARS_CACHED,
    ) -> None:
        self.settings = settings
        self.ring = ring
        self._clock = clock
        self._verified: OrderedDict[str, tuple[GatewayClaims, str]] = OrderedDict()  # token -> (claims, kid)
        self._cache_size = cache_size
        self._cache_chars = cache_chars
        self._cached_chars = 0  # the length of every token in the cache, added up

    def mint(
        self,
        api_key: ApiKey,
        *,
        key_scopes: Sequence[str],
        key_models: Collection[str] = frozenset(),
        sub: object = None,
        ttl: object = None,
        scopes: object = None,
    ) -> MintedToken:
        """A token for this key; `sub`, `ttl`, `scopes` come straight from the request body and are validated here."""
        subject = _checked_subject(sub)
        lifetime = _checked_ttl(ttl, self.settings)
        granted = narrow_scopes(scopes, key_scopes, key_models)
        now = int(self._clock())
        claims: dict[str, Any] = {
            "iss": self.settings.issuer,
            "aud": self.settings.audience,
            "iat": now,
            "nbf": now,
            "exp": now + lifetime,
            "jti": secrets.token_urlsafe(16),
            CLAIM_KEY_ID: api_key.id,
            CLAIM_KEY_FINGERPRINT: key_fingerprint(api_key),
            CLAIM_PLAN: api_key.plan,
            CLAIM_SCOPES: list(granted),
        }
        if subject is not None:
            claims["sub"] = subject
        active = self.ring.active
        token = jwt.encode(claims, active.private_key, algorithm=active.algorithm, headers={"kid": active.kid})
        return MintedToken(token=token, expires_at=now + lifetime, expires_in=lifetime)

    def cached(self, token: str) -> GatewayClaims | None:
        """The claims of a token verified before, if it has not expired since and its signing key is still in the
        ring; else None. Its claims are signed, so they cannot have changed: what can (the API key behind it revoked,
        disabled or re-keyed) is the caller's to check on every call."""
        entry = self._verified.get(token)
        if entry is None:
            return None
        claims, kid = entry
        if self._clock() >= claims.expires_at + self.settings.leeway_s or self.ring.get(kid) is None:
            self._forget(token)
            return None
        self._verified.move_to_end(token)
        return claims

    def verify(self, token: str, parts: UnverifiedToken | None = None) -> GatewayClaims:
        """Check signature (only the ring's keys and algorithms), iss, aud, exp/nbf and required claims; `parts` is
        the token already split (`unverified_parts`), if the caller has it. An expired token is refused before its
        signature is checked (that costs the most); a valid one is remembered for `cached`."""
        header, payload = parts if parts is not None else unverified_parts(token)
        exp = payload.get("exp")
        if isinstance(exp, (int, float)) and not isinstance(exp, bool) and self._clock() >= exp + self.settings.leeway_s:
            raise ApiError("token_expired", "the token has expired; mint a new one")
        kid = header.get("kid")
        key = self.ring.get(kid) if isinstance(kid, str) else None
        if key is None:
            raise ApiError("invalid_token", "the token is not signed by a current gateway key")
        try:
            claims = jwt.decode(
                token,
                key.public_key,
                algorithms=[key.algorithm],
                issuer=self.settings.issuer,
                audience=self.settings.audience,
                leeway=self.settings.leeway_s,
                options={"require": ["iss", "aud", "exp", "iat", "jti", CLAIM_KEY_ID, CLAIM_KEY_FINGERPRINT, CLAIM_PLAN, CLAIM_SCOPES]},
            )
        except jwt.ExpiredSignatureError:
            raise ApiError("token_expired", "the token has expired; mint a new one") from None
        except jwt.InvalidTokenError as exc:
            raise ApiError("invalid_token", f"the token is invalid: {exc}") from None
        verified = _gateway_claims(claims)
        self._remember(token, verified, key.kid)
        return verified

    def _remember(self, token: str, claims: GatewayClaims, kid: str) -> None:
        if token in self._verified or len(token) > self._cache_chars:
            return
        self._verified[token] = (claims, kid)
        self._cached_chars += len(token)
        while len(self._verified) > self._cache_size or self._cached_chars > self._cache_chars:
            self._forget(next(iter(self._verified)))  # the least recently used

    def _forget(self, token: str) -> None:
        del self._verified[token]
        self._cached_chars -= len(token)


UnverifiedToken = tuple[dict[str, Any], dict[str, Any]]  # (header, payload), neither trusted before verification


def unverified_parts(token: str) -> UnverifiedToken:
    """A JWT's header and payload from one parse, signature unchecked: only to choose the verifier and to refuse an
    expired token early. 401 invalid_token when it is not a well-formed JWT."""
    try:
        parts = jwt.api_jwt.decode_complete(token, options={"verify_signature": False})
    except jwt.InvalidTokenError:
        raise ApiError("invalid_token", "the token is not a well-formed JWT") from None
    return parts["header"], parts["payload"]


def _gateway_claims(claims: dict[str, Any]) -> GatewayClaims:
    scopes = claims[CLAIM_SCOPES]
    strings = (claims[CLAIM_KEY_ID], claims[CLAIM_KEY_FINGERPRINT], claims[CLAIM_PLAN])
    if not all(isinstance(v, str) for v in strings) or not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
        raise ApiError("invalid_token", "the token's claims have the wrong types")
    return GatewayClaims(
        key_id=claims[CLAIM_KEY_ID],
        key_fingerprint=claims[CLAIM_KEY_FINGERPRINT],
        plan=claims[CLAIM_PLAN],
        scopes=tuple(scopes),
        subject=claims.get("sub"),
        token_id=claims["jti"],
        expires_at=int(claims["exp"]),
    )
