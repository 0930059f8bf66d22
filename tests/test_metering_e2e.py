"""Metering through a real gateway: settle from real usage, release, partial charges, 402/429 and their
headers, against both stores; and Redis dying and coming back under a running gateway."""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from proxy.server import RunningServer

from .gateway_harness import TEST_KEY, gateway_config, start_gateway, write_policy
from .mock_provider import MockProvider, chat_chunk, open_sse, sse, usage_chunk
from .redis_server import RedisServer

AUTH = {"Authorization": f"Bearer {TEST_KEY}"}
MAX_TOKENS = 50
CHAT = {"model": "mock/chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": MAX_TOKENS}
CHAT_BYTES = json.dumps(CHAT).encode()
STREAM_BYTES = json.dumps({**CHAT, "stream": True}).encode()
BUDGET = 1_000_000

POLICY = f"""
plans:
  demo:
    models: ["mock/*"]
    rate_limits: [{{per: user, requests: 1000, window: 1h}}]
    budget: {{credits: {BUDGET}, period: month, scope: account}}
prices:
  "mock/*": {{per_request: 1}}
  mock/chat: {{per_request: 1, input_per_1k_tokens: 1000, output_per_1k_tokens: 2000}}
"""


def chat_cost(input_tokens: int, output_tokens: int) -> int:
    """The mock/chat price above: 1 per request, 1 per input token, 2 per output token."""
    return 1 + input_tokens + 2 * output_tokens


def reserve_for(body: bytes) -> int:
    """What the gateway reserves for mock/chat: input bounded by body bytes, output by max_tokens."""
    return chat_cost(len(body), MAX_TOKENS)


StartGateway = Callable[..., Awaitable[str]]


@pytest.fixture(params=["memory", "redis"])
async def start_metered(
    request: pytest.FixtureRequest, provider: MockProvider, gateway_env: None, tmp_path: Path
) -> AsyncIterator[StartGateway]:
    """Start one gateway with the given policy (and store settings) on memory or on a freshly flushed Redis."""
    store: dict[str, Any] = {"kind": "memory"}
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        async with aioredis.from_url(url) as client:
            await client.flushdb()
        store = {"kind": "redis", "redis_url": url}
    servers: list[RunningServer] = []

    async def start(policy: str, **store_settings: Any) -> str:
        policies = write_policy(tmp_path / "policies", policy)
        config = gateway_config(provider.url, policies, store={**store, **store_settings})
        servers.append(await start_gateway(config))
        return servers[-1].url

    yield start
    for server in servers:
        await server.stop()


async def post(
    gateway: str, body: bytes = CHAT_BYTES, route: str = "/v1/chat/completions"
) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{gateway}{route}", data=body, headers={**AUTH, "Content-Type": "application/json"}
        ) as response:
            return response.status, dict(response.headers), await response.read()


async def balance(gateway: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{gateway}/v1/me", headers=AUTH) as response:
            assert response.status == 200, await response.text()
            return (await response.json())["balance"]


async def settled_balance(
    gateway: str, done: Callable[[dict[str, Any]], bool] = lambda b: b["held"] == 0, timeout_s: float = 5.0
) -> dict[str, Any]:
    """The balance once `done` holds (default: nothing held); settles may finish after the response ends."""
    deadline = time.monotonic() + timeout_s
    while True:
        current = await balance(gateway)
        if done(current) or time.monotonic() > deadline:
            return current
        await asyncio.sleep(0.05)


async def test_json_answer_is_charged_exactly_its_usage(start_metered: StartGateway) -> None:
    gateway = await start_metered(POLICY)
    status, headers, _ = await post(gateway)
    assert status == 200
    # The header is the balance right after the hold: budget minus the reservation.
    assert headers["X-Credits-Balance"] == str(BUDGET - reserve_for(CHAT_BYTES))
    assert headers["RateLimit-Limit"] == "1000" and headers["RateLimit-Remaining"] == "999"
    assert int(headers["RateLimit-Reset"]) >= 1
    state = await settled_balance(gateway)
    assert state["spent"] == chat_cost(7, 4)  # the mock reports 7 prompt and 4 completion tokens
    assert state["remaining"] == BUDGET - chat_cost(7, 4)


async def test_stream_is_charged_from_its_final_usage_chunk_and_carries_the_headers(
    start_metered: StartGateway,
) -> None:
    gateway = await start_metered(POLICY)
    status, headers, body = await post(gateway, STREAM_BYTES)
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    assert body.endswith(b"data: [DONE]\n\n")
    assert headers["X-Credits-Balance"] == str(BUDGET - reserve_for(STREAM_BYTES))
    assert headers["RateLimit-Limit"] == "1000" and headers["RateLimit-Remaining"] == "999"
    assert "RateLimit-Reset" in headers
    state = await settled_balance(gateway)
    assert state["spent"] == chat_cost(7, 4)
    # The next request's header shows the first one settled at its real cost.
    _, next_headers, _ = await post(gateway)
    assert next_headers["X-Credits-Balance"] == str(BUDGET - chat_cost(7, 4) - reserve_for(CHAT_BYTES))


async def test_upstream_500_releases_the_reservation(start_metered: StartGateway, provider: MockProvider) -> None:
    async def broken(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        return web.json_response({"error": {"message": "boom"}}, status=500)

    provider.handler = broken
    gateway = await start_metered(POLICY)
    status, _, _ = await post(gateway)
    assert status == 502
    state = await settled_balance(gateway)
    assert (state["spent"], state["held"], state["remaining"]) == (0, 0, BUDGET)


async def test_client_disconnect_mid_stream_charges_part_of_the_reservation(
    start_metered: StartGateway, provider: MockProvider
) -> None:
    async def endless(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        response = await open_sse(request)
        while True:
            await response.write(sse(chat_chunk("tick")))
            await asyncio.sleep(0.02)

    provider.handler = endless
    gateway = await start_metered(POLICY)
    async with aiohttp.ClientSession() as http:
        response = await http.post(
            f"{gateway}/v1/chat/completions", data=STREAM_BYTES, headers={**AUTH, "Content-Type": "application/json"}
        )
        for _ in range(3):
            assert b"tick" in await response.content.readuntil(b"\n\n")
        response.close()  # hang up mid-stream
    state = await settled_balance(gateway)
    assert state["held"] == 0
    assert 0 < state["spent"] < reserve_for(STREAM_BYTES)


async def test_estimated_charge_of_a_cut_stream_never_exceeds_the_reservation(
    start_metered: StartGateway, provider: MockProvider
) -> None:
    """An upstream that ignores max_tokens must not make the disconnect estimate charge above the reserve."""
    chunks = MAX_TOKENS * 3

    async def flood_then_hang(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        response = await open_sse(request)
        for _ in range(chunks):
            await response.write(sse(chat_chunk("t")))
        await asyncio.sleep(30)
        return response

    provider.handler = flood_then_hang
    gateway = await start_metered(POLICY)
    async with aiohttp.ClientSession() as http:
        response = await http.post(
            f"{gateway}/v1/chat/completions", data=STREAM_BYTES, headers={**AUTH, "Content-Type": "application/json"}
        )
        for _ in range(chunks):
            await response.content.readuntil(b"\n\n")
        response.close()
    state = await settled_balance(gateway)
    assert state["held"] == 0
    assert state["spent"] == reserve_for(STREAM_BYTES)


RESPONSES_BYTES = json.dumps({"model": "mock/chat", "prompt": "hi", "max_tokens": MAX_TOKENS}).encode()


@pytest.mark.parametrize(("route", "first_body"), [
    ("/v1/chat/completions", STREAM_BYTES), ("/v1/responses", RESPONSES_BYTES),
], ids=["passthrough", "responses"])
async def test_stream_outliving_the_ttl_keeps_its_slot_and_hold_while_it_runs(
    start_metered: StartGateway, provider: MockProvider, route: str, first_body: bytes
) -> None:
    """The replica renews a running stream's lease and hold: no second stream sneaks in after the ttl, and the
    hold is never charged at the reserve in between; the end charges exactly the usage."""
    ttl_s = 0.6
    started, finish = asyncio.Event(), asyncio.Event()
    calls = 0

    async def first_runs_long(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        nonlocal calls
        calls += 1
        if calls > 1:  # a second stream that got in answers at once, so the test sees it instead of hanging
            return await provider.default(request, body)
        response = await open_sse(request)
        await response.write(sse(chat_chunk("start")))
        started.set()
        while not finish.is_set():
            await response.write(sse(chat_chunk("tick")))
            await asyncio.sleep(0.1)
        await response.write(sse(usage_chunk(7, 4)))
        await response.write(sse("[DONE]"))
        return response

    provider.handler = first_runs_long
    one_at_a_time = POLICY.replace("    budget:", "    concurrency: 1\n    budget:")
    gateway = await start_metered(one_at_a_time, reservation_ttl_s=ttl_s)
    first = asyncio.create_task(post(gateway, first_body, route))
    try:
        await asyncio.wait_for(started.wait(), 5)
        observed = []
        deadline = time.monotonic() + 3 * ttl_s
        while time.monotonic() < deadline:
            status, _, body = await post(gateway, STREAM_BYTES)
            state = await balance(gateway)
            code = json.loads(body)["error"]["code"] if status >= 400 else None
            observed.append((status, code, state["held"], state["spent"]))
            await asyncio.sleep(0.05)
    finally:
        finish.set()
    assert len(observed) >= 10
    assert set(observed) == {(429, "concurrency_limit", reserve_for(first_body), 0)}
    assert (await asyncio.wait_for(first, 5))[0] == 200
    state = await settled_balance(gateway)
    assert (state["spent"], state["held"]) == (chat_cost(7, 4), 0)


async def test_rate_limit_refusal_carries_retry_after_and_ratelimit_headers(start_metered: StartGateway) -> None:
    gateway = await start_metered(POLICY.replace("requests: 1000, window: 1h", "requests: 2, window: 1h"))
    remaining = []
    for _ in range(2):
        status, headers, _ = await post(gateway)
        assert status == 200
        remaining.append(headers["RateLimit-Remaining"])
    assert remaining == ["1", "0"]
    status, headers, body = await post(gateway)
    assert status == 429 and json.loads(body)["error"]["code"] == "rate_limit"
    # GCRA: one request back every 30 min, the bucket full again after one hour.
    assert 1790 <= int(headers["Retry-After"]) <= 1800
    assert headers["RateLimit-Limit"] == "2" and headers["RateLimit-Remaining"] == "0"
    assert 3590 <= int(headers["RateLimit-Reset"]) <= 3600
    state = await settled_balance(gateway)
    assert state["spent"] == 2 * chat_cost(7, 4)  # the refused request took nothing


async def test_budget_refusal_is_402_and_takes_nothing(start_metered: StartGateway) -> None:
    gateway = await start_metered(POLICY.replace(f"credits: {BUDGET}", "credits: 2"))
    body = json.dumps({"model": "mock/embed", "input": "hi"}).encode()
    answers = []
    for _ in range(3):
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{gateway}/v1/embeddings", data=body, headers=AUTH) as response:
                answers.append((response.status, response.headers.get("X-Credits-Balance")))
                payload = await response.json()
    assert answers == [(200, "1"), (200, "0"), (402, "0")]
    assert payload["error"]["code"] == "insufficient_credits"
    state = await settled_balance(gateway)
    assert (state["spent"], state["held"], state["remaining"]) == (2, 0, 0)


@asynccontextmanager
async def gateway_on_own_redis(
    provider: MockProvider, tmp_path: Path, policy: str, **store: Any
) -> AsyncIterator[tuple[str, RedisServer]]:
    """A gateway on a redis-server of its own, which the test may kill and restart; both stopped at the end.
    Its data survives a kill (append-only file), as a production Redis's does."""
    redis_server = RedisServer(workdir=tmp_path, persistent=True)
    redis_server.start()
    try:
        policies = write_policy(tmp_path / "policies", policy)
        server = await start_gateway(
            gateway_config(provider.url, policies, store={"kind": "redis", "redis_url": redis_server.url, **store})
        )
        try:
            yield server.url, redis_server
        finally:
            await server.stop()
    finally:
        redis_server.stop()


async def test_redis_killed_and_restarted_under_a_running_gateway(
    provider: MockProvider, gateway_env: None, tmp_path: Path
) -> None:
    """Credits fail closed: 503 at once while Redis is down; the replica stays ready (a shared outage must not
    empty the Service); the probe sees the outage and the recovery by itself, without traffic."""
    store = {"breaker_reset_s": 0.3, "fail_mode": {"credits": "closed"}}
    async with gateway_on_own_redis(provider, tmp_path, POLICY, **store) as (gateway, redis_server):
        assert (await post(gateway))[0] == 200
        redis_server.kill()
        # Readiness notices by itself, before any request has tripped the breaker, and stays 200.
        assert await asyncio.wait_for(readiness(gateway), 2.0) == (200, False)
        assert await store_up(gateway) == 0
        for _ in range(5):
            status, headers, body = await asyncio.wait_for(post(gateway), 2.0)
            assert status == 503 and json.loads(body)["error"]["code"] == "store_unavailable"
            assert headers["Retry-After"] == "1"
        redis_server.start()
        # No traffic needed: the probe alone finds Redis back.
        assert await eventually(lambda: store_up(gateway), 1, timeout_s=5.0) == 1
        assert await readiness(gateway) == (200, True)
        assert (await post(gateway))[0] == 200


async def test_rate_limits_fail_open_to_a_local_limiter_while_redis_is_down(
    provider: MockProvider, gateway_env: None, tmp_path: Path
) -> None:
    """Both fail modes open: with Redis gone the replica enforces the limit locally and stays ready."""
    unbudgeted = POLICY.replace("requests: 1000, window: 1h", "requests: 2, window: 1h").replace(
        f"    budget: {{credits: {BUDGET}, period: month, scope: account}}\n", "")
    store = {"fail_mode": {"rate_limits": "open", "credits": "open"}}
    async with gateway_on_own_redis(provider, tmp_path, unbudgeted, **store) as (gateway, redis_server):
        redis_server.kill()
        answers = [await asyncio.wait_for(post(gateway), 2.0) for _ in range(3)]
        assert [status for status, _, _ in answers] == [200, 200, 429]
        assert answers[2][1]["RateLimit-Limit"] == "2" and "Retry-After" in answers[2][1]
        assert await ready_status(gateway) == 200


async def test_a_request_finishing_while_redis_is_down_is_charged_its_usage_once_redis_is_back(
    provider: MockProvider, gateway_env: None, tmp_path: Path
) -> None:
    """The settle that cannot reach Redis waits in the replica's queue (visible as a gauge) and is applied when
    Redis returns: the ledger shows the real usage, not the reserve, and nothing held."""
    redis_down, started = asyncio.Event(), asyncio.Event()

    async def finishes_after_redis_died(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        response = await open_sse(request)
        await response.write(sse(chat_chunk("start")))
        started.set()
        await redis_down.wait()
        await response.write(sse(usage_chunk(7, 4)))
        await response.write(sse("[DONE]"))
        return response

    provider.handler = finishes_after_redis_died
    store = {"breaker_reset_s": 0.3}
    async with gateway_on_own_redis(provider, tmp_path, POLICY, **store) as (gateway, redis_server):
        call = asyncio.create_task(post(gateway, STREAM_BYTES))
        await asyncio.wait_for(started.wait(), 5)
        redis_server.kill()
        redis_down.set()
        assert (await asyncio.wait_for(call, 5))[0] == 200
        assert await eventually(lambda: pending_settles(gateway), 1, timeout_s=3.0) == 1
        redis_server.start()
        assert await eventually(lambda: pending_settles(gateway), 0, timeout_s=5.0) == 0
        state = await balance(gateway)
    assert (state["spent"], state["held"]) == (chat_cost(7, 4), 0)


async def pending_settles(gateway: str) -> int:
    """The gateway's edge_proxy_pending_settles gauge."""
    return await gauge(gateway, "edge_proxy_pending_settles")


async def gauge(gateway: str, name: str) -> int:
    async with aiohttp.ClientSession() as http, http.get(f"{gateway}/metrics") as response:
        text = await response.text()
    line = next(line for line in text.splitlines() if line.startswith(f"{name} "))
    return int(float(line.split()[1]))


async def ready_status(gateway: str) -> int:
    return (await readiness(gateway))[0]


async def readiness(gateway: str) -> tuple[int, bool]:
    """/readyz's status and what it reports about the store."""
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{gateway}/readyz") as response:
            return response.status, (await response.json()).get("dependencies", {}).get("store")


async def store_up(gateway: str) -> int:
    """The edge_proxy_store_up gauge, refreshed by a readiness probe as the kubelet's would."""
    await readiness(gateway)
    return await gauge(gateway, "edge_proxy_store_up")


async def eventually(probe: Callable[[], Awaitable[int]], wanted: int, timeout_s: float) -> int:
    """Probe until it returns the wanted status or the time is up; returns the last status."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = await asyncio.wait_for(probe(), 2.0)
        if status == wanted or time.monotonic() > deadline:
            return status
        await asyncio.sleep(0.1)


FREE_EMBED_POLICY = """
plans:
  demo:
    models: ["mock/*"]
    budget: {credits: 100, period: none, scope: account}
prices:
  mock/chat: {per_request: 1}
  mock/embed: {output_per_1k_tokens: 1}  # embeddings produce no output: reserved and charged 0
"""


async def test_calls_to_a_free_model_neither_poison_a_lifetime_budget_nor_open_the_breaker(
    start_metered: StartGateway,
) -> None:
    """A reserve of 0 (mock/embed is priced by output only) once broke the Redis settle halfway: every such call counted
    against the breaker, so after a few of them every budgeted request answered 503."""
    gateway = await start_metered(FREE_EMBED_POLICY)
    embed = json.dumps({"model": "mock/embed", "input": "hi"}).encode()
    answers = await asyncio.gather(*(post(gateway, embed, "/v1/embeddings") for _ in range(8)))
    assert [status for status, _, _ in answers] == [200] * 8
    status, _, body = await post(gateway)  # a priced call of the same account
    assert status == 200, body
    assert (await settled_balance(gateway))["spent"] == 1
