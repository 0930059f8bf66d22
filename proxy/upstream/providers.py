"""Route: each provider with its own credentials and one shared connection pool."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, MutableMapping
from urllib.parse import urlencode

import aiohttp
from yarl import URL

from ..config import ProviderSettings, Timeouts
from .aws import AwsSigner
from .credentials import ProviderKeys, provider_keys
from .formats import WireFormat, adapter
from .formats.azure_openai import API_VERSION as AZURE_API_VERSION
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
    keys: ProviderKeys | None  # None: no credential (the demo upstream)
    session: aiohttp.ClientSession
    pool: PoolShares  # every call holds a slot of the session's pool; no account more than its share
    redirects: RedirectPolicy = RedirectPolicy()
    url_query: str = ""  # added to every call's URL (url_query())
    signer: AwsSigner | None = None  # bedrock without an API key: each call is SigV4-signed
    inject_trace: Callable[[MutableMapping[str, str]], None] = lambda headers: None  # adds traceparent if tracing

    def url(self, route: str, upstream_model: str, stream: bool) -> str:
        """Where a call on a public route goes, in the provider's wire format."""
        return self.format.url(self.base_url, route, upstream_model, stream) + self.url_query


def credentials(name: str, settings: ProviderSettings, base_dir: Path) -> ProviderKeys | None:
    """The provider's keys (read now; errors name the provider and the fix), presented in the kind's way or the
    config's header and scheme."""
    fmt = adapter(settings.kind)
    return provider_keys(
        name, settings, base_dir, lambda key: fmt.credential_headers(key, settings.auth_header, settings.auth_scheme)
    )


async def aws_signer(name: str, settings: ProviderSettings) -> AwsSigner | None:
    """A Bedrock provider's SigV4 signer, its credentials resolved from AWS's standard chain now."""
    if settings.kind != "bedrock" or settings.region is None:
        return None
    signer = AwsSigner(settings.region, settings.aws_profile)
    await signer.start(name)
    return signer


def url_query(settings: ProviderSettings) -> str:
    """The query every call of this provider carries: Azure's `api-version`."""
    if settings.kind != "azure_openai":
        return ""
    return "?" + urlencode({"api-version": settings.api_version or AZURE_API_VERSION})


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
