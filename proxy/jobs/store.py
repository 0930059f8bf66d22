"""Where jobs live: a Redis hash per job (any replica answers a poll and resumes a job), or memory (one process).

A job's keys hang off its account's prefix (`ep:{account}`: the account's hash tag), so the job, its
idempotency key and every script touching them live in one Redis Cluster slot. One key outside the accounts,
`ep:{jobs}:working` (a sorted set: job key → lease expiry), lets replicas find jobs whose poller died; it is a
hint kept beside the jobs (a different slot), never trusted alone: claiming a job checks the job's own lease.

Every change is one script on the job's hash, atomic:
- create: the job, and with an idempotency key the key too, unless the key already names a job (that one is
  returned instead);
- claim: take the lease when it is free or expired (or renew it when it is ours);
- update: progress and the provider handle, only by the lease holder of a job still working;
- finish: completed or failed, only once (the first finisher wins; it alone settles the job's credits).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Callable, Literal, Mapping, Protocol

from ..store.redis_client import Credentials, RedisMode, connect, guarded

State = Literal["working", "completed", "failed"]
WORKING_INDEX = "ep:{jobs}:working"
PROVIDER_IDS = "ep:{jobs}:provider-id"  # + ":{provider}:{id}" → the job key (webhooks name jobs by the provider's id)


@dataclass(frozen=True)
class JobRecord:
    """A job as stored. `key` is its store key; `user` the owner's namespaced id (meter.user_id): only that
    principal reads it. `reservation` and `price` are the billing hold and the price it settles at (JSON)."""

    key: str
    id: str
    account: str
    user: str
    model: str
    capability: str
    provider: str
    deployment: str
    upstream_model: str
    inputs: str  # JSON object
    public_url: str
    reservation: str  # JSON: proxy/jobs/billing.py
    price: str  # JSON
    reserve: float  # credits held
    bound_seconds: float  # charged for a video whose provider reports no length
    bound_megapixels: float = 0.0  # the most megapixels charged (n images at the requested size)
    cancel_on_disconnect: bool = False
    cancel_requested: bool = False  # the client left and its plan cancels: the lease holder cancels the job
    state: State = "working"
    phase: str = "queued"  # queued | running while working
    progress: float = -1.0  # -1: unknown
    queue_position: int = -1  # -1: unknown or not queued
    handle: str = ""  # JSON, once submitted
    output: str = ""  # JSON, when completed
    error: str = ""  # JSON ApiError body, when failed
    body_hash: str = ""
    created_ms: int = 0
    deadline_ms: int = 0
    owner: str = ""
    lease_until: int = 0

    def fields(self) -> dict[str, str]:
        return {name: _text(value) for name, value in asdict(self).items()}

    @classmethod
    def from_fields(cls, raw: Mapping[str, str]) -> JobRecord:
        types = {f.name: f.type for f in fields(cls)}
        values: dict[str, Any] = {}
        for name, text in raw.items():
            kind = types.get(name)
            if kind is None:
                continue  # a field a newer release wrote
            values[name] = _parse(kind, text)
        return cls(**values)


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def _parse(kind: Any, text: str) -> Any:
    if kind in ("int", int):
        return int(text or 0)
    if kind in ("float", float):
        return float(text or 0)
    if kind in ("bool", bool):
        return text == "1"
    return text


@dataclass(frozen=True)
class Created:
    """What `create` did: made `record`, or found the idempotency key naming `existing_id` (body hash
    `existing_hash`)."""

    created: bool
    existing_id: str = ""
    existing_hash: str = ""


class JobStore(Protocol):
    """Job records shared by the replicas (RedisJobStore) or kept by one process (MemoryJobStore)."""

    async def create(self, record: JobRecord, idempotency_key: str | None, ttl_ms: int, idem_ttl_ms: int) -> Created:
        ...

    async def get(self, key: str) -> JobRecord | None:
        ...

    async def find_idempotent(self, idempotency_key: str) -> tuple[str, str] | None:
        """(job id, body hash) the key names, if any."""
        ...

    async def claim(self, key: str, owner: str, now_ms: int, lease_ms: int, *, renew: bool) -> bool:
        """Take the lease (free, expired or ours); `renew`: only if ours. False if not working or held by another."""
        ...

    async def update(self, key: str, owner: str, changes: Mapping[str, str]) -> bool:
        """Set fields of a working job we hold the lease of (`owner` '': whoever holds it)."""
        ...

    async def finish(self, key: str, changes: Mapping[str, str]) -> bool:
        """Set `state` (completed or failed) and fields of a job still working, once."""
        ...

    async def release(self, key: str, owner: str) -> None:
        """Give the lease up at once (a replica shutting down), so another replica resumes the job."""
        ...

    async def orphans(self, now_ms: int, limit: int) -> list[str]:
        """Keys of working jobs whose lease has expired (from the index)."""
        ...

    async def index(self, key: str, lease_until: int) -> None:
        """Note a working job's lease expiry in the index; 0 removes it."""
        ...

    async def link(self, provider: str, provider_id: str, key: str, ttl_ms: int) -> None:
        """Note that the provider's job `provider_id` is the job `key` (for its webhooks), for `ttl_ms`."""
        ...

    async def linked(self, provider: str, provider_id: str) -> str | None:
        """The job key the provider's job `provider_id` is, if noted."""
        ...

    async def close(self) -> None:
        ...


# KEYS: job, idempotency key (optional). ARGV: ttl_ms, idem_ttl_ms, idem value, then field/value pairs.
# Reply: {1} created, or {0, existing idem value}.
_CREATE = r"""
if KEYS[2] then
  local existing = redis.call('GET', KEYS[2])
  if existing then return {0, existing} end
  redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[2])
end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return {1}
"""
# KEYS: job. ARGV: owner, now_ms, lease_ms, renew (1: only if ours). Reply: 1 if the lease is ours now.
_CLAIM = r"""
local job = redis.call('HMGET', KEYS[1], 'state', 'owner', 'lease_until')
if job[1] ~= 'working' then return 0 end
local ours = job[2] == ARGV[1]
if not ours and (ARGV[4] == '1' or tonumber(job[3] or '0') >= tonumber(ARGV[2])) then return 0 end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'lease_until', tonumber(ARGV[2]) + tonumber(ARGV[3]))
return 1
"""
# KEYS: job. ARGV: owner ('' for finish), then field/value pairs. Reply: 1 if applied.
_UPDATE = r"""
local job = redis.call('HMGET', KEYS[1], 'state', 'owner')
if job[1] ~= 'working' or (ARGV[1] ~= '' and job[2] ~= ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
return 1
"""
# KEYS: job. ARGV: owner. Gives the lease up if it is ours.
_RELEASE = r"""
if redis.call('HGET', KEYS[1], 'owner') == ARGV[1] then redis.call('HSET', KEYS[1], 'lease_until', 0) end
return 1
"""


def _flatten(changes: Mapping[str, str]) -> list[str]:
    return [item for pair in changes.items() for item in pair]


class RedisJobStore:
    """Jobs in Redis, on a small pool of its own (polls and pollers never queue behind metering calls)."""

    def __init__(
        self, url: str, *, mode: RedisMode = "standalone", credentials: Credentials = Credentials(),
        timeout_s: float = 1.0, max_connections: int = 16,
    ) -> None:
        self._client = connect(url, mode, max_connections, credentials, timeout_s=timeout_s)
        self._create = self._client.register_script(_CREATE)
        self._claim = self._client.register_script(_CLAIM)
        self._update = self._client.register_script(_UPDATE)
        self._release = self._client.register_script(_RELEASE)

    async def create(self, record: JobRecord, idempotency_key: str | None, ttl_ms: int, idem_ttl_ms: int) -> Created:
        keys = [record.key, *([idempotency_key] if idempotency_key else [])]
        idem_value = f"{record.id} {record.body_hash}"
        args = [ttl_ms, idem_ttl_ms, idem_value, *_flatten(record.fields())]
        reply = await guarded(self._create(keys=keys, args=args), "jobs")
        if int(reply[0]) == 1:
            return Created(True)
        existing_id, _, existing_hash = reply[1].decode().partition(" ")
        return Created(False, existing_id, existing_hash)

    async def get(self, key: str) -> JobRecord | None:
        raw = await guarded(self._client.hgetall(key), "jobs")
        if not raw:
            return None
        return JobRecord.from_fields({k.decode(): v.decode() for k, v in raw.items()})

    async def find_idempotent(self, idempotency_key: str) -> tuple[str, str] | None:
        raw = await guarded(self._client.get(idempotency_key), "jobs")
        if raw is None:
            return None
        job_id, _, body_hash = raw.decode().partition(" ")
        return job_id, body_hash

    async def claim(self, key: str, owner: str, now_ms: int, lease_ms: int, *, renew: bool) -> bool:
        args = [owner, now_ms, lease_ms, "1" if renew else "0"]
        return bool(await guarded(self._claim(keys=[key], args=args), "jobs"))

    async def update(self, key: str, owner: str, changes: Mapping[str, str]) -> bool:
        return bool(await guarded(self._update(keys=[key], args=[owner, *_flatten(changes)]), "jobs"))

    async def finish(self, key: str, changes: Mapping[str, str]) -> bool:
        return bool(await guarded(self._update(keys=[key], args=["", *_flatten(changes)]), "jobs"))

    async def release(self, key: str, owner: str) -> None:
        await guarded(self._release(keys=[key], args=[owner]), "jobs")

    async def orphans(self, now_ms: int, limit: int) -> list[str]:
        keys = await guarded(self._client.zrangebyscore(WORKING_INDEX, "-inf", now_ms, start=0, num=limit), "jobs")
        return [key.decode() for key in keys]

    async def index(self, key: str, lease_until: int) -> None:
        if lease_until:
            await guarded(self._client.zadd(WORKING_INDEX, {key: lease_until}), "jobs")
        else:
            await guarded(self._client.zrem(WORKING_INDEX, key), "jobs")

    async def link(self, provider: str, provider_id: str, key: str, ttl_ms: int) -> None:
        await guarded(self._client.set(f"{PROVIDER_IDS}:{provider}:{provider_id}", key, px=ttl_ms), "jobs")

    async def linked(self, provider: str, provider_id: str) -> str | None:
        key = await guarded(self._client.get(f"{PROVIDER_IDS}:{provider}:{provider_id}"), "jobs")
        return key.decode() if key is not None else None

    async def close(self) -> None:
        await self._client.aclose()


@dataclass
class _Entry:
    fields: dict[str, str]
    expires_ms: int


@dataclass
class MemoryJobStore:
    """The same semantics in one process (store kind memory): nothing to resume after a restart."""

    clock: Callable[[], float] = time.time
    _entries: dict[str, _Entry] = field(default_factory=dict)
    _index: dict[str, int] = field(default_factory=dict)

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    def _live(self, key: str) -> _Entry | None:
        entry = self._entries.get(key)
        if entry is not None and entry.expires_ms <= self._now_ms():
            del self._entries[key]
            return None
        return entry

    async def create(self, record: JobRecord, idempotency_key: str | None, ttl_ms: int, idem_ttl_ms: int) -> Created:
        if idempotency_key:
            existing = self._live(idempotency_key)
            if existing is not None:
                return Created(False, existing.fields["id"], existing.fields["hash"])
            self._entries[idempotency_key] = _Entry({"id": record.id, "hash": record.body_hash},
                                                    self._now_ms() + idem_ttl_ms)
        self._entries[record.key] = _Entry(record.fields(), self._now_ms() + ttl_ms)
        return Created(True)

    async def get(self, key: str) -> JobRecord | None:
        entry = self._live(key)
        return JobRecord.from_fields(entry.fields) if entry is not None else None

    async def find_idempotent(self, idempotency_key: str) -> tuple[str, str] | None:
        entry = self._live(idempotency_key)
        return (entry.fields["id"], entry.fields["hash"]) if entry is not None else None

    async def claim(self, key: str, owner: str, now_ms: int, lease_ms: int, *, renew: bool) -> bool:
        entry = self._live(key)
        if entry is None or entry.fields["state"] != "working":
            return False
        ours = entry.fields["owner"] == owner
        if not ours and (renew or int(entry.fields["lease_until"]) >= now_ms):
            return False
        entry.fields.update(owner=owner, lease_until=str(now_ms + lease_ms))
        return True

    async def update(self, key: str, owner: str, changes: Mapping[str, str]) -> bool:
        entry = self._live(key)
        if entry is None or entry.fields["state"] != "working" or (owner and entry.fields["owner"] != owner):
            return False
        entry.fields.update(changes)
        return True

    async def finish(self, key: str, changes: Mapping[str, str]) -> bool:
        return await self.update(key, "", changes)

    async def release(self, key: str, owner: str) -> None:
        entry = self._live(key)
        if entry is not None and entry.fields["owner"] == owner:
            entry.fields["lease_until"] = "0"

    async def orphans(self, now_ms: int, limit: int) -> list[str]:
        return [key for key, until in self._index.items() if until <= now_ms][:limit]

    async def index(self, key: str, lease_until: int) -> None:
        if lease_until:
            self._index[key] = lease_until
        else:
            self._index.pop(key, None)

    async def link(self, provider: str, provider_id: str, key: str, ttl_ms: int) -> None:
        self._entries[f"{PROVIDER_IDS}:{provider}:{provider_id}"] = _Entry({"key": key}, self._now_ms() + ttl_ms)

    async def linked(self, provider: str, provider_id: str) -> str | None:
        entry = self._live(f"{PROVIDER_IDS}:{provider}:{provider_id}")
        return entry.fields["key"] if entry is not None else None

    async def close(self) -> None:
        """Nothing to release."""


def changed(record: JobRecord, **changes: Any) -> tuple[JobRecord, dict[str, str]]:
    """The record with `changes`, and the changes as stored fields."""
    return replace(record, **changes), {name: _text(value) for name, value in changes.items()}


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))
