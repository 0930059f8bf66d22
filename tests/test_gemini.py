"""The Gemini API through the gateway (`/gemini/v1beta/models/...`), driven by the official `google-genai` SDK
against a mock that speaks the real wire format; metered on a real redis-server."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import openai
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from google import genai
from google.genai import errors as genai_errors
from google.genai import types

from proxy.server import RunningServer

from .gateway_harness import (
    PROVIDER_KEY, TEST_KEY, TOKEN_PRICE, MeteredGateway, budget_policy, gateway_config, start_gateway, token_cost, with_text_model, write_policy,
)
from .mock_gemini import (
    COUNTED_TOKENS, USAGE, MockGemini, error_body, error_response, last_event, open_stream, response, stream_events,
    text_event,
)
from .mock_provider import Handler, MockProvider

BUDGET = 1_000_000
MODEL_CAP = 500  # mock/gemini's max_output_tokens
MODEL = "mock/gemini"
POLICY = budget_policy(BUDGET, {MODEL: TOKEN_PRICE})
CONTENTS = [{"role": "user", "parts": [{"text": "Hi"}]}]
AUTH = {"x-goog-api-key": TEST_KEY}
GENERATE = f"/gemini/v1beta/models/{MODEL}:generateContent"
STREAM = f"/gemini/v1beta/models/{MODEL}:streamGenerateContent?alt=sse"
INPUT = USAGE["promptTokenCount"] + USAGE["toolUsePromptTokenCount"]
OUTPUT = USAGE["candidatesTokenCount"] + USAGE["thoughtsTokenCount"]


class Env(MeteredGateway):
    def __init__(self, url: str, upstream: MockGemini) -> None:
        super().__init__(url, AUTH)
        self.upstream = upstream

    def sdk(self, api_key: str = TEST_KEY) -> genai.client.AsyncClient:
        options = types.HttpOptions(base_url=f"{self.url}/gemini", api_version="v1beta")
        return genai.Client(api_key=api_key, http_options=options).aio


@pytest.fixture
async def env(provider: MockProvider, gateway_env: None, tmp_path: Path, redis_url: str) -> AsyncIterator[Env]:
    upstream = await MockGemini().start()
    config = with_text_model(
        gateway_config(provider.url, write_policy(tmp_path / "policies", POLICY),
                       store={"kind": "redis", "redis_url": redis_url}),
        "google", "gemini", f"{upstream.url}/v1beta", MODEL, "gemini-up", MODEL_CAP,
    )
    async with aioredis.from_url(redis_url) as client:
        await client.flushdb()
    server: RunningServer = await start_gateway(config)
    yield Env(server.url, upstream)
    await server.stop()
    await upstream.stop()


async def test_sdk_generate_content_is_relayed_and_charged_its_usage_to_the_credit(env: Env) -> None:
    async with env.sdk() as client:
        answer = await client.models.generate_content(model=MODEL, contents="Hi")
    assert answer.text == "Hello from Gemini"
    assert answer.usage_metadata is not None and answer.usage_metadata.thoughts_token_count == 6
    sent = env.upstream.received[0]
    assert sent.path == "/v1beta/models/gemini-up:generateContent"
    # No output limit asked: the model's cap is sent, the bound the reservation was taken for.
    assert sent.body == {"contents": CONTENTS, "generationConfig": {"maxOutputTokens": MODEL_CAP}}
    # The provider's credential, never the caller's.
    assert sent.headers["x-goog-api-key"] == PROVIDER_KEY and "Authorization" not in sent.headers
    assert TEST_KEY not in json.dumps(sent.headers) and env.upstream.received[0].query == {}
    assert await env.spent() == token_cost(INPUT, OUTPUT)


async def test_sdk_stream_gets_the_chunks_and_is_charged_the_last_usage(env: Env) -> None:
    async with env.sdk() as client:
        stream = await client.models.generate_content_stream(model=MODEL, contents="Hi")
        chunks = [chunk async for chunk in stream]
    assert [chunk.text for chunk in chunks] == ["Hello", " from", " Gemini"]
    last = chunks[-1]
    assert last.candidates and last.candidates[0].finish_reason == types.FinishReason.STOP
    assert env.upstream.received[0].path == "/v1beta/models/gemini-up:streamGenerateContent"
    assert env.upstream.received[0].query == {"alt": "sse"}
    assert await env.spent() == token_cost(INPUT, OUTPUT)


async def test_stream_bytes_are_exactly_what_the_provider_sent(env: Env) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{env.url}{STREAM}", json={"contents": CONTENTS}, headers=AUTH) as response:
            assert response.headers["Content-Type"].startswith("text/event-stream")
            relayed = await response.read()
    assert relayed == b"".join(stream_events("gemini-up", env.upstream.texts))


@pytest.mark.parametrize("asked, sent, reserved_output", [
    ({"maxOutputTokens": 100_000, "temperature": 0.5}, {"maxOutputTokens": MODEL_CAP, "temperature": 0.5}, MODEL_CAP),
    ({"maxOutputTokens": 100, "candidateCount": 3}, {"maxOutputTokens": 100, "candidateCount": 3}, 3 * 100),
])
async def test_max_output_tokens_is_lowered_to_the_model_cap_and_bounds_the_reservation_per_candidate(
    env: Env, asked: dict[str, Any], sent: dict[str, Any], reserved_output: int,
) -> None:
    body = {"contents": CONTENTS, "generationConfig": asked}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{env.url}{GENERATE}", json=body, headers=AUTH) as response:
            assert response.status == 200
            balance_after_hold = int(response.headers["X-Credits-Balance"])
    assert env.upstream.received[0].body["generationConfig"] == sent
    assert balance_after_hold == BUDGET - token_cost(len(json.dumps(body)), reserved_output)


@pytest.mark.parametrize("config", [{"maxOutputTokens": 0}, {"maxOutputTokens": "100"}, {"maxOutputTokens": 2**31},
                                    {"candidateCount": -1}, "fast"])
async def test_broken_generation_config_is_a_400_in_googles_shape(env: Env, config: Any) -> None:
    status, answer = await env.post(GENERATE, {"contents": CONTENTS, "generationConfig": config})
    assert status == 400
    error = answer["error"]
    assert error["code"] == 400 and error["status"] == "INVALID_ARGUMENT"
    assert error["details"][0]["reason"] == "invalid_request" and error["details"][0]["domain"] == "edge-proxy"
    assert env.upstream.received == [] and await env.spent() == 0


@pytest.mark.parametrize("body, named", [
    ({"contents": CONTENTS, "tools": [{"googleSearch": {}}]}, "googleSearch"),
    ({"contents": CONTENTS, "cachedContent": "cachedContents/abc"}, "cachedContent"),
])
async def test_features_the_gateway_cannot_bound_are_refused(env: Env, body: dict[str, Any], named: str) -> None:
    status, answer = await env.post(GENERATE, body)
    assert status == 400 and named in answer["error"]["message"]
    assert env.upstream.received == []


async def test_a_stream_without_alt_sse_is_refused_naming_it(env: Env) -> None:
    status, answer = await env.post(STREAM.removesuffix("?alt=sse"), {"contents": CONTENTS})
    assert status == 400 and "alt=sse" in answer["error"]["message"]
    assert answer["error"]["details"][0]["metadata"] == {"param": "alt"}
    assert env.upstream.received == []


async def test_count_tokens_is_relayed_and_charged_only_per_request(env: Env) -> None:
    async with env.sdk() as client:
        counted = await client.models.count_tokens(model=MODEL, contents="Hi")
    assert counted.total_tokens == COUNTED_TOKENS
    sent = env.upstream.received[0]
    assert sent.path == "/v1beta/models/gemini-up:countTokens" and sent.body == {"contents": CONTENTS}
    assert await env.spent() == token_cost(0, 0)


async def test_provider_errors_reach_the_sdk_and_cost_nothing(env: Env) -> None:
    quota = {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "7s"}
    answers = iter([
        error_response(500, "INTERNAL", "An internal error has occurred."),
        error_response(400, "INVALID_ARGUMENT", "* GenerateContentRequest.contents: contents is not specified\n"),
        # Last: the deployment then rests (routing), so later calls would get a 503.
        error_response(429, "RESOURCE_EXHAUSTED", "You exceeded your current quota.", quota),
    ])

    async def scripted(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        return next(answers)

    env.upstream.handler = scripted
    async with env.sdk() as client:
        with pytest.raises(genai_errors.ServerError) as failed:
            await client.models.generate_content(model=MODEL, contents="Hi")
        with pytest.raises(genai_errors.ClientError) as refused:
            await client.models.generate_content(model=MODEL, contents="Hi")
        with pytest.raises(genai_errors.ClientError) as limited:
            await client.models.generate_content(model=MODEL, contents="Hi")
    # A 5xx is the gateway's 502 (in Google's shape, with the provider's status); 4xx come as the provider sent them.
    assert failed.value.code == 502 and failed.value.status == "UNAVAILABLE"
    info = failed.value.details["error"]["details"][0]
    assert info["reason"] == "upstream_error" and info["metadata"]["upstream_status"] == "500"
    assert refused.value.code == 400 and refused.value.details == error_body(
        400, "INVALID_ARGUMENT", "* GenerateContentRequest.contents: contents is not specified\n")
    assert limited.value.code == 429 and limited.value.status == "RESOURCE_EXHAUSTED"
    assert limited.value.details["error"]["details"] == [quota]
    assert await env.spent() == 0


async def test_gateway_errors_use_googles_shape_with_our_code(env: Env) -> None:
    async with env.sdk(api_key="sk_test_" + "x" * 40) as stranger:
        with pytest.raises(genai_errors.ClientError) as refused:
            await stranger.models.generate_content(model=MODEL, contents="Hi")
    assert refused.value.code == 401 and refused.value.status == "UNAUTHENTICATED"
    assert refused.value.details["error"]["details"][0]["reason"] == "invalid_api_key"
    async with env.sdk() as client:
        with pytest.raises(genai_errors.ClientError) as missing:
            await client.models.generate_content(model="mock/none", contents="Hi")
        with pytest.raises(genai_errors.ClientError) as other_format:
            await client.models.generate_content(model="mock/chat", contents="Hi")
    assert missing.value.code == 404 and missing.value.status == "NOT_FOUND"
    assert "openai wire format" in other_format.value.message
    status, answer = await env.post("/gemini/v1beta/models/mock/gemini:embedContent", {})
    assert status == 404 and answer["error"]["status"] == "NOT_FOUND"
    assert env.upstream.received == []


async def test_our_credential_is_accepted_as_the_sdk_header_a_key_query_or_bearer(env: Env) -> None:
    body = {"contents": CONTENTS}
    assert (await env.post(f"{GENERATE}?key={TEST_KEY}", body, {}))[0] == 200
    assert (await env.post(GENERATE, body, {"Authorization": f"Bearer {TEST_KEY}"}))[0] == 200
    assert (await env.post(f"{GENERATE}?key={TEST_KEY}", body, AUTH))[0] == 200
    status, answer = await env.post(f"{GENERATE}?key=sk_test_{'y' * 40}", body, AUTH)
    assert status == 400 and "x-goog-api-key and ?key= carry different credentials" in answer["error"]["message"]
    status, answer = await env.post(f"{GENERATE}?key={TEST_KEY}&key={TEST_KEY}", body, {})
    assert status == 400 and "exactly one" in answer["error"]["message"]
    assert (await env.post(GENERATE, body, {}))[0] == 401
    # Our id with its slash encoded reaches the same model.
    assert (await env.post("/gemini/v1beta/models/mock%2Fgemini:generateContent", body))[0] == 200
    assert all(r.headers["x-goog-api-key"] == PROVIDER_KEY for r in env.upstream.received)
    assert all(r.query == {} for r in env.upstream.received)  # our ?key= never goes upstream


def gated(seen_first: asyncio.Event) -> Handler:
    """A stream whose second chunk waits until the client has seen the first."""
    async def answer(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        stream = await open_stream(request)
        await stream.write(text_event("gemini-up", "one"))
        await asyncio.wait_for(seen_first.wait(), 5)  # a gateway that buffers never lets the client see "one"
        await stream.write(last_event("gemini-up", "two"))
        return stream
    return answer


async def cut_after_two_chunks(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
    stream = await open_stream(request)
    for text in ("one", "two"):
        await stream.write(text_event("gemini-up", text))
    await asyncio.sleep(0.1)
    assert request.transport is not None
    request.transport.close()  # the provider's connection breaks mid-stream
    return stream


def endless(closed: asyncio.Event) -> Handler:
    """A stream that never ends; `closed` is set when the gateway hangs up on it."""
    async def answer(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        stream = await open_stream(request)
        try:
            while True:
                await stream.write(text_event("gemini-up", "tick"))
                await asyncio.sleep(0.05)
        except (asyncio.CancelledError, ConnectionResetError):
            closed.set()
            raise
    return answer


async def hang_up_after_the_first_event(url: str, body: dict[str, Any], headers: dict[str, str]) -> None:
    async with aiohttp.ClientSession() as http:
        answer = await http.post(url, json=body, headers=headers)
        async for line in answer.content:
            if line.startswith(b"data: "):
                break
        answer.close()


async def test_stream_is_not_buffered(env: Env) -> None:
    seen_first = asyncio.Event()
    env.upstream.handler = gated(seen_first)
    texts = []
    async with env.sdk() as client:
        async for chunk in await client.models.generate_content_stream(model=MODEL, contents="Hi"):
            texts.append(chunk.text)
            seen_first.set()
    assert texts == ["one", "two"]


async def test_stream_cut_midway_is_an_error_event_and_charged_an_estimate(env: Env) -> None:
    env.upstream.handler = cut_after_two_chunks
    texts = []
    async with env.sdk() as client:
        with pytest.raises(genai_errors.APIError) as broken:
            async for chunk in await client.models.generate_content_stream(model=MODEL, contents="Hi"):
                texts.append(chunk.text)
    assert texts == ["one", "two"]
    assert broken.value.code == 502 and broken.value.details["error"]["details"][0]["reason"] == "upstream_error"
    # The prompt count the chunks reported is exact; the output is estimated from the two chunks relayed.
    assert await env.spent() == token_cost(USAGE["promptTokenCount"], 2)


async def test_client_disconnect_closes_the_upstream_and_charges_an_estimate(env: Env) -> None:
    closed = asyncio.Event()
    env.upstream.handler = endless(closed)
    body = {"contents": CONTENTS, "generationConfig": {"maxOutputTokens": 100}}
    await hang_up_after_the_first_event(f"{env.url}{STREAM}", body, AUTH)
    await asyncio.wait_for(closed.wait(), 5)
    spent = await env.spent()
    assert token_cost(USAGE["promptTokenCount"], 1) <= spent <= token_cost(len(json.dumps(body)), 100)  # exact input, capped


async def test_me_lists_models_by_provider_kind(env: Env) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{env.url}/v1/me", headers={"Authorization": f"Bearer {TEST_KEY}"}) as r:
            me = await r.json()
    assert me["models_by_provider_kind"]["gemini"] == [MODEL]


# OpenAI chat completions to the Gemini model, translated (the openai SDK at both OpenAI base URLs).

MESSAGES = [{"role": "user", "content": "Hi"}]


def openai_sdk(env: Env, base: str = "/v1") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{env.url}{base}", api_key=TEST_KEY, max_retries=0)


@pytest.mark.parametrize("base", ["/v1", "/openai/v1"])
async def test_openai_chat_is_translated_and_charged_geminis_usage_to_the_credit(env: Env, base: str) -> None:
    async with openai_sdk(env, base) as client:
        completion = await client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0.3)  # type: ignore[arg-type]
    choice = completion.choices[0]
    assert choice.message.content == "Hello from Gemini" and choice.finish_reason == "stop"
    assert completion.model == "gemini-up" and completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (INPUT, OUTPUT)
    sent = env.upstream.received[0]
    assert sent.path == "/v1beta/models/gemini-up:generateContent"
    assert sent.body == {"contents": CONTENTS, "generationConfig": {"temperature": 0.3, "maxOutputTokens": MODEL_CAP}}
    assert sent.headers["x-goog-api-key"] == PROVIDER_KEY and TEST_KEY not in json.dumps(sent.headers)
    assert await env.spent() == token_cost(INPUT, OUTPUT)


async def test_openai_stream_is_translated_to_chunks_with_the_usage_asked_for(env: Env) -> None:
    async with openai_sdk(env) as client:
        stream = await client.chat.completions.create(
            model=MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True})  # type: ignore[arg-type]
        chunks = [chunk async for chunk in stream]
    texts = [c.choices[0].delta.content for c in chunks if c.choices]
    assert texts == ["Hello", " from", " Gemini"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices] == [None, None, "stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (INPUT, OUTPUT)
    assert env.upstream.received[0].path.endswith(":streamGenerateContent")
    assert env.upstream.received[0].query == {"alt": "sse"}
    assert await env.spent() == token_cost(INPUT, OUTPUT)


async def test_openai_tool_call_and_image_are_translated_both_ways(env: Env) -> None:
    async def calls_a_function(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        part = {"functionCall": {"name": "weather", "args": {"city": "Paris"}}}
        return web.json_response(response("gemini-up", [part], USAGE))

    env.upstream.handler = calls_a_function
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    tool = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}
    async with openai_sdk(env) as client:
        completion = await client.chat.completions.create(
            model=MODEL, tools=[tool],  # type: ignore[list-item]
            messages=[{"role": "user", "content": [{"type": "text", "text": "Weather where this is?"}, image]}])  # type: ignore[list-item]
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls is not None
    call = choice.message.tool_calls[0]
    assert call.function.name == "weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    sent = env.upstream.received[0].body
    assert sent["contents"][0]["parts"][1] == {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}}
    assert sent["tools"] == [{"functionDeclarations": [{"name": "weather", "parametersJsonSchema": {"type": "object"}}]}]
    assert await env.spent() == token_cost(INPUT, OUTPUT)


async def test_openai_errors_refusals_and_provider_errors_in_openais_shape(env: Env) -> None:
    answers = iter([
        error_response(400, "INVALID_ARGUMENT", "* GenerateContentRequest.contents: contents is not specified\n"),
        error_response(429, "RESOURCE_EXHAUSTED", "You exceeded your current quota."),
    ])

    async def scripted(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        return next(answers)

    env.upstream.handler = scripted
    async with openai_sdk(env) as client:
        with pytest.raises(openai.BadRequestError) as untranslatable:
            await client.chat.completions.create(model=MODEL, messages=MESSAGES, n=2)  # type: ignore[arg-type]
        assert env.upstream.received == []
        with pytest.raises(openai.BadRequestError) as refused:
            await client.chat.completions.create(model=MODEL, messages=MESSAGES)  # type: ignore[arg-type]
        with pytest.raises(openai.RateLimitError) as limited:
            await client.chat.completions.create(model=MODEL, messages=MESSAGES)  # type: ignore[arg-type]
    assert untranslatable.value.param == "n" and "Gemini" in untranslatable.value.message
    assert "contents is not specified" in refused.value.message
    assert isinstance(refused.value.body, dict) and refused.value.body["upstream_status"] == 400
    assert "exceeded your current quota" in limited.value.message
    assert await env.spent() == 0


async def test_openai_stream_is_not_buffered(env: Env) -> None:
    seen_first = asyncio.Event()
    env.upstream.handler = gated(seen_first)
    texts = []
    async with openai_sdk(env) as client:
        async for chunk in await client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True):  # type: ignore[arg-type]
            texts.append(chunk.choices[0].delta.content)
            seen_first.set()
    assert texts == ["one", "two"]


async def test_openai_stream_cut_midway_raises_and_is_charged_an_estimate(env: Env) -> None:
    env.upstream.handler = cut_after_two_chunks
    texts = []
    async with openai_sdk(env) as client:
        with pytest.raises(openai.APIError) as broken:
            async for chunk in await client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True):  # type: ignore[arg-type]
                texts.append(chunk.choices[0].delta.content)
    assert texts == ["one", "two"] and "closed the stream" in broken.value.message
    assert await env.spent() == token_cost(USAGE["promptTokenCount"], 2)


async def test_openai_client_disconnect_closes_the_upstream(env: Env) -> None:
    closed = asyncio.Event()
    env.upstream.handler = endless(closed)
    body = {"model": MODEL, "messages": MESSAGES, "stream": True, "max_tokens": 100}
    await hang_up_after_the_first_event(f"{env.url}/v1/chat/completions", body, {"Authorization": f"Bearer {TEST_KEY}"})
    await asyncio.wait_for(closed.wait(), 5)
    assert token_cost(USAGE["promptTokenCount"], 1) <= await env.spent() <= token_cost(len(json.dumps(body)), 100)


async def test_keepalives_of_a_quiet_stream_do_not_break_the_sdk(
    provider: MockProvider, gateway_env: None, tmp_path: Path,
) -> None:
    """google-genai reads a line that is neither `data:` nor blank as a JSON error: a `: ping` comment broke it."""
    upstream = await MockGemini().start()

    async def quiet(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        stream = await open_stream(request)
        await stream.write(text_event("gemini-up", "one"))
        await asyncio.sleep(0.3)  # several keepalives go out meanwhile
        await stream.write(last_event("gemini-up", "two"))
        return stream

    upstream.handler = quiet
    config = with_text_model(gateway_config(provider.url, write_policy(tmp_path / "policies", POLICY),
                                            server={"sse_keepalive_s": 0.05}),
                             "google", "gemini", f"{upstream.url}/v1beta", MODEL, "gemini-up", MODEL_CAP)
    server = await start_gateway(config)
    try:
        async with Env(server.url, upstream).sdk() as client:
            texts = [chunk.text async for chunk in await client.models.generate_content_stream(model=MODEL, contents="Hi")]
        assert texts == ["one", "two"]
    finally:
        await server.stop()
        await upstream.stop()
