"""The `s3` asset backend: S3-compatible object storage (AWS S3, MinIO, R2, ...) through aiobotocore.

Objects are `<prefix><asset id>`, with the account and expiry in their metadata; the gateway refuses an object
past its expiry itself, and a bucket lifecycle rule on the prefix deletes it later (lifecycle rules count whole
days: docs/configuration.md). Credentials come from the standard AWS chain. There is no per-account share here:
the bucket holds what the accounts store within `ttl_s`, and each object is capped by `server.max_upload_bytes`.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import AsyncExitStack
from dataclasses import replace
from typing import Any, AsyncGenerator, Callable

import aiohttp

from ..config import AssetSettings, S3Settings
from .base import Asset, AssetBody, AssetExists, AssetStoreError, new_asset_id

from aiobotocore.session import get_session
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError

_MISSING = ("NoSuchKey", "404", "NotFound")
_TAKEN = ("PreconditionFailed", "412", "ConditionalRequestConflict")
_CHUNK = 64 * 1024
# A connection that fails, a timeout, or a body cut short (aiohttp's payload error, as aiobotocore reads it).
_FAILURES = (BotoCoreError, aiohttp.ClientError, OSError, asyncio.TimeoutError)


class S3Assets:
    """One aiobotocore client, opened on first use and closed with the gateway."""

    def __init__(self, settings: AssetSettings, s3: S3Settings, clock: Callable[[], float] = time.time) -> None:
        self._settings, self._s3, self._clock = settings, s3, clock
        self._stack = AsyncExitStack()
        self._client: Any = None
        self._opening = asyncio.Lock()

    async def put(self, data: bytes, content_type: str, account: str, asset_id: str | None = None) -> Asset:
        if len(data) > self._settings.max_bytes_per_account:
            raise ValueError(f"an asset of {len(data)} bytes exceeds the per-account "
                             f"{self._settings.max_bytes_per_account} bytes")
        asset_id = asset_id or new_asset_id(account)
        expires = self._clock() + self._settings.ttl_s
        client = await self._opened()
        try:
            # If-None-Match: a presigned upload URL stores one object; a second PUT must not replace it.
            await client.put_object(
                Bucket=self._s3.bucket, Key=self._key(asset_id), Body=data, ContentType=content_type,
                Metadata={"account": account, "expires": f"{expires:.3f}"}, IfNoneMatch="*",
            )
        except ClientError as exc:
            if _code(exc) in _TAKEN:
                raise AssetExists(asset_id) from None
            raise AssetStoreError(f"s3 (assets): {_code(exc)}") from exc
        except _FAILURES as exc:
            raise AssetStoreError(f"s3 (assets): {type(exc).__name__}") from exc
        return Asset(asset_id, account, content_type, data, expires)

    async def get(self, asset_id: str) -> Asset | None:
        body = await self.open(asset_id)
        if body is None:
            return None
        try:
            data = b"".join([chunk async for chunk in body.chunks])
        finally:
            body.release()
        return replace(body.asset, data=data)

    async def open(self, asset_id: str) -> AssetBody | None:
        client = await self._opened()
        try:
            answer = await client.get_object(Bucket=self._s3.bucket, Key=self._key(asset_id))
        except ClientError as exc:
            if _code(exc) in _MISSING:
                return None
            raise AssetStoreError(f"s3 (assets): {_code(exc)}") from exc
        except _FAILURES as exc:
            raise AssetStoreError(f"s3 (assets): {type(exc).__name__}") from exc
        metadata, stream = answer.get("Metadata") or {}, answer["Body"]
        try:
            expires = float(metadata.get("expires", ""))
        except ValueError:
            expires = 0.0  # not one of ours: never serve what the gateway did not store
        if expires <= self._clock():
            stream.close()
            return None
        asset = Asset(asset_id, metadata.get("account", ""),
                      answer.get("ContentType") or "application/octet-stream", b"", expires)
        return AssetBody(asset, int(answer.get("ContentLength") or 0), _chunks(stream), stream.close)

    async def delete(self, asset_id: str) -> None:
        client = await self._opened()
        try:
            await client.delete_object(Bucket=self._s3.bucket, Key=self._key(asset_id))
        except (ClientError, *_FAILURES) as exc:
            raise AssetStoreError(f"s3 (assets): {type(exc).__name__}") from exc

    async def close(self) -> None:
        await self._stack.aclose()
        self._client = None

    def _key(self, asset_id: str) -> str:
        return f"{self._s3.prefix}{asset_id}"

    async def _opened(self) -> Any:
        async with self._opening:  # one client, however many first requests arrive together
            if self._client is None:
                config = BotoConfig(
                    s3={"addressing_style": self._s3.addressing_style}, connect_timeout=5, read_timeout=30,
                    retries={"max_attempts": 2, "mode": "standard"},
                )
                self._client = await self._stack.enter_async_context(get_session().create_client(
                    "s3", region_name=self._s3.region, endpoint_url=self._s3.endpoint_url, config=config,
                ))
            return self._client


async def _chunks(stream: Any) -> AsyncGenerator[bytes, None]:
    """The object's bytes as they arrive (the body's `release` closes the stream, read or not)."""
    try:
        async for chunk in stream.iter_chunks(_CHUNK):
            yield chunk
    except _FAILURES as exc:
        raise AssetStoreError(f"s3 (assets): {type(exc).__name__}") from exc


def _code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))
