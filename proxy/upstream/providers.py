"""Route: each provider with its own credentials and one shared connection pool."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, MutableMapping

import aiohttp
from yarl import URL

from ..config import ConfigError, ProviderSettings, Timeouts
from .formats import WireFormat, adapter
from .shares import PoolShares


_KEEPS_METHOD_AND_BODY = frozenset({307, 308})


@dataclass(frozen=True)
class RedirectPolicy:
    """Where a provider's redirect may lead: a 307/308 to a host the operator named, never to plain http from
    https. Anything else is not followed, so the prompt and the credential go nowhere else."""

    hosts: tuple[tuple[str, int | None], ...] = ()  # (host, port or None for any port)

    @classmethod
    def from_settings(cls, settings: ProviderSettings) -> "RedirectPolicy":
        named = (URL(f"//{entry}") for entry in settings.follow_redirects_to)  # validated as host[:port]
        return cls(tuple((url.host or "", url.explicit_port) for url in named))

    def allows(self, status: int, source: URL, target: URL) -> bool:
        if status not in _KEEPS_METHOD_AND_BODY or (source.scheme == "https" and target.scheme != "https"):
            return False
        return any(
            target.host is not None and target.host.lower() == host.lower() and port in (None, target.port)
            for host, port in self.hosts
        )


@dataclass
class Provider:
    """An upstream: its wire format, where to send, which credential to add, and the pool to send it through."""

    name: str
    kind: str
    format: WireFormat
    base_url: str  # without a trailing slash
    timeouts: Timeouts
    auth_headers: Mapping[str, str]
    session: aiohttp.ClientSession
    pool: PoolShares  # every call holds a slot of the session's pool; no account more than its share
    redirects: RedirectPolicy = RedirectPolicy()
    inject_trace: Callable[[MutableMapping[str, str]], None] = lambda headers: None  # adds traceparent if tracing

    def url(self, route: str, upstream_model: str, stream: bool) -> str:
        """Where a call on a public route goes, in the provider's wire format."""
        return self.format.url(self.base_url, route, upstream_model, stream)


def read_credential(name: str, settings: ProviderSettings, base_dir: Path) -> str | None:
    """The provider's key from the environment or a file; errors name the provider and the fix."""
    if settings.api_key_env:
        value = os.environ.get(settings.api_key_env, "").strip()
        if not value:
            raise ConfigError(
                f"providers.{name}.api_key_env: environment variable {settings.api_key_env} is empty or unset. "
                f"Fix: export {settings.api_key_env}=<key> or remove provider {name!r} and its models"
            )
        return value
    if settings.api_key_file:
        path = base_dir / settings.api_key_file
        try:
            return path.read_text().strip()
        except OSError as exc:
            raise ConfigError(
                f"providers.{name}.api_key_file: cannot read {settings.api_key_file}: {exc.strerror}. "
                "Fix: mount the key file there or use api_key_env"
            ) from None
    return None


def auth_headers(settings: ProviderSettings, credential: str | None) -> dict[str, str]:
    """The credential headers, built once at start-up in the kind's way (or the config's header and scheme)."""
    if credential is None:
        return {}
    return adapter(settings.kind).credential_headers(credential, settings.auth_header, settings.auth_scheme)


def pool_shares(name: str, settings: ProviderSettings) -> PoolShares:
    return PoolShares(name, settings.max_connections, settings.connections_per_account, settings.pool_wait_s)


def new_session(settings: ProviderSettings) -> aiohttp.ClientSession:
    """One pool per provider. Only connecting is bounded here: the relay enforces every read deadline itself
    (`idle_s`, `total_s`); aiohttp's own `total` would make each later read fail at once, mid-stream."""
    timeout = aiohttp.ClientTimeout(total=None, connect=settings.timeouts.connect_s)
    connector = aiohttp.TCPConnector(limit=settings.max_connections, ttl_dns_cache=300)
    # auto_decompress stays on: usage is read from the body, and the relay drops Content-Encoding.
    # Redirects are never followed by the session (see RedirectPolicy): each call passes allow_redirects=False.
    return aiohttp.ClientSession(connector=connector, timeout=timeout, raise_for_status=False)
