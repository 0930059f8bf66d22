"""Long-lived API keys (`sk_...`), stored only as hashes, looked up by hash."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Iterable, Mapping

KEY_PREFIX = "sk_"
HASH_PREFIX = "sha256:"


@dataclass(frozen=True)
class ApiKey:
    """An API key as declared in policies: never the key itself, only its hash."""

    id: str
    hash: str  # "sha256:<hex>"
    plan: str
    account: str | None = None  # whom to bill; defaults to the key id
    allow_direct: bool = True  # may the raw key call models, or only mint tokens?
    disabled: bool = False

    @property
    def billing_account(self) -> str:
        return self.account or self.id


def generate_key() -> str:
    """A new key: prefix plus 256 bits of randomness."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return HASH_PREFIX + hashlib.sha256(key.encode()).hexdigest()


def looks_like_key(credential: str) -> bool:
    return credential.startswith(KEY_PREFIX)


class KeyIndex:
    """Keys by hash: a lookup is one dict access, independent of how many keys exist."""

    def __init__(self, keys: Iterable[ApiKey]) -> None:
        records = list(keys)
        self._by_hash: Mapping[str, ApiKey] = {k.hash: k for k in records}
        self._by_id: Mapping[str, ApiKey] = {k.id: k for k in records}

    def find(self, credential: str) -> ApiKey | None:
        """The key record for a raw credential, or None. Disabled keys are returned; callers reject them."""
        digest = hash_key(credential)
        record = self._by_hash.get(digest)
        # The dict lookup already matched; compare_digest keeps the final check constant-time.
        if record is None or not hmac.compare_digest(record.hash, digest):
            return None
        return record

    def by_id(self, key_id: str) -> ApiKey | None:
        """The key record with this id (the key behind a minted token), or None if it no longer exists."""
        return self._by_id.get(key_id)

    def __len__(self) -> int:
        return len(self._by_hash)
