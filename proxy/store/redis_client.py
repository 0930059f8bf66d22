"""How the store reaches Redis (`store.redis_mode`): one server, a Redis Cluster, or the primary Sentinel names.

Every mode gets the same client behaviour the store relies on: no client-side retries or socket timeouts
(RedisStore bounds each call itself and its breaker decides what happens next), a connection per call on the
wire at most. What differs:
- cluster: redis-py's RedisCluster follows MOVED and ASK itself and re-reads the slot map after a node fails;
  a script missing on a node (a promoted replica) is loaded there by the EVALSHA fallback (SCRIPT LOAD goes to
  every primary). The URL names any one node (a managed offering's configuration endpoint).
- sentinel: each new connection asks the sentinels for the current primary; a connection to a primary that
  was demoted fails (READONLY becomes a connection error) and is dropped, so a failover needs no restart.
  The URL lists the sentinels and names the service: `redis://[user:password@]host:port,host:port/service[/db]`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Literal, TypeVar, Union
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from proxy.store.base import StoreError

T = TypeVar("T")

RedisMode = Literal["standalone", "cluster", "sentinel"]
REDIS_MODES: tuple[str, ...] = ("standalone", "cluster", "sentinel")
RedisClient = Union[aioredis.Redis, RedisCluster]

SENTINEL_TIMEOUT_S = 0.5  # per sentinel asked for the primary: a dead one must not use up a call's whole deadline


@dataclass(frozen=True)
class SentinelAddress:
    """`redis://[user:password@]host:port,host:port/service[/db]`, parsed; TLS with `rediss://`."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int
    tls: bool
    username: str | None
    password: str | None = field(repr=False)

    @classmethod
    def parse(cls, url: str) -> SentinelAddress:
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError("a sentinel URL starts with redis:// or rediss://")
        credentials, _, hosts = parts.netloc.rpartition("@")
        username, _, password = credentials.partition(":")
        sentinels = tuple(_host_port(host) for host in hosts.split(",") if host)
        path = [part for part in parts.path.split("/") if part]
        if not sentinels or not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
            raise ValueError(
                "a sentinel URL lists the sentinels and names the service, e.g. "
                "redis://:PASSWORD@sentinel-a:26379,sentinel-b:26379,sentinel-c:26379/mymaster/0"
            )
        return cls(sentinels, path[0], int(path[1]) if len(path) == 2 else 0, parts.scheme == "rediss",
                   unquote(username) or None, unquote(password) or None)


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"sentinel {text!r} is not host:port")
    return host.strip("[]"), int(port)


@dataclass(frozen=True)
class Credentials:
    """An ACL user and password kept out of the URL (and out of the config file): from env or a file."""

    username: str | None = None
    password_env: str | None = None
    password_file: str | None = None

    def password(self) -> str | None:
        if self.password_env:
            return os.environ[self.password_env]
        if self.password_file:
            return Path(self.password_file).read_text().strip()
        return None

    def options(self) -> dict[str, Any]:
        """Connection options that override the URL's user and password, when set."""
        password = self.password()
        return {
            **({"username": self.username} if self.username else {}),
            **({"password": password} if password is not None else {}),
        }


def connect(
    url: str, mode: RedisMode, max_connections: int, credentials: Credentials = Credentials(),
    timeout_s: float | None = None,
) -> RedisClient:
    """A client for `mode`; nothing connects until the first call. `timeout_s` bounds each socket operation
    (none by default: the metering store bounds whole calls itself)."""
    options: dict[str, Any] = {
        "socket_connect_timeout": timeout_s, "socket_timeout": timeout_s, "retry": Retry(NoBackoff(), 0),
        **credentials.options(),
    }
    if mode == "cluster":  # max_connections is per node here; the store's gate bounds the calls on the wire
        return RedisCluster.from_url(url, max_connections=max_connections, **options)
    if mode == "sentinel":
        address = SentinelAddress.parse(url)
        # The URL's user and password log in to the sentinels and, unless `credentials` say otherwise, the primary.
        auth = {k: v for k, v in (("username", address.username), ("password", address.password)) if v is not None}
        sentinel = Sentinel(
            list(address.sentinels),
            sentinel_kwargs={"socket_timeout": SENTINEL_TIMEOUT_S, "socket_connect_timeout": SENTINEL_TIMEOUT_S,
                             "ssl": address.tls, **auth},
            db=address.db, ssl=address.tls, max_connections=max_connections, **{**auth, **options},
        )
        return sentinel.master_for(address.service)
    pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=None, **options)
    return aioredis.Redis.from_pool(pool)


async def guarded(awaitable: Awaitable[T], what: str) -> T:
    """`awaitable`'s result; a Redis or socket failure becomes a StoreError naming `what` (keys, assets)."""
    try:
        return await awaitable
    except (RedisError, OSError) as exc:
        raise StoreError(f"redis ({what}): {type(exc).__name__}") from exc
