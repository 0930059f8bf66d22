"""A client that sends its request headers slowly (slowloris) is cut off within `server.idle_timeout_s`."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from proxy.config import Config
from proxy.server import runner_options

from .gateway_harness import gateway_config, start_gateway
from .mock_provider import MockProvider

BOUND_S = 1.0


async def test_headers_dribbled_one_line_at_a_time_are_cut_off_within_the_bound(
    provider: MockProvider, gateway_env: None, policies_dir: Path
) -> None:
    server = await start_gateway(gateway_config(provider.url, policies_dir, server={"idle_timeout_s": BOUND_S}))
    try:
        host, port = server.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        started = time.monotonic()
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\n")
        closed_after = None
        for i in range(40):  # a header line every 0.1 s, never the blank line that ends them: 4 s if not cut off
            await asyncio.sleep(0.1)
            if reader.at_eof() or reader.exception() is not None:  # the gateway hung up
                closed_after = time.monotonic() - started
                break
            writer.write(f"X-Slow-{i}: x\r\n".encode())
        writer.close()
    finally:
        await server.stop()
    assert closed_after is not None and closed_after < BOUND_S + 1.0


def test_the_default_bound_is_finite_and_reaches_the_server() -> None:
    default = Config().server.idle_timeout_s
    assert 0 < default <= 75  # before: aiohttp's own 3630 s
    assert runner_options(Config())["keepalive_timeout"] == default
