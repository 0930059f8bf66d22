"""The admin credential: a bearer token for `/v1/admin/*`, separate from every user credential.

Configured only from the environment or a file (or as SHA-256 hashes, which are not secret); the token itself is
never in YAML. Checked by hashing the presented token and comparing it with every configured hash in constant
time, so neither the answer nor its timing tells how close a guess was.
"""

from __future__ import annotations

import hmac
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from proxy.auth.api_keys import hash_key, looks_like_key
from proxy.auth.authenticator import bearer_credential, with_challenge
from proxy.errors import ApiError

MIN_TOKEN_LENGTH = 32  # characters: an admin token guards every key and balance
_HASH = re.compile(r"^sha256:[0-9a-f]{64}$")
_JWT = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$")


class AdminConfigError(ValueError):
    """A bad `admin:` setting; the message names the key and the fix."""


@dataclass(frozen=True)
class AdminCredential:
    """The hashes of the accepted admin tokens (several during a rotation). None configured: admin API off."""

    hashes: tuple[str, ...] = ()

    @property
    def enabled(self) -> bool:
        return bool(self.hashes)

    @classmethod
    def load(
        cls, *, token_env: str | None, token_file: Path | None, token_sha256: Iterable[str], where: str = "admin"
    ) -> AdminCredential:
        """Read the configured sources; a named source that is missing or weak stops start-up."""
        hashes = []
        for i, digest in enumerate(token_sha256):
            if not _HASH.match(digest):
                raise AdminConfigError(
                    f"{where}.token_sha256[{i}]: not sha256: followed by 64 lowercase hex digits; "
                    'write the output of `printf %s "$TOKEN" | sha256sum` after sha256:'
                )
            hashes.append(digest)
        if token_env:
            token = os.environ.get(token_env, "").strip()
            if not token:
                raise AdminConfigError(f"{where}.token_env: env var {token_env} is not set; export the admin token")
            hashes.append(hash_key(_strong(token, f"{where}.token_env ({token_env})")))
        if token_file:
            try:
                token = token_file.read_text().strip()
            except OSError as exc:
                raise AdminConfigError(f"{where}.token_file: cannot read {token_file}: {exc.strerror}; fix the path") from None
            hashes.append(hash_key(_strong(token, f"{where}.token_file")))
        return cls(tuple(dict.fromkeys(hashes)))

    def check(self, authorization: str | None) -> str:
        """The caller's admin actor for an admin token; else 401 (no or wrong admin token) or 403 (a user
        credential). The actor (`admin:` and 12 hex digits of the token's hash) tells the configured tokens apart
        in the audit trail without revealing any."""
        try:
            credential = bearer_credential(authorization)
        except ApiError as err:
            raise with_challenge(err) from None
        digest = hash_key(credential)
        matched = False
        for accepted in self.hashes:  # no early exit: the time does not depend on which hash matched
            matched |= hmac.compare_digest(accepted, digest)
        if matched:
            return "admin:" + digest.removeprefix("sha256:")[:12]
        if looks_like_key(credential) or _JWT.match(credential):
            raise ApiError("admin_required", "this route takes the admin token, not an API key or a user token")
        raise with_challenge(ApiError("invalid_admin_token", "the admin token is not valid"))


def _strong(token: str, where: str) -> str:
    if len(token) < MIN_TOKEN_LENGTH or looks_like_key(token) or _JWT.match(token):
        raise AdminConfigError(
            f"{where}: the admin token must be at least {MIN_TOKEN_LENGTH} characters and not look like an API key "
            "(sk_...) or a JWT; generate one with `edge-proxy keys admin-token`"
        )
    return token
