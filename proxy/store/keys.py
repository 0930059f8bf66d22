"""API keys created through the admin API: records kept in the store, shared by every replica.

A record is a JSON object under its key id in one Redis hash, next to a version counter that every change
increments in the same script; replicas poll the counter and re-read the hash when it moved (proxy/auth/store_keys.py).
Changes are compare-and-set on the record's previous JSON, so two admins editing one key never lose an update.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Protocol

from proxy.store.redis_client import Credentials, RedisMode, connect, guarded

# One hash tag, so the two keys live in one Redis Cluster slot and one script may touch both.
RECORDS_KEY = "ep:{keys}:records"
VERSION_KEY = "ep:{keys}:version"

# KEYS: records hash, version. ARGV: key id, expected JSON ('' = must not exist), new JSON.
# Reply: 1 and the new version, or 0 when the record is not what the caller read (changed meanwhile).
_PUT = r"""
local current = redis.call('HGET', KEYS[1], ARGV[1]) or ''
if current ~= ARGV[2] then return {0, 0} end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return {1, redis.call('INCR', KEYS[2])}
"""


@dataclass(frozen=True)
class StoredKey:
    """One admin-managed key: its secret only as a hash; `overrides` as written (validated like YAML overrides)."""

    id: str
    hash: str
    plan: str
    account: str | None = None
    allow_direct: bool = True
    disabled: bool = False
    overrides: Mapping[str, Any] = field(default_factory=dict)
    created_at: int = 0  # unix seconds
    updated_at: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> StoredKey:
        data = json.loads(text)
        return cls(**{name: data[name] for name in cls.__dataclass_fields__ if name in data})


class KeyDirectory(Protocol):
    """Where admin-managed keys live: `MemoryKeyDirectory` (one process) or `RedisKeyDirectory`."""

    async def version(self) -> int:
        """A number that changes whenever a record changes."""
        ...

    async def records(self) -> tuple[int, dict[str, StoredKey]]:
        """The version and every record, read together."""
        ...

    async def get(self, key_id: str) -> StoredKey | None:
        ...

    async def put(self, record: StoredKey, expected: StoredKey | None) -> bool:
        """Write `record` if the stored one is still `expected` (None: none may exist). False if it changed."""
        ...

    async def close(self) -> None:
        ...


class MemoryKeyDirectory:
    """The records of one process (store kind memory)."""

    def __init__(self) -> None:
        self._records: dict[str, str] = {}
        self._version = 0

    async def version(self) -> int:
        return self._version

    async def records(self) -> tuple[int, dict[str, StoredKey]]:
        return self._version, {key_id: StoredKey.from_json(raw) for key_id, raw in self._records.items()}

    async def get(self, key_id: str) -> StoredKey | None:
        raw = self._records.get(key_id)
        return StoredKey.from_json(raw) if raw is not None else None

    async def put(self, record: StoredKey, expected: StoredKey | None) -> bool:
        if self._records.get(record.id, "") != (expected.to_json() if expected else ""):
            return False
        self._records[record.id] = record.to_json()
        self._version += 1
        return True

    async def close(self) -> None:
        """Nothing to release."""


class RedisKeyDirectory:
    """The records in Redis, on a small pool of its own (admin calls and polling never queue behind metering)."""

    def __init__(
        self, url: str, *, timeout_s: float = 1.0, mode: RedisMode = "standalone", credentials: Credentials = Credentials()
    ) -> None:
        self._client = connect(url, mode, 4, credentials, timeout_s=timeout_s)
        self._put = self._client.register_script(_PUT)

    async def version(self) -> int:
        raw = await guarded(self._client.get(VERSION_KEY), "keys")
        return int(raw or 0)

    async def records(self) -> tuple[int, dict[str, StoredKey]]:
        async with self._client.pipeline(transaction=True) as pipe:  # MULTI: version and records agree
            pipe.get(VERSION_KEY).hgetall(RECORDS_KEY)
            raw_version, raw_records = await guarded(pipe.execute(), "keys")
        records = {key_id.decode(): StoredKey.from_json(raw) for key_id, raw in raw_records.items()}
        return int(raw_version or 0), records

    async def get(self, key_id: str) -> StoredKey | None:
        raw = await guarded(self._client.hget(RECORDS_KEY, key_id), "keys")
        return StoredKey.from_json(raw) if raw is not None else None

    async def put(self, record: StoredKey, expected: StoredKey | None) -> bool:
        args = [record.id, expected.to_json() if expected else "", record.to_json()]
        written, _ = await guarded(self._put(keys=[RECORDS_KEY, VERSION_KEY], args=args), "keys")
        return bool(written)

    async def close(self) -> None:
        await self._client.aclose()
