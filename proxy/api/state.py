"""Where handlers find the gateway's shared parts, and how they learn who is calling."""

from typing import Any, Callable

from aiohttp import web

from ..auth.principal import Principal
from ..context import CONTEXT
from ..errors import ApiError
from ..gateway import Gateway

GATEWAY = web.AppKey("gateway", Gateway)
# (path prefix, body) for route families whose clients expect another error shape than ours (e.g. Anthropic's)
ERROR_SHAPES = web.AppKey("error_shapes", list[tuple[str, Callable[[ApiError], dict[str, Any]]]])


def authorization_header(request: web.Request) -> str | None:
    """The one `Authorization` header; several are refused, since proxies and the gateway may pick different ones."""
    values = request.headers.getall("Authorization", [])
    if len(values) > 1:
        raise ApiError("invalid_request", "send exactly one Authorization header", param="Authorization")
    return values[0] if values else None


def credential_header(request: web.Request, api_key_header: str | None) -> str | None:
    """The caller's credential as an `Authorization` value. `api_key_header`: a header that may carry it instead,
    as a provider's SDK sends it (e.g. `x-api-key`); both at once must agree, and each comes at most once."""
    header = authorization_header(request)
    keys = request.headers.getall(api_key_header, []) if api_key_header else []
    if len(keys) > 1:
        raise ApiError("invalid_request", f"send exactly one {api_key_header} header", param=api_key_header)
    if not keys:
        return header
    bearer = f"Bearer {keys[0]}"
    if header is not None and header != bearer:
        raise ApiError(
            "invalid_request", f"Authorization and {api_key_header} carry different credentials; send one",
            param=api_key_header,
        )
    return bearer


async def authenticated(request: web.Request, api_key_header: str | None = None) -> Principal:
    """The caller, also noted in the request context so metrics and the access log name it."""
    principal = await request.app[GATEWAY].auth.authenticate(credential_header(request, api_key_header))
    request[CONTEXT].principal = principal
    return principal
