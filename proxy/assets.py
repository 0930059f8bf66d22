"""Short-lived assets (uploads, generated audio and images) kept in memory, bounded in total and per account.

No account can take more than its share: an account over its byte or count quota loses its own least
recently used assets, and when the whole store is full an account may only make room from its own assets,
never by evicting another account's (it is refused instead). Bodies being received count against their own
budget, so concurrent uploads cannot take unbounded memory before they are stored.

Memory is per process: with several replicas, an asset URL is served only by the replica that stored it
(see docs/api.md).
"""

from __future__ import annotations

import math
import secrets
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

from .config import AssetSettings


@dataclass(frozen=True)
class Asset:
    id: str
    account: str  # the account it counts against
    content_type: str
    data: bytes
    expires_at: float  # unix seconds


class AssetStoreFull(Exception):
    """No room without taking another account's share; worth retrying after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class AssetStore:
    """A TTL'd map of unguessable ids (128 random bits) to bytes, with per-account quotas (LRU within an account)."""

    def __init__(self, settings: AssetSettings, clock: Callable[[], float] = time.time) -> None:
        self._ttl_s = settings.ttl_s
        self._limits = settings
        self._clock = clock
        self._assets: dict[str, Asset] = {}  # insertion order is expiry order: every asset lives ttl_s
        self._by_account: dict[str, OrderedDict[str, Asset]] = {}  # each in least recently used order
        self._account_bytes: dict[str, int] = {}
        self._total_bytes = 0
        self._receiving_bytes = 0

    def put(self, data: bytes, content_type: str, account: str) -> Asset:
        """Store `data` for `account`, evicting expired assets, then the account's own least recently used ones."""
        size, limits = len(data), self._limits
        if size > limits.max_bytes_per_account:
            raise ValueError(f"an asset of {size} bytes exceeds the per-account {limits.max_bytes_per_account} bytes")
        self._drop_expired()
        own = self._by_account.get(account, OrderedDict())
        while own and (
            len(own) >= limits.max_count_per_account or self._account_bytes[account] + size > limits.max_bytes_per_account
        ):
            self._remove(next(iter(own)))
        if not self._fits(size, freed_count=len(own), freed_bytes=self._account_bytes.get(account, 0)):
            raise AssetStoreFull("the asset store is full with other accounts' assets", self._seconds_until_expiry())
        while not self._fits(size):
            self._remove(next(iter(own)))
        asset = Asset(secrets.token_urlsafe(16), account, content_type, data, self._clock() + self._ttl_s)
        self._assets[asset.id] = asset
        self._by_account.setdefault(account, own)[asset.id] = asset
        self._account_bytes[account] = self._account_bytes.get(account, 0) + size
        self._total_bytes += size
        return asset

    def get(self, asset_id: str) -> Asset | None:
        """The asset, or None if unknown or expired; a hit counts as a use for its account's LRU order."""
        asset = self._assets.get(asset_id)
        if asset is None:
            return None
        if asset.expires_at <= self._clock():
            self._remove(asset_id)
            return None
        self._by_account[asset.account].move_to_end(asset_id)
        return asset

    def seconds_left(self, asset: Asset) -> int:
        return max(0, int(asset.expires_at - self._clock()))

    @contextmanager
    def receiving(self, size: int) -> Iterator[None]:
        """Hold `size` bytes of the receiving budget while a body is read; AssetStoreFull at once when spent
        (waiting would let half-read bodies hold memory while they wait for each other)."""
        if self._receiving_bytes + size > self._limits.max_receiving_bytes:
            raise AssetStoreFull("the gateway is receiving too many uploads at once", retry_after_s=1)
        self._receiving_bytes += size
        try:
            yield
        finally:
            self._receiving_bytes -= size

    def _fits(self, size: int, *, freed_count: int = 0, freed_bytes: int = 0) -> bool:
        """Would an asset of `size` fit the whole store, once `freed_count` assets of `freed_bytes` are gone?"""
        return (
            len(self._assets) - freed_count < self._limits.max_count
            and self._total_bytes - freed_bytes + size <= self._limits.max_total_bytes
        )

    def _seconds_until_expiry(self) -> int:
        oldest = next(iter(self._assets.values()))
        return max(1, math.ceil(oldest.expires_at - self._clock()))

    def _drop_expired(self) -> None:
        now = self._clock()
        while self._assets:
            oldest = next(iter(self._assets.values()))
            if oldest.expires_at > now:
                return
            self._remove(oldest.id)

    def _remove(self, asset_id: str) -> None:
        asset = self._assets.pop(asset_id)
        own = self._by_account[asset.account]
        del own[asset_id]
        self._account_bytes[asset.account] -= len(asset.data)
        if not own:
            del self._by_account[asset.account], self._account_bytes[asset.account]
        self._total_bytes -= len(asset.data)
