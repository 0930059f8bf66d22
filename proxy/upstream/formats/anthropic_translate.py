"""OpenAI chat completions <-> Anthropic's Messages API: the request, the JSON answer, the stream's chunks, errors.

The Anthropic wire format (anthropic.py) prepares a chat call with `chat_request` and hands the relay a
`ChatTranslation` (formats.base.AnswerTranslation): the JSON answer translated whole, a stream event by event as it
arrives (relay.py writes each piece at once). What is translated and what is refused: docs/api.md ("Translation:
OpenAI chat completions to Anthropic models"). A field the gateway cannot translate is refused with a 400
`unsupported_parameter` naming it, never dropped.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from typing import Any

from ...errors import ApiError
from ...policy.types import Usage
from .. import sse
from . import anthropic as wire  # its usage readers, used at call time (anthropic.py imports this module)
from .base import answer_object, error_message, provider_refusal, tool_call_arguments

# OpenAI fields that only label a call or steer the provider's storage: accepted, not forwarded.
_IGNORED = frozenset({"metadata", "store", "stream_options", "model"})
_HANDLED = frozenset({
    "messages", "stream", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "tools",
    "tool_choice", "parallel_tool_calls", "user", "n", "response_format", "logprobs",
})
# Anthropic stop_reason -> OpenAI finish_reason (pause_turn and unknown reasons: "stop").
_FINISH = {"max_tokens": "length", "tool_use": "tool_calls", "refusal": "content_filter"}
_TOOL_CHOICES = {"auto": {"type": "auto"}, "none": {"type": "none"}, "required": {"type": "any"}}
_DATA_URL = re.compile(r"data:(image/[\w.+-]+);base64,(.+)", re.DOTALL)


def _refuse(param: str, why: str) -> ApiError:
    return ApiError("unsupported_parameter", f"`{param}` {why} when the model is served by Anthropic "
                    "(docs/providers.md, Translation)", param=param)


def _invalid(param: str, why: str) -> ApiError:
    return ApiError("invalid_request", f"`{param}` {why}", param=param)


def chat_request(body: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI chat completions body as an Anthropic Messages body. `max_tokens` is the client's limit if any;
    the wire format's prepare lowers it to the reservation's bound, or sets that bound when absent."""
    for name in body:
        if name not in _HANDLED and name not in _IGNORED:
            raise _refuse(name, "is not supported")
    _refuse_values(body)
    system, messages = _messages(body.get("messages"))
    out: dict[str, Any] = {"messages": messages}
    if system:
        out["system"] = system
    limit = body.get("max_completion_tokens", body.get("max_tokens"))  # validated counts (request facts)
    if limit is not None:
        out["max_tokens"] = limit
    for name in ("temperature", "top_p"):
        if body.get(name) is not None:
            out[name] = _unit_number(body[name], name)
    if body.get("stop") is not None:
        out["stop_sequences"] = _stops(body["stop"])
    if body.get("stream") is True:
        out["stream"] = True
    if isinstance(body.get("user"), str):
        out["metadata"] = {"user_id": body["user"]}
    if body.get("tools") is not None:
        out["tools"] = _tools(body["tools"])
    if (choice := _tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"), "tools" in out)) is not None:
        out["tool_choice"] = choice
    return out


def _refuse_values(body: dict[str, Any]) -> None:
    """Fields accepted only with the values Anthropic's behaviour matches."""
    if body.get("n") not in (None, 1):
        raise _refuse("n", "must be 1 (Anthropic generates one answer per call)")
    if body.get("logprobs") not in (None, False):
        raise _refuse("logprobs", "is not available")
    response_format = body.get("response_format")
    kind = response_format.get("type") if isinstance(response_format, dict) else response_format
    if kind not in (None, "text"):
        raise _refuse("response_format", "must be text (describe the JSON wanted in the prompt, or use a tool)")


def _unit_number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise _refuse(name, "must be a number from 0 to 1 (Anthropic's range)")
    return value


def _stops(stop: Any) -> list[str]:
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise _invalid("stop", "must be a non-empty string or an array of them")
    return stops


def _messages(messages: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """System blocks, and the turns: user parts and tool results as `user`, assistant text and tool calls as
    `assistant`; consecutive turns of one role are merged, as Anthropic requires alternating roles."""
    if not isinstance(messages, list) or not messages:
        raise _invalid("messages", "must be a non-empty array")
    system: list[dict[str, Any]] = []
    turns: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        role = message.get("role") if isinstance(message, dict) else None
        if role in ("system", "developer"):
            system.extend(_text_blocks(message.get("content"), where))
            continue
        if role == "user":
            role, blocks = "user", _user_blocks(message.get("content"), where)
        elif role == "assistant":
            blocks = _assistant_blocks(message, where)
        elif role == "tool":
            role, blocks = "user", [_tool_result(message, where)]
        else:
            raise _invalid(f"{where}.role", "must be system, developer, user, assistant or tool")
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    if not turns:
        raise _invalid("messages", "needs a user message besides system ones")
    return system, turns


def _text_blocks(content: Any, where: str) -> list[dict[str, Any]]:
    """A string or text parts as text blocks; empty texts are left out (Anthropic refuses empty text blocks)."""
    if isinstance(content, str):
        texts = [content]
    elif isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        texts = [part.get("text") for part in content]
    else:
        raise _invalid(f"{where}.content", "must be a string or an array of text parts")
    if not all(isinstance(text, str) for text in texts):
        raise _invalid(f"{where}.content", "text parts need a `text` string")
    return [{"type": "text", "text": text} for text in texts if text]


def _user_blocks(content: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return _text_blocks(content, where) or [{"type": "text", "text": " "}]  # a turn must not be empty
    if not isinstance(content, list) or not content:
        raise _invalid(f"{where}.content", "must be a string or a non-empty array of parts")
    return [_user_block(part, f"{where}.content[{i}]") for i, part in enumerate(content)]


def _user_block(part: Any, where: str) -> dict[str, Any]:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part.get("text"), str):
        return {"type": "text", "text": part["text"]}
    if kind == "image_url":
        image = part.get("image_url")
        return {"type": "image", "source": _image_source(image.get("url") if isinstance(image, dict) else None, where)}
    raise _refuse(f"{where}.type", f"{kind!r} is not supported (text and image_url parts are)")


def _image_source(url: Any, where: str) -> dict[str, Any]:
    """A base64 `data:` URL as a base64 source, an https URL as a url source (Anthropic fetches it)."""
    if isinstance(url, str) and url.startswith("https://"):
        return {"type": "url", "url": url}
    match = _DATA_URL.fullmatch(url) if isinstance(url, str) else None
    if match is None:
        raise _refuse(f"{where}.image_url.url", "must be an https URL or a base64 data: URL of an image")
    return {"type": "base64", "media_type": match[1], "data": match[2]}


def _assistant_blocks(message: dict[str, Any], where: str) -> list[dict[str, Any]]:
    content = message.get("content")
    blocks = [] if content is None else _text_blocks(content, where)
    calls = message.get("tool_calls") or []
    if not isinstance(calls, list):
        raise _invalid(f"{where}.tool_calls", "must be an array")
    for i, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not isinstance(call.get("id"), str):
            raise _invalid(f"{where}.tool_calls[{i}]", "needs an `id` and a `function.name`")
        blocks.append({"type": "tool_use", "id": call["id"], "name": function["name"],
                       "input": _arguments(function.get("arguments"), f"{where}.tool_calls[{i}].function.arguments")})
    if not blocks:
        raise _invalid(f"{where}.content", "an assistant message needs content or tool_calls")
    return blocks


def _arguments(arguments: Any, where: str) -> dict[str, Any]:
    if (value := tool_call_arguments(arguments)) is None:
        raise _invalid(where, "must be a JSON object")
    return value


def _tool_result(message: dict[str, Any], where: str) -> dict[str, Any]:
    if not isinstance(message.get("tool_call_id"), str):
        raise _invalid(f"{where}.tool_call_id", "must name the tool call answered")
    content = message.get("content")
    text = "".join(block["text"] for block in _text_blocks(content if content is not None else "", where))
    return {"type": "tool_result", "tool_use_id": message["tool_call_id"], "content": text}


def _tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise _invalid("tools", "must be an array")
    out = []
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise _refuse("tools", "may only hold function tools with a name")
        schema = function.get("parameters")
        entry = {"name": function["name"], "input_schema": schema if isinstance(schema, dict) else {"type": "object"}}
        if isinstance(function.get("description"), str):
            entry["description"] = function["description"]
        out.append(entry)
    return out


def _tool_choice(choice: Any, parallel: Any, has_tools: bool) -> dict[str, Any] | None:
    """auto/none/required/named as Anthropic's; `parallel_tool_calls: false` as `disable_parallel_tool_use`."""
    if choice is None:
        out = {"type": "auto"} if parallel is False and has_tools else None
    elif isinstance(choice, str) and choice in _TOOL_CHOICES:
        out = dict(_TOOL_CHOICES[choice])
    else:
        function = choice.get("function") if isinstance(choice, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise _invalid("tool_choice", "must be auto, none, required or {\"type\": \"function\", \"function\": {\"name\": ...}}")
        out = {"type": "tool", "name": function["name"]}
    if out is not None and parallel is False and out["type"] != "none":
        out["disable_parallel_tool_use"] = True
    return out


def finish_reason(stop_reason: Any) -> str:
    return _FINISH.get(stop_reason, "stop") if isinstance(stop_reason, str) else "stop"


def usage(figures: Any) -> dict[str, Any] | None:
    """OpenAI's usage object from Anthropic's (cache writes and reads are prompt tokens, reads also as cached)."""
    if not isinstance(figures, dict):
        return None
    count = {k: v if isinstance(v, int) and not isinstance(v, bool) else 0 for k, v in figures.items()}
    cached = count.get("cache_read_input_tokens", 0)
    prompt = count.get("input_tokens", 0) + count.get("cache_creation_input_tokens", 0) + cached
    completion = count.get("output_tokens", 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _tool_call(block: dict[str, Any]) -> dict[str, Any]:
    return {"id": block.get("id", ""), "type": "function",
            "function": {"name": block.get("name", ""), "arguments": json.dumps(block.get("input") or {})}}


def chat_completion(answer: dict[str, Any], model: str, completion_id: str, created: int) -> dict[str, Any]:
    """An Anthropic message as an OpenAI chat.completion (thinking blocks are not part of the answer's text)."""
    content = answer.get("content")
    blocks = [b for b in content if isinstance(b, dict)] if isinstance(content, list) else []
    text = "".join(b["text"] for b in blocks if b.get("type") == "text" and isinstance(b.get("text"), str))
    calls = [_tool_call(b) for b in blocks if b.get("type") == "tool_use"]
    message: dict[str, Any] = {"role": "assistant", "content": text or None, "refusal": None}
    if calls:
        message["tool_calls"] = calls
    completion = {
        "id": completion_id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None,
                     "finish_reason": finish_reason(answer.get("stop_reason"))}],
    }
    if (figures := usage(answer.get("usage"))) is not None:
        completion["usage"] = figures
    return completion


def wants_usage(body: dict[str, Any]) -> bool:
    """Whether a chat stream's client asked for the usage chunk (`stream_options.include_usage`)."""
    options = body.get("stream_options")
    return body.get("stream") is True and isinstance(options, dict) and options.get("include_usage") is True


class ChatAnswer:
    """A stream's Anthropic events as chat.completion.chunk objects, in order: the role (at message_start), text
    and tool call fragments as they come (a tool call's id and name with its first), the finish reason (at
    message_delta); then, if asked, the usage chunk."""

    def __init__(self, model: str, completion_id: str, created: int, include_usage: bool) -> None:
        self._head = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model}
        self._include_usage = include_usage
        self._tool_index: dict[int, int] = {}  # Anthropic content block index -> OpenAI tool call index
        self._figures: dict[str, Any] = {}  # Anthropic usage so far (message_delta's counts are cumulative)

    def chunks(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        kind = event.get("type")
        if kind == "message_start":
            message = event.get("message")
            self._note_usage(message.get("usage") if isinstance(message, dict) else None)
            return [self._chunk({"role": "assistant", "content": ""})]
        if kind == "content_block_start":
            return self._block_start(event)
        if kind == "content_block_delta":
            return self._block_delta(event)
        if kind == "message_delta":
            self._note_usage(event.get("usage"))
            delta = event.get("delta")
            return [self._chunk({}, finish_reason(delta.get("stop_reason") if isinstance(delta, dict) else None))]
        return []  # ping, content_block_stop, message_stop, and event types added later carry nothing to translate

    def final(self) -> list[dict[str, Any]]:
        """After the last event: the usage chunk, if the client asked for it (`stream_options.include_usage`)."""
        if not self._include_usage:
            return []
        return [{**self._head, "choices": [], "usage": usage(self._figures)}]

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {**self._head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    def _note_usage(self, figures: Any) -> None:
        if isinstance(figures, dict):
            self._figures.update({k: v for k, v in figures.items() if v is not None})

    def _block_start(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        block = event.get("content_block")
        if not isinstance(block, dict):
            return []
        if block.get("type") == "text" and isinstance(block.get("text"), str) and block["text"]:
            return [self._chunk({"content": block["text"]})]
        block_index = event.get("index")
        if block.get("type") != "tool_use" or not isinstance(block_index, int):
            return []  # thinking blocks are not part of an OpenAI answer; a call no fragment could name is dropped
        index = self._tool_index.setdefault(block_index, len(self._tool_index))
        call = {"index": index, "id": block.get("id", ""), "type": "function",
                "function": {"name": block.get("name", ""), "arguments": ""}}
        return [self._chunk({"tool_calls": [call]})]

    def _block_delta(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        delta = event.get("delta")
        if not isinstance(delta, dict):
            return []
        if delta.get("type") == "text_delta" and isinstance(delta.get("text"), str):
            return [self._chunk({"content": delta["text"]})]
        block_index = event.get("index")
        index = self._tool_index.get(block_index) if isinstance(block_index, int) else None
        if delta.get("type") == "input_json_delta" and index is not None and isinstance(delta.get("partial_json"), str):
            return [self._chunk({"tool_calls": [{"index": index, "function": {"arguments": delta["partial_json"]}}]})]
        return []  # thinking and signature deltas are not part of an OpenAI answer


class StreamTranslation:
    """Anthropic's SSE bytes in, OpenAI chunk SSE events out (formats.base.StreamTranslator): each whole event is
    translated as soon as it is read; usage is read from the events as the native route reads it."""

    def __init__(self, answer: ChatAnswer) -> None:
        self._answer = answer
        self._splitter = sse.EventSplitter()
        self.usage: Usage | None = None
        self.output_chunks = 0
        self.done = False
        self.error: dict[str, Any] | None = None

    def feed(self, data: bytes) -> bytes:
        out = bytearray()
        for event in self._splitter.feed(data):
            out += self._event(event)
            if self.done:
                break
        return bytes(out)

    def _event(self, event: bytes) -> bytes:
        if wire.is_output_event(event):
            self.output_chunks += 1
        data = sse.event_json(event)
        self.usage = wire.event_usage(self.usage, event, data)
        if data is None:
            return b""
        if data.get("type") == "error":  # `event: error` mid-stream (overloaded...): the SDK raises it
            error = data.get("error")
            message = error.get("message") if isinstance(error, dict) else None
            self.error = ApiError("upstream_error", f"the provider failed mid-stream: {message}").body()
            self.done = True
            return sse.data_event(self.error)
        out = b"".join(sse.data_event(chunk) for chunk in self._answer.chunks(data))
        if data.get("type") == "message_stop":
            self.done = True
            out += b"".join(sse.data_event(chunk) for chunk in self._answer.final()) + b"data: [DONE]\n\n"
        return out


class ChatTranslation:
    """How the answer to a translated chat call reaches its OpenAI client (PreparedBody.translation)."""

    def __init__(self, model: str, include_usage: bool) -> None:
        self._model, self._include_usage = model, include_usage  # `model`: the upstream's, as OpenAI names its own
        self._id, self._created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())

    def answer(self, body: bytes) -> tuple[bytes, Usage | None]:
        message = answer_object(body, "Anthropic")
        completion = chat_completion(message, self._model, self._id, self._created)
        return sse.compact_json(completion), wire.usage_of(message)

    def error(self, status: int, error_type: str, body: bytes) -> bytes:
        """A refusal of the request (400, 413, 429) in OpenAI's shape; any other 4xx is the gateway's 502."""
        refusal = provider_refusal(status, error_message(body))
        if refusal.status != status:
            raise refusal
        return sse.compact_json(refusal.body())

    def stream(self) -> StreamTranslation:
        return StreamTranslation(ChatAnswer(self._model, self._id, self._created, self._include_usage))
