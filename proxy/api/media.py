"""Media inputs of `POST /v1/responses` (`audio_url`, `image_url`): an asset of this gateway (an upload, a generated
output) is read from the asset store; any other URL must be https and is either passed on to a provider that
fetches URLs itself, or fetched here: no redirects, bounded in size and time, and only from public addresses
(checked on the addresses actually connected to, so DNS cannot point a name at the gateway's own network)."""

from __future__ import annotations

import errno
import ipaddress
import mimetypes
from typing import Any, AsyncIterator

import aiohttp
from aiohttp import web
from yarl import URL

from ..assets import Asset, AssetStoreError, valid_asset_id
from ..assets.rehost import PublicResolver, is_public
from ..assets.signing import expiry_param
from ..errors import ApiError
from ..upstream.formats.base import FilePart
from .state import GATEWAY

FETCH_TIMEOUT_S = 30.0  # the whole fetch of one input
_ASSET_PATH = "/v1/assets/"
# Extensions providers read formats from, where the system's MIME table may have none.
_EXTENSIONS = {"audio/mpeg": ".mp3", "audio/wav": ".wav", "audio/x-wav": ".wav", "audio/wave": ".wav",
               "audio/webm": ".webm", "audio/ogg": ".ogg", "audio/mp4": ".m4a", "audio/flac": ".flac",
               "image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp"}


class MediaFetcher:
    """One client session for fetching inputs from URLs, opened with the app and closed with it."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    async def fetch(self, url: URL, param: str, accepted: tuple[str, ...], max_bytes: int) -> FilePart:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(resolver=PublicResolver(frozenset()), limit=64),  # no host exempt
                timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT_S), auto_decompress=False, trust_env=False,
            )
        try:
            async with self._session.get(url, allow_redirects=False) as response:
                if response.status != 200:
                    hint = "; give the final URL" if 300 <= response.status < 400 else ""
                    raise _invalid(param, f"`{param}` answered HTTP {response.status}, not the file{hint}")
                content_type = _accepted_type(response.content_type, param, accepted)
                if (response.content_length or 0) > max_bytes:
                    raise ApiError("payload_too_large", f"`{param}` is over {max_bytes} bytes", param=param)
                data = bytearray()
                async for chunk in response.content.iter_chunked(64 * 1024):
                    data += chunk
                    if len(data) > max_bytes:
                        raise ApiError("payload_too_large", f"`{param}` is over {max_bytes} bytes", param=param)
        except aiohttp.ClientConnectorError as exc:
            if exc.os_error.errno == errno.EACCES:  # PublicResolver's refusal
                raise _invalid(param, f"`{param}` points at a private address; give a public https URL") from None
            raise _invalid(param, f"`{param}` could not be reached") from None
        except aiohttp.InvalidURL:  # e.g. a host such as 2130706433 or 127.1, which aiohttp will not dial
            raise _invalid(param, f"`{param}` is not a URL that can be fetched: give its host as a name or a "
                           "canonical IP address") from None
        except (aiohttp.ClientError, TimeoutError):
            raise _invalid(param, f"`{param}` could not be fetched within {FETCH_TIMEOUT_S:g}s") from None
        return FilePart(bytes(data), content_type, _filename(param, content_type))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


MEDIA_FETCHER = web.AppKey("media_fetcher", MediaFetcher)


async def media_fetcher(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: the fetcher lives as long as the app."""
    app[MEDIA_FETCHER] = fetcher = MediaFetcher()
    yield
    await fetcher.close()


async def media_input(
    request: web.Request, value: Any, param: str, accepted: tuple[str, ...], *, by_url: bool = False
) -> FilePart | str:
    """The file a URL input names: the bytes of this gateway's asset, else the https URL itself when the provider
    fetches URLs (`by_url`), else its bytes fetched here. Bad, private or unreachable URLs are 400s naming `param`."""
    gateway = request.app[GATEWAY]
    url = URL(value) if isinstance(value, str) else None
    if url is None or not url.is_absolute() or url.host is None:
        raise _invalid(param, f"`{param}` must be an absolute URL: an upload's URL or an https URL")
    if _is_own_asset(request, url):
        asset = await _asset(request, url, param)
        if asset is None:
            raise _invalid(param, f"`{param}` names no asset (asset URLs expire); upload the file again")
        content_type = _accepted_type(asset.content_type, param, accepted)
        return FilePart(asset.data, content_type, _filename(param, content_type))
    if url.scheme != "https" or url.user is not None:
        raise _invalid(param, f"`{param}` must be an https URL (without credentials) or an upload's URL")
    if _is_ip_literal(url.host) and not is_public(url.host):
        raise _invalid(param, f"`{param}` points at a private address; give a public https URL")
    if by_url:
        return str(url)
    return await request.app[MEDIA_FETCHER].fetch(url, param, accepted, gateway.config.server.max_upload_bytes)


async def _asset(request: web.Request, url: URL, param: str) -> Asset | None:
    """The asset a signed asset URL names, as `GET /v1/assets/{id}` would serve it: a URL changed, extended or past
    its `exp` is refused (403, 410) naming `param`."""
    assets, asset_id = request.app[GATEWAY].assets, url.path.removeprefix(_ASSET_PATH)
    try:
        assets.check_get(asset_id, expiry_param(url.query.get("exp")), url.query.get("sig", ""))
    except ApiError as exc:
        raise ApiError(exc.code, f"`{param}`: {exc.message}", param=param) from None
    try:
        return await assets.store.get(asset_id) if valid_asset_id(asset_id) else None
    except AssetStoreError:
        raise ApiError("store_unavailable", "the asset store cannot be reached; retry shortly") from None


def _is_own_asset(request: web.Request, url: URL) -> bool:
    public = request.app[GATEWAY].config.server.public_url
    hosts = {URL(public).host_port_subcomponent} if public else set()
    hosts.add(request.host)
    return url.path.startswith(_ASSET_PATH) and url.host_port_subcomponent in hosts


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


def _accepted_type(content_type: str, param: str, accepted: tuple[str, ...]) -> str:
    if not content_type.startswith(accepted):
        kinds = " or ".join(f"{prefix}*" for prefix in accepted)
        raise ApiError("unsupported_media_type", f"`{param}` is {content_type!r}, not {kinds}", param=param)
    return content_type


def _filename(param: str, content_type: str) -> str:
    """A filename whose extension names the format: providers such as OpenAI read the format from it."""
    extension = _EXTENSIONS.get(content_type) or mimetypes.guess_extension(content_type) or ""
    return f"{param.split('_url', 1)[0]}{extension}"  # image_urls, image_url: image.png


def _invalid(param: str, message: str) -> ApiError:
    return ApiError("invalid_request", message, param=param)

