"""The `redis` asset backend: bytes in the store's Redis with a TTL, so any replica serves any asset.

For small deployments (assets up to a few MiB: lower `server.max_upload_bytes` to match). Each account's
share (`assets.max_count_per_account`, `assets.max_bytes_per_account`) is enforced atomically in one script
per put: the account's expired entries are dropped, then its oldest assets make room; another account's
assets are never touched. The total is bounded by the shares and Redis's own `maxmemory`.

Keys (an account's keys share a Cluster hash tag, `{tag}`, which its asset ids start with):
`edge_proxy:asset:{tag}:<id>` a hash (data, content type, account, expiry) with the asset's TTL;
`edge_proxy:assets:{tag}:<account>` a sorted set of the account's ids in the order they were stored (`...:seq`
numbers them), and `...:sizes` their sizes and expiries.
"""

from __future__ import annotations

import time
from typing import Callable

from ..config import AssetSettings
from ..store.redis_client import Credentials, RedisMode, connect, guarded
from .base import Asset, AssetExists, ReadsWhole, account_tag, new_asset_id

_PREFIX = "edge_proxy:asset:"

# KEYS: the asset, the account's ids in the order they were stored, their sizes and expiries, a sequence.
# ARGV: data, content type, account, now ms, ttl ms, max count, max bytes, asset key prefix.
# Returns 1 when stored, 0 when the id is taken.
_PUT = """
local now, ttl = tonumber(ARGV[4]), tonumber(ARGV[5])
local max_count, max_bytes, prefix = tonumber(ARGV[6]), tonumber(ARGV[7]), ARGV[8]
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local function forget(id)
  redis.call('ZREM', KEYS[2], id)
  redis.call('HDEL', KEYS[3], id)
  redis.call('DEL', prefix .. id)
end
local size, used = string.len(ARGV[1]), 0
local entries = redis.call('HGETALL', KEYS[3])
for i = 1, #entries, 2 do
  local bytes, expires = string.match(entries[i + 1], '(%d+):(%d+)')
  if tonumber(expires) <= now then forget(entries[i]) else used = used + tonumber(bytes) end
end
while redis.call('ZCARD', KEYS[2]) > 0 and (redis.call('ZCARD', KEYS[2]) >= max_count or used + size > max_bytes) do
  local oldest = redis.call('ZRANGE', KEYS[2], 0, 0)[1]
  used = used - tonumber(string.match(redis.call('HGET', KEYS[3], oldest) or '0:0', '(%d+):'))
  forget(oldest)
end
local expires, id = now + ttl, string.sub(KEYS[1], string.len(prefix) + 1)
redis.call('HSET', KEYS[1], 'data', ARGV[1], 'type', ARGV[2], 'account', ARGV[3], 'expires', expires)
redis.call('PEXPIREAT', KEYS[1], expires)
redis.call('ZADD', KEYS[2], redis.call('INCR', KEYS[4]), id)
redis.call('HSET', KEYS[3], id, size .. ':' .. expires)
for i = 2, 4 do redis.call('PEXPIREAT', KEYS[i], expires) end
return 1
"""

# KEYS: the asset. ARGV: the account keys' prefix. Forgets the asset and its entry in its account's share.
_DELETE = """
local account = redis.call('HGET', KEYS[1], 'account')
if not account then return 0 end
local id = string.sub(KEYS[1], string.len(ARGV[2]) + 1)
redis.call('DEL', KEYS[1])
redis.call('ZREM', ARGV[1] .. account, id)
redis.call('HDEL', ARGV[1] .. account .. ':sizes', id)
return 1
"""


def _asset_prefix(tag: str) -> str:
    return f"{_PREFIX}{{{tag}}}:"


def _account_prefix(tag: str) -> str:
    return f"edge_proxy:assets:{{{tag}}}:"


def _asset_key(asset_id: str) -> str:
    return _asset_prefix(asset_id[:8]) + asset_id  # an id starts with its account's tag


class RedisAssets(ReadsWhole):
    """Assets in Redis on a small pool of their own (big values never queue behind metering calls)."""

    def __init__(
        self, settings: AssetSettings, url: str, *, mode: RedisMode = "standalone",
        credentials: Credentials = Credentials(), timeout_s: float = 10.0, clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._client = connect(url, mode, 8, credentials, timeout_s=timeout_s)
        self._put = self._client.register_script(_PUT)
        self._delete = self._client.register_script(_DELETE)

    async def put(self, data: bytes, content_type: str, account: str, asset_id: str | None = None) -> Asset:
        limits = self._settings
        if len(data) > limits.max_bytes_per_account:
            raise ValueError(f"an asset of {len(data)} bytes exceeds the per-account {limits.max_bytes_per_account} bytes")
        asset_id = asset_id or new_asset_id(account)
        now_ms, ttl_ms = int(self._clock() * 1000), int(limits.ttl_s * 1000)
        key, own = _asset_key(asset_id), _account_prefix(account_tag(account)) + account
        stored = await guarded(self._put(
            keys=[key, own, f"{own}:sizes", f"{own}:seq"],
            args=[data, content_type, account, now_ms, ttl_ms, limits.max_count_per_account,
                  limits.max_bytes_per_account, _asset_prefix(asset_id[:8])],
        ), "assets")
        if not stored:
            raise AssetExists(asset_id)
        return Asset(asset_id, account, content_type, data, (now_ms + ttl_ms) / 1000)

    async def get(self, asset_id: str) -> Asset | None:
        data, content_type, account, expires = await guarded(
            self._client.hmget(_asset_key(asset_id), ["data", "type", "account", "expires"]), "assets"
        )
        if data is None or int(expires) <= self._clock() * 1000:
            return None
        return Asset(asset_id, account.decode(), content_type.decode(), data, int(expires) / 1000)

    async def delete(self, asset_id: str) -> None:
        tag = asset_id[:8]
        await guarded(self._delete(keys=[_asset_key(asset_id)], args=[_account_prefix(tag), _asset_prefix(tag)]),
                      "assets")

    async def close(self) -> None:
        await self._client.aclose()
