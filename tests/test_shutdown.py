"""Graceful shutdown of the real process: SIGTERM stops new connections, lets an open stream finish, exits 0."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from tests.gateway_harness import TEST_KEY, gateway_config
from tests.gateway_harness import gateway_process as harness_process
from tests.mock_provider import MockProvider, chat_chunk, open_sse, sse, usage_chunk

CHUNKS = 8
CHUNK_GAP_S = 0.25  # the stream lasts ~2 s, well inside the grace period
GRACE_S = 6.0


async def slow_stream(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
    response = await open_sse(request)
    for i in range(CHUNKS):
        await response.write(sse(chat_chunk(f"t{i}")))
        await asyncio.sleep(CHUNK_GAP_S)
    await response.write(sse(usage_chunk(3, CHUNKS)))
    await response.write(sse("[DONE]"))
    return response


@pytest.fixture
async def gateway_process(
    provider: MockProvider, policies_dir: Path, tmp_path: Path
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """`python -m proxy serve` in front of the slow mock; yields the process and its URL."""
    provider.handler = slow_stream
    config = gateway_config(provider.url, policies_dir, server={"shutdown_grace_s": GRACE_S})
    async with harness_process(config, tmp_path) as running:
        yield running


async def connection_refused(url: str, timeout_s: float = 2.0) -> bool:
    """True once a fresh TCP connection to the gateway is not accepted (polled: the listener closes asynchronously)."""
    host, port = url.removeprefix("http://").split(":")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.open_connection(host, int(port))
        except (ConnectionRefusedError, ConnectionResetError):
            # Refused, or reset when the attempt landed in the backlog of the closing listener: not accepted.
            return True
        writer.close()
        await asyncio.sleep(0.05)
    return False


async def test_sigterm_drains_the_open_stream_and_exits_zero(gateway_process: tuple[asyncio.subprocess.Process, str]) -> None:
    process, url = gateway_process
    payload = {"model": "mock/chat", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{url}/v1/chat/completions", json=payload, headers={"Authorization": f"Bearer {TEST_KEY}"},
        ) as response:
            assert response.status == 200
            received = await response.content.readuntil(b"\n\n")  # the stream is open and flowing
            process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            assert await connection_refused(url), "new connections are still accepted after SIGTERM"
            received += await asyncio.wait_for(response.content.read(), GRACE_S)
    events = [e for e in received.decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    assert sum('"content": "t' in e for e in events) == CHUNKS, "the stream lost chunks while draining"
    assert await asyncio.wait_for(process.wait(), GRACE_S) == 0
    assert time.monotonic() - signalled < GRACE_S
