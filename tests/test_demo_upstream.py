"""The built-in demo upstream behaves like the provider it stands in for, within bounds."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import pytest

from proxy.upstream.demo import start_demo_upstream


async def test_image_count_is_capped_like_real_image_apis() -> None:
    runner, base_url = await start_demo_upstream()
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{base_url}/images/generations", json={"prompt": "x", "n": 1_000_000}) as r:
                many = await r.json()
            async with http.post(f"{base_url}/images/generations", json={"prompt": "x", "n": 3}) as r:
                three = await r.json()
    finally:
        await runner.cleanup()
    assert len(many["data"]) == 10
    assert len(three["data"]) == 3


async def test_a_caller_hanging_up_mid_stream_is_not_logged_as_an_error(caplog: pytest.LogCaptureFixture) -> None:
    runner, base_url = await start_demo_upstream()
    try:
        async with aiohttp.ClientSession() as http:
            body = {"model": "demo", "stream": True, "messages": [{"role": "user", "content": "a b c d e f g h i j"}]}
            response = await http.post(f"{base_url}/chat/completions", json=body)
            assert b"data: " in await response.content.readuntil(b"\n\n")
            response.close()
        await asyncio.sleep(0.3)  # the demo keeps writing into the closed connection
    finally:
        await runner.cleanup()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
