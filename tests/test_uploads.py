"""`POST /v1/uploads` and `GET /v1/assets/{id}` over real HTTP, and the asset store's bounds."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import aiohttp
import pytest
import redis.asyncio as aioredis

from proxy.api.state import GATEWAY
from proxy.assets import AssetStoreError, AssetStoreFull, MemoryAssets, ReceivingBudget, valid_asset_id
from proxy.assets.base import AssetBody
from proxy.auth.api_keys import hash_key
from proxy.config import AssetSettings
from proxy.server import RunningServer

from .gateway_harness import TEST_KEY, gateway_config, start_gateway, write_policy
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


@pytest.mark.parametrize("content_type", ["text/plain", "application/pdf", "application/octet-stream"])
async def test_other_media_types_are_415(gateway: str, content_type: str) -> None:
    status, answer = await upload(gateway, b"hello", content_type)
    assert (status, answer["error"]["code"]) == (415, "unsupported_media_type")


async def test_expired_urls_are_410_and_unsigned_ones_403(small_gateway: str) -> None:
    _, answer = await upload(small_gateway, PNG, "image/png")
    async with aiohttp.ClientSession() as http:
        async with http.get(answer["url"]) as r:
            assert r.status == 200
        await asyncio.sleep(datetime.fromisoformat(answer["expires_at"]).timestamp() - time.time() + 0.05)
        async with http.get(answer["url"]) as r:
            assert (r.status, (await r.json())["error"]["code"]) == (410, "asset_url_expired")
        async with http.get(f"{small_gateway}/v1/assets/not-an-id") as r:
            assert (r.status, (await r.json())["error"]["code"]) == (403, "invalid_asset_signature")


@pytest.fixture
async def gateway_server(provider: MockProvider, gateway_env: None, policies_dir: Path) -> AsyncIterator[RunningServer]:
    server = await start_gateway(gateway_config(provider.url, policies_dir))
    yield server
    await server.stop()


class BrokenBackend:
    """Serves every asset as a body that fails after its first chunk, as S3 can mid-object, and counts releases."""

    def __init__(self, opens: Callable[[str], Any]) -> None:
        self._opens = opens
        self.released = 0

    async def open(self, asset_id: str) -> AssetBody | None:
        body = await self._opens(asset_id)

        async def failing() -> AsyncIterator[bytes]:
            yield PNG[:10]
            raise AssetStoreError("s3 (assets): ReadTimeoutError")

        return AssetBody(body.asset, body.size, failing(), self._release)

    def _release(self) -> None:
        self.released += 1


async def test_an_asset_failing_mid_answer_is_cut_and_its_backend_released(
    gateway_server: RunningServer, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Headers sent, the backend fails: the connection is cut short of Content-Length (never a complete-looking
    answer), logged as such; a HEAD never reads the body, and still gives back what the backend holds."""
    _, answer = await upload(gateway_server.url, PNG, "image/png")
    store = gateway_server.runner.app[GATEWAY].assets.store
    backend = BrokenBackend(store.open)
    monkeypatch.setattr(store, "open", backend.open)
    async with aiohttp.ClientSession() as http:
        with caplog.at_level(logging.WARNING, logger="edge_proxy"):
            async with http.get(answer["url"]) as r:
                assert (r.status, r.content_length) == (200, len(PNG))
                with pytest.raises(aiohttp.ClientPayloadError):
                    await r.read()
        assert any("cut mid-answer" in record.getMessage() for record in caplog.records)
        assert backend.released == 1
        async with http.head(answer["url"]) as r:
            assert (r.status, r.content_length) == (200, len(PNG))
        assert backend.released == 2


def asset_store(clock: Callable[[], float] = time.time, **settings: Any) -> MemoryAssets:
    return MemoryAssets(AssetSettings(**settings), clock)


async def test_store_evicts_least_recently_used_to_stay_within_bytes_and_count() -> None:
    store = asset_store(ttl_s=60, max_total_bytes=10, max_count=3, max_bytes_per_account=10, max_count_per_account=3)
    a, b = await store.put(b"aaaa", "image/png", "acme"), await store.put(b"bbbb", "image/png", "acme")
    assert await store.get(a.id) is not None  # a is now more recently used than b
    c = await store.put(b"cccc", "image/png", "acme")  # 12 bytes would not fit: b goes
    assert [await store.get(x.id) is not None for x in (a, b, c)] == [True, False, True]
    d = await store.put(b"d", "image/png", "acme")
    e = await store.put(b"e", "image/png", "acme")  # a fourth asset would pass max_count: the least recently used (a) goes
    assert [await store.get(x.id) is not None for x in (a, c, d, e)] == [False, True, True, True]
    with pytest.raises(ValueError):
        await store.put(b"x" * 11, "image/png", "acme")


async def test_an_account_over_its_share_loses_only_its_own_least_recently_used() -> None:
    store = asset_store(max_total_bytes=100, max_count=10, max_bytes_per_account=12, max_count_per_account=3)
    kept = await store.put(b"b" * 10, "image/png", "tenant-b")
    flood = [await store.put(b"a", "image/png", "tenant-a") for _ in range(1001)]
    assert await store.get(kept.id) is not None
    assert [await store.get(asset.id) is not None for asset in flood[-4:]] == [False, True, True, True]  # count share: 3
    big = await store.put(b"a" * 12, "image/png", "tenant-a")  # byte share: 12, so the other three go
    assert [await store.get(asset.id) is not None for asset in (*flood[-3:], big, kept)] == [False, False, False, True, True]


async def test_a_full_store_refuses_rather_than_evict_another_accounts_asset() -> None:
    now = [1000.0]
    store = asset_store(lambda: now[0], ttl_s=60, max_total_bytes=100, max_count=4,
                        max_bytes_per_account=100, max_count_per_account=3)
    others = [await store.put(b"x", "image/png", tenant) for tenant in ("a", "a", "b", "b")]
    with pytest.raises(AssetStoreFull) as full:
        await store.put(b"c", "image/png", "c")
    assert full.value.retry_after_s == 60  # when the oldest asset expires
    assert [await store.get(asset.id) is not None for asset in others] == [True] * 4
    replacing = await store.put(b"y", "image/png", "a")  # under its share in a full store: a's own oldest makes room
    assert [await store.get(asset.id) is not None for asset in (*others, replacing)] == [False, True, True, True, True]
    now[0] += 60.5
    assert await store.get((await store.put(b"c", "image/png", "c")).id) is not None  # expired assets made room


def test_receiving_budget_is_held_while_reading_and_given_back() -> None:
    budget = ReceivingBudget(100)
    with budget.hold(60):
        with pytest.raises(AssetStoreFull):
            with budget.hold(41):
                pass
        with budget.hold(40):
            pass
    with budget.hold(100):
        pass


async def test_store_expires_by_its_clock_and_ids_are_unguessable() -> None:
    now = [1000.0]
    store = asset_store(lambda: now[0], ttl_s=60, max_total_bytes=100, max_count=10,
                        max_bytes_per_account=100, max_count_per_account=10)
    asset = await store.put(b"data", "audio/wav", "acme")
    assert valid_asset_id(asset.id) and asset.expires_at == 1060  # an account tag and 16 random bytes, URL-safe
    now[0] += 60
    assert await store.get(asset.id) is None


TENANT_KEYS = {"tenant-a": "sk_test_tenant_a_" + "a" * 24, "tenant-b": "sk_test_tenant_b_" + "b" * 24}


def tenant_policy(demo_limits: str) -> str:
    """The demo plan with `demo_limits`, and one key for each of two tenants (accounts) on a roomy plan."""
    keys = "\n".join(f'  - {{id: {account}, hash: "{hash_key(secret)}", plan: roomy, account: {account}}}'
                     for account, secret in TENANT_KEYS.items())
    return f"""
plans:
  demo:
    models: ["mock/*"]
    {demo_limits}
  roomy:
    models: ["mock/*"]
    rate_limits: [{{per: user, requests: 10000, window: 1m}}]
keys:
{keys}
prices:
  "mock/*": {{per_request: 1}}
"""


@pytest.fixture
async def tenants_gateway(provider: MockProvider, gateway_env: None, tmp_path: Path) -> AsyncIterator[str]:
    """Demo key on 10 uploads a minute; two tenants, each allowed 5 of the store's 20 assets."""
    policies = write_policy(tmp_path / "policies", tenant_policy("rate_limits: [{per: user, requests: 10, window: 1m}]"))
    config = gateway_config(provider.url, policies, server={"max_upload_bytes": 1024},
                            assets={"max_count": 20, "max_count_per_account": 5, "max_total_bytes": 64 * 1024,
                                    "max_bytes_per_account": 16 * 1024})
    server = await start_gateway(config)
    yield server.url
    await server.stop()


async def test_uploads_count_against_the_plans_request_limit(tenants_gateway: str) -> None:
    for i in range(10):
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{tenants_gateway}/v1/uploads", data=PNG,
                                 headers={**AUTH, "Content-Type": "image/png"}) as r:
                assert r.status == 200
                assert r.headers["RateLimit-Limit"] == "10" and r.headers["RateLimit-Remaining"] == str(9 - i)
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{tenants_gateway}/v1/uploads", data=PNG,
                             headers={**AUTH, "Content-Type": "image/png"}) as r:
            assert (r.status, (await r.json())["error"]["code"]) == (429, "rate_limit")
            assert int(r.headers["Retry-After"]) >= 1


async def test_one_tenants_flood_never_evicts_another_tenants_asset(tenants_gateway: str) -> None:
    def auth(account: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {TENANT_KEYS[account]}"}

    status, kept = await upload(tenants_gateway, PNG, "image/png", auth("tenant-b"))
    assert status == 200
    flood = [await upload(tenants_gateway, PNG, "image/png", auth("tenant-a")) for _ in range(60)]
    assert {status for status, _ in flood} == {200}
    async with aiohttp.ClientSession() as http:
        async with http.get(kept["url"]) as r:
            assert (r.status, await r.read()) == (200, PNG)
        alive = []
        for _, answer in flood:
            async with http.get(answer["url"]) as r:
                alive.append(r.status == 200)
    assert alive == [False] * 55 + [True] * 5  # tenant A keeps its 5 newest: its share, and no more


async def test_only_the_owners_account_deletes_an_asset(tenants_gateway: str) -> None:
    def auth(account: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {TENANT_KEYS[account]}"}

    _, kept = await upload(tenants_gateway, PNG, "image/png", auth("tenant-a"))
    asset = f"{tenants_gateway}/v1/assets/{kept['url'].split('/v1/assets/')[1].split('?')[0]}"
    async with aiohttp.ClientSession() as http:
        async with http.delete(asset, headers=auth("tenant-b")) as r:
            assert r.status == 404  # as if it did not exist: no oracle for other accounts' ids
        async with http.get(kept["url"]) as r:
            assert r.status == 200
        async with http.delete(asset) as r:
            assert r.status == 401
        async with http.delete(asset, headers=auth("tenant-a")) as r:
            assert r.status == 204
        async with http.get(kept["url"]) as r:
            assert (r.status, (await r.json())["error"]["code"]) == (404, "not_found")


async def held_upload(url: str, gate: asyncio.Event) -> tuple[int, dict[str, Any], str | None]:
    """A chunked upload (it holds the whole `max_upload_bytes` of receiving budget) whose body waits for `gate`."""
    async def body() -> AsyncIterator[bytes]:
        yield b"x" * 1024
        await gate.wait()
        yield b"x" * 1024

    async with aiohttp.ClientSession() as http:
        async with http.post(f"{url}/v1/uploads", data=body(), headers={**AUTH, "Content-Type": "video/mp4"}) as r:
            return r.status, await r.json(), r.headers.get("Retry-After")


async def until_done(tasks: list[asyncio.Task[Any]], count: int, timeout_s: float = 5.0) -> list[Any]:
    """The results of the tasks done once `count` of them are (or the timeout passed)."""
    deadline = time.monotonic() + timeout_s
    while sum(task.done() for task in tasks) < count and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return [task.result() for task in tasks if task.done()]


async def until_in_flight(url: str, count: int, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            async with http.get(f"{url}/v1/me", headers=AUTH) as r:
                if (await r.json())["concurrency"]["in_flight"] == count:
                    return
            await asyncio.sleep(0.02)
    raise TimeoutError(f"{count} requests were not in flight within {timeout_s}s")


async def test_concurrent_uploads_are_bounded_in_memory(
    provider: MockProvider, gateway_env: None, policies_dir: Path
) -> None:
    """8 uploads of up to 64 KiB at once against 256 KiB of receiving budget: 4 are read, 4 are refused at once."""
    config = gateway_config(provider.url, policies_dir, server={"max_upload_bytes": 64 * 1024},
                            assets={"max_receiving_bytes": 256 * 1024})
    server = await start_gateway(config)
    gate = asyncio.Event()
    try:
        uploads = [asyncio.create_task(held_upload(server.url, gate)) for _ in range(8)]
        refused = await until_done(uploads, 4)  # refusals come at once; the others wait for the rest of their bodies
        assert [(status, answer["error"]["code"], retry) for status, answer, retry in refused] == [
            (503, "overloaded", "1")] * 4
        gate.set()
        finished = await asyncio.gather(*uploads)
        assert sorted(status for status, _, _ in finished) == [200] * 4 + [503] * 4
        assert (await upload(server.url, PNG, "image/png"))[0] == 200  # the budget came back
    finally:
        gate.set()
        await server.stop()


@pytest.mark.parametrize("store_kind", ["memory", "redis"])
async def test_an_upload_holds_a_concurrency_slot_until_it_is_received(
    provider: MockProvider, gateway_env: None, tmp_path: Path, request: pytest.FixtureRequest, store_kind: str
) -> None:
    store: dict[str, Any] = {"kind": "memory"}
    if store_kind == "redis":
        store = {"kind": "redis", "redis_url": request.getfixturevalue("redis_url")}
        async with aioredis.from_url(store["redis_url"]) as client:
            await client.flushdb()
    policies = write_policy(tmp_path / "policies", tenant_policy("concurrency: 1"))
    server = await start_gateway(gateway_config(provider.url, policies, store=store))
    gate = asyncio.Event()
    try:
        first = asyncio.create_task(held_upload(server.url, gate))
        await until_in_flight(server.url, 1)  # the first upload is being received
        status, answer = await upload(server.url, PNG, "image/png")
        assert (status, answer["error"]["code"]) == (429, "concurrency_limit")
        gate.set()
        assert (await first)[0] == 200
        assert (await upload(server.url, PNG, "image/png"))[0] == 200  # the slot was released
    finally:
        gate.set()
        await server.stop()
