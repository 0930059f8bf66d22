"""Assets: uploads and generated outputs behind signed, short-lived URLs, in a store chosen by `assets.backend`.

`Assets` is what the HTTP surface uses: the store (`base.AssetStore`), the URL signer and this process's
budget for bodies being received; `build_assets(config)` makes it once at start-up.
"""

from __future__ import annotations

import logging

import math
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

from ..config import Config, ConfigError, SecretSource
from .base import (
    Asset, AssetExists, AssetStore, AssetStoreError, AssetStoreFull, ReceivingBudget, new_asset_id,
    valid_asset_id,
)
from .memory import MemoryAssets
from .rehost import Rehoster, RehostError
from .signing import MIN_KEY_BYTES, UrlSigner

__all__ = [
    "Asset", "AssetExists", "AssetStore", "AssetStoreError", "AssetStoreFull", "Assets", "MemoryAssets",
    "ReceivingBudget", "RehostError", "build_assets", "valid_asset_id",
]


log = logging.getLogger("edge_proxy")

@dataclass
class Assets:
    store: AssetStore
    signer: UrlSigner
    receiving: ReceivingBudget
    url_ttl_s: float | None  # None: a URL lives as long as its object
    rehoster: Rehoster

    def url_expiry(self, asset: Asset) -> int:
        """When a URL issued now for `asset` stops working: the object's expiry, or sooner by `url_ttl_s`."""
        until = asset.expires_at if self.url_ttl_s is None else min(asset.expires_at, self.signer.clock() + self.url_ttl_s)
        return math.ceil(until)  # whole seconds; the object itself still expires on time

    def get_url(self, base_url: str, asset: Asset) -> str:
        expires = self.url_expiry(asset)
        signature = self.signer.sign(("get", asset.id, expires))
        return f"{base_url.rstrip('/')}/v1/assets/{asset.id}?exp={expires}&sig={signature}"

    async def rehost(self, url: str, account: str) -> Asset:
        """Copy a provider's output `url` into the store for `account` (RehostError when it cannot be)."""
        return await self.rehoster.rehost(url, account)

    async def output_url(self, url: str, account: str, base_url: str) -> str:
        """A provider's output URL as the client gets it: copied into the store (a signed URL of ours, on
        `base_url`) when `assets.rehost.enabled`, else as is. A copy that fails keeps the provider's URL: the
        generation is done and paid for, and the client still gets its result (for the provider's lifetime); the
        log says why. A URL on `base_url` already is the gateway's own and stays."""
        if not self.rehoster.enabled or url.startswith(base_url.rstrip("/") + "/"):
            return url
        try:
            return self.get_url(base_url, await self.rehost(url, account))
        except RehostError as exc:
            log.warning("provider output not re-hosted, its own URL is passed on: %s", exc)
            return url

    async def close(self) -> None:
        await self.rehoster.close()
        await self.store.close()

    def check_get(self, asset_id: str, expires: int, signature: str) -> None:
        """Raise the 403 or 410 ApiError unless the URL for `asset_id` is ours and still valid."""
        self.signer.verify(("get", asset_id, expires), signature, expires)

    @staticmethod
    def new_id(account: str) -> str:
        return new_asset_id(account)

    def put_url(self, base_url: str, asset_id: str, account: str, content_type: str, size: int, expires: int) -> str:
        """A presigned upload: PUT of at most `size` bytes of `content_type`, kept as `asset_id` of `account`."""
        signature = self.signer.sign(("put", asset_id, account, content_type, str(size), expires))
        query = urlencode({"exp": expires, "type": content_type, "size": size, "acct": account, "sig": signature})
        return f"{base_url.rstrip('/')}/v1/uploads/{asset_id}?{query}"

    def check_put(self, asset_id: str, account: str, content_type: str, size: str, expires: int, signature: str) -> None:
        """Raise the 403 or 410 ApiError unless the upload URL is ours, unchanged and still valid."""
        self.signer.verify(("put", asset_id, account, content_type, size, expires), signature, expires)


def build_assets(config: Config) -> Assets:
    settings = config.assets
    keys = tuple(_read_key(config, source, i) for i, source in enumerate(settings.url_signing_keys))
    store = _build_store(config)
    return Assets(
        store=store,
        signer=UrlSigner(keys) if keys else UrlSigner.ephemeral(),
        receiving=ReceivingBudget(settings.max_receiving_bytes),
        url_ttl_s=settings.url_ttl_s,
        rehoster=Rehoster(settings.rehost, store, config.server.max_upload_bytes),
    )


def _build_store(config: Config) -> AssetStore:
    settings = config.assets
    if settings.backend == "redis":
        from .redis import RedisAssets

        store = config.store_settings()
        assert store.redis_url is not None  # checked with the config: assets in Redis need a Redis store
        return RedisAssets(settings, store.redis_url, mode=store.redis_mode, credentials=store.credentials())
    if settings.backend == "s3":
        try:
            from .s3 import S3Assets
        except ImportError:
            raise ConfigError(f"{config.source}: assets.backend: s3 needs aiobotocore, which is not installed. "
                              "Fix: pip install 'edge-proxy[s3]'") from None
        assert settings.s3 is not None  # checked with the config
        return S3Assets(settings, settings.s3)
    return MemoryAssets(settings)


def _read_key(config: Config, source: SecretSource, index: int) -> bytes:
    where = f"{config.source}: assets.url_signing_keys[{index}]"
    if source.env:
        value = os.environ.get(source.env, "")
        if not value:
            raise ConfigError(f"{where}: environment variable {source.env} is not set. Fix: export it")
    else:
        assert source.file is not None  # exactly one of file or env, validated
        path = Path(config.path(source.file))
        try:
            value = path.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read {path}: {exc.strerror}. Fix: mount the key file there") from None
    key = value.strip().encode()
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(f"{where}: the key has {len(key)} bytes, fewer than {MIN_KEY_BYTES}. Fix: use a longer "
                          "random key, e.g. `openssl rand -base64 48`")
    return key
