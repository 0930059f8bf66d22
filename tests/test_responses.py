"""`POST /v1/responses` end to end: real HTTP, the event stream a client parses, metering via GET /v1/me."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from .gateway_harness import TEST_KEY, gateway_config, start_gateway
from .mock_provider import MockProvider, endless_stream, gated_two_chunks, stalls_after_one_chunk, wait_for

AUTH = {"Authorization": f"Bearer {TEST_KEY}"}
Event = tuple[str, dict[str, Any]]


async def events_of(response: aiohttp.ClientResponse) -> AsyncIterator[Event]:
    """Parse `event:` / `data:` frames as they arrive (a client's view of the stream); each event's `request_id`
    must be the response's X-Request-Id, and is left out of what is yielded."""
    name, data = "message", b""
    async for line in response.content:
        line = line.rstrip(b"\r\n")
        if line.startswith(b"event:"):
            name = line[6:].strip().decode()
        elif line.startswith(b"data:"):
            data += line[5:].strip()
        elif not line and data:
            event = json.loads(data)
            assert event.pop("request_id") == response.headers["X-Request-Id"], event
            yield name, event
            name, data = "message", b""


async def generate(gateway: str, body: dict[str, Any]) -> tuple[aiohttp.typedefs.LooseHeaders, list[Event]]:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{gateway}/v1/responses", json=body, headers=AUTH) as r:
            assert r.status == 200, await r.text()
            return r.headers, [event async for event in events_of(r)]


async def balance(gateway: str) -> dict[str, float]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{gateway}/v1/me", headers=AUTH) as r:
            return (await r.json())["balance"]


async def test_text_streams_status_deltas_and_completion_and_settles_from_usage(
    gateway: str, provider: MockProvider
) -> None:
    headers, events = await generate(gateway, {"model": "mock/chat", "prompt": "hi", "max_tokens": 50})
    assert headers["Content-Type"].startswith("text/event-stream")
    assert (headers["Cache-Control"], headers["X-Accel-Buffering"]) == ("no-cache", "no")
    assert "X-Credits-Balance" in headers
    assert events == [
        ("generation.status", {"status": "queued"}),
        ("generation.status", {"status": "running"}),
        *[("generation.delta", {"delta": token}) for token in provider.tokens],
        ("generation.completed", {"output": {"text": "Hello from the mock"}}),
    ]
    forwarded = provider.received[-1]
    assert forwarded.path == "/v1/chat/completions"
    assert forwarded.body["messages"] == [{"role": "user", "content": "hi"}]
    assert (forwarded.body["model"], forwarded.body["max_tokens"]) == ("mock-up", 50)
    assert forwarded.body["stream_options"] == {"include_usage": True}
    # mock/chat: 1 per request + 1000 per 1k input tokens + 2000 per 1k output; the mock reports 7 in, 4 out.
    after = await balance(gateway)
    assert (after["spent"], after["held"]) == (1 + 7 + 8, 0)


async def test_deltas_are_not_buffered(gateway: str, provider: MockProvider) -> None:
    seen_first = asyncio.Event()
    provider.handler = gated_two_chunks(seen_first, usage=(3, 2))
    deltas = []
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{gateway}/v1/responses", json={"model": "mock/chat", "prompt": "hi"}, headers=AUTH) as r:
            async for name, data in events_of(r):
                if name == "generation.delta":
                    deltas.append(data["delta"])
                    seen_first.set()
    assert deltas == ["one", "two"]


async def test_image_maps_inputs_and_completes_with_the_urls(gateway: str, provider: MockProvider) -> None:
    _, events = await generate(gateway, {"model": "mock/image", "prompt": "a cat", "aspect_ratio": "16:9", "n": 2})
    assert events[-1] == ("generation.completed", {"output": {"url": "http://127.0.0.1/img.png",
                                                              "urls": ["http://127.0.0.1/img.png"]}})
    forwarded = provider.received[-1]
    assert forwarded.path == "/v1/images/generations"
    assert forwarded.body == {"model": "mock-image", "prompt": "a cat", "n": 2, "size": "1792x1024"}


async def test_base64_images_become_asset_urls(gateway: str, provider: MockProvider) -> None:
    png = b"\x89PNG\r\n\x1a\nfake"

    async def b64(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        return web.json_response({"created": 1, "data": [{"b64_json": base64.b64encode(png).decode()}]})

    provider.handler = b64
    _, events = await generate(gateway, {"model": "mock/image", "prompt": "a cat"})
    name, data = events[-1]
    assert name == "generation.completed" and data["output"]["url"].startswith(f"{gateway}/v1/assets/")
    async with aiohttp.ClientSession() as http, http.get(data["output"]["url"]) as r:
        assert (r.status, r.content_type, await r.read()) == (200, "image/png", png)


async def test_speech_completes_with_an_asset_url_serving_the_audio(gateway: str, provider: MockProvider) -> None:
    _, events = await generate(gateway, {"model": "mock/speech", "input": "say hi"})
    name, data = events[-1]
    assert name == "generation.completed"
    output = data["output"]
    assert output["content_type"] == "audio/wav" and output["bytes"] == len(b"RIFF....WAVEfmt ")
    assert provider.received[-1].body == {"model": "mock-tts", "input": "say hi", "voice": "alloy"}
    async with aiohttp.ClientSession() as http, http.get(output["url"]) as r:  # no credential needed
        assert (r.status, r.content_type, await r.read()) == (200, "audio/wav", b"RIFF....WAVEfmt ")


async def test_upstream_500_fails_the_generation_and_releases_the_credits(gateway: str, provider: MockProvider) -> None:
    async def broken(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        return web.json_response({"error": {"message": "boom"}}, status=500)

    provider.handler = broken
    _, events = await generate(gateway, {"model": "mock/chat", "prompt": "hi"})
    assert [name for name, _ in events] == ["generation.status", "generation.failed"]
    error = events[-1][1]["error"]
    assert (error["code"], error["type"], error["upstream_status"]) == ("upstream_error", "upstream_error", 500)
    assert error["message"]
    after = await balance(gateway)
    assert (after["spent"], after["held"]) == (0, 0)


async def test_upstream_stall_mid_stream_fails_with_a_timeout_and_charges_what_was_sent(
    gateway: str, provider: MockProvider
) -> None:
    provider.handler = stalls_after_one_chunk
    _, events = await asyncio.wait_for(generate(gateway, {"model": "mock/chat", "prompt": "hi"}), 10)
    assert events[-2] == ("generation.delta", {"delta": "one"})
    assert events[-1][0] == "generation.failed" and events[-1][1]["error"]["code"] == "upstream_timeout"
    after = await balance(gateway)
    assert after["held"] == 0 and after["spent"] > 0  # cut short after output: an estimate is charged


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "mock/chat"}, "prompt"),
        ({"model": "mock/chat", "prompt": ""}, "prompt"),
        ({"model": "mock/chat", "prompt": "hi", "temperature": 5}, "temperature"),
        ({"model": "mock/chat", "prompt": "hi", "max_tokens": True}, "max_tokens"),
        ({"model": "mock/chat", "prompt": "hi", "messages": []}, "messages"),
        ({"model": "mock/image", "prompt": "x", "aspect_ratio": "2:1"}, "aspect_ratio"),
        ({"model": "mock/image", "prompt": "x", "n": "2"}, "n"),
        ({"model": "mock/speech", "input": 3}, "input"),
    ],
)
async def test_schema_violations_are_400_naming_the_field(
    gateway: str, provider: MockProvider, body: dict[str, Any], param: str
) -> None:
    status, error = await error_of(gateway, body)
    assert (status, error["code"], error["param"]) == (400, "invalid_request", param)
    assert param in error["message"]
    assert provider.received == []


async def test_unknown_model_is_404_and_missing_credentials_401(gateway: str) -> None:
    assert (await error_of(gateway, {"model": "mock/none", "prompt": "x"}))[1]["code"] == "model_not_found"
    status, error = await error_of(gateway, {"model": "mock/chat", "prompt": "x"}, headers={})
    assert (status, error["code"]) == (401, "missing_credentials")


async def test_capabilities_without_an_openai_format_mapping_are_400(
    provider: MockProvider, gateway_env: None, policies_dir: Path
) -> None:
    config = gateway_config(provider.url, policies_dir)
    config["models"].append({"id": "mock/video", "name": "Mock Video", "creator": "Tests", "capability": "text2video",
                             "provider": "mock", "upstream_model": "mock-video"})
    server = await start_gateway(config)
    try:
        status, error = await error_of(server.url, {"model": "mock/video", "prompt": "a cat"})
    finally:
        await server.stop()
    assert (status, error["code"], error["param"]) == (400, "invalid_request", "model")
    assert "not supported by /v1/responses yet" in error["message"]


async def error_of(gateway: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{gateway}/v1/responses", json=body, headers=AUTH if headers is None else headers) as r:
            assert r.content_type == "application/json"
            return r.status, (await r.json())["error"]


async def test_client_disconnect_cancels_the_upstream_and_settles(gateway: str, provider: MockProvider) -> None:
    upstream_cancelled = asyncio.Event()
    provider.handler = endless_stream(upstream_cancelled)
    async with aiohttp.ClientSession() as http:
        response = await http.post(f"{gateway}/v1/responses", json={"model": "mock/chat", "prompt": "hi"}, headers=AUTH)
        async for name, _ in events_of(response):
            if name == "generation.delta":
                break
        response.close()  # hang up mid-stream
    await wait_for(upstream_cancelled, 5)
    for _ in range(50):  # the shielded settle runs after the cancellation; give it a moment
        after = await balance(gateway)
        if after["held"] == 0:
            break
        await asyncio.sleep(0.05)
    assert after["held"] == 0 and after["spent"] > 0
