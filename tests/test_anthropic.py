"""Anthropic's Messages API through the gateway (`/anthropic/v1/...`), driven by the official `anthropic` SDK
against a mock that speaks the real wire format; metered on a real redis-server."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import anthropic
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from proxy.config import ConfigError, parse_config
from proxy.server import RunningServer

from .gateway_harness import (
    PROVIDER_KEY, TEST_KEY, TOKEN_PRICE, MeteredGateway, budget_policy, gateway_config, start_gateway, token_cost, with_text_model, write_policy,
)
from .mock_anthropic import (
    COUNTED_TOKENS, USAGE, MockAnthropic, cut_after_two_deltas, delta_event, endless, end_events, error_response, open_stream, start_events,
    stream_events,
)
from .mock_provider import MockProvider

BUDGET = 1_000_000
MODEL_CAP = 500  # mock/claude's max_output_tokens
POLICY = budget_policy(BUDGET, {"mock/claude": TOKEN_PRICE})
MESSAGES = [{"role": "user", "content": "Hi"}]
ALL_INPUT = USAGE["input_tokens"] + USAGE["cache_creation_input_tokens"] + USAGE["cache_read_input_tokens"]
AUTH = {"x-api-key": TEST_KEY, "anthropic-version": "2023-06-01"}


class Env(MeteredGateway):
    def __init__(self, url: str, upstream: MockAnthropic) -> None:
        super().__init__(url, AUTH)
        self.upstream = upstream

    def sdk(self, api_key: str = TEST_KEY) -> anthropic.AsyncAnthropic:
        return anthropic.AsyncAnthropic(base_url=f"{self.url}/anthropic", api_key=api_key, max_retries=0)


def config_with_claude(openai_url: str, claude_url: str, policies: Path, **overrides: Any) -> dict[str, Any]:
    config = gateway_config(openai_url, policies, **overrides)
    return with_text_model(config, "claude", "anthropic", claude_url, "mock/claude", "claude-up", MODEL_CAP)


@pytest.fixture
async def env(provider: MockProvider, gateway_env: None, tmp_path: Path, redis_url: str) -> AsyncIterator[Env]:
    async with aioredis.from_url(redis_url) as client:
        await client.flushdb()
    upstream = await MockAnthropic().start()
    config = config_with_claude(provider.url, upstream.url, write_policy(tmp_path / "policies", POLICY),
                                store={"kind": "redis", "redis_url": redis_url})
    server: RunningServer = await start_gateway(config)
    yield Env(server.url, upstream)
    await server.stop()
    await upstream.stop()


async def test_sdk_message_is_relayed_and_charged_its_usage_to_the_credit(env: Env) -> None:
    async with env.sdk() as client:
        answer = await client.messages.create(model="mock/claude", max_tokens=100, messages=MESSAGES)
    assert answer.content[0].text == "Hello from Claude" and answer.usage.input_tokens == USAGE["input_tokens"]
    sent = env.upstream.received[0]
    assert sent.path == "/v1/messages"
    assert sent.body == {"model": "claude-up", "max_tokens": 100, "messages": MESSAGES}
    # The provider's credential, never the caller's; the SDK's API version passed through.
    assert sent.headers["x-api-key"] == PROVIDER_KEY and "Authorization" not in sent.headers
    assert TEST_KEY not in json.dumps(sent.headers)
    assert sent.headers["anthropic-version"] == anthropic._constants.ANTHROPIC_API_VERSION
    assert await env.spent() == token_cost(ALL_INPUT, USAGE["output_tokens"])


async def test_sdk_stream_gets_the_events_and_is_charged_their_usage(env: Env) -> None:
    async with env.sdk() as client:
        async with client.messages.stream(model="mock/claude", max_tokens=100, messages=MESSAGES) as stream:
            texts = [text async for text in stream.text_stream]
            final = await stream.get_final_message()
    assert texts == ["Hello", " from", " Claude"]
    assert final.usage.output_tokens == USAGE["output_tokens"] and final.stop_reason == "end_turn"
    assert env.upstream.received[0].body["stream"] is True
    assert await env.spent() == token_cost(ALL_INPUT, USAGE["output_tokens"])


async def test_stream_bytes_are_exactly_what_the_provider_sent(env: Env) -> None:
    async with aiohttp.ClientSession() as http:
        body = {"model": "mock/claude", "max_tokens": 100, "messages": MESSAGES, "stream": True}
        async with http.post(f"{env.url}/anthropic/v1/messages", json=body, headers=AUTH) as response:
            assert response.headers["Content-Type"].startswith("text/event-stream")
            relayed = await response.read()
    assert relayed == b"".join(stream_events("claude-up", env.upstream.texts, USAGE))


async def test_max_tokens_is_lowered_to_the_model_cap_and_bounds_the_reservation(env: Env) -> None:
    body = {"model": "mock/claude", "max_tokens": 100_000, "messages": MESSAGES}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{env.url}/anthropic/v1/messages", json=body, headers=AUTH) as response:
            assert response.status == 200
            balance_after_hold = int(response.headers["X-Credits-Balance"])
    assert env.upstream.received[0].body["max_tokens"] == MODEL_CAP
    assert balance_after_hold == BUDGET - token_cost(len(json.dumps(body)), MODEL_CAP)


@pytest.mark.parametrize("max_tokens", [None, 0, -1, "100", 2**31])
async def test_max_tokens_missing_or_broken_is_a_400_in_anthropics_shape(env: Env, max_tokens: Any) -> None:
    body = {"model": "mock/claude", "messages": MESSAGES, **({} if max_tokens is None else {"max_tokens": max_tokens})}
    status, answer = await env.post("/anthropic/v1/messages", body)
    assert status == 400
    assert answer["type"] == "error" and answer["error"]["type"] == "invalid_request_error"
    assert answer["error"]["code"] == "invalid_request" and "max_tokens" in answer["error"]["message"]
    assert env.upstream.received == [] and await env.spent() == 0


async def test_count_tokens_is_relayed_and_charged_only_per_request(env: Env) -> None:
    async with env.sdk() as client:
        counted = await client.messages.count_tokens(model="mock/claude", messages=MESSAGES)
    assert counted.input_tokens == COUNTED_TOKENS
    sent = env.upstream.received[0]
    assert sent.path == "/v1/messages/count_tokens" and sent.body == {"model": "claude-up", "messages": MESSAGES}
    assert await env.spent() == token_cost(0, 0)


async def test_provider_errors_reach_the_sdk_and_cost_nothing(env: Env) -> None:
    answers = iter([
        error_response(529, "overloaded_error", "Overloaded"),
        error_response(400, "invalid_request_error", "messages: roles must alternate"),
        # Last: the deployment then rests for the Retry-After (routing), so later calls would get a 503.
        error_response(429, "rate_limit_error", "Number of request tokens has exceeded your rate limit",
                       **{"retry-after": "7"}),
    ])

    async def scripted(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        return next(answers)

    env.upstream.handler = scripted
    async with env.sdk() as client:
        with pytest.raises(anthropic.APIStatusError) as overloaded:
            await client.messages.create(model="mock/claude", max_tokens=10, messages=MESSAGES)
        with pytest.raises(anthropic.BadRequestError) as refused:
            await client.messages.create(model="mock/claude", max_tokens=10, messages=MESSAGES)
        with pytest.raises(anthropic.RateLimitError) as limited:
            await client.messages.create(model="mock/claude", max_tokens=10, messages=MESSAGES)
    # A 5xx is the gateway's 502 (in Anthropic's shape, with the provider's status); 4xx come as the provider sent them.
    assert overloaded.value.status_code == 502
    assert overloaded.value.body["error"]["code"] == "upstream_error"
    assert overloaded.value.body["error"]["upstream_status"] == 529
    assert limited.value.body["error"]["message"] == "Number of request tokens has exceeded your rate limit"
    assert limited.value.response.headers["retry-after"] == "7"
    assert refused.value.body == {"type": "error", "error": {"type": "invalid_request_error",
                                                             "message": "messages: roles must alternate"}}
    assert await env.spent() == 0


async def test_gateway_errors_use_anthropics_shape_with_our_code(env: Env) -> None:
    async with env.sdk(api_key="sk_test_" + "x" * 40) as stranger:
        with pytest.raises(anthropic.AuthenticationError) as refused:
            await stranger.messages.create(model="mock/claude", max_tokens=10, messages=MESSAGES)
    assert refused.value.body["error"]["type"] == "authentication_error"
    assert refused.value.body["error"]["code"] == "invalid_api_key"
    async with env.sdk() as client:
        with pytest.raises(anthropic.NotFoundError) as missing:
            await client.messages.create(model="mock/none", max_tokens=10, messages=MESSAGES)
        with pytest.raises(anthropic.BadRequestError) as other_format:
            await client.messages.create(model="mock/chat", max_tokens=10, messages=MESSAGES)
    assert missing.value.body["error"]["code"] == "model_not_found"
    assert "openai wire format" in other_format.value.body["error"]["message"]
    # And the other way round, in OpenAI's shape.
    # (chat completions are translated: test_anthropic_translate.py; other OpenAI routes are not)
    status, answer = await env.post("/v1/embeddings", {"model": "mock/claude", "input": "Hi"},
                                    {"Authorization": f"Bearer {TEST_KEY}"})
    assert status == 400 and "/anthropic/v1/messages" in answer["error"]["message"]
    status, answer = await env.post("/anthropic/v1/nothing", {})
    assert status == 404 and answer["type"] == "error" and answer["error"]["type"] == "not_found_error"
    assert env.upstream.received == []


async def test_our_credential_is_accepted_in_x_api_key_or_bearer_but_not_two_different_ones(env: Env) -> None:
    body = {"model": "mock/claude", "max_tokens": 10, "messages": MESSAGES}
    bearer = {"Authorization": f"Bearer {TEST_KEY}", "anthropic-version": "2023-06-01"}
    assert (await env.post("/anthropic/v1/messages", body, bearer))[0] == 200
    assert (await env.post("/anthropic/v1/messages", body, {**bearer, "x-api-key": TEST_KEY}))[0] == 200
    status, answer = await env.post("/anthropic/v1/messages", body, {**bearer, "x-api-key": "sk_test_" + "y" * 40})
    assert status == 400 and answer["error"]["param"] == "x-api-key"
    status, _ = await env.post("/anthropic/v1/messages", body, {"anthropic-version": "2023-06-01"})
    assert status == 401
    # The version the client names goes upstream, and a beta header too; without one, the stable version is sent.
    await env.post("/anthropic/v1/messages", body, {**AUTH, "anthropic-beta": "tools-2024-04-04"})
    await env.post("/anthropic/v1/messages", body, {"x-api-key": TEST_KEY})
    beta, default = env.upstream.received[-2].headers, env.upstream.received[-1].headers
    assert beta["anthropic-beta"] == "tools-2024-04-04" and beta["anthropic-version"] == "2023-06-01"
    assert default["anthropic-version"] == "2023-06-01"
    assert all(r.headers["x-api-key"] == PROVIDER_KEY for r in env.upstream.received)


async def test_stream_is_not_buffered(env: Env) -> None:
    seen_first = asyncio.Event()

    async def gated(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        response = await open_stream(request)
        for raw in start_events(body["model"], USAGE):
            await response.write(raw)
        await response.write(delta_event("one"))
        await asyncio.wait_for(seen_first.wait(), 5)  # a gateway that buffers never lets the client see "one"
        for raw in (delta_event("two"), *end_events(USAGE)):
            await response.write(raw)
        return response

    env.upstream.handler = gated
    texts = []
    async with env.sdk() as client:
        async with client.messages.stream(model="mock/claude", max_tokens=100, messages=MESSAGES) as stream:
            async for text in stream.text_stream:
                texts.append(text)
                seen_first.set()
    assert texts == ["one", "two"]


async def test_stream_cut_midway_is_an_error_event_and_charged_an_estimate(env: Env) -> None:
    env.upstream.handler = cut_after_two_deltas
    async with env.sdk() as client:
        with pytest.raises(anthropic.APIStatusError) as broken:
            async with client.messages.stream(model="mock/claude", max_tokens=100, messages=MESSAGES) as stream:
                async for _ in stream.text_stream:
                    pass
    assert broken.value.body["error"]["code"] == "upstream_error"
    # The input message_start reported is exact; the output is estimated from the two deltas relayed.
    assert await env.spent() == token_cost(ALL_INPUT, 2)


async def test_client_disconnect_closes_the_upstream_and_charges_an_estimate(env: Env) -> None:
    closed = asyncio.Event()
    env.upstream.handler = endless(closed)
    body = {"model": "mock/claude", "max_tokens": 100, "messages": MESSAGES, "stream": True}
    async with aiohttp.ClientSession() as http:
        response = await http.post(f"{env.url}/anthropic/v1/messages", json=body, headers=AUTH)
        async for line in response.content:
            if line.startswith(b"event: content_block_delta"):
                break
        response.close()  # hang up mid-stream
    await asyncio.wait_for(closed.wait(), 5)
    spent = await env.spent()
    assert token_cost(ALL_INPUT, 1) <= spent <= token_cost(len(json.dumps(body)), 100)  # exact input, some output, capped


async def test_me_lists_models_by_provider_kind(env: Env) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{env.url}/v1/me", headers={"Authorization": f"Bearer {TEST_KEY}"}) as r:
            me = await r.json()
    assert me["models_by_provider_kind"] == {
        "openai": ["mock/chat", "mock/embed", "mock/image", "mock/speech"], "anthropic": ["mock/claude"],
    }


def test_a_model_or_its_fallbacks_cannot_mix_wire_formats(tmp_path: Path) -> None:
    config = config_with_claude("http://127.0.0.1:9/v1", "http://127.0.0.1:9", tmp_path)
    claude = config["models"][-1]
    mixed = {**claude, "provider": None, "upstream_model": None, "deployments": [
        {"provider": "claude", "upstream_model": "claude-up"}, {"provider": "mock", "upstream_model": "gpt"}]}
    with pytest.raises(ConfigError, match="served in several wire formats"):
        parse_config({**config, "models": [*config["models"][:-1], mixed]}, "c.yaml")
    crossed = {**claude, "fallbacks": ["mock/chat"]}
    with pytest.raises(ConfigError, match="speaks the openai wire format, not anthropic"):
        parse_config({**config, "models": [*config["models"][:-1], crossed]}, "c.yaml")


async def test_a_hostile_provider_reporting_a_huge_input_then_breaking_off_costs_at_most_the_reserve(env: Env) -> None:
    huge = {**USAGE, "input_tokens": 2**31 - 1}

    async def lying(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        response = await open_stream(request)
        for raw in (*start_events(body["model"], huge), delta_event("one")):
            await response.write(raw)
        assert request.transport is not None
        request.transport.close()
        return response

    env.upstream.handler = lying
    body = {"model": "mock/claude", "max_tokens": 100, "messages": MESSAGES, "stream": True}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{env.url}/anthropic/v1/messages", json=body, headers=AUTH) as response:
            relayed = await response.read()
    assert relayed.endswith(b"\n\n") and b"event: error" in relayed
    assert await env.spent() == token_cost(len(json.dumps(body)), 100)  # the reserve: an estimate is never more


async def test_image_blocks_count_in_the_reserve_wherever_they_nest(env: Env) -> None:
    image = {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}}
    nested = {"type": "tool_result", "tool_use_id": "t1", "content": [image, image]}
    body = {"model": "mock/claude", "max_tokens": 10,
            "messages": [{"role": "user", "content": [image, nested, {"type": "text", "text": "Hi"}]}]}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{env.url}/anthropic/v1/messages", json=body, headers=AUTH) as response:
            assert response.status == 200
            balance_after_hold = int(response.headers["X-Credits-Balance"])
    media_tokens = 3 * 4096  # proxy.policy.pricing.MEDIA_PART_TOKENS per image block
    assert balance_after_hold == BUDGET - token_cost(len(json.dumps(body)) + media_tokens, 10)


async def test_a_block_type_that_is_not_a_string_is_relayed_and_counts_as_no_media(env: Env) -> None:
    # An object or array as `type` once crashed the media count (unhashable in a set): a 500 and a traceback.
    body = {"model": "mock/claude", "max_tokens": 10, "messages": [{"role": "user", "content": [
        {"type": {"image": 1}}, {"type": ["image"]}, {"type": "text", "text": "Hi"}]}]}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{env.url}/anthropic/v1/messages", json=body, headers=AUTH) as response:
            assert response.status == 200
            balance_after_hold = int(response.headers["X-Credits-Balance"])
    assert balance_after_hold == BUDGET - token_cost(len(json.dumps(body)), 10)


async def test_sdk_lists_and_retrieves_the_models_it_can_call(env: Env) -> None:
    async with env.sdk() as client:
        listed = [model.id async for model in client.models.list()]
        one = await client.models.retrieve("mock/claude")
        with pytest.raises(anthropic.NotFoundError) as other_format:
            await client.models.retrieve("mock/chat")
    assert listed == ["mock/claude"]  # only models of anthropic providers answer on /anthropic
    assert (one.id, one.display_name, one.type) == ("mock/claude", "Mock Claude", "model")
    assert other_format.value.body["error"]["code"] == "model_not_found"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{env.url}/metrics") as response:
            page = await response.text()
    assert 'route="/anthropic/v1/models/{model_id}"' in page and 'route="/anthropic/v1/models"' in page
