"""Signed asset URLs: `?exp=<unix seconds>&sig=<HMAC-SHA256>` over what the URL may do, so a URL needs no
credential, yet cannot be forged, pointed at another asset or kept alive past its `exp`.

The MAC covers a purpose (`get`, or `put` for a presigned upload), the asset id, the expiry and, for uploads,
the signed limits; any change to one of them breaks it. Several keys may be configured for rotation: the first
signs, every one verifies. Without a configured key each process makes its own (fine for the memory backend,
whose assets are per process anyway).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from ..errors import ApiError

MIN_KEY_BYTES = 32


@dataclass(frozen=True)
class UrlSigner:
    keys: tuple[bytes, ...] = field(repr=False)
    clock: Callable[[], float] = time.time

    @classmethod
    def ephemeral(cls) -> UrlSigner:
        return cls((secrets.token_bytes(MIN_KEY_BYTES),))

    def sign(self, fields: Sequence[str | int]) -> str:
        return _mac(self.keys[0], fields)

    def verify(self, fields: Sequence[str | int], signature: str, expires_at: int) -> None:
        """Raise unless `signature` is one of our keys' MAC of `fields` (403) and `expires_at` is still ahead (410).
        The signature is checked first: an `exp` moved forward is a forgery, not an expired URL."""
        if not any(hmac.compare_digest(_mac(key, fields), signature) for key in self.keys):
            raise ApiError("invalid_asset_signature",
                           "this URL's signature does not match; use the URL exactly as the gateway issued it")
        if expires_at <= self.clock():
            raise ApiError("asset_url_expired",
                           "this URL has expired; ask for a new one (upload again or re-run the generation)")


def _mac(key: bytes, fields: Sequence[str | int]) -> str:
    message = json.dumps(list(fields), separators=(",", ":")).encode()  # unambiguous field boundaries
    digest = hmac.new(key, message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def expiry_param(text: str | None) -> int:
    """The URL's `exp` as an int; a missing or malformed one is a bad signature (403), never a 500."""
    if text is None or not text.isdigit() or len(text) > 12:
        raise ApiError("invalid_asset_signature", "this URL lacks a valid `exp`; use the URL exactly as the gateway issued it")
    return int(text)
