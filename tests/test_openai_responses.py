"""OpenAI's Responses API at `/openai/v1/responses`: relayed natively (events verbatim, never buffered), metered
from the provider's own usage on a real Redis store, bounded by `max_output_tokens` and the model's cap, driven by
the official `openai` SDK against a mock that speaks the Responses API's events exactly."""

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

from tests.gateway_harness import TEST_KEY, TOKEN_PRICE, budget_policy, gateway_config, start_gateway, token_cost, write_policy
from tests.mock_provider import (
    MockProvider, named_sse, open_sse, responses_events, wait_for,
)
from tests.test_openai_surface import sdk, spent_once_settled

AUTH = {"Authorization": f"Bearer {TEST_KEY}", "Content-Type": "application/json"}
MODEL_CAP = 64  # mock/chat's max_output_tokens: the bound of a request that sets none
TOKENS = ("Hello", " from", " the", " mock")
USAGE = (7, len(TOKENS))  # what the mock reports


def reserve_for(body: bytes, max_output_tokens: int) -> int:
    """The hold: input bounded by the body's bytes, output by the request's (or the model's) limit."""
    return token_cost(len(body), max_output_tokens)


@pytest.fixture
async def gateway(provider: MockProvider, gateway_env: None, tmp_path: Path, redis_url: str) -> AsyncIterator[str]:
    async with aioredis.from_url(redis_url) as client:
        await client.flushdb()
    config = gateway_config(provider.url, write_policy(tmp_path / "policies", budget_policy(1_000_000, {
        "mock/chat": TOKEN_PRICE})), store={"kind": "redis", "redis_url": redis_url})
    config["models"][0]["max_output_tokens"] = MODEL_CAP
    server = await start_gateway(config)
    yield server.url
    await server.stop()


async def post(gateway: str, body: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{gateway}/openai/v1/responses", data=json.dumps(body), headers=AUTH) as r:
            return r.status, dict(r.headers), await r.read()


async def test_sdk_json_response_is_settled_at_its_usage(gateway: str, provider: MockProvider) -> None:
    async with sdk(f"{gateway}/openai/v1") as client:
        answer = await client.responses.create(model="mock/chat", input="hi", max_output_tokens=500)
    assert answer.output_text == "Hello from the mock"
    assert answer.usage is not None and (answer.usage.input_tokens, answer.usage.output_tokens) == USAGE
    assert await spent_once_settled(gateway) == token_cost(*USAGE)
    sent = provider.received[0]
    # The model's id at the provider, and the output capped at the model's cap (the client asked for more).
    assert (sent.path, sent.body["model"], sent.body["max_output_tokens"]) == ("/v1/responses", "mock-up", MODEL_CAP)


async def test_sdk_stream_gets_every_event_and_is_settled_at_the_completed_usage(
    gateway: str, provider: MockProvider
) -> None:
    async with sdk(f"{gateway}/openai/v1") as client:
        stream = await client.responses.create(model="mock/chat", input="hi", stream=True)
        events = [event async for event in stream]
        async with client.responses.stream(model="mock/chat", input="hi", max_output_tokens=20) as helper:
            final = await helper.get_final_response()
    assert [e.type for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        *["response.output_text.delta"] * len(TOKENS), "response.output_text.done", "response.content_part.done",
        "response.output_item.done", "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "Hello from the mock"
    assert final.output_text == "Hello from the mock" and final.usage is not None
    assert await spent_once_settled(gateway) == 2 * token_cost(*USAGE)
    assert [r.body.get("max_output_tokens") for r in provider.received] == [MODEL_CAP, 20]
    assert "stream_options" not in provider.received[0].body  # Responses streams always end with their usage


async def test_stream_bytes_are_the_providers_verbatim_with_the_metering_headers(gateway: str) -> None:
    body = {"model": "mock/chat", "input": "hi", "stream": True, "max_output_tokens": 30}
    status, headers, raw = await post(gateway, body)
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    assert raw == b"".join(responses_events("mock-up", TOKENS, USAGE))
    assert headers["X-Credits-Balance"] == str(1_000_000 - reserve_for(json.dumps(body).encode(), 30))


async def test_first_event_reaches_the_client_before_the_provider_sends_the_second(
    gateway: str, provider: MockProvider
) -> None:
    seen_first = asyncio.Event()

    async def gated(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        events = responses_events(body["model"], TOKENS, USAGE)
        response = await open_sse(request)
        await response.write(events[0])
        await wait_for(seen_first)  # a gateway that buffers never lets the client see it: the test times out
        for event in events[1:]:
            await response.write(event)
        return response

    provider.handler = gated
    async with sdk(f"{gateway}/openai/v1") as client:
        stream = await client.responses.create(model="mock/chat", input="hi", stream=True)
        types = []
        async for event in stream:
            types.append(event.type)
            seen_first.set()
    assert types[0] == "response.created" and types[-1] == "response.completed"
    assert await spent_once_settled(gateway) == token_cost(*USAGE)


def cut_after(deltas: int) -> Any:
    """A provider streaming `deltas` text deltas, then dropping the connection before `response.completed`."""

    async def cut(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        events = responses_events(body["model"], ("tok",) * deltas, USAGE)
        response = await open_sse(request)
        for event in events[:4 + deltas]:  # created ... content_part.added, then the deltas
            await response.write(event)
        assert request.transport is not None
        request.transport.close()  # mid-body: the chunked answer never ends
        return response

    return cut


@pytest.mark.parametrize("deltas, max_output_tokens", [(3, 40), (200, 16)])
async def test_stream_cut_midway_is_charged_an_estimate_capped_at_the_reservation(
    gateway: str, provider: MockProvider, deltas: int, max_output_tokens: int
) -> None:
    provider.handler = cut_after(deltas)
    body = {"model": "mock/chat", "input": "hi", "stream": True, "max_output_tokens": max_output_tokens}
    status, _, raw = await post(gateway, body)
    assert status == 200
    *relayed, last = raw.split(b"\n\n")[:-1]
    assert len(relayed) == 4 + deltas  # every event the provider sent, then the gateway's error event
    assert json.loads(last.removeprefix(b"data: "))["error"]["code"] == "upstream_error"
    # The estimate: a token per 4 bytes of the request, one output token per delta relayed; never above the hold
    # (200 deltas under a bound of 16 is a provider ignoring the cap it was sent).
    raw_body = json.dumps(body).encode()
    estimate, reserve = token_cost(len(raw_body) // 4, deltas), reserve_for(raw_body, max_output_tokens)
    assert (estimate < reserve) == (deltas == 3)
    assert await spent_once_settled(gateway) == min(estimate, reserve)
    async with sdk(f"{gateway}/openai/v1") as client:  # the SDK raises the gateway's error event
        stream = await client.responses.create(model="mock/chat", input="hi", stream=True)
        with pytest.raises(openai.APIError, match="closed the stream"):
            async for _ in stream:
                pass


async def test_client_disconnect_closes_the_upstream_and_settles(gateway: str, provider: MockProvider) -> None:
    closed = asyncio.Event()

    async def endless(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        head = responses_events(body["model"], ("tick",), USAGE)[:5]  # created ... one delta
        response = await open_sse(request)
        try:
            for event in head:
                await response.write(event)
            for n in range(5, 10_000):
                await response.write(named_sse({"type": "response.output_text.delta", "item_id": "msg_0a1b2c3d4e5f",
                                                "output_index": 0, "content_index": 0, "delta": "tick",
                                                "logprobs": [], "sequence_number": n}))
                await asyncio.sleep(0.02)
        except (asyncio.CancelledError, ConnectionResetError):
            closed.set()
            raise
        return response

    provider.handler = endless
    body = {"model": "mock/chat", "input": "hi", "stream": True, "max_output_tokens": 1000}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{gateway}/openai/v1/responses", data=json.dumps(body), headers=AUTH) as r:
            assert r.status == 200
            assert b"response.created" in await r.content.readuntil(b"\n\n")
    await wait_for(closed)  # the provider saw the gateway hang up
    spent = await spent_once_settled(gateway)
    assert 0 < spent <= reserve_for(json.dumps(body).encode(), 1000)


@pytest.mark.parametrize("field, value", [
    ("previous_response_id", "resp_123"),
    ("conversation", "conv_123"),
    ("prompt", {"id": "pmpt_123"}),
    ("background", True),
    ("tools", [{"type": "function", "name": "f", "parameters": {}}, {"type": "web_search"}]),
    ("tools", [{"type": "file_search", "vector_store_ids": ["vs_1"]}]),
    ("max_output_tokens", 0),
    ("max_output_tokens", "16"),
])
async def test_what_the_gateway_cannot_bound_is_refused_before_the_provider(
    gateway: str, provider: MockProvider, field: str, value: Any
) -> None:
    param = field
    async with sdk(f"{gateway}/openai/v1") as client:
        with pytest.raises(openai.BadRequestError) as refused:
            await client.responses.create(model="mock/chat", input="hi", extra_body={field: value})
    assert (refused.value.code, refused.value.param) == ("invalid_request", param)
    assert provider.received == []
    assert await spent_once_settled(gateway) == 0


async def test_function_tools_and_images_in_input_are_relayed(gateway: str, provider: MockProvider) -> None:
    body = {"model": "mock/chat", "max_output_tokens": 20, "background": False, "previous_response_id": None,
            "tools": [{"type": "function", "name": "weather", "parameters": {"type": "object", "properties": {}}}],
            "input": [{"role": "user", "content": [
                {"type": "input_text", "text": "what is this?"},
                {"type": "input_image", "image_url": "https://example.com/cat.png"}]}]}
    status, headers, raw = await post(gateway, body)
    assert status == 200 and json.loads(raw)["output"][0]["content"][0]["text"] == "Hello from the mock"
    assert provider.received[0].body == {**body, "model": "mock-up"}
    # One media part: its tokens are not bounded by the bytes, so the hold adds the media allowance for it.
    assert int(headers["X-Credits-Balance"]) < 1_000_000 - reserve_for(json.dumps(body).encode(), 20)


async def test_provider_error_is_relayed_in_openai_shape_and_nothing_charged(
    gateway: str, provider: MockProvider
) -> None:
    async def refuses(request: web.Request, body: dict[str, Any]) -> web.Response:
        return web.json_response({"error": {"message": "Invalid 'input': empty.", "type": "invalid_request_error",
                                            "param": "input", "code": "empty_array"}}, status=400)

    provider.handler = refuses
    async with sdk(f"{gateway}/openai/v1") as client:
        with pytest.raises(openai.BadRequestError) as refused:
            await client.responses.create(model="mock/chat", input=[])
    assert refused.value.body == {"message": "Invalid 'input': empty.", "type": "invalid_request_error",
                                  "param": "input", "code": "empty_array"}  # the provider's, as it sent it
    assert await spent_once_settled(gateway) == 0


async def test_the_seeds_v1_responses_stays_the_unified_api(gateway: str, provider: MockProvider) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{gateway}/v1/responses", headers=AUTH,
                             data=json.dumps({"model": "mock/chat", "input": "hi"})) as r:
            refused = r.status, (await r.json())["error"]
        async with http.post(f"{gateway}/v1/responses", headers=AUTH,
                             data=json.dumps({"model": "mock/chat", "prompt": "hi"})) as r:
            unified = await r.text()
    assert refused[0] == 400 and refused[1]["param"] == "input"  # `input` is no field of the unified API
    assert "event: generation.completed" in unified
    assert provider.received[0].path == "/v1/chat/completions"
    # An OpenAI SDK given the gateway's /v1 as its base URL is told where OpenAI's Responses API is.
    async with sdk(f"{gateway}/v1") as client:
        with pytest.raises(openai.BadRequestError) as misdirected:
            await client.responses.create(model="mock/chat", input="hi")
    assert misdirected.value.param == "input" and "base_url=<gateway>/openai/v1" in misdirected.value.message
    assert "/openai/v1" not in refused[1]["message"]  # the seeds' clients get the plain message
    assert len(provider.received) == 1 and await spent_once_settled(gateway) == token_cost(7, 4)
