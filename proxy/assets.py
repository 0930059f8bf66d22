"""Short-lived assets (uploads, generated audio) kept in memory: bounded in bytes and count, oldest use out first.

Memory is per process: with several replicas, an asset URL is served only by the replica that stored it
(see docs/api.md).
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Asset:
    id: str
    content_type: str
    data: bytes
    expires_at: float  # unix seconds


class AssetStore:
    """A TTL'd LRU map of unguessable ids (128 random bits) to bytes."""

    def __init__(
        self, *, ttl_s: float, max_total_bytes: int, max_count: int, clock: Callable[[], float] = time.time
    ) -> None:
        self._ttl_s = ttl_s
        self._max_total_bytes = max_total_bytes
        self._max_count = max_count
        self._clock = clock
        self._assets: OrderedDict[str, Asset] = OrderedDict()
        self._total_bytes = 0

    def put(self, data: bytes, content_type: str) -> Asset:
        """Store `data`, evicting expired then least recently used assets until it fits."""
        if len(data) > self._max_total_bytes:
            raise ValueError(f"an asset of {len(data)} bytes exceeds the store's {self._max_total_bytes} bytes")
        self._drop_expired()
        while self._assets and (
            len(self._assets) >= self._max_count or self._total_bytes + len(data) > self._max_total_bytes
        ):
            self._remove(next(iter(self._assets)))
        asset = Asset(secrets.token_urlsafe(16), content_type, data, self._clock() + self._ttl_s)
        self._assets[asset.id] = asset
        self._total_bytes += len(data)
        return asset

    def get(self, asset_id: str) -> Asset | None:
        """The asset, or None if unknown or expired; a hit counts as a use for LRU."""
        asset = self._assets.get(asset_id)
        if asset is None:
            return None
        if asset.expires_at <= self._clock():
            self._remove(asset_id)
            return None
        self._assets.move_to_end(asset_id)
        return asset

    def seconds_left(self, asset: Asset) -> int:
        return max(0, int(asset.expires_at - self._clock()))

    def _drop_expired(self) -> None:
        now = self._clock()
        for asset_id in [a.id for a in self._assets.values() if a.expires_at <= now]:
            self._remove(asset_id)

    def _remove(self, asset_id: str) -> None:
        self._total_bytes -= len(self._assets.pop(asset_id).data)
