"""Re-hosting: copy a provider's output URL into the asset store, so a result outlives the provider's short-lived
URL (the seeds' "Asset URL Lifetime" problem) and is served by the gateway's signed URLs.

A copy is fetched only over https from public addresses: every name is resolved through `PublicResolver`, which
refuses loopback, private, link-local and other non-global addresses, and the connection goes to exactly the
addresses it checked (no second lookup to rebind). Redirects are followed by hand, each hop checked the same
way. Hosts named in `assets.rehost.private_hosts` (an in-cluster provider) are exempt, and may use http.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
from urllib.parse import urljoin, urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from ..config import RehostSettings
from .base import Asset, AssetStore, AssetStoreError, AssetStoreFull

_MEDIA = ("image/", "audio/", "video/")
_READ_CHUNK = 64 * 1024


class RehostError(Exception):
    """The URL could not be copied (refused, unreachable, too large, not media); the message says why."""


def is_public(address: str) -> bool:
    """A globally routable IP address (not loopback, private, link-local, shared or reserved)."""
    return ipaddress.ip_address(address.split("%", 1)[0]).is_global


class PublicResolver(AbstractResolver):
    """Resolves like the default resolver, but a name with any non-global address is refused outright."""

    def __init__(self, exempt: frozenset[str]) -> None:
        self._inner = DefaultResolver()
        self._exempt = exempt

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        answers = await self._inner.resolve(host, port, family)
        if host not in self._exempt and not all(is_public(answer["host"]) for answer in answers):
            raise OSError(errno.EACCES, f"{host} resolves to a non-public address")  # strerror: aiohttp quotes it
        return answers

    async def close(self) -> None:
        await self._inner.close()


class Rehoster:
    """Copies URLs into `store`; one HTTP session, opened on first use and closed with the gateway."""

    def __init__(self, settings: RehostSettings, store: AssetStore, max_bytes: int) -> None:
        self.enabled = settings.enabled
        self._settings, self._store, self._max_bytes = settings, store, max_bytes
        self._exempt = frozenset(host.lower() for host in settings.private_hosts)  # as URLs spell hosts
        self._session: aiohttp.ClientSession | None = None

    async def rehost(self, url: str, account: str) -> Asset:
        """Fetch `url` (media only, at most `max_bytes`) and keep it as an asset of `account`; RehostError if not."""
        data, content_type = await self._fetch(url)
        try:
            return await self._store.put(data, content_type, account)
        except (AssetStoreFull, AssetStoreError, ValueError) as exc:
            raise RehostError(f"the copy cannot be kept: {exc}") from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _fetch(self, url: str) -> tuple[bytes, str]:
        session = self._opened()
        for _ in range(self._settings.max_redirects + 1):
            self._check(url)
            try:
                async with session.get(url, allow_redirects=False) as answer:
                    if answer.status in (301, 302, 303, 307, 308) and "Location" in answer.headers:
                        url = urljoin(url, answer.headers["Location"])
                        continue
                    return await self._body(answer)
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
                raise RehostError(f"cannot fetch {urlsplit(url).netloc}: {exc or type(exc).__name__}") from None
        raise RehostError(f"more than {self._settings.max_redirects} redirects")

    def _check(self, url: str) -> None:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if host in self._exempt:
            if parts.scheme not in ("https", "http"):
                raise RehostError(f"only http(s) URLs are copied, not {parts.scheme!r}")
            return
        if parts.scheme != "https":
            raise RehostError(f"only https URLs are copied, not {parts.scheme!r}")
        try:
            literal = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            return  # a name: PublicResolver checks what it resolves to
        if not literal.is_global:
            raise RehostError(f"{host} is not a public address")

    async def _body(self, answer: aiohttp.ClientResponse) -> tuple[bytes, str]:
        if answer.status != 200:
            raise RehostError(f"the URL answered {answer.status}")
        if not answer.content_type.startswith(_MEDIA):
            raise RehostError(f"the URL is {answer.content_type!r}, not an image, audio or video")
        if answer.content_length is not None and answer.content_length > self._max_bytes:
            raise RehostError(f"the file exceeds {self._max_bytes} bytes")
        body = bytearray()
        async for chunk in answer.content.iter_chunked(_READ_CHUNK):
            body += chunk
            if len(body) > self._max_bytes:
                raise RehostError(f"the file exceeds {self._max_bytes} bytes")
        return bytes(body), answer.content_type

    def _opened(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(resolver=PublicResolver(self._exempt), limit=16)
            timeout = aiohttp.ClientTimeout(total=self._settings.timeout_s, connect=5)
            self._session = aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False)
        return self._session

