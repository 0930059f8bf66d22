"""Where handlers find the gateway's shared parts, and how they learn who is calling."""

from aiohttp import web

from ..auth.principal import Principal
from ..context import CONTEXT
from ..gateway import Gateway

GATEWAY = web.AppKey("gateway", Gateway)


async def authenticated(request: web.Request) -> Principal:
    """The caller, also noted in the request context so metrics and the access log name it."""
    principal = await request.app[GATEWAY].auth.authenticate(request.headers.get("Authorization"))
    request[CONTEXT].principal = principal
    return principal
