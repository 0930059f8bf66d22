"""The HTTP sink's signature: HMAC-SHA256 over `<timestamp>.<body>`, so a receiver can check who sent a batch
and refuse an old one replayed (docs/usage.md, "Verifying a batch")."""

from __future__ import annotations

import hashlib
import hmac

SIGNATURE_HEADER = "X-Edge-Signature"
TIMESTAMP_HEADER = "X-Edge-Timestamp"
SCHEME = "v1="
TOLERANCE_S = 300  # how old (or how far ahead) a batch's timestamp may be at its receiver


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """The signature header's value for `body` sent at `timestamp` (unix seconds)."""
    return SCHEME + hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def verify(secret: bytes, timestamp: str, signature: str, body: bytes, now: float, tolerance_s: int = TOLERANCE_S) -> bool:
    """Whether `signature` is ours over this exact body and timestamp, and the timestamp is within the tolerance."""
    if not timestamp.isascii() or not timestamp.isdigit() or abs(now - int(timestamp)) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, int(timestamp), body), signature)
