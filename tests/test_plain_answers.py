"""Plain (non-stream) answers: a small one of known length leaves with its Content-Length in one send; a large,
compressed or unsized one streams chunked; either way the client gets exactly the upstream's bytes, and a body
the provider cuts short never looks complete."""

from __future__ import annotations

import gzip
import json
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.gateway_harness import TEST_KEY
from tests.mock_provider import MockProvider

USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


def answer(content: str) -> bytes:
    return json.dumps({"id": "c1", "object": "chat.completion", "model": "mock-up", "usage": USAGE,
                       "choices": [{"index": 0, "finish_reason": "stop",
                                    "message": {"role": "assistant", "content": content}}]}).encode()


async def call(gateway: str) -> tuple[aiohttp.ClientResponse, bytes]:
    payload = {"model": "mock/chat", "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{gateway}/v1/chat/completions", json=payload,
                             headers={"Authorization": f"Bearer {TEST_KEY}"}) as response:
            return response, await response.read()


@pytest.mark.parametrize(("size", "sized", "one_send"), [(10, True, True), (60_000, True, True),
                                                         (70_000, True, False), (10, False, False)])
async def test_plain_answer_framing_and_bytes(provider: MockProvider, gateway: str, size: int, sized: bool,
                                              one_send: bool) -> None:
    body = answer("x" * size)

    async def plain(request: web.Request, _: dict[str, Any]) -> web.StreamResponse:
        if sized:
            return web.Response(body=body, content_type="application/json")
        response = web.StreamResponse(headers={"Content-Type": "application/json"})  # chunked: no length known
        await response.prepare(request)
        await response.write(body)
        return response

    provider.handler = plain
    response, received = await call(gateway)
    assert response.status == 200 and received == body
    assert (response.headers.get("Content-Length") == str(len(body))) is one_send
    assert (response.headers.get("Transfer-Encoding") == "chunked") is not one_send


async def test_a_compressed_answer_streams_decompressed(provider: MockProvider, gateway: str) -> None:
    """The client session decompresses: the upstream's Content-Length is not the relayed body's."""
    body = answer("y" * 500)

    async def compressed(request: web.Request, _: dict[str, Any]) -> web.StreamResponse:
        return web.Response(body=gzip.compress(body), headers={"Content-Type": "application/json",
                                                                "Content-Encoding": "gzip"})

    provider.handler = compressed
    response, received = await call(gateway)
    assert response.status == 200 and received == body
    assert "Content-Encoding" not in response.headers and response.headers.get("Transfer-Encoding") == "chunked"


async def test_a_body_cut_short_never_looks_complete(provider: MockProvider, gateway: str) -> None:
    body = answer("z" * 100)

    async def cut(request: web.Request, _: dict[str, Any]) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = len(body)
        await response.prepare(request)
        await response.write(body[: len(body) // 2])
        assert request.transport is not None
        request.transport.close()  # the provider dies mid-body
        return response

    provider.handler = cut
    with pytest.raises(aiohttp.ClientPayloadError):
        await call(gateway)
