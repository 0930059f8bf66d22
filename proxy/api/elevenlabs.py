"""ElevenLabs' text-to-speech, native: `POST /elevenlabs/v1/text-to-speech/{voice_id}/stream` (and without
`/stream`), for ElevenLabs SDKs with `base_url=<gateway>/elevenlabs` and one of our keys or tokens as their API key
(`xi-api-key`, as they send it, or `Authorization: Bearer`). `model_id` is our public model id (a model of an
`elevenlabs` provider), sent on as its upstream id; `output_format` and the other fields are ElevenLabs' own. The
audio is relayed chunk by chunk as it arrives, never buffered; billed per character (reserved for `text`, settled on
the `x-character-count` header ElevenLabs answers with). Gateway errors here are in ElevenLabs' shape."""

from __future__ import annotations

from aiohttp import web

from ..context import CONTEXT
from ..errors import ApiError
from ..policy.types import RequestFacts
from ..upstream.formats import elevenlabs as elevenlabs_format
from ..upstream.relay import forwarded_headers
from .body import read_call_body
from .passthrough import relay_generation
from .state import ERROR_SHAPES, GATEWAY, authenticated

PREFIX = "/elevenlabs"


async def speak(request: web.Request) -> web.StreamResponse:
    gateway, ctx = request.app[GATEWAY], request[CONTEXT]
    principal = await authenticated(request, api_key_header="xi-api-key")
    output_format = request.query.get("output_format", elevenlabs_format.OUTPUT_FORMAT)
    route = elevenlabs_format.speech_route(
        request.match_info["voice_id"], output_format, stream=request.path.endswith("/stream")
    )
    body, size = await read_call_body(request, gateway.config.server.max_body_bytes)
    model_id = body.pop("model_id", None)
    if not isinstance(model_id, str) or not model_id:
        raise ApiError("invalid_request", "`model_id` must be a model id from GET /v1/models", param="model_id")
    ctx.model = model = gateway.model(model_id, "elevenlabs")
    text = body.get("text")
    if not isinstance(text, str) or not text:
        raise ApiError("invalid_request", "`text` must be a non-empty string", param="text")
    facts = RequestFacts(input_bytes=size, max_output_tokens=0, characters=len(text))
    return await relay_generation(request, principal, model, route, body, facts, forwarded_headers(request),
                                  elevenlabs_format.character_usage)


def add_routes(app: web.Application) -> None:
    app.router.add_post(PREFIX + "/v1/text-to-speech/{voice_id}/stream", speak)
    app.router.add_post(PREFIX + "/v1/text-to-speech/{voice_id}", speak)
    app[ERROR_SHAPES].append((PREFIX + "/", elevenlabs_format.error_body))
