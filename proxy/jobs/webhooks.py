"""Providers' webhooks, verified before anything in them is read.

Standard Webhooks (Replicate, `jobs.webhook_secret`): a delivery carries `webhook-id`, `webhook-timestamp` (Unix seconds) and `webhook-signature` (space-separated
`v1,<base64>` entries); the signature is HMAC-SHA256, keyed with the base64 after the secret's `whsec_` prefix,
of `{webhook-id}.{webhook-timestamp}.{raw body}`. A delivery whose timestamp is further than the tolerance from
now is refused (a replayed capture), and the signatures are compared in constant time.

fal (`jobs.webhooks`): a delivery carries `X-Fal-Webhook-Request-Id`, `-User-Id`, `-Timestamp` (Unix seconds) and
`-Signature` (hex), an ED25519 signature of the request id, user id, timestamp and the body's SHA-256 (hex) joined
by newlines, by one of the keys fal publishes as a JWKS (`x`: the raw public key, base64url). The keys are fetched
on first use and cached for `JWKS_TTL_S`; a signature no cached key verifies refetches them (a rotation) at most
once per `JWKS_REFETCH_S`, so forged deliveries cannot hammer the key server.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Mapping, Protocol

import aiohttp
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ..config import Config, ConfigError, SecretSource
from ..errors import ApiError

_MIN_KEY_BYTES = 16
_MAX_HEADER = 4096
JWKS_TTL_S = 3600.0
JWKS_REFETCH_S = 30.0
_JWKS_TIMEOUT = aiohttp.ClientTimeout(total=5)
_MAX_JWKS_BYTES = 64 * 1024
_FAL_HEADERS = tuple(f"X-Fal-Webhook-{part}" for part in ("Request-Id", "User-Id", "Timestamp", "Signature"))

log = logging.getLogger(__name__)


class Verifier(Protocol):
    async def verify(self, headers: Mapping[str, str], body: bytes, now: float) -> None:
        """Return if the delivery is the provider's and fresh; else ApiError (400 malformed, 401 refused)."""
        ...


@dataclass(frozen=True)
class WebhookVerifier:
    """One provider's webhook secret (the decoded key) and the timestamp tolerance."""

    key: bytes
    tolerance_s: float

    async def verify(self, headers: Mapping[str, str], body: bytes, now: float) -> None:
        """Return if the delivery is signed with the key and fresh; else ApiError (400 malformed, 401 refused)."""
        message_id, timestamp, signatures = (headers.get(name, "") for name in
                                             ("webhook-id", "webhook-timestamp", "webhook-signature"))
        if not (message_id and timestamp and signatures) or max(map(len, (message_id, signatures))) > _MAX_HEADER:
            raise ApiError("invalid_request", "a webhook needs the webhook-id, webhook-timestamp and "
                           "webhook-signature headers (Standard Webhooks)")
        _check_fresh(timestamp, "webhook-timestamp", now, self.tolerance_s)
        signed = f"{message_id}.{timestamp}.".encode() + body
        expected = base64.b64encode(hmac.new(self.key, signed, hashlib.sha256).digest())
        for entry in signatures.split(" "):
            version, _, signature = entry.partition(",")
            if version == "v1" and hmac.compare_digest(signature.encode(), expected):
                return
        raise ApiError("invalid_webhook_signature", "the webhook's signature does not match its provider's secret")


@dataclass
class JwksVerifier:
    """One provider's published keys (fetched from `jwks_url`, cached) and the timestamp tolerance (fal)."""

    jwks_url: str
    tolerance_s: float
    _keys: list[Ed25519PublicKey] = field(default_factory=list)
    _fetched_at: float = float("-inf")  # monotonic
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def verify(self, headers: Mapping[str, str], body: bytes, now: float) -> None:
        request_id, user_id, timestamp, signature = (headers.get(name, "") for name in _FAL_HEADERS)
        if not (request_id and timestamp and signature) or max(map(len, (request_id, user_id, signature))) > _MAX_HEADER:
            raise ApiError("invalid_request", "a fal webhook needs the X-Fal-Webhook-Request-Id, -User-Id, -Timestamp "
                           "and -Signature headers")
        _check_fresh(timestamp, _FAL_HEADERS[2], now, self.tolerance_s)
        try:
            raw = bytes.fromhex(signature)
        except ValueError:
            raise ApiError("invalid_request", "X-Fal-Webhook-Signature must be hex", param=_FAL_HEADERS[3]) from None
        signed = "\n".join((request_id, user_id, timestamp, hashlib.sha256(body).hexdigest())).encode()
        if _any_verifies(await self._current_keys(), raw, signed):
            return
        if _any_verifies(await self._refetched_keys(), raw, signed):  # the provider may have rotated its key
            return
        raise ApiError("invalid_webhook_signature", "the webhook's signature matches none of its provider's "
                       "published keys")

    async def _current_keys(self) -> list[Ed25519PublicKey]:
        if time.monotonic() - self._fetched_at > JWKS_TTL_S:
            return await self._refetched_keys(JWKS_TTL_S)
        return self._keys

    async def _refetched_keys(self, min_age_s: float = JWKS_REFETCH_S) -> list[Ed25519PublicKey]:
        """The keys, fetched again unless they are younger than `min_age_s` (one fetch for concurrent callers)."""
        async with self._lock:
            if time.monotonic() - self._fetched_at > min_age_s:
                try:
                    self._keys = await _fetch_keys(self.jwks_url)
                except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
                    log.warning("webhook keys from %s not fetched (%s); keeping %d cached", self.jwks_url, exc,
                                len(self._keys))
                    if not self._keys:  # nothing to verify with: the provider retries, refused meanwhile
                        raise ApiError("invalid_webhook_signature", "the provider's published keys cannot be "
                                       "fetched right now; the delivery cannot be verified") from None
                self._fetched_at = time.monotonic()
            return self._keys


async def _fetch_keys(url: str) -> list[Ed25519PublicKey]:
    """The Ed25519 keys of a JWKS (`kty` OKP, `crv` Ed25519, `x` base64url); ValueError when there are none."""
    async with aiohttp.ClientSession(timeout=_JWKS_TIMEOUT) as session:
        async with session.get(url) as response:
            response.raise_for_status()
            document = await response.content.read(_MAX_JWKS_BYTES + 1)
    if len(document) > _MAX_JWKS_BYTES:
        raise ValueError("the JWKS is too large")
    entries = json.loads(document).get("keys") if document.startswith(b"{") else None
    keys = []
    for entry in entries if isinstance(entries, list) else ():
        x = entry.get("x") if isinstance(entry, dict) and entry.get("crv", "Ed25519") == "Ed25519" else None
        if isinstance(x, str):
            try:
                keys.append(Ed25519PublicKey.from_public_bytes(base64.urlsafe_b64decode(x + "=" * (-len(x) % 4))))
            except (binascii.Error, ValueError):
                continue  # a key of another kind or a broken entry: the others still count
    if not keys:
        raise ValueError("the JWKS holds no Ed25519 key")
    return keys


def _any_verifies(keys: list[Ed25519PublicKey], signature: bytes, signed: bytes) -> bool:
    for key in keys:
        try:
            key.verify(signature, signed)
            return True
        except InvalidSignature:
            continue
    return False


def _check_fresh(timestamp: str, header: str, now: float, tolerance_s: float) -> None:
    """Refuse a malformed timestamp (400) or one further than the tolerance from now (401, a replayed capture)."""
    if not timestamp.isascii() or not timestamp.isdigit() or len(timestamp) > 12:
        raise ApiError("invalid_request", f"{header} must be Unix seconds", param=header)
    if abs(now - int(timestamp)) > tolerance_s:
        raise ApiError("invalid_webhook_signature", f"the webhook's timestamp is more than "
                       f"{tolerance_s:g}s from now: refused as a replay")


def webhook_key(secret: str) -> bytes:
    """The HMAC key of a `whsec_<base64>` secret (the prefix is optional); ValueError if it is not one."""
    try:
        key = base64.b64decode(secret.strip().removeprefix("whsec_"), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("it is not base64 after its whsec_ prefix") from None
    if len(key) < _MIN_KEY_BYTES:
        raise ValueError(f"its key has {len(key)} bytes, fewer than {_MIN_KEY_BYTES}")
    return key


def webhook_verifiers(config: Config) -> dict[str, Verifier]:
    """The verifier of each provider taking webhooks, its secret read at start-up; ConfigError names the key."""
    verifiers: dict[str, Verifier] = {}
    for name, settings in config.providers.items():
        if settings.jobs.webhooks:
            verifiers[name] = JwksVerifier(settings.jobs.webhook_jwks_url, settings.jobs.webhook_tolerance_s)
        source = settings.jobs.webhook_secret
        if source is not None:
            where = f"{config.source}: providers.{name}.jobs.webhook_secret"
            secret = _read(config, source, where)
            try:
                key = webhook_key(secret)
            except ValueError as exc:
                raise ConfigError(f"{where}: the secret is not a webhook signing secret: {exc}. Fix: use the "
                                  "provider's secret as given (Replicate: GET /v1/webhooks/default/secret, "
                                  "whsec_...)") from None
            verifiers[name] = WebhookVerifier(key, settings.jobs.webhook_tolerance_s)
    return verifiers


def _read(config: Config, source: SecretSource, where: str) -> str:
    if source.env:
        value = os.environ.get(source.env, "")
        if not value:
            raise ConfigError(f"{where}: environment variable {source.env} is not set. Fix: export it")
        return value
    assert source.file is not None  # exactly one of env or file, validated
    path = config.path(source.file)
    try:
        return path.read_text()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {path}: {exc.strerror}. Fix: mount the secret file there") from None
