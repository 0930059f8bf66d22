"""No account takes more than its share of a provider's connection pool (100 connections, all tenants)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from proxy.config import ConfigError, parse_config

from proxy.auth.api_keys import hash_key

from .gateway_harness import TEST_KEY, gateway_config, start_gateway, write_policy
from .mock_provider import MockProvider, chat_chunk, open_sse, sse, wait_for
from .test_metrics_e2e import samples, total

POOL, SHARE = 100, 50  # the shipped defaults: max_connections and half of it per account
WAIT_S = 0.5  # pool_wait_s, shorter than the shipped 5 s to keep the tests quick
CHAT = {"model": "mock/chat", "messages": [{"role": "user", "content": "hi"}]}
TENANT_KEYS = {"tenant-a": "sk_test_share_a_" + "a" * 24, "tenant-b": "sk_test_share_b_" + "b" * 24}
KEYS = "\n".join(f'  - {{id: {account}, hash: "{hash_key(secret)}", plan: tenant, account: {account}}}'
                 for account, secret in TENANT_KEYS.items())
POLICY = f"""
plans:
  demo:
    models: ["mock/*"]
  tenant:
    models: ["mock/*"]
    budget: {{credits: 100000, period: month, scope: account}}
keys:
{KEYS}
prices:
  "mock/*": {{per_request: 1}}
"""


class HeldStreams:
    """Streams of `user: hold` stay open after their first chunk until `release` is set; other calls answer."""

    def __init__(self, provider: MockProvider) -> None:
        self.open = 0
        self.release = asyncio.Event()
        provider.handler = lambda request, body: self._answer(provider, request, body)

    async def _answer(self, provider: MockProvider, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        if body.get("user") != "hold":
            return await provider.default(request, body)
        response = await open_sse(request)
        await response.write(sse(chat_chunk("held")))
        self.open += 1
        await wait_for(self.release, 30)
        await response.write(sse("[DONE]"))
        return response

    async def until_placed(self, calls: list[asyncio.Task[Any]]) -> None:
        """Until every call is either held open at the provider or already answered (refused)."""
        async with asyncio.timeout(10):
            while self.open + sum(call.done() for call in calls) < len(calls):
                await asyncio.sleep(0.02)


async def held_call(http: aiohttp.ClientSession, url: str, key: str) -> tuple[int, dict[str, Any] | None]:
    """A streamed call that stays open until released; the error body when refused."""
    async with http.post(f"{url}/v1/chat/completions", json={**CHAT, "stream": True, "user": "hold"},
                         headers={"Authorization": f"Bearer {key}"}) as r:
        if r.status != 200:
            return r.status, (await r.json())["error"]
        await r.read()
        return r.status, None


async def quick_call(http: aiohttp.ClientSession, url: str, key: str) -> int:
    async with http.post(f"{url}/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {key}"}) as r:
        await r.read()
        return r.status


@pytest.fixture
async def tenants_gateway(
    provider: MockProvider, gateway_env: None, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[str]:
    config = gateway_config(provider.url, write_policy(tmp_path / "policies", POLICY))
    config["providers"]["mock"] |= getattr(request, "param", {"pool_wait_s": WAIT_S})
    server = await start_gateway(config)
    yield server.url
    await server.stop()


async def balance(http: aiohttp.ClientSession, url: str, key: str) -> dict[str, Any]:
    async with http.get(f"{url}/v1/me", headers={"Authorization": f"Bearer {key}"}) as r:
        return (await r.json())["balance"]


async def test_an_account_over_its_share_is_refused_and_another_is_still_served(
    tenants_gateway: str, provider: MockProvider
) -> None:
    held = HeldStreams(provider)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        flood = [asyncio.create_task(held_call(http, tenants_gateway, TENANT_KEYS["tenant-a"])) for _ in range(POOL)]
        await held.until_placed(flood)
        # Before: tenant-a held all 100 connections and tenant-b's call waited for one until it timed out (504).
        assert await asyncio.wait_for(quick_call(http, tenants_gateway, TENANT_KEYS["tenant-b"]), 10) == 200
        held.release.set()
        results = await asyncio.gather(*flood)
        async with http.get(f"{tenants_gateway}/metrics") as r:
            page = samples(await r.text())
        spent = await balance(http, tenants_gateway, TENANT_KEYS["tenant-a"])
    refused = [error for status, error in results if status == 429]
    assert sum(status == 200 for status, _ in results) == SHARE and len(refused) == POOL - SHARE
    assert {(e["code"], e["rule"], e["limit"]) for e in refused if e} == {("concurrency_limit", "provider_connections", SHARE)}
    assert total(page, "edge_proxy_denials_total", kind="concurrency", rule="provider_connections") == POOL - SHARE
    assert (spent["spent"], spent["held"]) == (SHARE, 0)  # a refused call was admitted, then released: no charge


@pytest.mark.parametrize("tenants_gateway", [{}], indirect=True)  # the shipped pool_wait_s
async def test_a_burst_over_the_share_is_latency_when_the_accounts_calls_finish_in_time(
    tenants_gateway: str, provider: MockProvider
) -> None:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        burst = [quick_call(http, tenants_gateway, TENANT_KEYS["tenant-a"]) for _ in range(3 * SHARE)]
        assert set(await asyncio.gather(*burst)) == {200}


async def test_a_call_waits_a_bounded_time_for_a_full_pool_then_gets_503(
    tenants_gateway: str, provider: MockProvider
) -> None:
    held = HeldStreams(provider)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        flood = [asyncio.create_task(held_call(http, tenants_gateway, TENANT_KEYS[tenant]))
                 for tenant in ("tenant-a", "tenant-b") for _ in range(SHARE)]
        await held.until_placed(flood)
        async with http.post(f"{tenants_gateway}/v1/chat/completions", json=CHAT,
                             headers={"Authorization": f"Bearer {TEST_KEY}"}) as r:
            assert (r.status, (await r.json())["error"]["code"]) == (503, "generation_unavailable")
            assert r.headers["Retry-After"] == "1"
        held.release.set()
        assert {status for status, _ in await asyncio.gather(*flood)} == {200}
        assert await quick_call(http, tenants_gateway, TEST_KEY) == 200  # the pool is free again


def test_an_account_share_larger_than_the_pool_is_refused_at_start_up(policies_dir: Path) -> None:
    config = gateway_config("http://127.0.0.1:9/v1", policies_dir)
    config["providers"]["mock"] |= {"max_connections": 10, "max_connections_per_account": 11}
    with pytest.raises(ConfigError, match=r"providers\.mock: max_connections_per_account \(11\) exceeds"):
        parse_config(config, "test-config")
