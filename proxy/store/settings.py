"""The `store:` section of config.yaml, validated, and the store it builds."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any, Literal, Mapping

from proxy.store.base import Store, StoreObserver
from proxy.store.memory import MemoryStore
from proxy.store.redis_client import REDIS_MODES, Credentials, RedisMode, SentinelAddress
from proxy.store.redis_store import RedisStore
from proxy.store.resilient import FailMode, ResilientStore


class StoreConfigError(ValueError):
    """A bad `store:` section; the message names the file, the key and the fix."""


@dataclass(frozen=True)
class StoreSettings:
    """`store: {kind, redis_url | redis_url_env, timeouts, pool and queue, breaker, fail_mode, reservation_ttl_s,
    usage ledger retention}`."""

    kind: Literal["memory", "redis"] = "memory"
    redis_url: str | None = None
    redis_mode: RedisMode = "standalone"  # standalone | cluster | sentinel (proxy/store/redis_client.py)
    redis_username: str | None = None  # an ACL user, when the URL does not carry it
    redis_password_env: str | None = None  # the env var, or the file, holding the password (not the URL's)
    redis_password_file: str | None = None
    connect_timeout_s: float = 0.25
    op_timeout_s: float = 0.5
    max_connections: int = 64
    max_waiting_calls: int = 1000
    queue_timeout_s: float = 2.0
    breaker_failures: int = 3
    breaker_reset_s: float = 2.0
    fail_rate_limits: FailMode = "open"
    fail_credits: FailMode = "closed"
    reservation_ttl_s: float = 600.0
    usage_retention_days: int = 35  # ledger records and daily usage aggregates (docs/usage.md)
    usage_max_records: int = 100_000  # per account's ledger stream, trimmed beyond (approximately, in Redis)

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any] | None, source: str = "config.yaml") -> StoreSettings:
        """Parse and validate; `redis_url_env` names an env var holding the URL (it may carry a password)."""
        data = dict(raw or {})
        fail_mode = data.pop("fail_mode", None) or {}
        if not isinstance(fail_mode, Mapping):
            raise StoreConfigError(f"{source}: store.fail_mode must be a mapping like {{rate_limits: open, credits: closed}}")
        for concern in ("rate_limits", "credits"):
            if concern in fail_mode:
                data[f"fail_{concern}"] = fail_mode[concern]
        url_env = data.pop("redis_url_env", None)
        if url_env:
            data["redis_url"] = os.environ.get(str(url_env)) or _fail(
                f"{source}: store.redis_url_env names {url_env!r}, which is not set; export it or use store.redis_url"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            _fail(f"{source}: unknown key store.{unknown[0]}; known keys: {', '.join(sorted(known))}, fail_mode, redis_url_env")
        settings = cls(**data)
        settings._validate(source)
        return settings

    def credentials(self) -> Credentials:
        return Credentials(self.redis_username, self.redis_password_env, self.redis_password_file)

    def _validate(self, source: str) -> None:
        if self.kind not in ("memory", "redis"):
            _fail(f"{source}: store.kind is {self.kind!r}; use memory or redis")
        if self.kind == "redis" and not self.redis_url:
            _fail(f"{source}: store.kind is redis but store.redis_url is empty; set redis_url or redis_url_env")
        if self.redis_mode not in REDIS_MODES:
            _fail(f"{source}: store.redis_mode is {self.redis_mode!r}; use one of {', '.join(REDIS_MODES)}")
        if self.kind == "redis" and self.redis_mode == "sentinel":
            try:
                SentinelAddress.parse(self.redis_url or "")
            except ValueError as exc:
                _fail(f"{source}: store.redis_url: {exc} (store.redis_mode is sentinel)")
        if self.redis_password_env and self.redis_password_file:
            _fail(f"{source}: store.redis_password_env and store.redis_password_file are both set; keep one")
        if self.redis_password_env and self.redis_password_env not in os.environ:
            _fail(f"{source}: store.redis_password_env names {self.redis_password_env!r}, which is not set; export it")
        if self.redis_password_file and not os.path.isfile(self.redis_password_file):
            _fail(f"{source}: store.redis_password_file {self.redis_password_file!r} is not a readable file")
        for name in ("fail_rate_limits", "fail_credits"):
            if getattr(self, name) not in ("open", "closed"):
                _fail(f"{source}: store.fail_mode.{name[5:]} must be open or closed")
        for name in ("connect_timeout_s", "op_timeout_s", "queue_timeout_s", "breaker_reset_s", "reservation_ttl_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value <= 0:
                _fail(f"{source}: store.{name} must be a positive number of seconds")
        for name in ("max_connections", "breaker_failures", "usage_retention_days", "usage_max_records"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                _fail(f"{source}: store.{name} must be a positive integer")
        if isinstance(self.usage_retention_days, int) and self.usage_retention_days > 3650:
            _fail(f"{source}: store.usage_retention_days must be at most 3650 (ten years)")
        if isinstance(self.usage_max_records, int) and self.usage_max_records > 10**9:
            _fail(f"{source}: store.usage_max_records must be at most 1000000000")
        if not isinstance(self.max_waiting_calls, int) or self.max_waiting_calls < 0:
            _fail(f"{source}: store.max_waiting_calls must be an integer >= 0 (0: never queue, answer 503 overloaded)")


def build_store(settings: StoreSettings, observer: StoreObserver | None = None) -> Store:
    """A MemoryStore, or Redis behind a circuit breaker with the configured fail modes."""
    if settings.kind == "memory":
        return MemoryStore()
    return ResilientStore(
        redis_store(settings),
        breaker_failures=settings.breaker_failures,
        breaker_reset_s=settings.breaker_reset_s,
        fail_rate_limits=settings.fail_rate_limits,
        fail_credits=settings.fail_credits,
        observer=observer,
    )


def redis_store(settings: StoreSettings) -> RedisStore:
    """The Redis store of a `kind: redis` section, without a breaker (the ledger exporter retries by itself)."""
    assert settings.redis_url is not None  # checked by _validate
    return RedisStore(
        settings.redis_url,
        mode=settings.redis_mode,
        credentials=settings.credentials(),
        connect_timeout_s=settings.connect_timeout_s,
        op_timeout_s=settings.op_timeout_s,
        max_connections=settings.max_connections,
        max_waiting_calls=settings.max_waiting_calls,
        queue_timeout_s=settings.queue_timeout_s,
    )


def _fail(message: str) -> Any:
    raise StoreConfigError(message)
