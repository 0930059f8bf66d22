"""The asset store's interface: uploads and generated outputs kept for a while under unguessable ids.

Three backends implement `AssetStore` (chosen by `assets.backend`): `memory` (one process), `redis` (bytes in
Redis, any replica serves any asset) and `s3` (S3-compatible object storage). The budget for upload bodies
being received (`ReceivingBudget`) is per process whatever the backend: it bounds this process's memory.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import AsyncGenerator, Callable, Iterator, Protocol

from ..store.base import StoreError

# An account tag (8 hex of the account's hash: a Redis Cluster hash tag keeps an account's keys in one slot)
# and 128 random bits; anything else is refused before a backend is asked.
_ID = re.compile(r"^[0-9a-f]{8}[A-Za-z0-9_-]{22}$")


@dataclass(frozen=True)
class Asset:
    id: str
    account: str  # the account it counts against
    content_type: str
    data: bytes
    expires_at: float  # unix seconds


def _holds_nothing() -> None:
    pass


@dataclass(frozen=True)
class AssetBody:
    """An asset to send: its description (`asset.data` empty) and its bytes as they are read, so serving a
    large object never holds it whole. `release()` it once done, whether or not `chunks` was read (a HEAD
    request, a client gone before the first byte): it frees what the backend holds, such as S3's connection."""

    asset: Asset
    size: int
    chunks: AsyncGenerator[bytes, None]
    release: Callable[[], None] = _holds_nothing


class ReadsWhole:
    """`open` for backends that read an asset whole anyway (memory, redis): `get`, as a body of one chunk."""

    async def get(self, asset_id: str) -> Asset | None:
        raise NotImplementedError

    async def open(self, asset_id: str) -> AssetBody | None:
        asset = await self.get(asset_id)
        if asset is None:
            return None

        async def one() -> AsyncGenerator[bytes, None]:
            yield asset.data

        return AssetBody(replace(asset, data=b""), len(asset.data), one())


class AssetStoreFull(Exception):
    """No room without taking another account's share; worth retrying after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class AssetExists(Exception):
    """An asset with that id is already stored (a presigned upload URL used twice)."""


# The backend could not be reached or failed (as the metering store's error): the request gets 503 store_unavailable.
AssetStoreError = StoreError


class AssetStore(Protocol):
    async def put(self, data: bytes, content_type: str, account: str, asset_id: str | None = None) -> Asset:
        """Keep `data` for `account` (under `asset_id` when given, from `new_asset_id`); AssetStoreFull when
        there is no room, AssetExists when `asset_id` is taken, ValueError when it exceeds the account's share."""

    async def get(self, asset_id: str) -> Asset | None:
        """The asset, or None if unknown or expired."""

    async def open(self, asset_id: str) -> AssetBody | None:
        """The asset to send, its bytes streamed where the backend can (s3), or None if unknown or expired."""

    async def delete(self, asset_id: str) -> None:
        """Forget the asset (no error if it is gone)."""

    async def close(self) -> None:
        """Release connections."""


def account_tag(account: str) -> str:
    return hashlib.sha256(account.encode()).hexdigest()[:8]


def new_asset_id(account: str) -> str:
    return account_tag(account) + secrets.token_urlsafe(16)


def valid_asset_id(asset_id: str) -> bool:
    return bool(_ID.match(asset_id))


class ReceivingBudget:
    """Bytes of upload bodies this process reads at once: concurrent uploads cannot take unbounded memory
    before they are stored."""

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._held = 0

    @contextmanager
    def hold(self, size: int) -> Iterator[None]:
        """Hold `size` bytes while a body is read; AssetStoreFull at once when spent (waiting would let
        half-read bodies hold memory while they wait for each other)."""
        if self._held + size > self._max_bytes:
            raise AssetStoreFull("the gateway is receiving too many uploads at once", retry_after_s=1)
        self._held += size
        try:
            yield
        finally:
            self._held -= size
