"""Where handlers find the gateway's shared parts, and how they learn who is calling."""

import re
from typing import Any, Callable

from aiohttp import web

from ..auth.end_user import END_USER_HEADER, with_end_user
from ..auth.principal import Principal
from ..context import CONTEXT
from ..errors import ApiError
from ..gateway import Gateway

GATEWAY = web.AppKey("gateway", Gateway)
# The official OpenAI SDKs' default User-Agent: `<client class>/<language> <version>` (`OpenAI/Python 2.8.1`,
# `AsyncOpenAI/Python ...`, `OpenAI/JS 6.9.1`).
_OPENAI_SDK_AGENT = re.compile(r"^(Async)?OpenAI/(Python|JS) ")
# (path prefix, body) for route families whose clients expect another error shape than ours (e.g. Anthropic's)
ERROR_SHAPES = web.AppKey("error_shapes", list[tuple[str, Callable[[ApiError], dict[str, Any]]]])


def from_openai_sdk(request: web.Request) -> bool:
    """Whether an official OpenAI SDK sent the request (its default User-Agent): a cue for answer shapes only."""
    return _OPENAI_SDK_AGENT.match(request.headers.get("User-Agent", "")) is not None


def authorization_header(request: web.Request) -> str | None:
    """The one `Authorization` header; several are refused, since proxies and the gateway may pick different ones."""
    values = request.headers.getall("Authorization", [])
    if len(values) > 1:
        raise ApiError("invalid_request", "send exactly one Authorization header", param="Authorization")
    return values[0] if values else None


def credential_header(
    request: web.Request, api_key_header: str | None, api_key_query: str | None = None
) -> str | None:
    """The caller's credential as an `Authorization` value. `api_key_header` / `api_key_query`: a header or a query
    parameter that may carry it instead, as a provider's SDK sends it (e.g. `x-api-key`, Gemini's `?key=`);
    several at once must agree, and each comes at most once."""
    offered = {"Authorization": authorization_header(request)}
    if api_key_header:
        offered[api_key_header] = _bearer(request.headers.getall(api_key_header, []), f"{api_key_header} header")
    if api_key_query:
        offered[f"?{api_key_query}="] = _bearer(request.query.getall(api_key_query, []), f"?{api_key_query}= parameter")
    present = {name: value for name, value in offered.items() if value is not None}
    if len(set(present.values())) > 1:
        names = [name for name in present if name != "Authorization"]
        raise ApiError(
            "invalid_request", f"{' and '.join(present)} carry different credentials; send one", param=names[0]
        )
    return next(iter(present.values()), None)


def _bearer(keys: list[str], where: str) -> str | None:
    if len(keys) > 1:
        raise ApiError("invalid_request", f"send exactly one {where}", param=where.split(" ")[0])
    return f"Bearer {keys[0]}" if keys else None


async def authenticated(
    request: web.Request, api_key_header: str | None = None, api_key_query: str | None = None
) -> Principal:
    """The caller (with the end user an API key names in `X-End-User-Id`), also noted in the request context so
    metrics and the access log name it."""
    credential = credential_header(request, api_key_header, api_key_query)
    principal = await request.app[GATEWAY].auth.authenticate(credential)
    principal = with_end_user(principal, request.headers.getall(END_USER_HEADER, []))
    request[CONTEXT].principal = principal
    return principal
