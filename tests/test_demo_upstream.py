"""The built-in demo upstream behaves like the provider it stands in for, within bounds."""

from __future__ import annotations

import aiohttp

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
