"""The OpenAI-compatible routes end to end: real HTTP, the official openai SDK, a mock provider on loopback."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, Awaitable, Callable

import aiohttp
import openai
import pytest
from aiohttp import web

from .gateway_harness import PROVIDER_KEY, TEST_KEY, gateway_config, start_gateway
from .mock_provider import MockProvider, chat_chunk, endless_stream, gated_two_chunks, stalls_after_one_chunk, open_sse, sse, usage_chunk, wait_for

AUTH = {"Authorization": f"Bearer {TEST_KEY}"}
CHAT = {"model": "mock/chat", "messages": [{"role": "user", "content": "hi"}]}


def sdk(gateway: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{gateway}/v1", api_key=TEST_KEY, max_retries=0, timeout=10)


async def test_sdk_chat_completion_gets_exactly_what_the_upstream_sent(gateway: str, provider: MockProvider) -> None:
    async with sdk(gateway) as client:
        answer = await client.chat.completions.create(model="mock/chat", messages=[{"role": "user", "content": "hi"}])
    assert answer.choices[0].message.content == "Hello from the mock"
    assert answer.usage is not None and answer.usage.completion_tokens == 4
    forwarded = provider.received[-1]
    assert forwarded.body["model"] == "mock-up"
    assert forwarded.headers["Authorization"] == f"Bearer {PROVIDER_KEY}"
    assert TEST_KEY not in json.dumps(forwarded.headers)


async def test_sdk_streaming_chat_gets_every_chunk_and_no_injected_usage(gateway: str, provider: MockProvider) -> None:
    async with sdk(gateway) as client:
        stream = await client.chat.completions.create(
            model="mock/chat", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        chunks = [chunk async for chunk in stream]
    assert [c.choices[0].delta.content for c in chunks] == ["Hello", " from", " the", " mock"]
    # The gateway asked the upstream for usage; the client did not, so it must not see that chunk.
    assert provider.received[-1].body["stream_options"] == {"include_usage": True}
    assert all(c.choices for c in chunks)


async def test_streaming_client_that_asked_for_usage_gets_it(gateway: str) -> None:
    async with sdk(gateway) as client:
        stream = await client.chat.completions.create(
            model="mock/chat", messages=[{"role": "user", "content": "hi"}], stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == 7


async def test_stream_is_not_buffered(gateway: str, provider: MockProvider) -> None:
    seen_first = asyncio.Event()
    provider.handler = gated_two_chunks(seen_first)
    async with sdk(gateway) as client:
        stream = await client.chat.completions.create(
            model="mock/chat", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        contents = []
        async for chunk in stream:
            contents.append(chunk.choices[0].delta.content)
            seen_first.set()
    assert contents == ["one", "two"]


async def test_sse_response_headers_defeat_proxy_buffering(gateway: str) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{gateway}/v1/chat/completions", json={**CHAT, "stream": True}, headers=AUTH) as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/event-stream")
            assert r.headers["Cache-Control"] == "no-cache"
            assert r.headers["X-Accel-Buffering"] == "no"
            body = await r.read()
    assert body.endswith(b"data: [DONE]\n\n")


async def test_client_disconnect_cancels_the_upstream(gateway: str, provider: MockProvider) -> None:
    upstream_cancelled = asyncio.Event()
    provider.handler = endless_stream(upstream_cancelled)
    async with aiohttp.ClientSession() as http:
        response = await http.post(f"{gateway}/v1/chat/completions", json={**CHAT, "stream": True}, headers=AUTH)
        assert b"tick" in await response.content.readline()
        response.close()  # hang up mid-stream
    await wait_for(upstream_cancelled, 5)


async def stream_through_a_pinging_gateway(
    provider: MockProvider, policies_dir: Path, read: Callable[[aiohttp.ClientResponse], Awaitable[bytes]]
) -> bytes:
    """A chat stream through a gateway that pings every 0.1 s while the upstream is silent; `read` reads it."""
    server = await start_gateway(gateway_config(provider.url, policies_dir, server={"sse_keepalive_s": 0.1}))
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{server.url}/v1/chat/completions", json={**CHAT, "stream": True}, headers=AUTH) as r:
                return await read(r)
    finally:
        await server.stop()


async def test_keepalive_ping_while_the_upstream_is_slow(
    provider: MockProvider, gateway_env: None, policies_dir: Path
) -> None:
    async def slow(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        response = await open_sse(request)
        await asyncio.sleep(0.5)
        await response.write(sse(chat_chunk("late", finish="stop")))
        await response.write(sse("[DONE]"))
        return response

    provider.handler = slow
    body = await stream_through_a_pinging_gateway(provider, policies_dir, aiohttp.ClientResponse.read)
    assert body.startswith(b": ping\n\n")
    assert b'"late"' in body


async def test_a_client_that_stops_reading_past_the_ping_time_gets_the_whole_stream(
    provider: MockProvider, gateway_env: None, policies_dir: Path
) -> None:
    # More than the sockets buffer, so the gateway's writes wait for the client while its read deadline (the next
    # ping) passes: that deadline must not land in the waiting write and cut the stream.
    big = "x" * 64 * 1024
    events = 256

    async def burst_then_pause(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        response = await open_sse(request)
        for _ in range(events):
            await response.write(sse(chat_chunk(big)))
        await asyncio.sleep(0.3)
        await response.write(sse(chat_chunk("end", finish="stop")) + sse(usage_chunk(3, events + 1)) + sse("[DONE]"))
        return response

    async def read_after_a_pause(r: aiohttp.ClientResponse) -> bytes:
        first = await r.content.readline()
        await asyncio.sleep(1.0)  # ten ping periods without reading
        return first + await asyncio.wait_for(r.read(), 10)

    provider.handler = burst_then_pause
    body = await stream_through_a_pinging_gateway(provider, policies_dir, read_after_a_pause)
    frames = body.split(b"\n\n")
    assert frames[-2:] == [b"data: [DONE]", b""]
    contents = [json.loads(f.removeprefix(b"data: "))["choices"][0]["delta"]["content"]
                for f in frames[:-2] if f.startswith(b"data: ")]
    assert contents == [big] * events + ["end"]
    assert all(f.startswith(b"data: ") or f == b": ping" for f in frames[:-2])


@pytest.mark.parametrize(
    ("route", "payload", "check"),
    [
        ("/v1/embeddings", {"model": "mock/embed", "input": "x"}, lambda b: json.loads(b)["data"][0]["embedding"]),
        ("/v1/images/generations", {"model": "mock/image", "prompt": "a cat"}, lambda b: json.loads(b)["data"][0]["url"]),
        ("/v1/audio/speech", {"model": "mock/speech", "input": "hi", "voice": "x"}, lambda b: b.startswith(b"RIFF")),
        ("/v1/completions", {"model": "mock/chat", "prompt": "hi"}, lambda b: json.loads(b)["choices"]),
    ],
)
async def test_other_routes_relay_to_the_same_path(
    gateway: str, provider: MockProvider, route: str, payload: dict[str, Any], check: Any
) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{gateway}{route}", json=payload, headers=AUTH) as r:
            assert r.status == 200
            assert check(await r.read())
    assert provider.received[-1].path == route
    assert provider.received[-1].body["model"].startswith("mock-")


async def error_of(gateway: str, body: bytes | dict[str, Any], headers: dict[str, str] | None = None,
                   route: str = "/v1/chat/completions") -> tuple[int, dict[str, Any], aiohttp.typedefs.LooseHeaders]:
    async with aiohttp.ClientSession() as http:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        async with http.post(f"{gateway}{route}", data=data, headers=headers if headers is not None else AUTH) as r:
            return r.status, await r.json(), r.headers


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{not json", 400, "invalid_request"),
        (b"[" * 50_000, 400, "invalid_request"),  # nesting deep enough to exhaust the JSON parser's recursion
        (b"[1, 2]", 400, "invalid_request"),
        (b"", 400, "invalid_request"),
        ({"messages": []}, 400, "invalid_request"),
        ({"model": "nope/nothing", "messages": []}, 404, "model_not_found"),
        (b'{"model": "mock/chat", "pad": "' + b"x" * 70_000 + b'"}', 413, "payload_too_large"),
    ],
)
async def test_bad_requests_get_catalogue_errors(gateway: str, body: Any, status: int, code: str) -> None:
    got_status, payload, headers = await error_of(gateway, body)
    assert (got_status, payload["error"]["code"]) == (status, code)
    assert payload["error"]["message"]
    assert headers["X-Request-Id"]


async def test_missing_and_wrong_credentials(gateway: str) -> None:
    status, payload, headers = await error_of(gateway, CHAT, headers={})
    assert (status, payload["error"]["code"]) == (401, "missing_credentials")
    assert headers["WWW-Authenticate"].startswith("Bearer")
    status, payload, _ = await error_of(gateway, CHAT, headers={"Authorization": "Bearer sk_wrong"})
    assert (status, payload["error"]["code"]) == (401, "invalid_api_key")


async def test_upstream_down_is_503(gateway_env: None, policies_dir: Path) -> None:
    mock = await MockProvider().start()
    url = mock.url
    await mock.stop()  # nothing listens there now
    server = await start_gateway(gateway_config(url, policies_dir))
    try:
        status, payload, _ = await error_of(server.url, CHAT)
    finally:
        await server.stop()
    assert (status, payload["error"]["code"]) == (503, "generation_unavailable")


async def test_upstream_500_is_502_with_its_status(gateway: str, provider: MockProvider) -> None:
    async def broken(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        return web.json_response({"error": {"message": "boom"}}, status=500)

    provider.handler = broken
    status, payload, _ = await error_of(gateway, CHAT)
    assert (status, payload["error"]["code"], payload["error"]["upstream_status"]) == (502, "upstream_error", 500)


async def test_upstream_4xx_is_relayed_as_is(gateway: str, provider: MockProvider) -> None:
    async def rejects(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        return web.json_response({"error": {"message": "bad temperature", "code": "invalid_value"}}, status=400)

    provider.handler = rejects
    status, payload, _ = await error_of(gateway, CHAT)
    assert (status, payload["error"]["code"]) == (400, "invalid_value")


async def test_upstream_that_never_answers_times_out_with_504(gateway: str, provider: MockProvider) -> None:
    async def stalls(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        await asyncio.sleep(30)
        raise AssertionError("unreachable")

    provider.handler = stalls
    status, payload, _ = await asyncio.wait_for(error_of(gateway, CHAT), 10)
    assert (status, payload["error"]["code"]) == (504, "upstream_timeout")


async def test_upstream_that_stalls_mid_stream_ends_it_with_an_error_event(gateway: str, provider: MockProvider) -> None:
    provider.handler = stalls_after_one_chunk
    async with sdk(gateway) as client:
        stream = await client.chat.completions.create(
            model="mock/chat", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        contents = []
        with pytest.raises(openai.APIError, match="no data from the provider"):
            async for chunk in stream:
                contents.append(chunk.choices[0].delta.content)
    assert contents == ["one"]


async def test_usage_chunk_split_across_reads_is_still_dropped(gateway: str, provider: MockProvider) -> None:
    async def split(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        response = await open_sse(request)
        await response.write(sse(chat_chunk("a", finish="stop", with_null_usage=True)))
        raw = sse(usage_chunk(3, 1))
        await response.write(raw[:10])
        await asyncio.sleep(0.05)
        await response.write(raw[10:] + sse("[DONE]"))
        return response

    provider.handler = split
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{gateway}/v1/chat/completions", json={**CHAT, "stream": True}, headers=AUTH) as r:
            body = await r.read()
    assert b'"usage": {' not in body and b"[DONE]" in body


async def test_request_id_is_echoed_when_well_formed_and_replaced_when_not(gateway: str) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{gateway}/healthz", headers={"X-Request-Id": "trace-1234-abcd"}) as r:
            assert r.headers["X-Request-Id"] == "trace-1234-abcd"
        async with http.get(f"{gateway}/healthz", headers={"X-Request-Id": "bad id\twith junk"}) as r:
            assert r.headers["X-Request-Id"].startswith("req_")


async def test_cors_preflight_needs_no_credentials_and_only_allowed_origins(gateway: str) -> None:
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    async with aiohttp.ClientSession() as http:
        async with http.options(f"{gateway}/v1/chat/completions",
                                headers={"Origin": "https://app.example.com", **preflight}) as r:
            assert r.status == 204
            assert r.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
            assert "POST" in r.headers["Access-Control-Allow-Methods"]
        async with http.options(f"{gateway}/v1/chat/completions",
                                headers={"Origin": "https://evil.example", **preflight}) as r:
            assert "Access-Control-Allow-Origin" not in r.headers
        async with http.post(f"{gateway}/v1/chat/completions", json=CHAT,
                             headers={**AUTH, "Origin": "https://app.example.com"}) as r:
            assert r.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
            assert "X-Request-Id" in r.headers["Access-Control-Expose-Headers"]


async def test_unknown_route_and_wrong_method_are_json(gateway: str) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{gateway}/v1/nothing-here", headers=AUTH) as r:
            assert (r.status, (await r.json())["error"]["code"]) == (404, "not_found")
        async with http.get(f"{gateway}/v1/chat/completions", headers=AUTH) as r:
            assert (r.status, (await r.json())["error"]["code"]) == (405, "method_not_allowed")


async def test_models_list_and_group_by_capability(gateway: str) -> None:
    async with aiohttp.ClientSession(headers=AUTH) as http:
        async with http.get(f"{gateway}/v1/models") as r:
            flat = await r.json()
        async with http.get(f"{gateway}/v1/models?groupBy=capability") as r:
            grouped = await r.json()
        async with http.get(f"{gateway}/v1/models/mock/image") as r:
            one = await r.json()
    assert {m["id"] for m in flat} == {"mock/chat", "mock/embed", "mock/image", "mock/speech"}
    assert set(flat[0]) == {"id", "name", "creator", "capability"}
    assert [m["id"] for m in grouped["text2image"]] == ["mock/image"]
    assert one == {"id": "mock/image", "name": "Mock Image", "creator": "Tests", "capability": "text2image"}


async def test_model_schema_is_an_openapi_document_for_its_capability(gateway: str) -> None:
    async with aiohttp.ClientSession(headers=AUTH) as http:
        async with http.get(f"{gateway}/v1/models/mock/image/schema") as r:
            doc = await r.json()
        async with http.get(f"{gateway}/v1/models/none/such/schema") as r:
            missing = (r.status, (await r.json())["error"]["code"])
    assert doc["openapi"].startswith("3.1")
    assert doc["info"]["x-model-id"] == "mock/image"
    assert doc["components"]["schemas"]["Input"]["required"] == ["prompt"]
    assert missing == (404, "model_not_found")


async def test_hostile_upstream_json_is_relayed_without_crashing_the_usage_reader(
    gateway: str, provider: MockProvider
) -> None:
    deep = b'{"usage": ' * 50_000 + b"1" + b"}" * 50_000

    async def nested(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        if body.get("stream"):
            response = await open_sse(request)
            await response.write(b"data: " + deep + b"\n\n")
            await response.write(sse("[DONE]"))
            return response
        return web.Response(body=deep, content_type="application/json")

    provider.handler = nested
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        for stream in (False, True):
            async with http.post(f"{gateway}/v1/chat/completions", json={**CHAT, "stream": stream}, headers=AUTH) as r:
                assert r.status == 200
                assert deep in await r.read()


async def test_me_lists_the_callers_models_by_provider_kind(gateway: str) -> None:
    async with aiohttp.ClientSession(headers=AUTH) as http:
        async with http.get(f"{gateway}/v1/me") as r:
            me = await r.json()
    assert me["models_by_provider_kind"] == {"openai": ["mock/chat", "mock/embed", "mock/image", "mock/speech"]}
