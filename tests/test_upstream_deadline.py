"""The provider's `total_s` deadline ends a long stream once, cleanly, with a clear reason, and never spins."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest

from .gateway_harness import TEST_KEY, gateway_config, start_gateway
from .mock_provider import MockProvider, endless_stream, wait_for

AUTH = {"Authorization": f"Bearer {TEST_KEY}"}
TOTAL_S = 1.0
KEEPALIVE_S = 0.1
ROUTES = {
    "/v1/chat/completions": {"model": "mock/chat", "messages": [{"role": "user", "content": "hi"}], "stream": True},
    "/v1/responses": {"model": "mock/chat", "prompt": "hi"},
}


@pytest.mark.parametrize("route", ROUTES)
async def test_stream_longer_than_total_ends_at_the_deadline_without_a_ping_flood(
    route: str, provider: MockProvider, gateway_env: None, policies_dir: Path
) -> None:
    upstream_closed = asyncio.Event()
    provider.handler = endless_stream(upstream_closed)  # a chunk every 50 ms, for ever
    timeouts = {"connect_s": 2, "first_byte_s": 2, "idle_s": 2, "total_s": TOTAL_S}
    config = gateway_config(provider.url, policies_dir, server={"sse_keepalive_s": KEEPALIVE_S})
    config["providers"]["mock"]["timeouts"] = timeouts
    server = await start_gateway(config)
    try:
        started, cpu_started = time.monotonic(), time.process_time()
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{server.url}{route}", json=ROUTES[route], headers=AUTH) as r:
                body = await asyncio.wait_for(r.read(), 10)
        elapsed, cpu = time.monotonic() - started, time.process_time() - cpu_started
        await wait_for(upstream_closed, 5)
    finally:
        await server.stop()
    # Before the fix, aiohttp's own `total` made every later read fail at once, each failure taken for a quiet
    # moment: a busy loop writing hundreds of thousands of pings until `idle_s` ran out.
    assert body.count(b": ping") <= 2
    assert body.count(b"upstream_timeout") == 1
    assert f"longer than {TOTAL_S:g}s".encode() in body
    assert TOTAL_S <= elapsed < TOTAL_S + 1.5
    assert cpu < elapsed  # gateway, mock and client share this process; a spinning loop pins it at 100%
