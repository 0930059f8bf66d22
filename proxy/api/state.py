"""Where handlers find the gateway's shared parts, and how they learn who is calling."""

from aiohttp import web

from ..auth.principal import Principal
from ..context import CONTEXT
from ..errors import ApiError
from ..gateway import Gateway

GATEWAY = web.AppKey("gateway", Gateway)


def authorization_header(request: web.Request) -> str | None:
    """The one `Authorization` header; several are refused, since proxies and the gateway may pick different ones."""
    values = request.headers.getall("Authorization", [])
    if len(values) > 1:
        raise ApiError("invalid_request", "send exactly one Authorization header", param="Authorization")
    return values[0] if values else None


async def authenticated(request: web.Request) -> Principal:
    """The caller, also noted in the request context so metrics and the access log name it."""
    principal = await request.app[GATEWAY].auth.authenticate(authorization_header(request))
    request[CONTEXT].principal = principal
    return principal
