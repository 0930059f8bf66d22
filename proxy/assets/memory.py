"""The `memory` asset backend: assets in this process's memory, bounded in total and per account.

No account can take more than its share: an account over its byte or count quota loses its own least
recently used assets, and when the whole store is full an account may only make room from its own assets,
never by evicting another account's (it is refused instead).

Memory is per process: with several replicas, an asset URL is served only by the replica that stored it
(use the redis or s3 backend there, docs/api.md).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from typing import Callable

from ..config import AssetSettings
from .base import Asset, AssetExists, ReadsWhole, AssetStoreFull, new_asset_id


class MemoryAssets(ReadsWhole):
    """A TTL'd map of unguessable ids (128 random bits) to bytes, with per-account quotas (LRU within an account)."""

    def __init__(self, settings: AssetSettings, clock: Callable[[], float] = time.time) -> None:
        self._ttl_s = settings.ttl_s
        self._limits = settings
        self._clock = clock
        self._assets: dict[str, Asset] = {}  # insertion order is expiry order: every asset lives ttl_s
        self._by_account: dict[str, OrderedDict[str, Asset]] = {}  # each in least recently used order
        self._account_bytes: dict[str, int] = {}
        self._total_bytes = 0

    async def put(self, data: bytes, content_type: str, account: str, asset_id: str | None = None) -> Asset:
        """Store `data` for `account`, evicting expired assets, then the account's own least recently used ones."""
        size, limits = len(data), self._limits
        if size > limits.max_bytes_per_account:
            raise ValueError(f"an asset of {size} bytes exceeds the per-account {limits.max_bytes_per_account} bytes")
        self._drop_expired()
        if asset_id in self._assets:
            raise AssetExists(asset_id)
        own = self._by_account.get(account, OrderedDict())
        while own and (
            len(own) >= limits.max_count_per_account or self._account_bytes[account] + size > limits.max_bytes_per_account
        ):
            self._remove(next(iter(own)))
        if not self._fits(size, freed_count=len(own), freed_bytes=self._account_bytes.get(account, 0)):
            raise AssetStoreFull("the asset store is full with other accounts' assets", self._seconds_until_expiry())
        while not self._fits(size):
            self._remove(next(iter(own)))
        asset = Asset(asset_id or new_asset_id(account), account, content_type, data, self._clock() + self._ttl_s)
        self._assets[asset.id] = asset
        self._by_account.setdefault(account, own)[asset.id] = asset
        self._account_bytes[account] = self._account_bytes.get(account, 0) + size
        self._total_bytes += size
        return asset

    async def get(self, asset_id: str) -> Asset | None:
        """The asset, or None if unknown or expired; a hit counts as a use for its account's LRU order."""
        asset = self._assets.get(asset_id)
        if asset is None:
            return None
        if asset.expires_at <= self._clock():
            self._remove(asset_id)
            return None
        self._by_account[asset.account].move_to_end(asset_id)
        return asset

    async def delete(self, asset_id: str) -> None:
        if asset_id in self._assets:
            self._remove(asset_id)

    async def close(self) -> None:
        """Nothing to release."""

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
