"""AWS Bedrock (kind `bedrock`): the Converse API, `POST <base_url>/model/<modelId>/converse` (JSON) and
`/converse-stream` (AWS event-stream framing), signed with SigV4 (proxy/upstream/aws.py) or sent with a Bedrock API
key as a bearer token. Clients call it through `/v1/chat/completions`: the body is translated to Converse and the
answer back (converse.py); usage is Converse's `usage` (`inputTokens`, `outputTokens`), in a stream its `metadata`
event's.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from ...errors import ApiError
from ...policy.types import Usage
from .. import sse
from . import openai
from .base import PreparedBody
from .converse import ChatTranslation, converse_usage, to_converse

dialect = "bedrock"
example_base_url = "https://bedrock-runtime.us-east-1.amazonaws.com"
CHAT_ROUTE = "/v1/chat/completions"  # the only route translated to Converse


def url(base_url: str, route: str, upstream_model: str, stream: bool) -> str:
    return f"{base_url}/model/{quote(upstream_model, safe='')}/{'converse-stream' if stream else 'converse'}"


# A Bedrock API key: `Authorization: Bearer <key>` (without one, calls are SigV4-signed instead).
credential_headers = openai.credential_headers


def prepare(route: str, body: dict[str, Any], upstream_model: str, max_output_tokens: int = 0) -> PreparedBody:
    """The Converse request for an OpenAI chat body (a 400 for what is not translated), and how its answer is
    translated back."""
    if route != CHAT_ROUTE:
        raise ApiError("invalid_request", f"Bedrock models answer {CHAT_ROUTE} only", param="model")
    stream = body.get("stream") is True
    options = body.get("stream_options")
    include_usage = stream and isinstance(options, dict) and options.get("include_usage") is True
    converse = to_converse(body, max_output_tokens)
    return PreparedBody(sse.compact_json(converse), stream, False,
                        ChatTranslation(upstream_model, include_usage))


def usage_of(answer: dict[str, Any]) -> Usage | None:
    return converse_usage(answer.get("usage"))


def usage_in_tail(data: bytes) -> Usage | None:
    return None  # answers are translated whole (converse.py), never read from a tail


def event_usage(previous: Usage | None, event: bytes, parsed: dict[str, Any] | None = None) -> Usage | None:
    return previous  # streams are event-stream frames read by converse.StreamTranslation, not SSE events


def may_carry_usage(event: bytes) -> bool:
    return False


is_output_event = ends_stream = may_carry_usage
is_injected_usage_event = may_carry_usage
error_body = openai.error_body  # clients of a translated answer are OpenAI's
error_event = openai.error_event
keepalive = openai.keepalive
