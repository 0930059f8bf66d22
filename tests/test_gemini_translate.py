"""OpenAI chat <-> Gemini translation, as pure functions: what is mapped, what is refused."""

from __future__ import annotations

import json
from typing import Any

import pytest

from proxy.errors import ApiError
from proxy.upstream.formats import gemini_translate as translate

PNG = "iVBORw0KGgo="


def test_messages_become_contents_with_the_system_prompt_apart() -> None:
    body = {"model": "m", "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": [{"type": "text", "text": "Use French."}]},
        {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                     {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}]},
        {"role": "assistant", "content": "A logo."},
        {"role": "user", "content": "Thanks"},
    ], "temperature": 0.2, "top_p": 0.9, "max_tokens": 50, "stop": "END", "seed": 7, "user": "u1"}
    assert translate.chat_request(body) == {
        "systemInstruction": {"parts": [{"text": "Be brief."}, {"text": "Use French."}]},
        "contents": [
            {"role": "user", "parts": [{"text": "What is this?"}, {"inlineData": {"mimeType": "image/png", "data": PNG}}]},
            {"role": "model", "parts": [{"text": "A logo."}]},
            {"role": "user", "parts": [{"text": "Thanks"}]},
        ],
        "generationConfig": {"temperature": 0.2, "topP": 0.9, "seed": 7, "maxOutputTokens": 50, "stopSequences": ["END"]},
    }


def test_tools_calls_and_results_map_to_function_declarations_calls_and_responses() -> None:
    weather = {"type": "object", "properties": {"city": {"type": "string"}}}
    body = {"model": "m", "tool_choice": {"type": "function", "function": {"name": "weather"}},
            "tools": [{"type": "function", "function": {"name": "weather", "description": "Now", "parameters": weather}}],
            "messages": [
                {"role": "user", "content": "Weather in Paris and Rome?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}},
                    {"id": "c2", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Rome"}'}}]},
                {"role": "tool", "tool_call_id": "c1", "content": '{"celsius": 20}'},
                {"role": "tool", "tool_call_id": "c2", "content": "sunny"},
            ]}
    out = translate.chat_request(body)
    assert out["tools"] == [{"functionDeclarations": [{"name": "weather", "description": "Now", "parametersJsonSchema": weather}]}]
    assert out["toolConfig"] == {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["weather"]}}
    assert out["contents"][1:] == [
        {"role": "model", "parts": [{"functionCall": {"name": "weather", "args": {"city": "Paris"}}},
                                    {"functionCall": {"name": "weather", "args": {"city": "Rome"}}}]},
        {"role": "user", "parts": [{"functionResponse": {"name": "weather", "response": {"celsius": 20}}},
                                   {"functionResponse": {"name": "weather", "response": {"content": "sunny"}}}]},
    ]


@pytest.mark.parametrize("extra, param", [
    ({"n": 2}, "n"),
    ({"logprobs": True}, "logprobs"),
    ({"audio": {"voice": "alloy"}}, "audio"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"tools": [{"type": "web_search"}]}, "tools"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x.example/a.png"}}]}]},
     "messages[0].content[0].image_url.url"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}, "messages[0].content[0].type"),
    ({"messages": [{"role": "tool", "tool_call_id": "nope", "content": "x"}]}, "messages[0].tool_call_id"),
    ({"messages": [{"role": "tool", "tool_call_id": {"id": "c1"}, "content": "x"}]}, "messages[0].tool_call_id"),
    ({"messages": [{"role": "tool", "tool_call_id": ["c1"], "content": "x"}]}, "messages[0].tool_call_id"),
    ({"messages": [{"role": "system", "content": "only"}]}, "messages"),
    ({"messages": [{"role": "assistant", "tool_calls": [  # arguments as an object, not its JSON text
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"city": "Paris"}}}]}]}, "messages[0].tool_calls"),
])
def test_what_cannot_be_translated_is_a_400_naming_it(extra: dict[str, Any], param: str) -> None:
    with pytest.raises(ApiError) as refused:
        translate.chat_request({"model": "m", "messages": [{"role": "user", "content": "Hi"}], **extra})
    assert refused.value.status == 400 and refused.value.details["param"] == param


def test_an_answer_becomes_a_chat_completion_with_usage_and_finish_reason() -> None:
    answer = {"candidates": [{"content": {"role": "model", "parts": [
        {"text": "thinking...", "thought": True}, {"text": "Hello"},
        {"functionCall": {"name": "weather", "args": {"city": "Paris"}}}]}, "finishReason": "STOP"}],
        "usageMetadata": {"promptTokenCount": 10, "candidatesTokenCount": 5, "thoughtsTokenCount": 3,
                          "cachedContentTokenCount": 4, "totalTokenCount": 18}}
    completion = translate.chat_completion(answer, "google/g", "chatcmpl-1", 1700000000)
    assert completion["choices"] == [{"index": 0, "logprobs": None, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": "Hello", "refusal": None, "tool_calls": [
            {"id": "call_0", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]}}]
    assert completion["usage"] == {"prompt_tokens": 10, "completion_tokens": 8, "total_tokens": 18,
                                   "prompt_tokens_details": {"cached_tokens": 4},
                                   "completion_tokens_details": {"reasoning_tokens": 3}}
    assert completion["model"] == "google/g" and completion["object"] == "chat.completion"


@pytest.mark.parametrize("gemini, openai", [("STOP", "stop"), ("MAX_TOKENS", "length"), ("SAFETY", "content_filter"),
                                            ("RECITATION", "content_filter"), ("OTHER", "stop")])
def test_finish_reasons(gemini: str, openai: str) -> None:
    assert translate.finish_reason(gemini, False) == openai


def test_a_blocked_prompt_is_a_content_filter_finish() -> None:
    blocked = {"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": {"promptTokenCount": 3}}
    assert translate.chat_completion(blocked, "m", "c", 0)["choices"][0]["finish_reason"] == "content_filter"


def test_stream_chunks_carry_the_role_first_the_finish_last_then_the_usage_if_asked() -> None:
    answer = translate.ChatChunks("google/g", "chatcmpl-1", 1700000000, include_usage=True)
    first = answer.chunks({"candidates": [{"content": {"parts": [{"text": "Hel"}]}}], "usageMetadata": {"promptTokenCount": 4}})
    last = answer.chunks({"candidates": [{"content": {"parts": [{"text": "lo"}]}, "finishReason": "MAX_TOKENS"}],
                          "usageMetadata": {"promptTokenCount": 4, "candidatesTokenCount": 2}})
    assert [c["choices"][0]["delta"] for c in first + last] == [{"role": "assistant", "content": "Hel"}, {"content": "lo"}]
    assert [c["choices"][0]["finish_reason"] for c in first + last] == [None, "length"]
    (usage,) = answer.final()
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 2
    assert translate.ChatChunks("m", "c", 0, include_usage=False).final() == []


def test_provider_refusals_keep_their_status_and_message() -> None:
    body = json.dumps({"error": {"code": 400, "message": "bad contents", "status": "INVALID_ARGUMENT"}}).encode()
    refused = translate.error_from_gemini(400, body)
    assert (refused.code, refused.details["upstream_status"]) == ("invalid_request", 400)
    assert "bad contents" in refused.message
    assert translate.error_from_gemini(429, body).code == "rate_limit"
    assert translate.error_from_gemini(403, b"not json").code == "upstream_error"
