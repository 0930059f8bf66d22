"""Every completed call is charged: the provider's usage wherever it sits in the answer (large JSON, oversized
SSE events, streamed images), a measured audio length for per-second prices, otherwise the reserve; broken or
hostile usage figures never raise and never undercharge."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.upstream.body_usage import MAX_WHOLE_JSON

from .conftest import StartGateway
from .gateway_harness import TEST_KEY, budget_policy
from .mock_provider import MockProvider, chat_chunk, open_sse, sse, usage_chunk, wait_for

AUTH = {"Authorization": f"Bearer {TEST_KEY}"}
BUDGET = 1_000_000
POLICY = budget_policy(BUDGET, {
    "mock/chat": "{input_per_1k_tokens: 1000, output_per_1k_tokens: 1000}",
    "mock/embed": "{input_per_1k_tokens: 1000}",
    "mock/image": "{per_image: 5, input_per_1k_tokens: 1000}",
    "mock/speech": "{per_second: 2}",
}, ("concurrency: 1",))
EMBED = {"model": "mock/embed", "input": ["word"] * 250}
CHAT = {"model": "mock/chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50}


async def call(gateway: str, route: str, body: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{gateway}{route}", json=body, headers=AUTH) as response:
            return response.status, dict(response.headers), await response.read()


async def me(gateway: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{gateway}/v1/me", headers=AUTH) as response:
            return await response.json()


async def settled_balance(gateway: str) -> dict[str, Any]:
    """The balance once nothing is held: a client that hung up is settled after its handler was cancelled."""
    for _ in range(50):
        state: dict[str, Any] = (await me(gateway))["balance"]
        if state["held"] == 0:
            break
        await asyncio.sleep(0.05)
    return state


def reserved(headers: dict[str, str]) -> float:
    return BUDGET - float(headers["X-Credits-Balance"])


def large_embeddings(count: int, usage: dict[str, Any] | None) -> bytes:
    """An embeddings answer over the whole-parse limit, in OpenAI's layout: data first, usage last."""
    vector = "[" + ",".join(["-0.0123456789"] * 3072) + "]"
    data = ",".join(f'{{"object":"embedding","index":{i},"embedding":{vector}}}' for i in range(count))
    tail = f',"usage":{json.dumps(usage)}' if usage is not None else ""
    body = f'{{"object":"list","data":[{data}],"model":"mock-embed"{tail}}}'.encode()
    assert len(body) > MAX_WHOLE_JSON
    return body


@pytest.mark.parametrize("with_usage", [True, False], ids=["usage", "no-usage"])
async def test_json_answer_over_8_mib_is_charged_its_usage_or_else_the_reserve(
    start_with: StartGateway, provider: MockProvider, with_usage: bool
) -> None:
    usage = {"prompt_tokens": 250, "total_tokens": 250} if with_usage else None
    answer = large_embeddings(250, usage)

    async def embeddings(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        return web.Response(body=answer, content_type="application/json")

    provider.handler = embeddings
    gateway = await start_with(POLICY)
    status, headers, body = await call(gateway, "/v1/embeddings", EMBED)
    assert status == 200 and body == answer  # relayed whole
    state = (await me(gateway))["balance"]
    assert state["held"] == 0
    assert state["spent"] == (250 if with_usage else reserved(headers))


async def test_completed_stream_without_a_usage_event_is_charged_the_reserve(
    start_with: StartGateway, provider: MockProvider
) -> None:
    async def ignores_include_usage(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        response = await open_sse(request)
        await response.write(sse(chat_chunk("one")) + sse(chat_chunk("two", finish="stop")) + sse("[DONE]"))
        return response

    provider.handler = ignores_include_usage
    gateway = await start_with(POLICY)
    status, headers, body = await call(gateway, "/v1/chat/completions", {**CHAT, "stream": True})
    assert status == 200 and body.endswith(b"data: [DONE]\n\n")
    state = (await me(gateway))["balance"]
    assert state["held"] == 0 and state["spent"] == reserved(headers) > 0


def image_event(kind: str, payload: dict[str, Any]) -> bytes:
    return f"event: image_generation.{kind}\ndata: {json.dumps({'type': f'image_generation.{kind}', **payload})}\n\n".encode()


async def test_streamed_image_generation_is_charged_per_image_and_its_usage_from_oversized_events(
    start_with: StartGateway, provider: MockProvider
) -> None:
    """OpenAI's streamed images: partial images then a completed event, each carrying megabytes of base64;
    the completed one ends with the usage."""
    partial = base64.b64encode(b"p" * 1_200_000).decode()
    final = base64.b64encode(b"f" * 1_600_000).decode()
    stream = image_event("partial_image", {"b64_json": partial, "partial_image_index": 0}) + image_event(
        "completed", {"b64_json": final, "size": "1024x1024",
                      "usage": {"input_tokens": 50, "output_tokens": 4160, "total_tokens": 4210}})

    async def streams_an_image(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        response = await open_sse(request)
        for start in range(0, len(stream), 65536):  # as a network delivers it
            await response.write(stream[start : start + 65536])
        return response

    provider.handler = streams_an_image
    gateway = await start_with(POLICY)
    status, _, body = await call(gateway, "/v1/images/generations",
                                 {"model": "mock/image", "prompt": "a cat", "stream": True, "partial_images": 1})
    assert status == 200 and body == stream  # framing and bytes intact
    state = (await me(gateway))["balance"]
    assert (state["spent"], state["held"]) == (5 + 50, 0)  # one image and 50 input tokens


def wav(seconds: float, rate: int = 16_000) -> bytes:
    """A PCM WAV (mono, 16-bit) of the given length, header as a TTS provider writes it."""
    data = b"\x00\x00" * int(seconds * rate)
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
    return (b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt
            + b"data" + struct.pack("<I", len(data)) + data)


@pytest.mark.parametrize("route", ["/v1/audio/speech", "/v1/responses"])
async def test_speech_is_charged_per_second_of_the_audio_returned(
    start_with: StartGateway, provider: MockProvider, route: str
) -> None:
    async def speaks(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        return web.Response(body=wav(2.5), content_type="audio/wav")

    provider.handler = speaks
    gateway = await start_with(POLICY)
    status, _, _ = await call(gateway, route, {"model": "mock/speech", "input": "hello", "voice": "alloy"})
    assert status == 200
    state = (await me(gateway))["balance"]
    assert (state["spent"], state["held"]) == (2 * 2.5, 0)


async def test_speech_of_unknown_length_is_charged_the_reserves_seconds(
    start_with: StartGateway, provider: MockProvider
) -> None:
    async def speaks_mp3(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        return web.Response(body=b"ID3\x04" + b"\x00" * 4000, content_type="audio/mpeg")

    provider.handler = speaks_mp3
    gateway = await start_with(POLICY)
    status, headers, _ = await call(gateway, "/v1/audio/speech", {"model": "mock/speech", "input": "hello"})
    assert status == 200
    state = (await me(gateway))["balance"]
    assert state["spent"] == reserved(headers) == 2 * 60  # defaults.max_seconds


@pytest.mark.parametrize("figure", [10**400, 2**40, -5, "7", 1.5, True], ids=repr)
async def test_broken_usage_figures_charge_the_reserve_and_free_the_slot(
    start_with: StartGateway, provider: MockProvider, figure: Any
) -> None:
    async def broken_usage(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        answer = {"id": "x", "object": "chat.completion", "choices": [],
                  "usage": {"prompt_tokens": figure, "completion_tokens": 3, "total_tokens": 3}}
        return web.Response(text=json.dumps(answer), content_type="application/json")

    provider.handler = broken_usage
    gateway = await start_with(POLICY)
    status, headers, _ = await call(gateway, "/v1/chat/completions", CHAT)
    assert status == 200
    state = await me(gateway)
    assert (state["balance"]["spent"], state["balance"]["held"]) == (reserved(headers), 0)
    assert state["concurrency"]["in_flight"] == 0
    assert (await call(gateway, "/v1/chat/completions", CHAT))[0] == 200  # the slot (limit 1) is free


@pytest.mark.parametrize("usage", [{}, {"total_tokens": 500}], ids=["empty", "total-only"])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_usage_without_token_figures_charges_the_reserve(
    start_with: StartGateway, provider: MockProvider, usage: dict[str, Any], stream: bool
) -> None:
    """A usage object that names no input or output count is no usage: it was read as 0 tokens, so a completed
    call cost nothing; and a later such chunk in a stream erased the usage reported before it."""

    async def figureless_usage(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        if not stream:
            answer = {"id": "x", "object": "chat.completion", "choices": [], "usage": usage}
            return web.Response(text=json.dumps(answer), content_type="application/json")
        response = await open_sse(request)
        trailing = {**usage_chunk(0, 0), "usage": usage}
        await response.write(sse(chat_chunk("one", finish="stop")) + sse(usage_chunk(7, 9)) + sse(trailing))
        await response.write(sse("[DONE]"))
        return response

    provider.handler = figureless_usage
    gateway = await start_with(POLICY)
    status, headers, _ = await call(gateway, "/v1/chat/completions", {**CHAT, "stream": stream})
    assert status == 200
    state = (await me(gateway))["balance"]
    assert (state["spent"], state["held"]) == (7 + 9 if stream else reserved(headers), 0)


async def test_responses_reads_usage_from_an_oversized_final_chunk(
    start_with: StartGateway, provider: MockProvider
) -> None:
    """Some providers put the usage on the last content chunk; a huge one must not lose it."""
    last = {**chat_chunk("y" * 1_500_000, finish="stop"),
            "usage": {"prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10}}

    async def usage_on_the_last_chunk(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        response = await open_sse(request)
        await response.write(sse(chat_chunk("x")) + sse(last) + sse("[DONE]"))
        return response

    provider.handler = usage_on_the_last_chunk
    gateway = await start_with(POLICY)
    status, _, _ = await call(gateway, "/v1/responses", {"model": "mock/chat", "prompt": "hi", "max_tokens": 50})
    assert status == 200
    state = (await me(gateway))["balance"]
    assert (state["spent"], state["held"]) == (4 + 6, 0)


async def test_a_per_second_price_is_charged_the_reserves_seconds_when_no_length_is_known(
    start_with: StartGateway, provider: MockProvider
) -> None:
    """Usage in tokens says nothing about seconds: a per_second price still applies, at `max_seconds`."""
    gateway = await start_with(budget_policy(BUDGET, {"mock/chat": "{per_second: 2}"}))
    status, _, _ = await call(gateway, "/v1/chat/completions", CHAT)  # the mock reports 7 + 4 tokens
    assert status == 200
    state = (await me(gateway))["balance"]
    assert (state["spent"], state["held"]) == (2 * 60, 0)


async def test_usage_in_a_last_event_without_its_blank_line_is_read(
    start_with: StartGateway, provider: MockProvider
) -> None:
    async def ends_without_blank_line(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        response = await open_sse(request)
        await response.write(sse(chat_chunk("one", finish="stop")) + sse(usage_chunk(5, 1))[:-1])
        return response

    provider.handler = ends_without_blank_line
    gateway = await start_with(POLICY)
    status, _, body = await call(gateway, "/v1/chat/completions", {**CHAT, "stream": True})
    assert status == 200 and b"usage" not in body  # the usage chunk the gateway asked for stays hidden
    state = (await me(gateway))["balance"]
    assert (state["spent"], state["held"]) == (5 + 1, 0)


@pytest.mark.parametrize(("route", "body"), [
    ("/v1/chat/completions", CHAT), ("/v1/responses", {"model": "mock/chat", "prompt": "hi", "max_tokens": 50}),
], ids=["chat", "responses"])
async def test_a_client_that_leaves_a_provider_working_pays_for_its_input(
    start_with: StartGateway, provider: MockProvider, route: str, body: dict[str, Any]
) -> None:
    """Hanging up while the provider works on the call (which it bills) was free: nothing had been relayed yet, so
    the hold was released, and a tenant could farm expensive prompts that way. It is charged like any call cut
    short: the input estimate from the request's bytes, nothing for output it never saw."""
    working = asyncio.Event()

    async def slow(request: web.Request, received: dict[str, Any]) -> web.StreamResponse:
        working.set()
        await asyncio.sleep(30)  # still generating when the client gives up
        raise AssertionError("the gateway should have closed the call")

    provider.handler = slow
    gateway = await start_with(POLICY)
    raw = json.dumps(body).encode()
    async with aiohttp.ClientSession() as http:
        request = asyncio.ensure_future(http.post(
            f"{gateway}{route}", data=raw, headers={**AUTH, "Content-Type": "application/json"}))
        await wait_for(working)
        request.cancel()  # the client hangs up
    state = await settled_balance(gateway)  # the shielded settle runs after the cancellation
    assert (state["spent"], state["held"]) == (len(raw) // 4, 0)  # 1 credit per input token


async def test_a_json_answer_read_whole_is_charged_its_usage_when_the_client_leaves_before_its_end(
    start_with: StartGateway, provider: MockProvider
) -> None:
    """A client that has the whole JSON answer and hangs up before the upstream's body has formally ended (the
    end of a chunked body can come a moment later) was charged only the input estimate: usage was read once the
    body ended, which it never did for the gateway. The usage in what was received is read whatever happens."""
    answer = json.dumps({"id": "x", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "y" * 400}, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 50, "total_tokens": 55}}).encode()

    async def body_end_comes_later(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)  # chunked: the end of the body is its own, last chunk
        await response.write(answer)
        await asyncio.sleep(0.5)
        return response

    provider.handler = body_end_comes_later
    gateway = await start_with(POLICY)
    async with aiohttp.ClientSession() as http:
        response = await http.post(f"{gateway}/v1/chat/completions", json=CHAT, headers=AUTH)
        assert await response.content.readexactly(len(answer)) == answer  # the whole answer
        response.close()  # and gone
    state = await settled_balance(gateway)  # the shielded settle runs after the cancellation
    assert (state["spent"], state["held"]) == (5 + 50, 0)


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/responses"])
async def test_a_stream_left_after_its_last_token_is_charged_the_usage_that_follows(
    start_with: StartGateway, provider: MockProvider, route: str
) -> None:
    """The usage event comes after the last content chunk (OpenAI: reasoning tokens, which no chunk shows). A client
    that hung up on the last token was charged the estimate from the chunks relayed (input bytes / 4 and 2 output
    tokens here, against 45 used); the end of the upstream's stream is now read, briefly, for its usage."""

    async def usage_a_moment_later(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        response = await open_sse(request)
        await response.write(sse(chat_chunk("one")) + sse(chat_chunk("two", finish="stop")))
        await asyncio.sleep(0.3)
        await response.write(sse(usage_chunk(5, 45)) + sse("[DONE]"))
        return response

    provider.handler = usage_a_moment_later
    gateway = await start_with(POLICY)
    body = {**CHAT, "stream": True} if route == "/v1/chat/completions" else {"model": "mock/chat", "prompt": "hi", "max_tokens": 50}
    async with aiohttp.ClientSession() as http:
        response = await http.post(f"{gateway}{route}", json=body, headers=AUTH)
        async for line in response.content:
            if b'"finish_reason": "stop"' in line or b'"delta":"two"' in line:
                break  # the last token: the client has the whole text and leaves
        response.close()
    state = await settled_balance(gateway)  # the shielded settle runs after the cancellation
    assert (state["spent"], state["held"]) == (5 + 45, 0)
