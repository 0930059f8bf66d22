"""The Gemini API, native: `POST /gemini/{v1beta|v1}/models/<model>:generateContent`, `:streamGenerateContent`
(`?alt=sse`) and `:countTokens`.

google-genai works with `http_options={"base_url": "<gateway>/gemini"}` and one of our keys or tokens as its API
key (`x-goog-api-key`; `?key=` and `Authorization: Bearer` work too). `<model>` is our public model id as the SDK
puts it in the path (`models/google/gemini-2.5-flash`: slashes kept, or `%2F`-encoded); the call goes to a model of
a `gemini` provider with its upstream id, at the provider's API version (its base_url), with
`generationConfig.maxOutputTokens` lowered to the reservation's bound. Answers and SSE events come back as the
provider sent them. A stream without `alt=sse` (a JSON array) is refused: its usage could only be read at its end.
Errors of the gateway on these routes are in Google's shape (our code as the ErrorInfo reason).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ..context import CONTEXT
from ..errors import ApiError
from ..policy.types import RequestFacts
from ..upstream.formats import gemini as gemini_format
from ..upstream.formats.gemini import COUNT_TOKENS, PREFIX, ROUTES, STREAM
from ..upstream.relay import forwarded_headers
from .body import objects_within, read_call_body
from .metered import MAX_CHOICES, MAX_OUTPUT_TOKENS, count_param
from .passthrough import relay_generation
from .state import ERROR_SHAPES, GATEWAY, authenticated

_VERSIONS = "v1beta|v1"  # path versions accepted; the provider's base_url names the one called
_MEDIA_PARTS = frozenset({"inlineData", "fileData"})  # their tokens are not bounded by the body's bytes (files)
# Request fields whose cost the request does not bound, refused with the way around (docs/api.md): content stored
# in the provider account adds input the request does not carry.
_UNBOUNDED_FIELDS = {"cachedContent": "send the cached content in `contents`"}
# Tools the provider bills only as tokens; grounding with Google Search or Maps has fees per prompt.
_TOKEN_PRICED_TOOLS = frozenset({"functionDeclarations", "codeExecution"})


async def generate(request: web.Request) -> web.StreamResponse:
    gateway, ctx = request.app[GATEWAY], request[CONTEXT]
    principal = await authenticated(request, api_key_header="x-goog-api-key", api_key_query="key")
    route = gemini_route(request)
    if route == STREAM and request.query.get("alt") != "sse":
        raise ApiError("invalid_request", "streamGenerateContent needs ?alt=sse (Server-Sent Events); the JSON "
                       "array stream is not supported through the gateway", param="alt")
    body, size = await read_call_body(request, gateway.config.server.max_body_bytes)
    ctx.model = model = gateway.model(request.match_info["model"], "gemini")
    facts = request_facts(route, body, size)
    return await relay_generation(request, principal, model, route, body, facts, forwarded_headers(request))


def gemini_route(request: web.Request) -> str:
    """The matched route's canonical path: one of formats.gemini.ROUTES."""
    resource = request.match_info.route.resource
    assert resource is not None  # a handler runs only on a matched route
    return resource.canonical


def request_facts(route: str, body: dict[str, Any], input_bytes: int) -> RequestFacts:
    """What bounds a Gemini call: `generationConfig.maxOutputTokens` (absent: the model's cap) per candidate,
    `candidateCount`, the body's bytes and its inline or file parts. Counting tokens generates nothing."""
    for name, instead in _UNBOUNDED_FIELDS.items():
        if body.get(name) is not None:
            raise ApiError("invalid_request", f"`{name}` is not supported through the gateway, which bounds and "
                           f"meters a call by what its request carries: {instead}", param=name)
    _check_tools(body.get("tools"))
    media = _media_parts(body)
    if route == COUNT_TOKENS:
        return RequestFacts(input_bytes=input_bytes, max_output_tokens=0, media_parts=media)
    config = body.get("generationConfig")
    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise ApiError("invalid_request", "`generationConfig` must be an object", param="generationConfig")
    return RequestFacts(
        input_bytes=input_bytes,
        max_output_tokens=count_param(config, "maxOutputTokens", MAX_OUTPUT_TOKENS),
        choices=count_param(config, "candidateCount", MAX_CHOICES) or 1,
        media_parts=media,
        stream=route == STREAM,
    )


def _check_tools(tools: Any) -> None:
    for tool in tools if isinstance(tools, list) else []:
        kinds = set(tool) if isinstance(tool, dict) else {repr(tool)}
        if unsupported := sorted(kinds - _TOKEN_PRICED_TOOLS):
            raise ApiError("invalid_request", f"tool {', '.join(unsupported)} is not supported through the gateway "
                           "(it has fees beyond tokens); use functionDeclarations or codeExecution", param="tools")


def _media_parts(body: dict[str, Any]) -> int:
    """Inline and file parts anywhere in the body (contents, systemInstruction, a nested countTokens request)."""
    return sum(len(_MEDIA_PARTS & node.keys()) for node in objects_within(body))


def add_routes(app: web.Application) -> None:
    for route in ROUTES:
        # `{model}` may hold slashes (our ids do): a regex variable, matched on the whole rest of the path.
        app.router.add_post(route.replace("{version}", f"{{version:{_VERSIONS}}}").replace("{model}", "{model:.+}"),
                            generate)
    app[ERROR_SHAPES].append((PREFIX + "/", gemini_format.error_body))
