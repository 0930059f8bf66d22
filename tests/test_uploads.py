"""`POST /v1/uploads` and `GET /v1/assets/{id}` over real HTTP, and the asset store's bounds."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest

from proxy.assets import AssetStore

from .gateway_harness import TEST_KEY, gateway_config, start_gateway
from .mock_provider import MockProvider

AUTH = {"Authorization": f"Bearer {TEST_KEY}"}
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256))


@pytest.fixture
async def small_gateway(provider: MockProvider, gateway_env: None, policies_dir: Path) -> AsyncIterator[str]:
    """Uploads up to 1 KiB, assets that live 0.3 s."""
    config = gateway_config(provider.url, policies_dir, server={"max_upload_bytes": 1024}, assets={"ttl_s": 0.3})
    server = await start_gateway(config)
    yield server.url
    await server.stop()


async def upload(gateway: str, data: bytes, content_type: str, headers: dict[str, str] = AUTH) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{gateway}/v1/uploads", data=data,
                             headers={**headers, "Content-Type": content_type}) as r:
            return r.status, await r.json()


async def test_upload_round_trip_needs_no_credential_to_fetch(gateway: str) -> None:
    status, answer = await upload(gateway, PNG, "image/png")
    assert status == 200
    assert answer["url"].startswith(f"{gateway}/v1/assets/")
    assert (answer["content_type"], answer["bytes"]) == ("image/png", len(PNG))
    assert answer["expires_at"].endswith("+00:00")
    async with aiohttp.ClientSession() as http, http.get(answer["url"]) as r:
        assert (r.status, r.content_type, await r.read()) == (200, "image/png", PNG)
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        assert "sandbox" in r.headers["Content-Security-Policy"]


async def test_upload_needs_a_credential(gateway: str) -> None:
    status, answer = await upload(gateway, PNG, "image/png", headers={})
    assert (status, answer["error"]["code"]) == (401, "missing_credentials")


async def test_oversize_upload_is_413(small_gateway: str) -> None:
    status, answer = await upload(small_gateway, b"x" * 2048, "video/mp4")
    assert (status, answer["error"]["code"], answer["error"]["max_bytes"]) == (413, "payload_too_large", 1024)


async def test_oversize_chunked_upload_is_413(small_gateway: str) -> None:
    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the limit must hold while reading
        for _ in range(4):
            yield b"x" * 512

    async with aiohttp.ClientSession() as http:
        async with http.post(f"{small_gateway}/v1/uploads", data=chunks(),
                             headers={**AUTH, "Content-Type": "audio/wav"}) as r:
            assert (r.status, (await r.json())["error"]["code"]) == (413, "payload_too_large")


@pytest.mark.parametrize("content_type", ["text/plain", "application/json", "application/octet-stream"])
async def test_other_media_types_are_415(gateway: str, content_type: str) -> None:
    status, answer = await upload(gateway, b"hello", content_type)
    assert (status, answer["error"]["code"]) == (415, "unsupported_media_type")


async def test_expired_and_unknown_assets_are_404(small_gateway: str) -> None:
    _, answer = await upload(small_gateway, PNG, "image/png")
    async with aiohttp.ClientSession() as http:
        async with http.get(answer["url"]) as r:
            assert r.status == 200
        await asyncio.sleep(0.4)
        async with http.get(answer["url"]) as r:
            assert (r.status, (await r.json())["error"]["code"]) == (404, "not_found")
        async with http.get(f"{small_gateway}/v1/assets/not-an-id") as r:
            assert r.status == 404


def test_store_evicts_least_recently_used_to_stay_within_bytes_and_count() -> None:
    store = AssetStore(ttl_s=60, max_total_bytes=10, max_count=3)
    a, b = store.put(b"aaaa", "image/png"), store.put(b"bbbb", "image/png")
    assert store.get(a.id) is not None  # a is now more recently used than b
    c = store.put(b"cccc", "image/png")  # 12 bytes would not fit: b goes
    assert [store.get(x.id) is not None for x in (a, b, c)] == [True, False, True]
    d = store.put(b"d", "image/png")
    e = store.put(b"e", "image/png")  # a fourth asset would pass max_count: the least recently used (a) goes
    assert [store.get(x.id) is not None for x in (a, c, d, e)] == [False, True, True, True]
    with pytest.raises(ValueError):
        store.put(b"x" * 11, "image/png")


def test_store_expires_by_its_clock_and_ids_are_unguessable() -> None:
    now = [1000.0]
    store = AssetStore(ttl_s=60, max_total_bytes=100, max_count=10, clock=lambda: now[0])
    asset = store.put(b"data", "audio/wav")
    assert len(asset.id) >= 22 and store.seconds_left(asset) == 60  # 16 random bytes, URL-safe base64
    now[0] += 60
    assert store.get(asset.id) is None
