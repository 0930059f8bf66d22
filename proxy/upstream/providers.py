"""Route: each provider with its own credentials and one shared connection pool."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, MutableMapping

import aiohttp

from ..config import ConfigError, ProviderSettings, Timeouts


@dataclass
class Provider:
    """An upstream: where to send, which credential to add, and the pool to send it through."""

    name: str
    base_url: str
    timeouts: Timeouts
    auth_headers: Mapping[str, str]
    session: aiohttp.ClientSession
    inject_trace: Callable[[MutableMapping[str, str]], None] = lambda headers: None  # adds traceparent if tracing

    def url(self, route: str) -> str:
        """The upstream URL for a public route: `/v1/chat/completions` -> `<base_url>/chat/completions`."""
        return self.base_url.rstrip("/") + route.removeprefix("/v1")


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
    if credential is None:
        return {}
    value = f"{settings.auth_scheme} {credential}" if settings.auth_scheme else credential
    return {settings.auth_header: value}


def new_session(settings: ProviderSettings) -> aiohttp.ClientSession:
    """One pool per provider. Only connecting is bounded here: the relay enforces every read deadline itself
    (`idle_s`, `total_s`); aiohttp's own `total` would make each later read fail at once, mid-stream."""
    timeout = aiohttp.ClientTimeout(total=None, connect=settings.timeouts.connect_s)
    connector = aiohttp.TCPConnector(limit=settings.max_connections, ttl_dns_cache=300)
    # auto_decompress stays on: usage is read from the body, and the relay drops Content-Encoding.
    return aiohttp.ClientSession(connector=connector, timeout=timeout, raise_for_status=False)
