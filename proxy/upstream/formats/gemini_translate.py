"""OpenAI chat completions <-> the Gemini API: the request, the JSON answer, the stream's chunks and errors.

Pure functions and one small per-stream state (gemini.py's ChatTranslation drives them); what is translated and
what is refused is listed in docs/providers.md (Gemini). A request field without a Gemini equivalent the gateway
knows is refused with a 400 naming it, never dropped silently (except `user`, `metadata`, `store`, `parallel_tool_calls`, which only label or steer the
provider's bookkeeping).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any

from ...errors import ApiError
from .base import error_message, provider_refusal, tool_call_arguments

# OpenAI fields that only label a call or steer the provider's bookkeeping: accepted, not forwarded.
_IGNORED = frozenset({"user", "metadata", "store", "parallel_tool_calls", "stream_options"})
# OpenAI field -> generationConfig field, values passed as they are.
_GENERATION = {
    "temperature": "temperature", "top_p": "topP", "seed": "seed",
    "presence_penalty": "presencePenalty", "frequency_penalty": "frequencyPenalty",
}
_HANDLED = frozenset({"model", "messages", "stream", "max_tokens", "max_completion_tokens", "stop", "n",
                      "response_format", "tools", "tool_choice"})
# Gemini finishReason -> OpenAI finish_reason; any other reason (OTHER, MALFORMED_FUNCTION_CALL...) is "stop".
_FINISH = {
    "STOP": "stop", "MAX_TOKENS": "length", "SAFETY": "content_filter", "RECITATION": "content_filter",
    "BLOCKLIST": "content_filter", "PROHIBITED_CONTENT": "content_filter", "SPII": "content_filter",
    "IMAGE_SAFETY": "content_filter", "LANGUAGE": "content_filter",
}
_TOOL_CHOICE_MODES = {"auto": "AUTO", "none": "NONE", "required": "ANY"}
_DATA_URL = re.compile(r"data:([\w.+-]+/[\w.+-]+);base64,(.*)", re.DOTALL)


def _refuse(param: str, why: str) -> ApiError:
    return ApiError("unsupported_parameter", f"`{param}` {why} when the model is served by Gemini (docs/providers.md)",
                    param=param)


def chat_request(body: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI chat completions body as a Gemini GenerateContentRequest (the model goes in the URL)."""
    for name in body:
        if name not in _HANDLED and name not in _GENERATION and name not in _IGNORED:
            raise _refuse(name, "is not supported")
    if body.get("n") not in (None, 1):
        raise _refuse("n", "must be 1")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError("invalid_request", "`messages` must be a non-empty array", param="messages")
    system, contents = _contents(messages)
    out: dict[str, Any] = {"contents": contents}
    if system:
        out["systemInstruction"] = {"parts": system}
    if config := _generation_config(body):
        out["generationConfig"] = config
    if body.get("tools") is not None:
        out["tools"] = [{"functionDeclarations": _function_declarations(body["tools"])}]
    if body.get("tool_choice") is not None:
        out["toolConfig"] = {"functionCallingConfig": _tool_choice(body["tool_choice"])}
    return out


def _generation_config(body: dict[str, Any]) -> dict[str, Any]:
    config = {gemini: body[name] for name, gemini in _GENERATION.items() if body.get(name) is not None}
    limit = body.get("max_completion_tokens", body.get("max_tokens"))  # validated counts (request facts)
    if limit is not None:
        config["maxOutputTokens"] = limit
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise ApiError("invalid_request", "`stop` must be a string or an array of strings", param="stop")
        config["stopSequences"] = stops
    config.update(_response_format(body.get("response_format")))
    return config


def _response_format(value: Any) -> dict[str, Any]:
    kind = value.get("type") if isinstance(value, dict) else value
    if kind in (None, "text"):
        return {}
    if kind == "json_object":
        return {"responseMimeType": "application/json"}
    schema = value.get("json_schema") if isinstance(value, dict) else None
    if kind == "json_schema" and isinstance(schema, dict) and isinstance(schema.get("schema"), dict):
        return {"responseMimeType": "application/json", "responseJsonSchema": schema["schema"]}
    raise _refuse("response_format", "must be text, json_object or json_schema with a schema")


def _contents(messages: list[Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """System parts, and the turns: user and tool results as `user`, assistant as `model` (a run of tool results
    is one turn, as Gemini expects the answers to one turn's calls together)."""
    system: list[dict[str, Any]] = []
    contents: list[dict[str, Any]] = []
    call_names: dict[str, str] = {}  # tool_call_id -> function name: Gemini's functionResponse names the function
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        role = message.get("role") if isinstance(message, dict) else None
        if role in ("system", "developer"):
            system.extend(_text_parts(message.get("content"), where))
        elif role == "user":
            contents.append({"role": "user", "parts": _user_parts(message.get("content"), where)})
        elif role == "assistant":
            contents.append({"role": "model", "parts": _assistant_parts(message, where, call_names)})
        elif role == "tool":
            part = _tool_result(message, where, call_names)
            if contents and contents[-1]["role"] == "user" and "functionResponse" in contents[-1]["parts"][0]:
                contents[-1]["parts"].append(part)
            else:
                contents.append({"role": "user", "parts": [part]})
        else:
            raise ApiError("invalid_request", f"{where}.role must be system, developer, user, assistant or tool",
                           param=f"{where}.role")
    if not contents:
        raise ApiError("invalid_request", "`messages` needs a user message besides system ones", param="messages")
    return system, contents


def _text_parts(content: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"text": content}]
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return [{"text": str(part.get("text", ""))} for part in content]
    raise ApiError("invalid_request", f"{where}.content must be a string or text parts", param=f"{where}.content")


def _user_parts(content: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"text": content}]
    if not isinstance(content, list) or not content:
        raise ApiError("invalid_request", f"{where}.content must be a string or an array of parts",
                       param=f"{where}.content")
    return [_user_part(part, f"{where}.content[{i}]") for i, part in enumerate(content)]


def _user_part(part: Any, where: str) -> dict[str, Any]:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part.get("text"), str):
        return {"text": part["text"]}
    if kind == "image_url":
        image = part.get("image_url")
        return _inline_image(image.get("url") if isinstance(image, dict) else None, where)
    raise _refuse(f"{where}.type", f"{kind!r} is not supported (text and image_url parts are)")


def _inline_image(url: Any, where: str) -> dict[str, Any]:
    """A `data:` URL as inlineData; other URLs are refused: Gemini reads files only from its own file store."""
    match = _DATA_URL.fullmatch(url) if isinstance(url, str) else None
    if match is None:
        raise _refuse(f"{where}.image_url.url", "must be a base64 data: URL (data:image/png;base64,...); fetch the "
                      "image and send its bytes")
    try:
        base64.b64decode(match[2], validate=True)
    except (binascii.Error, ValueError):
        raise _refuse(f"{where}.image_url.url", "is not valid base64") from None
    return {"inlineData": {"mimeType": match[1], "data": match[2]}}


def _assistant_parts(message: dict[str, Any], where: str, call_names: dict[str, str]) -> list[dict[str, Any]]:
    content = message.get("content")
    parts = [] if content in (None, "", []) else _text_parts(content, where)
    calls = message.get("tool_calls") or []
    if not isinstance(calls, list):
        raise ApiError("invalid_request", f"{where}.tool_calls must be an array", param=f"{where}.tool_calls")
    for i, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str):
            raise ApiError("invalid_request", f"{where}.tool_calls[{i}] needs function.name",
                           param=f"{where}.tool_calls")
        if isinstance(call.get("id"), str):
            call_names[call["id"]] = name
        parts.append({"functionCall": {"name": name, "args": _arguments(function.get("arguments"), where, i)}})
    return parts or [{"text": ""}]


def _arguments(arguments: Any, where: str, index: int) -> dict[str, Any]:
    if (value := tool_call_arguments(arguments)) is None:
        raise ApiError("invalid_request", f"{where}.tool_calls[{index}].function.arguments must be a JSON object",
                       param=f"{where}.tool_calls")
    return value


def _tool_result(message: dict[str, Any], where: str, call_names: dict[str, str]) -> dict[str, Any]:
    call_id = message.get("tool_call_id")
    name = call_names.get(call_id) if isinstance(call_id, str) else None  # a JSON object or array is no key
    if name is None:
        raise ApiError("invalid_request", f"{where}.tool_call_id must name a tool call of an earlier assistant "
                       "message", param=f"{where}.tool_call_id")
    text = "".join(p["text"] for p in _text_parts(message.get("content"), where))
    try:
        result = json.loads(text)
    except (ValueError, RecursionError):
        result = None
    return {"functionResponse": {"name": name, "response": result if isinstance(result, dict) else {"content": text}}}


def _function_declarations(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise ApiError("invalid_request", "`tools` must be an array", param="tools")
    declarations = []
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise _refuse("tools", "may only hold function tools with a name")
        declaration = {k: function[k] for k in ("name", "description") if k in function}
        if function.get("parameters") is not None:
            declaration["parametersJsonSchema"] = function["parameters"]
        declarations.append(declaration)
    return declarations


def _tool_choice(choice: Any) -> dict[str, Any]:
    if isinstance(choice, str) and choice in _TOOL_CHOICE_MODES:
        return {"mode": _TOOL_CHOICE_MODES[choice]}
    function = choice.get("function") if isinstance(choice, dict) else None
    if isinstance(function, dict) and isinstance(function.get("name"), str):
        return {"mode": "ANY", "allowedFunctionNames": [function["name"]]}
    raise _refuse("tool_choice", "must be auto, none, required or a named function")


def finish_reason(gemini_reason: Any, called: bool) -> str:
    """OpenAI's finish_reason: `tool_calls` when the answer calls a function, else mapped from Gemini's."""
    if called and gemini_reason in (None, "STOP"):
        return "tool_calls"
    return _FINISH.get(gemini_reason, "stop") if isinstance(gemini_reason, str) else "stop"


def usage(metadata: Any) -> dict[str, Any] | None:
    """OpenAI's usage object from a usageMetadata (thoughts as reasoning tokens, cached as cached tokens)."""
    if not isinstance(metadata, dict):
        return None
    figures = {k: v if isinstance(v, int) and not isinstance(v, bool) else 0 for k, v in metadata.items()}
    prompt = figures.get("promptTokenCount", 0) + figures.get("toolUsePromptTokenCount", 0)
    thoughts = figures.get("thoughtsTokenCount", 0)
    completion = figures.get("candidatesTokenCount", 0) + thoughts
    return {
        "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": figures.get("cachedContentTokenCount", 0)},
        "completion_tokens_details": {"reasoning_tokens": thoughts},
    }


def _candidate(answer: dict[str, Any]) -> dict[str, Any]:
    candidates = answer.get("candidates")
    first = candidates[0] if isinstance(candidates, list) and candidates else None
    return first if isinstance(first, dict) else {}


def _parts(candidate: dict[str, Any]) -> list[dict[str, Any]]:
    content = candidate.get("content")
    parts = content.get("parts") if isinstance(content, dict) else None
    return [p for p in parts if isinstance(p, dict)] if isinstance(parts, list) else []


def _text(parts: list[dict[str, Any]]) -> str:
    """The answer's text; thought summaries (`thought: true`) are not part of it."""
    return "".join(p["text"] for p in parts if isinstance(p.get("text"), str) and not p.get("thought"))


def _tool_calls(parts: list[dict[str, Any]], first_index: int) -> list[dict[str, Any]]:
    calls = []
    for offset, part in enumerate(p for p in parts if isinstance(p.get("functionCall"), dict)):
        call = part["functionCall"]
        index = first_index + offset
        calls.append({
            "index": index, "id": call.get("id") or f"call_{index}", "type": "function",
            "function": {"name": call.get("name", ""), "arguments": json.dumps(call.get("args") or {})},
        })
    return calls


def chat_completion(answer: dict[str, Any], model: str, completion_id: str, created: int) -> dict[str, Any]:
    """A GenerateContentResponse as an OpenAI chat.completion (its first candidate: n is 1)."""
    candidate = _candidate(answer)
    parts = _parts(candidate)
    calls = [{k: v for k, v in call.items() if k != "index"} for call in _tool_calls(parts, 0)]
    message: dict[str, Any] = {"role": "assistant", "content": _text(parts) or None, "refusal": None}
    if calls:
        message["tool_calls"] = calls
    reason = candidate.get("finishReason") if candidate else "SAFETY"  # no candidate: the prompt was blocked
    completion = {
        "id": completion_id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason(reason, bool(calls))}],
    }
    if (figures := usage(answer.get("usageMetadata"))) is not None:
        completion["usage"] = figures
    return completion


class ChatChunks:
    """A Gemini stream's chunks as OpenAI chat.completion.chunk objects, in order: the role with the first delta,
    text and whole tool calls as they come, the finish reason with the last; then, if asked, the usage chunk."""

    def __init__(self, model: str, completion_id: str, created: int, include_usage: bool) -> None:
        self._head = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model}
        self._include_usage = include_usage
        self._role_sent = False
        self._calls = 0
        self._usage: dict[str, Any] | None = None

    def chunks(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        """The OpenAI chunks one Gemini stream chunk becomes (none if it carries neither content nor an end)."""
        self._usage = usage(event.get("usageMetadata")) or self._usage
        candidate = _candidate(event)
        parts = _parts(candidate)
        delta: dict[str, Any] = {}
        if not self._role_sent:
            delta["role"] = "assistant"
        if text := _text(parts):
            delta["content"] = text
        if calls := _tool_calls(parts, self._calls):
            delta["tool_calls"] = calls
            self._calls += len(calls)
        reason = candidate.get("finishReason") if candidate else ("SAFETY" if "promptFeedback" in event else None)
        if not (text or calls or reason):
            return []
        self._role_sent = True
        finish = finish_reason(reason, self._calls > 0) if reason else None
        return [{**self._head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}]

    def final(self) -> list[dict[str, Any]]:
        """After the last chunk: the usage chunk, if the client asked for it (`stream_options.include_usage`)."""
        if not self._include_usage:
            return []
        return [{**self._head, "choices": [], "usage": self._usage}]


def error_from_gemini(status: int, body: bytes) -> ApiError:
    """A Gemini error answer (or in-stream error, `{"error": {"code", "message", "status"}}`) as our error, whose
    body is OpenAI's shape: the provider's message and status kept, a refusal of the request the client's 400 (413,
    429), anything else the gateway's 502 (formats.base.provider_refusal, as for every translated call)."""
    return provider_refusal(status, error_message(body))
