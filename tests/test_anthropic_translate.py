"""OpenAI chat completions to an Anthropic model, translated both ways: the official `openai` SDK at both OpenAI base
URLs against the mock that speaks Anthropic's wire format; metered from Anthropic's usage on a real redis-server."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from proxy.upstream.formats.anthropic_translate import ChatAnswer, chat_completion

from .gateway_harness import TEST_KEY
from .mock_anthropic import (
    USAGE, cut_after_two_deltas, delta_event, end_events, endless, error_response, event, message, open_stream,
    start_events,
)
from .gateway_harness import token_cost
from .test_anthropic import ALL_INPUT, MODEL_CAP, Env, env  # noqa: F401  (env: the gateway fixture)

MODEL = "mock/claude"
MESSAGES = [{"role": "user", "content": "Hi"}]
BEARER = {"Authorization": f"Bearer {TEST_KEY}"}


def openai_sdk(env: Env, base: str = "/v1") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{env.url}{base}", api_key=TEST_KEY, max_retries=0)


def answer_with(content: list[dict[str, Any]], stop_reason: str) -> Any:
    async def answer(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        return web.json_response({**message(body["model"], (), USAGE), "content": content, "stop_reason": stop_reason})
    return answer


def tool_stream_events(model: str) -> list[bytes]:
    """A streamed answer: some text, then a tool call whose input comes in JSON fragments."""
    started = {**message(model, (), {**USAGE, "output_tokens": 1}), "content": [], "stop_reason": None}
    block = {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {}}
    return [
        event("message_start", {"type": "message_start", "message": started}),
        event("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        delta_event("Let me look."),
        event("content_block_stop", {"type": "content_block_stop", "index": 0}),
        event("content_block_start", {"type": "content_block_start", "index": 1, "content_block": block}),
        *(event("content_block_delta", {"type": "content_block_delta", "index": 1,
                                        "delta": {"type": "input_json_delta", "partial_json": part}})
          for part in ('{"city": ', '"Par', 'is"}')),
        event("content_block_stop", {"type": "content_block_stop", "index": 1}),
        event("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                                "usage": {"output_tokens": USAGE["output_tokens"]}}),
        event("message_stop", {"type": "message_stop"}),
    ]


@pytest.mark.parametrize("base", ["/v1", "/openai/v1"])
async def test_chat_is_translated_and_charged_anthropics_usage_to_the_credit(env: Env, base: str) -> None:
    messages = [
        {"role": "system", "content": "Be brief."}, {"role": "developer", "content": [{"type": "text", "text": "Be kind."}]},
        {"role": "user", "content": "Hi"}, {"role": "user", "content": [{"type": "text", "text": "there"}]},
    ]
    async with openai_sdk(env, base) as client:
        completion = await client.chat.completions.create(
            model=MODEL, messages=messages, temperature=0.3, top_p=0.9, stop="END", user="u-7",  # type: ignore[arg-type]
        )
    assert completion.object == "chat.completion" and completion.model == "claude-up"  # the model that answered
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == "Hello from Claude"
    assert choice.finish_reason == "stop"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (ALL_INPUT, USAGE["output_tokens"])
    assert completion.usage.total_tokens == ALL_INPUT + USAGE["output_tokens"]
    sent = env.upstream.received[0]
    assert sent.path == "/v1/messages" and sent.headers["anthropic-version"] == "2023-06-01"
    assert sent.body == {
        "model": "claude-up", "max_tokens": MODEL_CAP,  # none asked: the reservation's bound (the model's cap)
        "system": [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind."}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]}],
        "temperature": 0.3, "top_p": 0.9, "stop_sequences": ["END"], "metadata": {"user_id": "u-7"},
    }
    assert await env.spent() == token_cost(ALL_INPUT, USAGE["output_tokens"])


async def test_max_tokens_is_lowered_to_the_reservations_bound(env: Env) -> None:
    async with openai_sdk(env) as client:
        await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=100_000)  # type: ignore[arg-type]
        await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20)  # type: ignore[arg-type]
    assert [r.body["max_tokens"] for r in env.upstream.received] == [MODEL_CAP, 20]


@pytest.mark.parametrize("stop_reason, finish", [("stop_sequence", "stop"), ("max_tokens", "length"), ("end_turn", "stop")])
async def test_stop_reasons_become_finish_reasons(env: Env, stop_reason: str, finish: str) -> None:
    env.upstream.handler = answer_with([{"type": "text", "text": "a"}], stop_reason)
    async with openai_sdk(env) as client:
        completion = await client.chat.completions.create(model=MODEL, messages=MESSAGES, stop=["x", "y"])  # type: ignore[arg-type]
    assert completion.choices[0].finish_reason == finish
    assert env.upstream.received[0].body["stop_sequences"] == ["x", "y"]


async def test_stream_is_translated_to_chunks_with_the_usage_asked_for(env: Env) -> None:
    async with openai_sdk(env, "/openai/v1") as client:
        stream = await client.chat.completions.create(
            model=MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True},  # type: ignore[arg-type]
        )
        chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello from Claude"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (ALL_INPUT, USAGE["output_tokens"])
    assert all(c.object == "chat.completion.chunk" and c.model == "claude-up" for c in chunks)
    assert env.upstream.received[0].body["stream"] is True
    assert await env.spent() == token_cost(ALL_INPUT, USAGE["output_tokens"])


async def test_stream_without_include_usage_has_no_usage_chunk_and_ends_with_done(env: Env) -> None:
    body = {"model": MODEL, "messages": MESSAGES, "stream": True}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{env.url}/v1/chat/completions", json=body, headers=BEARER) as response:
            assert response.headers["Content-Type"].startswith("text/event-stream")
            raw = await response.read()
    events = raw.decode().strip().split("\n\n")
    assert events[-1] == "data: [DONE]"
    assert all('"usage"' not in e for e in events)
    assert await env.spent() == token_cost(ALL_INPUT, USAGE["output_tokens"])


async def test_tool_calls_and_images_are_translated_both_ways(env: Env) -> None:
    env.upstream.handler = answer_with(
        [{"type": "text", "text": "Checking."},
         {"type": "tool_use", "id": "toolu_2", "name": "weather", "input": {"city": "Oslo"}}], "tool_use")
    tools = [{"type": "function", "function": {"name": "weather", "description": "Weather now",
                                               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    messages = [
        {"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
        ]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "toolu_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},
        {"role": "user", "content": "And Oslo?"},
    ]
    async with openai_sdk(env) as client:
        completion = await client.chat.completions.create(
            model=MODEL, messages=messages, tools=tools, tool_choice="required", parallel_tool_calls=False,  # type: ignore[arg-type]
        )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Checking."
    call = choice.message.tool_calls[0]  # type: ignore[index]
    assert (call.id, call.function.name, json.loads(call.function.arguments)) == ("toolu_2", "weather", {"city": "Oslo"})
    sent = env.upstream.received[0].body
    assert sent["tools"] == [{"name": "weather", "description": "Weather now",
                              "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    assert sent["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}
    assert sent["messages"] == [
        {"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
            {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
        ]},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
                                     {"type": "text", "text": "And Oslo?"}]},
    ]
    assert await env.spent() == token_cost(ALL_INPUT, USAGE["output_tokens"])


@pytest.mark.parametrize("choice, sent", [
    ("auto", {"type": "auto"}), ("none", {"type": "none"}),
    ({"type": "function", "function": {"name": "weather"}}, {"type": "tool", "name": "weather"}),
])
async def test_tool_choices(env: Env, choice: Any, sent: dict[str, Any]) -> None:
    tools = [{"type": "function", "function": {"name": "weather"}}]
    status, _ = await env.post("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "tools": tools,
                                                        "tool_choice": choice}, BEARER)
    assert status == 200
    assert env.upstream.received[0].body["tool_choice"] == sent
    assert env.upstream.received[0].body["tools"] == [{"name": "weather", "input_schema": {"type": "object"}}]


async def test_streamed_tool_call_arrives_in_fragments_the_sdk_joins(env: Env) -> None:
    async def streams_a_call(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        response = await open_stream(request)
        for raw in tool_stream_events(body["model"]):
            await response.write(raw)
        return response

    env.upstream.handler = streams_a_call
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    async with openai_sdk(env) as client:
        async with client.chat.completions.stream(model=MODEL, messages=MESSAGES, tools=tools) as stream:  # type: ignore[arg-type]
            async for _ in stream:
                pass
            final = await stream.get_final_completion()
    choice = final.choices[0]
    assert choice.message.content == "Let me look." and choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]  # type: ignore[index]
    assert (call.id, call.function.name, call.function.arguments) == ("toolu_1", "weather", '{"city": "Paris"}')
    assert await env.spent() == token_cost(ALL_INPUT, USAGE["output_tokens"])


@pytest.mark.parametrize("extra, param", [
    ({"n": 2}, "n"),
    ({"logprobs": True}, "logprobs"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}}, "response_format"),
    ({"audio": {"voice": "alloy", "format": "mp3"}}, "audio"),
    ({"seed": 1}, "seed"),
    ({"temperature": 1.5}, "temperature"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "mp3"}}]}]},
     "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}]},
     "messages[0].content[0].image_url.url"),
])
async def test_what_cannot_be_translated_is_a_400_naming_it(env: Env, extra: dict[str, Any], param: str) -> None:
    status, answer = await env.post("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, **extra}, BEARER)
    assert status == 400
    assert answer["error"]["code"] == "unsupported_parameter" and answer["error"]["param"] == param
    assert answer["error"]["type"] == "invalid_request_error"
    assert env.upstream.received == [] and await env.spent() == 0


async def test_broken_messages_are_a_400(env: Env) -> None:
    for messages in ([], [{"role": "system", "content": "x"}], [{"role": "robot", "content": "x"}],
                     [{"role": "assistant", "tool_calls": [{"id": "t", "function": {"name": "f", "arguments": "[1]"}}]}],
                     [{"role": "assistant", "tool_calls": [{"id": "t", "function": {"name": "f", "arguments": {"a": 1}}}]}]):
        status, answer = await env.post("/v1/chat/completions", {"model": MODEL, "messages": messages}, BEARER)
        assert status == 400 and answer["error"]["code"] == "invalid_request", messages
    assert env.upstream.received == []


async def test_provider_errors_in_openais_shape_cost_nothing(env: Env) -> None:
    answers = iter([
        error_response(400, "invalid_request_error", "messages: roles must alternate"),
        error_response(529, "overloaded_error", "Overloaded"),
        error_response(401, "authentication_error", "invalid x-api-key"),
        # Last: the deployment then rests for the Retry-After (routing), so later calls would get a 503.
        error_response(429, "rate_limit_error", "Too many tokens", **{"retry-after": "7"}),
    ])

    async def scripted(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        return next(answers)

    env.upstream.handler = scripted
    async with openai_sdk(env) as client:
        with pytest.raises(openai.BadRequestError) as refused:
            await client.chat.completions.create(model=MODEL, messages=MESSAGES)  # type: ignore[arg-type]
        with pytest.raises(openai.APIStatusError) as overloaded:
            await client.chat.completions.create(model=MODEL, messages=MESSAGES)  # type: ignore[arg-type]
        with pytest.raises(openai.InternalServerError) as bad_key:  # the provider's key, not the caller's
            await client.chat.completions.create(model=MODEL, messages=MESSAGES)  # type: ignore[arg-type]
        with pytest.raises(openai.RateLimitError) as limited:
            await client.chat.completions.create(model=MODEL, messages=MESSAGES)  # type: ignore[arg-type]
    assert refused.value.body["code"] == "invalid_request"  # type: ignore[index]
    assert "roles must alternate" in refused.value.message
    assert overloaded.value.status_code == 502 and overloaded.value.body["upstream_status"] == 529  # type: ignore[index]
    assert bad_key.value.status_code == 502 and bad_key.value.body["upstream_status"] == 401  # type: ignore[index]
    assert limited.value.body["upstream_status"] == 429 and "Too many tokens" in limited.value.message  # type: ignore[index]
    assert limited.value.response.headers["retry-after"] == "7"
    assert await env.spent() == 0


async def test_error_event_midway_is_raised_by_the_sdk_and_charged_an_estimate(env: Env) -> None:
    async def fails(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        response = await open_stream(request)
        for raw in (*start_events(body["model"], USAGE), delta_event("one"),
                    event("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})):
            await response.write(raw)
        return response

    env.upstream.handler = fails
    texts = []
    async with openai_sdk(env) as client:
        with pytest.raises(openai.APIError) as failed:
            async for chunk in await client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True):  # type: ignore[arg-type]
                texts.append(chunk.choices[0].delta.content)
    assert texts == ["", "one"] and "Overloaded" in failed.value.message
    assert await env.spent() == token_cost(ALL_INPUT, 1)  # the input message_start reported, one delta relayed


async def test_stream_is_not_buffered(env: Env) -> None:
    seen_first = asyncio.Event()

    async def gated(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        response = await open_stream(request)
        await response.write(start_events(body["model"], USAGE)[0])  # message_start: the role chunk
        await asyncio.wait_for(seen_first.wait(), 5)  # a gateway that buffers never lets the client see it
        for raw in (*start_events(body["model"], USAGE)[1:], delta_event("one"), *end_events(USAGE)):
            await response.write(raw)
        return response

    env.upstream.handler = gated
    texts = []
    async with openai_sdk(env) as client:
        async for chunk in await client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True):  # type: ignore[arg-type]
            seen_first.set()
            texts.extend(c.delta.content for c in chunk.choices if c.delta.content)
    assert texts == ["one"]


async def test_stream_cut_midway_raises_and_is_charged_an_estimate(env: Env) -> None:
    env.upstream.handler = cut_after_two_deltas
    async with openai_sdk(env) as client:
        with pytest.raises(openai.APIError) as broken:
            async for _ in await client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True):  # type: ignore[arg-type]
                pass
    assert broken.value.body["code"] == "upstream_error"  # type: ignore[index]
    assert await env.spent() == token_cost(ALL_INPUT, 2)  # exact input (message_start), two deltas relayed


async def test_client_disconnect_closes_the_upstream_and_charges_an_estimate(env: Env) -> None:
    closed = asyncio.Event()
    env.upstream.handler = endless(closed)
    body = {"model": MODEL, "messages": MESSAGES, "stream": True, "max_tokens": 100}
    async with aiohttp.ClientSession() as http:
        response = await http.post(f"{env.url}/v1/chat/completions", json=body, headers=BEARER)
        async for line in response.content:
            if b"tick" in line:
                break
        response.close()  # hang up mid-stream
    await asyncio.wait_for(closed.wait(), 5)
    spent = await env.spent()
    assert token_cost(ALL_INPUT, 1) <= spent <= token_cost(len(json.dumps(body)), 100)  # exact input, some output, capped


def test_hostile_stream_events_translate_to_nothing_rather_than_fail() -> None:
    answer = ChatAnswer(MODEL, "chatcmpl-x", 0, include_usage=True)
    hostile = [
        {"type": "content_block_start", "index": [1], "content_block": {"type": "tool_use", "id": "t", "name": "f"}},
        {"type": "content_block_delta", "index": {"a": 1}, "delta": {"type": "input_json_delta", "partial_json": "{"}},
        {"type": "content_block_delta", "index": 7, "delta": {"type": "input_json_delta", "partial_json": "{"}},
        {"type": "content_block_delta", "index": 0, "delta": ["text_delta"]},
        {"type": "message_start", "message": "not a message"}, {"type": ["message_delta"]}, {"type": "ping"},
    ]
    chunks = [c for event in hostile for c in answer.chunks(event)]
    assert [c["choices"][0]["delta"] for c in chunks] == [{"role": "assistant", "content": ""}]
    (last,) = answer.final()
    assert last["usage"] == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0,
                             "prompt_tokens_details": {"cached_tokens": 0}}


@pytest.mark.parametrize("content", [1, True, {"type": "text", "text": "Hi"}, None])
def test_an_answer_whose_content_is_not_an_array_has_no_text_rather_than_a_crash(content: Any) -> None:
    # A broken provider's `content: 1` once raised a TypeError (not iterable) in the translation.
    completion = chat_completion({"content": content, "stop_reason": "end_turn"}, "mock/claude", "chatcmpl-1", 1)
    assert completion["choices"][0]["message"] == {"role": "assistant", "content": None, "refusal": None}
