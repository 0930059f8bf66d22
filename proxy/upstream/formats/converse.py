"""Translation between OpenAI Chat Completions and Bedrock's Converse API (docs/providers.md#bedrock says what is
translated and what is refused).

Request: OpenAI chat body -> Converse body (messages, system, tools, tool calls and results, images from data:
URLs, inferenceConfig). Answer: Converse JSON -> `chat.completion`; ConverseStream events (decoded from AWS's
event-stream framing by botocore) -> `chat.completion.chunk` SSE events and `[DONE]`.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

from ...errors import ApiError
from ...policy.types import Usage
from .. import sse
from .base import answer_object, token_figure, tool_call_arguments

try:  # the `bedrock` extra; proxy/upstream/aws.py refuses a bedrock provider at start-up without it
    from botocore.eventstream import EventStreamBuffer, ParserError
except ImportError:  # pragma: no cover
    EventStreamBuffer = ParserError = None  # type: ignore[assignment, misc]

FINISH_REASONS = {
    "end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", "tool_use": "tool_calls",
    "content_filtered": "content_filter", "guardrail_intervened": "content_filter",
}
_IMAGE_FORMATS = {"image/png": "png", "image/jpeg": "jpeg", "image/jpg": "jpeg", "image/gif": "gif",
                  "image/webp": "webp"}
# OpenAI fields with no Converse equivalent: refused when set to anything but their neutral value.
_REFUSED_FIELDS = {
    "n": (None, 1), "logprobs": (None, False), "top_logprobs": (None,), "logit_bias": (None,),
    "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0), "seed": (None,),
    "functions": (None,), "function_call": (None,), "audio": (None,), "modalities": (None, ["text"]),
    "prediction": (None,), "web_search_options": (None,), "reasoning_effort": (None,),
}
_IGNORED_FIELDS = frozenset({"model", "messages", "stream", "stream_options", "user", "store", "metadata",
                             "parallel_tool_calls", "service_tier", "max_tokens", "max_completion_tokens",
                             "temperature", "top_p", "stop", "tools", "tool_choice", "response_format"})


def _refuse(message: str, param: str | None = None) -> ApiError:
    return ApiError("invalid_request", f"{message} (Bedrock Converse; see docs/providers.md#bedrock)", param=param)


def to_converse(body: dict[str, Any], max_output_tokens: int) -> dict[str, Any]:
    """The Converse request for an OpenAI chat body; a 400 naming the field for anything not translated."""
    for name, neutral in _REFUSED_FIELDS.items():
        if body.get(name) not in neutral:
            raise _refuse(f"`{name}` is not supported for this model", name)
    unknown = sorted(set(body) - _IGNORED_FIELDS - set(_REFUSED_FIELDS))
    if unknown:
        raise _refuse(f"`{unknown[0]}` is not supported for this model", unknown[0])
    response_format = body.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise _refuse("`response_format` other than text is not supported for this model", "response_format")
    system, messages = _messages(body.get("messages"))
    out: dict[str, Any] = {"messages": messages}
    if system:
        out["system"] = system
    inference = _inference(body, max_output_tokens)
    if inference:
        out["inferenceConfig"] = inference
    tools = _tool_config(body.get("tools"), body.get("tool_choice"))
    if tools is not None:
        out["toolConfig"] = tools
    return out


def _inference(body: dict[str, Any], cap: int) -> dict[str, Any]:
    asked = body.get("max_completion_tokens", body.get("max_tokens"))  # validated integers (request_facts)
    config: dict[str, Any] = {}
    if isinstance(asked, int) or cap > 0:
        config["maxTokens"] = min(asked, cap) if isinstance(asked, int) and cap > 0 else (asked or cap)
    for ours, theirs in (("temperature", "temperature"), ("top_p", "topP")):
        value = body.get(ours)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise _refuse(f"`{ours}` must be a number", ours)
            config[theirs] = value
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise _refuse("`stop` must be a string or a list of strings", "stop")
        config["stopSequences"] = stops
    return config


def _messages(messages: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """System blocks and the conversation; consecutive turns of one role merged (Converse alternates roles)."""
    if not isinstance(messages, list) or not messages:
        raise _refuse("`messages` must be a non-empty list", "messages")
    system: list[dict[str, Any]] = []
    turns: list[dict[str, Any]] = []
    for message in messages:
        if not isinstance(message, dict):
            raise _refuse("each message must be an object", "messages")
        role = message.get("role")
        if role in ("system", "developer"):
            system += [{"text": text} for text in _texts(message.get("content"))]
            continue
        if role == "user":
            blocks, converse_role = _user_blocks(message.get("content")), "user"
        elif role == "assistant":
            blocks, converse_role = _assistant_blocks(message), "assistant"
        elif role == "tool":
            blocks, converse_role = [_tool_result(message)], "user"
        else:
            raise _refuse(f"message role {role!r} is not supported", "messages")
        if turns and turns[-1]["role"] == converse_role:
            turns[-1]["content"] += blocks
        else:
            turns.append({"role": converse_role, "content": blocks})
    if not turns:
        raise _refuse("`messages` needs at least one user message", "messages")
    return system, turns


def _texts(content: Any) -> list[str]:
    if isinstance(content, str):
        return [content]
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return [str(p.get("text", "")) for p in content]
    raise _refuse("system and tool messages take text content only", "messages")


def _user_blocks(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"text": content}]
    if not isinstance(content, list) or not content:
        raise _refuse("message content must be a string or a non-empty list of parts", "messages")
    blocks = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            blocks.append({"text": str(part.get("text", ""))})
        elif kind == "image_url":
            blocks.append(_image(part.get("image_url")))
        else:
            raise _refuse(f"content part type {kind!r} is not supported (text and image_url only)", "messages")
    return blocks


def _image(image_url: Any) -> dict[str, Any]:
    """A data: URL as an image block (Converse's JSON carries the bytes base64-encoded); remote URLs refused."""
    url = image_url.get("url") if isinstance(image_url, dict) else None
    if not isinstance(url, str) or not url.startswith("data:") or ";base64," not in url:
        raise _refuse("images must be data: URLs (data:image/png;base64,...); remote image URLs are not fetched",
                      "messages")
    media_type, data = url[5:].split(";base64,", 1)
    image_format = _IMAGE_FORMATS.get(media_type.lower())
    if image_format is None:
        raise _refuse(f"image type {media_type!r} is not supported (png, jpeg, gif, webp)", "messages")
    try:
        base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise _refuse("an image data: URL is not valid base64", "messages") from None
    return {"image": {"format": image_format, "source": {"bytes": data}}}


def _assistant_blocks(message: dict[str, Any]) -> list[dict[str, Any]]:
    content = message.get("content")
    blocks = [{"text": text} for text in _texts(content) if text] if content is not None else []
    calls = message.get("tool_calls") or []
    if not isinstance(calls, list):
        raise _refuse("`tool_calls` must be a list", "messages")
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(call.get("id"), str):
            raise _refuse("each tool call needs an id and a function", "messages")
        if (arguments := tool_call_arguments(function.get("arguments"))) is None:
            raise _refuse("tool call arguments must be a JSON object", "messages")
        blocks.append({"toolUse": {"toolUseId": call["id"], "name": function.get("name"), "input": arguments}})
    if not blocks:
        raise _refuse("an assistant message needs content or tool_calls", "messages")
    return blocks


def _tool_result(message: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(message.get("tool_call_id"), str):
        raise _refuse("a tool message needs its tool_call_id", "messages")
    texts = _texts(message.get("content"))
    return {"toolResult": {"toolUseId": message["tool_call_id"], "content": [{"text": t} for t in texts]}}


def _tool_config(tools: Any, choice: Any) -> dict[str, Any] | None:
    if tools is None:
        if choice is not None:
            raise _refuse("`tool_choice` needs `tools`", "tool_choice")
        return None
    if not isinstance(tools, list) or not tools:
        raise _refuse("`tools` must be a non-empty list", "tools")
    specs = []
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise _refuse("only function tools with a name are supported", "tools")
        spec: dict[str, Any] = {"name": function["name"],
                                "inputSchema": {"json": function.get("parameters") or {"type": "object"}}}
        if function.get("description"):
            spec["description"] = function["description"]
        specs.append({"toolSpec": spec})
    config: dict[str, Any] = {"tools": specs}
    if choice in (None, "auto"):
        config["toolChoice"] = {"auto": {}}
    elif choice == "required":
        config["toolChoice"] = {"any": {}}
    elif isinstance(choice, dict) and isinstance((choice.get("function") or {}).get("name"), str):
        config["toolChoice"] = {"tool": {"name": choice["function"]["name"]}}
    else:
        raise _refuse("`tool_choice` must be auto, required or a named function (Converse has no `none`)",
                      "tool_choice")
    return config


def converse_usage(usage: Any) -> Usage | None:
    """Converse's `usage` (`inputTokens`, `outputTokens`); None if absent or broken."""
    if not isinstance(usage, dict):
        return None
    input_tokens, output_tokens = token_figure(usage.get("inputTokens")), token_figure(usage.get("outputTokens"))
    if input_tokens is None or output_tokens is None or ("inputTokens" not in usage and "outputTokens" not in usage):
        return None
    return Usage(input_tokens=input_tokens, output_tokens=output_tokens)


def _openai_usage(usage: Usage) -> dict[str, int]:
    return {"prompt_tokens": usage.input_tokens, "completion_tokens": usage.output_tokens,
            "total_tokens": usage.input_tokens + usage.output_tokens}


def to_chat_completion(answer: dict[str, Any], model: str, call_id: str) -> tuple[dict[str, Any], Usage | None]:
    """A Converse answer as an OpenAI `chat.completion`, with its usage."""
    output = answer.get("output")
    message = output.get("message") if isinstance(output, dict) else None
    content = message.get("content") if isinstance(message, dict) else None
    text, calls = "", []
    for block in content if isinstance(content, list) else []:
        if not isinstance(block, dict):
            continue
        if isinstance(block.get("text"), str):
            text += block["text"]
        elif isinstance(block.get("toolUse"), dict):
            use = block["toolUse"]
            calls.append({"id": use.get("toolUseId"), "type": "function",
                          "function": {"name": use.get("name"), "arguments": json.dumps(use.get("input", {}))}})
    reply: dict[str, Any] = {"role": "assistant", "content": text or (None if calls else "")}
    if calls:
        reply["tool_calls"] = calls
    usage = converse_usage(answer.get("usage"))
    completion: dict[str, Any] = {
        "id": f"chatcmpl-{call_id}", "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": reply, "logprobs": None,
                     "finish_reason": FINISH_REASONS.get(str(answer.get("stopReason")), "stop")}],
    }
    if usage is not None:
        completion["usage"] = _openai_usage(usage)
    return completion, usage


def error_body(status: int, error_type: str, payload: bytes) -> dict[str, Any]:
    """A Bedrock error (`x-amzn-ErrorType` or an exception event's type, `{"message": ...}`) in OpenAI's shape."""
    try:
        message = json.loads(payload).get("message") or json.loads(payload).get("Message")
    except (ValueError, AttributeError, RecursionError):
        message = None
    kind = error_type.split(":", 1)[0] or "BedrockError"
    return {"error": {"message": str(message or f"Bedrock answered {status} {kind}"), "type": _error_type(status),
                      "param": None, "code": kind}}


def _error_type(status: int) -> str:
    return {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
            429: "rate_limit_error"}.get(status, "invalid_request_error" if status < 500 else "server_error")


@dataclass
class StreamTranslation:
    """ConverseStream's event-stream bytes in, OpenAI chunk SSE events out (decoded by botocore's parser)."""

    model: str
    call_id: str
    include_usage: bool  # the client asked for the usage chunk (stream_options.include_usage)
    usage: Usage | None = None
    output_chunks: int = 0
    done: bool = False
    error: dict[str, Any] | None = None  # an exception event: the OpenAI error the stream ended with
    _buffer: Any = field(default_factory=lambda: EventStreamBuffer())
    _created: int = field(default_factory=lambda: int(time.time()))
    _tools: dict[int, int] = field(default_factory=dict)  # contentBlockIndex -> OpenAI tool call index

    def feed(self, data: bytes) -> bytes:
        """The SSE bytes for the client from this piece of the upstream's stream."""
        self._buffer.add_data(data)
        out = bytearray()
        try:
            for message in self._buffer:
                out += self._event(message.headers, message.payload)
        except ParserError:
            raise ApiError("upstream_error", "Bedrock's event stream could not be decoded") from None
        return bytes(out)

    def _event(self, headers: dict[str, Any], payload: bytes) -> bytes:
        if headers.get(":message-type") != "event":
            status = 429 if "hrottling" in str(headers.get(":exception-type")) else 500
            self.error = error_body(status, str(headers.get(":exception-type") or headers.get(":error-code")), payload)
            self.done = True
            return sse.data_event(self.error)
        try:
            data = json.loads(payload)
        except (ValueError, RecursionError):
            data = None
        if not isinstance(data, dict):
            raise ApiError("upstream_error", "Bedrock sent an event that is not a JSON object")
        kind = headers.get(":event-type")
        if kind == "messageStart":
            return self._chunk({"role": "assistant", "content": ""})
        if kind == "contentBlockStart":
            return self._tool_start(data)
        if kind == "contentBlockDelta":
            return self._delta(data)
        if kind == "messageStop":
            return self._chunk({}, FINISH_REASONS.get(str(data.get("stopReason")), "stop"))
        if kind == "metadata":
            self.usage = converse_usage(data.get("usage")) or self.usage
            self.done = True
            out = b""
            if self.include_usage and self.usage is not None:
                out = sse.data_event({**self._base(), "choices": [], "usage": _openai_usage(self.usage)})
            return out + b"data: [DONE]\n\n"
        return b""  # contentBlockStop and events added later carry nothing for the client

    def _tool_start(self, data: dict[str, Any]) -> bytes:
        start = data.get("start")
        use = start.get("toolUse") if isinstance(start, dict) else None
        if not isinstance(use, dict):
            return b""
        index = self._tools.setdefault(_block_index(data), len(self._tools))
        self.output_chunks += 1
        return self._chunk({"tool_calls": [{"index": index, "id": use.get("toolUseId"), "type": "function",
                                            "function": {"name": use.get("name"), "arguments": ""}}]})

    def _delta(self, data: dict[str, Any]) -> bytes:
        delta = data.get("delta")
        delta = delta if isinstance(delta, dict) else {}
        if isinstance(delta.get("text"), str):
            self.output_chunks += 1
            return self._chunk({"content": delta["text"]})
        use = delta.get("toolUse")
        if isinstance(use, dict):
            self.output_chunks += 1
            index = self._tools.get(_block_index(data), 0)
            return self._chunk({"tool_calls": [{"index": index, "function": {"arguments": use.get("input", "")}}]})
        return b""  # reasoning content is not part of OpenAI's chat chunks

    def _base(self) -> dict[str, Any]:
        return {"id": f"chatcmpl-{self.call_id}", "object": "chat.completion.chunk", "created": self._created,
                "model": self.model}

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        return sse.data_event({**self._base(), "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})


def _block_index(data: dict[str, Any]) -> int:
    index = data.get("contentBlockIndex")
    return index if isinstance(index, int) else 0


@dataclass(frozen=True)
class ChatTranslation:
    """How the answer to a translated chat call reaches its OpenAI client (PreparedBody.translation)."""

    model: str  # named in the answers, as OpenAI names the model that answered
    include_usage: bool

    def answer(self, body: bytes) -> tuple[bytes, Usage | None]:
        completion, usage = to_chat_completion(answer_object(body, "Bedrock"), self.model, _call_id())
        return sse.compact_json(completion), usage

    def error(self, status: int, error_type: str, body: bytes) -> bytes:
        return sse.compact_json(error_body(status, error_type, body))

    def stream(self) -> StreamTranslation:
        return StreamTranslation(self.model, _call_id(), self.include_usage)


def _call_id() -> str:
    return os.urandom(12).hex()
