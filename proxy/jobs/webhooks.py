"""Providers' webhooks, verified as Standard Webhooks (the scheme Replicate signs with).

A delivery carries `webhook-id`, `webhook-timestamp` (Unix seconds) and `webhook-signature` (space-separated
`v1,<base64>` entries); the signature is HMAC-SHA256, keyed with the base64 after the secret's `whsec_` prefix,
of `{webhook-id}.{webhook-timestamp}.{raw body}`. A delivery whose timestamp is further than the tolerance from
now is refused (a replayed capture), and the signatures are compared in constant time.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from dataclasses import dataclass
from typing import Mapping

from ..config import Config, ConfigError, SecretSource
from ..errors import ApiError

_MIN_KEY_BYTES = 16
_MAX_HEADER = 4096


@dataclass(frozen=True)
class WebhookVerifier:
    """One provider's webhook secret (the decoded key) and the timestamp tolerance."""

    key: bytes
    tolerance_s: float

    def verify(self, headers: Mapping[str, str], body: bytes, now: float) -> None:
        """Return if the delivery is signed with the key and fresh; else ApiError (400 malformed, 401 refused)."""
        message_id, timestamp, signatures = (headers.get(name, "") for name in
                                             ("webhook-id", "webhook-timestamp", "webhook-signature"))
        if not (message_id and timestamp and signatures) or max(map(len, (message_id, signatures))) > _MAX_HEADER:
            raise ApiError("invalid_request", "a webhook needs the webhook-id, webhook-timestamp and "
                           "webhook-signature headers (Standard Webhooks)")
        if not timestamp.isascii() or not timestamp.isdigit() or len(timestamp) > 12:
            raise ApiError("invalid_request", "webhook-timestamp must be Unix seconds", param="webhook-timestamp")
        if abs(now - int(timestamp)) > self.tolerance_s:
            raise ApiError("invalid_webhook_signature", f"the webhook's timestamp is more than "
                           f"{self.tolerance_s:g}s from now: refused as a replay")
        signed = f"{message_id}.{timestamp}.".encode() + body
        expected = base64.b64encode(hmac.new(self.key, signed, hashlib.sha256).digest())
        for entry in signatures.split(" "):
            version, _, signature = entry.partition(",")
            if version == "v1" and hmac.compare_digest(signature.encode(), expected):
                return
        raise ApiError("invalid_webhook_signature", "the webhook's signature does not match its provider's secret")


def webhook_key(secret: str) -> bytes:
    """The HMAC key of a `whsec_<base64>` secret (the prefix is optional); ValueError if it is not one."""
    try:
        key = base64.b64decode(secret.strip().removeprefix("whsec_"), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("it is not base64 after its whsec_ prefix") from None
    if len(key) < _MIN_KEY_BYTES:
        raise ValueError(f"its key has {len(key)} bytes, fewer than {_MIN_KEY_BYTES}")
    return key


def webhook_verifiers(config: Config) -> dict[str, WebhookVerifier]:
    """The verifier of each provider with a `jobs.webhook_secret`, read at start-up; ConfigError names the key."""
    verifiers = {}
    for name, settings in config.providers.items():
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
