"""A delivered answer is a 200 whatever the client does next, and its upstream connection goes back to the pool;
a client that hangs up before that is a quiet 499."""

from __future__ import annotations

import asyncio
import io
import json
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import aiohttp
import openai
import pytest
from aiohttp import web

from proxy.accesslog import configure_logging
from proxy.server import RunningServer
from tests.gateway_harness import TEST_KEY, gateway_config, start_gateway
from tests.mock_provider import MockProvider
from tests.test_metrics_e2e import samples, total

AUTH = {"Authorization": f"Bearer {TEST_KEY}"}
CHAT = {"model": "mock/chat", "messages": [{"role": "user", "content": "hi"}]}
CALLS = 10
BODY_END_AFTER_DONE_S = 0.25


@dataclass
class Recorded:
    """A gateway whose log lines are kept: `finish()` stops it and returns them."""

    url: str
    server: RunningServer
    stop_logging: Callable[[], None]
    buffer: io.StringIO = field(default_factory=io.StringIO)
    lines: list[dict[str, Any]] | None = None

    async def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{self.url}/metrics") as response:
                return samples(await response.text())

    async def finish(self) -> list[dict[str, Any]]:
        if self.lines is None:
            await self.server.stop()
            self.stop_logging()  # joins the writer thread: every line is in the buffer now
            self.lines = [json.loads(line) for line in self.buffer.getvalue().splitlines()]
        return self.lines


@pytest.fixture
async def recorded(provider: MockProvider, gateway_env: None, policies_dir: Path) -> AsyncIterator[Recorded]:
    buffer = io.StringIO()
    stop_logging = configure_logging("info", json=True, stream=buffer)
    server = await start_gateway(gateway_config(provider.url, policies_dir))
    gateway = Recorded(server.url, server, stop_logging, buffer)
    try:
        yield gateway
    finally:
        await gateway.finish()


def statuses(lines: list[dict[str, Any]]) -> list[int]:
    return [line["status"] for line in lines if line["logger"] == "edge_proxy.access" and line["path"] != "/metrics"]


def connections_seen(provider: MockProvider) -> set[object]:
    """Record each request's client address at the provider: one per upstream connection the gateway opened.

    The end of the body follows `[DONE]` a moment later, as it can over a real network: longer than the
    openai SDK waits for it (0.1 s) before closing.
    """
    peers: set[object] = set()

    async def note_peer(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        assert request.transport is not None
        peers.add(request.transport.get_extra_info("peername"))
        response = await provider.default(request, body)
        await asyncio.sleep(BODY_END_AFTER_DONE_S)
        return response

    provider.handler = note_peer
    return peers


async def sdk_stream(url: str) -> None:
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=TEST_KEY, max_retries=0) as client:
        stream = await client.chat.completions.create(**CHAT, stream=True)
        assert "".join([c.choices[0].delta.content or "" async for c in stream]) == "Hello from the mock"


async def hang_up_after_done(url: str) -> None:
    """What many SSE clients do: stop at `[DONE]` and close the connection without reading the end of the body."""
    async with aiohttp.ClientSession() as http:
        response = await http.post(f"{url}/v1/chat/completions", json={**CHAT, "stream": True}, headers=AUTH)
        async for line in response.content:
            if line.startswith(b"data: [DONE]"):
                break
        response.close()


@pytest.mark.parametrize("client", [sdk_stream, hang_up_after_done], ids=["openai-sdk", "hang-up-after-done"])
async def test_delivered_streams_are_200s_and_reuse_upstream_connections(
    client: Callable[[str], Awaitable[None]], recorded: Recorded, provider: MockProvider
) -> None:
    peers = connections_seen(provider)
    for _ in range(CALLS):
        await client(recorded.url)
        await asyncio.sleep(BODY_END_AFTER_DONE_S + 0.1)  # the gateway finishes a call after its client left
    page = await recorded.metrics()
    assert total(page, "edge_proxy_requests_total", status_class="2xx") == CALLS
    assert total(page, "edge_proxy_requests_total") == CALLS
    assert total(page, "edge_proxy_upstream_request_duration_seconds_count", outcome="ok") == CALLS
    assert statuses(await recorded.finish()) == [200] * CALLS
    assert len(peers) <= 2  # before: a new upstream connection for every call


async def test_client_gone_when_the_headers_go_out_is_a_quiet_499(recorded: Recorded, provider: MockProvider) -> None:
    client = socket.create_connection(("127.0.0.1", int(recorded.url.rsplit(":", 1)[1])))
    answered = asyncio.Event()

    async def answer_then_client_leaves(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        await response.write(b'{"choices": []}')  # headers and body reach the gateway in one segment ...
        client.close()  # ... and the client's FIN right behind them: both are read in the same loop turn
        answered.set()
        return response

    provider.handler = answer_then_client_leaves
    body = json.dumps(CHAT).encode()
    client.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {TEST_KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
    )
    await asyncio.wait_for(answered.wait(), 5)
    await asyncio.sleep(0.2)
    lines = await recorded.finish()
    assert statuses(lines) == [499]
    assert [line for line in lines if line["level"] in ("error", "critical")] == []
