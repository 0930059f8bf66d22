"""Several gateway processes sharing one Redis: budgets and rate limits exact across replicas, and the
hold of a replica killed mid-stream charged at its reserved amount once it expires."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
import yaml
from aiohttp import web

from proxy.auth.api_keys import hash_key
from proxy.store import RedisStore

from .gateway_harness import PROVIDER_KEY, TEST_KEY, gateway_config, wait_healthy, write_policy
from .mock_provider import MockProvider, chat_chunk, open_sse, sse
from .redis_server import free_port
from .test_budget_alerts import SECRET as ALERT_SECRET, Receiver
from .test_workers import eventually

pytestmark = pytest.mark.asyncio(loop_scope="module")

REPO = Path(__file__).resolve().parent.parent
REPLICAS = 4
REQUESTS = 400
BUDGET = 100  # credits; mock/embed costs exactly 1 per request and reserves exactly that
RATE = 50  # requests per hour
RESERVATION_TTL_S = 1.5
LIMITED_KEY = "sk_test_" + "l" * 40
STREAMER_KEY = "sk_test_" + "s" * 40
LEDGER_KEY = "sk_test_" + "g" * 40
ALERTING_KEY = "sk_test_" + "a" * 40
MAX_TOKENS = 10

POLICY = f"""
plans:
  demo:
    models: ["mock/*"]
    budget: {{credits: {BUDGET}, period: month, scope: account}}
  limited:
    models: ["mock/*"]
    rate_limits: [{{per: key, requests: {RATE}, window: 1h}}]
  alerting:
    models: ["mock/*"]
    budget: {{credits: {BUDGET}, period: month, scope: account, alerts: {{thresholds: [0.25, 0.5, 1.0]}}}}
  streamer:
    models: ["mock/*"]
    concurrency: 1
    budget: {{credits: 100000, period: none, scope: account}}
keys:
  - {{id: limited, hash: "{hash_key(LIMITED_KEY)}", plan: limited}}
  - {{id: streamer, hash: "{hash_key(STREAMER_KEY)}", plan: streamer}}
  - {{id: ledger, hash: "{hash_key(LEDGER_KEY)}", plan: demo}}
  - {{id: alerting, hash: "{hash_key(ALERTING_KEY)}", plan: alerting}}
prices:
  "mock/*": {{per_request: 1}}
  mock/chat: {{per_request: 1, input_per_1k_tokens: 1000, output_per_1k_tokens: 2000}}
"""
EMBED = json.dumps({"model": "mock/embed", "input": "hi"}).encode()


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}


class Replica:
    """One `python -m proxy serve` process on its own loopback port."""

    def __init__(self, config_path: Path, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": str(REPO),
               "EDGE_PROXY_DEMO_KEY": TEST_KEY, "MOCK_PROVIDER_KEY": PROVIDER_KEY,
               "EDGE_PROXY_ALERT_SECRET": ALERT_SECRET.decode()}
        with log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "proxy", "serve", "--config", str(config_path), "--port", str(self.port)],
                cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=log,
            )

    def stop(self) -> None:
        """Terminate, then kill if it does not exit in time."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


async def replica_healthy(replica: Replica) -> None:
    await wait_healthy(replica.url, lambda: replica.process.poll() is not None)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def provider() -> AsyncIterator[MockProvider]:
    mock = await MockProvider().start()
    yield mock
    await mock.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def webhook() -> AsyncIterator[Receiver]:
    """The budget alerts' webhook: verifies every signature, keeps what it was sent."""
    receiver = await Receiver().start()
    yield receiver
    await receiver.stop()


@pytest.fixture(scope="module")
def config_path(
    redis_url: str, provider: MockProvider, webhook: Receiver, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    workdir = tmp_path_factory.mktemp("replicas")
    config = gateway_config(
        provider.url, write_policy(workdir / "policies", POLICY),
        server={"access_log": False, "log_level": "warning", "workers": 1},  # a replica: one process, as a pod
        # The shipped store timeouts: 400 requests at once must not turn into 503s (docs/metering.md).
        store={"kind": "redis", "redis_url": redis_url, "reservation_ttl_s": RESERVATION_TTL_S},
        alerts={"webhook_url": webhook.url, "secret_env": "EDGE_PROXY_ALERT_SECRET"},
    )
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def replicas(config_path: Path, redis_url: str) -> AsyncIterator[list[Replica]]:
    """Four gateway processes on one freshly flushed Redis, stopped however the tests end."""
    async with aioredis.from_url(redis_url) as client:
        await client.flushdb()
    started: list[Replica] = []
    try:
        for i in range(REPLICAS):
            started.append(Replica(config_path, config_path.parent / f"replica{i}.log"))
        await asyncio.gather(*(replica_healthy(r) for r in started))
        yield started
    finally:
        for replica in started:
            replica.stop()


async def fan_out(
    replicas: list[Replica], path: str, body: bytes, key: str,
    allowed: tuple[str, ...] = ("insufficient_credits", "rate_limit"),
) -> list[tuple[int, Any]]:
    """REQUESTS concurrent posts spread round-robin over the replicas: (status, headers) each."""
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as http:

        async def one(i: int) -> tuple[int, Any]:
            async with http.post(f"{replicas[i % len(replicas)].url}{path}", data=body, headers=auth(key)) as response:
                payload = await response.read()
                if response.status != 200:
                    assert json.loads(payload)["error"]["code"] in allowed, payload
                return response.status, response.headers

        return await asyncio.gather(*(one(i) for i in range(REQUESTS)))


async def me(replica: Replica, key: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{replica.url}/v1/me", headers=auth(key)) as response:
            assert response.status == 200, await response.text()
            return await response.json()


async def balance(replica: Replica, key: str) -> dict[str, Any]:
    return (await me(replica, key))["balance"]


async def test_budget_is_exact_across_replicas(replicas: list[Replica]) -> None:
    answers = await fan_out(replicas, "/v1/embeddings", EMBED, TEST_KEY)
    assert Counter(status for status, _ in answers) == {200: BUDGET, 402: REQUESTS - BUDGET}
    # Each admission saw a distinct balance: every credit was held exactly once.
    balances = sorted(int(headers["X-Credits-Balance"]) for status, headers in answers if status == 200)
    assert balances == list(range(BUDGET))
    assert all(headers["X-Credits-Balance"] == "0" for status, headers in answers if status == 402)
    # an answer is sent before its settle: on a loaded machine the last settles land just after the burst
    deadline = time.monotonic() + 5
    while (await balance(replicas[0], TEST_KEY))["held"] and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    for replica in replicas:
        state = await balance(replica, TEST_KEY)
        assert (state["spent"], state["held"], state["remaining"]) == (BUDGET, 0, 0)


async def test_budget_alerts_fire_once_per_threshold_across_replicas(
    replicas: list[Replica], webhook: Receiver
) -> None:
    """Four replicas settle a concurrent burst that crosses every threshold: each is claimed by exactly one settle
    (the `fired` counters add up to the thresholds) and reaches the webhook once, signed."""
    answers = await fan_out(replicas, "/v1/embeddings", EMBED, ALERTING_KEY)
    assert Counter(status for status, _ in answers) == {200: BUDGET, 402: REQUESTS - BUDGET}
    await eventually(lambda: len(webhook.alerts) >= 3)
    await asyncio.sleep(0.5)  # room for a duplicate to show up, were there one
    assert sorted(alert["threshold"] for alert in webhook.alerts) == [0.25, 0.5, 1.0]
    assert len(set(webhook.ids())) == 3 and all(alert["account"] == "alerting" for alert in webhook.alerts)
    assert [alert["spent"] >= alert["threshold"] * BUDGET for alert in webhook.alerts] == [True] * 3
    fired = delivered = 0
    async with aiohttp.ClientSession() as http:
        for replica in replicas:
            async with http.get(f"{replica.url}/metrics") as response:
                text = await response.text()
            fired += metric_value(text, 'edge_proxy_budget_alerts_total{outcome="fired"}')
            delivered += metric_value(text, 'edge_proxy_budget_alerts_total{outcome="delivered"}')
    assert (fired, delivered) == (3, 3)


def metric_value(exposition: str, sample: str) -> int:
    return sum(int(float(line.split()[-1])) for line in exposition.splitlines() if line.startswith(sample + " "))


async def test_rate_limit_is_exact_across_replicas(replicas: list[Replica]) -> None:
    answers = await fan_out(replicas, "/v1/embeddings", EMBED, LIMITED_KEY)
    assert Counter(status for status, _ in answers) == {200: RATE, 429: REQUESTS - RATE}
    remaining = sorted(int(headers["RateLimit-Remaining"]) for status, headers in answers if status == 200)
    # The first admission sees RATE-1 left and the last sees 0. In between, a replica whose clock reading is a
    # few ms older than one already applied sees one fewer (docs/metering.md), so values may repeat or skip.
    assert (remaining[0], remaining[-1]) == (0, RATE - 1)
    assert all(0 <= value < RATE for value in remaining)
    for status, headers in answers:
        assert headers["RateLimit-Limit"] == str(RATE) and int(headers["RateLimit-Reset"]) > 0
        if status == 429:
            assert headers["RateLimit-Remaining"] == "0" and int(headers["Retry-After"]) >= 1


async def test_hold_of_a_replica_killed_mid_stream_is_charged_after_the_ttl(
    replicas: list[Replica], provider: MockProvider
) -> None:
    """docs/metering.md: an expired hold is charged at the reserved amount, as seen from another replica."""
    first_chunk_sent = asyncio.Event()

    async def hangs_after_one_chunk(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        response = await open_sse(request)
        await response.write(sse(chat_chunk("partial")))
        first_chunk_sent.set()
        await asyncio.sleep(30)  # cancelled when the dying replica's connection drops
        return response

    body = json.dumps({"model": "mock/chat", "messages": [{"role": "user", "content": "hi"}],
                       "max_tokens": MAX_TOKENS, "stream": True}).encode()
    reserve = 1 + len(body) + 2 * MAX_TOKENS  # input bounded by body bytes, output by max_tokens
    victim, observer = replicas[-1], replicas[0]
    provider.handler = hangs_after_one_chunk
    try:
        async with aiohttp.ClientSession() as http:
            admitted_at = time.monotonic()
            response = await http.post(f"{victim.url}/v1/chat/completions", data=body, headers=auth(STREAMER_KEY))
            assert response.status == 200
            assert b"partial" in await asyncio.wait_for(response.content.readuntil(b"\n\n"), 5)
            held = await me(observer, STREAMER_KEY)
            assert (held["balance"]["spent"], held["balance"]["held"]) == (0, reserve)
            assert held["concurrency"]["in_flight"] == 1
            victim.process.send_signal(signal.SIGKILL)
            victim.process.wait(timeout=5)
            response.close()
        state = await eventually_unheld(observer, STREAMER_KEY, timeout_s=RESERVATION_TTL_S + 3)
        assert time.monotonic() - admitted_at >= RESERVATION_TTL_S  # not before the ttl
        assert (state["balance"]["spent"], state["balance"]["held"]) == (reserve, 0)
        assert state["concurrency"]["in_flight"] == 0  # the dead replica's lease expired with it
    finally:
        provider.handler = None


async def test_replica_stopped_mid_stream_settles_before_it_exits(
    replicas: list[Replica], provider: MockProvider, config_path: Path
) -> None:
    """SIGTERM: once the shutdown grace is over the stream is cut and charged what it used, not left to expire."""
    graceful = config_path.parent / "graceful.yaml"
    config = yaml.safe_load(config_path.read_text())
    config["server"]["shutdown_grace_s"] = 0.3
    graceful.write_text(yaml.safe_dump(config))

    async def hangs_after_one_chunk(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        response = await open_sse(request)
        await response.write(sse(chat_chunk("partial")))
        await asyncio.sleep(30)  # cancelled when the stopping replica closes the connection
        return response

    body = json.dumps({"model": "mock/chat", "messages": [{"role": "user", "content": "hi"}],
                       "max_tokens": MAX_TOKENS, "stream": True}).encode()
    stopping = Replica(graceful, config_path.parent / "graceful.log")
    provider.handler = hangs_after_one_chunk
    try:
        async with aiohttp.ClientSession() as http:
            await replica_healthy(stopping)
            before = await balance(replicas[0], STREAMER_KEY)
            response = await http.post(f"{stopping.url}/v1/chat/completions", data=body, headers=auth(STREAMER_KEY))
            assert b"partial" in await asyncio.wait_for(response.content.readuntil(b"\n\n"), 5)
            stopping.process.send_signal(signal.SIGTERM)
            await asyncio.get_running_loop().run_in_executor(None, stopping.process.wait, 5)
            response.close()
        after = await balance(replicas[0], STREAMER_KEY)  # at once: well within the reservation ttl
        charged = after["spent"] - before["spent"]
        assert after["held"] == 0 and 0 < charged < 1 + len(body) + 2 * MAX_TOKENS
    finally:
        provider.handler = None
        stopping.stop()


async def eventually_unheld(replica: Replica, key: str, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        state = await me(replica, key)
        if state["balance"]["held"] == 0 or time.monotonic() > deadline:
            return state
        await asyncio.sleep(0.1)


async def ledger_of(reader: RedisStore, replica: Replica, key: str) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """The key's account state (`/v1/me`) and its ledger records."""
    state = await me(replica, key)
    records = await reader.read_ledger(f"ep:{{{state['principal']['account']}}}:lg", count=100_000)
    return state, [record.fields for record in records]


def net_calls(records: list[dict[str, str]]) -> int:
    """Calls charged: one per settle or expired hold, minus the expired holds a late release or cancel undid."""
    counted = sum(1 for r in records if r["late"] == "0" and r["outcome"] in ("settled", "expired"))
    return counted - sum(1 for r in records if r["late"] == "1" and r["outcome"] in ("released", "cancelled"))


async def test_every_charge_has_exactly_one_ledger_record_across_replicas(
    replicas: list[Replica], redis_url: str
) -> None:
    """A burst over the replicas on an account of its own: once every hold is settled or undone (cancels of
    admits whose answer was lost land in the background), the ledger's records add up to exactly what the budget
    spent, one charged call per 200 (a hold charged at expiry and corrected by its late settle is one call: this
    test's ttl is short), ids unique, and `/v1/usage` on any replica reports the same. The account of the killed
    and stopped replicas' streams above balances too."""
    replicas = [replica for replica in replicas if replica.process.poll() is None]  # one was killed above
    answers = await fan_out(replicas, "/v1/embeddings", EMBED, LEDGER_KEY, allowed=("insufficient_credits",
                            "store_unavailable", "overloaded"))
    served = sum(1 for status, _ in answers if status == 200)
    reader = RedisStore(redis_url)
    try:
        deadline = time.monotonic() + 3 * RESERVATION_TTL_S + 5
        while (state := await me(replicas[0], LEDGER_KEY))["balance"]["held"] and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        state, records = await ledger_of(reader, replicas[0], LEDGER_KEY)
        assert state["balance"]["held"] == 0 and 0 < served <= BUDGET
        assert sum(int(r["credits"]) for r in records) == state["balance"]["spent"] * 1_000_000 == served * 1_000_000
        assert net_calls(records) == served
        assert len({r["id"] for r in records}) == len(records)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{replicas[1].url}/v1/usage", headers=auth(LEDGER_KEY)) as response:
                usage = await response.json()
        assert (usage["total"]["credits"], usage["total"]["calls"]) == (served, served)

        state, records = await ledger_of(reader, replicas[-1], STREAMER_KEY)  # the killed and the stopped replica's
        assert sum(int(r["credits"]) for r in records) == round(state["balance"]["spent"] * 1_000_000)
        assert len({r["id"] for r in records}) == len(records)
    finally:
        await reader.close()
