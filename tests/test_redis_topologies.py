"""The store on Redis Cluster and Sentinel (store.redis_mode), against real local sets of redis-server.

Through the whole gateway, a primary fails over while calls run: every call gets an answer within a bound,
and the budget stays exact (what was answered 200 is what was spent, nothing stays held, never more than the
budget). On the cluster, accounts land on different primaries, and a script missing on a node (flushed, as on
a promoted replica) is loaded there again.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any, Awaitable, Callable

import aiohttp
import pytest
from redis.asyncio.cluster import RedisCluster

from proxy.auth.api_keys import hash_key
from proxy.auth.principal import Principal
from proxy.export.exporter import ExportSettings, Exporter
from proxy.export.sinks import JsonlSink
from proxy.meter import Meter
from proxy.policy.types import Budget, Decision
from proxy.store.base import CallUsage
from proxy.config import ConfigError, parse_config
from proxy.server import RunningServer
from tests.gateway_harness import TEST_KEY, gateway_config, start_gateway, write_policy
from tests.mock_provider import MockProvider
from proxy.store import RedisStore
from proxy.store.redis_client import Credentials, SentinelAddress
from tests.redis_server import RedisServer
from tests.redis_topologies import LocalCluster, LocalSentinels, redis_cli


BUDGET = 40  # credits per account; mock/embed costs exactly 1 and reserves exactly that
ANSWER_BOUND_S = 5.0  # no call may take longer, failover included (the store's deadline is 0.75 s)
KEYS = {f"acct{i}": "sk_test_" + str(i) * 40 for i in range(3)}  # three accounts, on different slots
POLICY = "plans:\n  paid:\n    models: [\"mock/*\"]\n" \
         f"    budget: {{credits: {BUDGET}, period: month, scope: account}}\n" \
         "keys:\n" + "".join(f"  - {{id: {a}, hash: \"{hash_key(k)}\", plan: paid, account: {a}}}\n"
                             for a, k in KEYS.items()) + \
         "prices:\n  \"mock/*\": {per_request: 1}\n"
EMBED = {"model": "mock/embed", "input": "hi"}
LEDGER_BUDGET = Decision(allowed=True, plan="paid", budget=Budget(credits=100), reserve_credits=1)


@pytest.fixture(scope="module")
def cluster() -> Any:
    with LocalCluster() as running:
        yield running


@pytest.fixture(scope="module")
def sentinels() -> Any:
    with LocalSentinels() as running:
        yield running


async def gateway_on(provider: MockProvider, tmp_path: Path, store: dict[str, Any]) -> RunningServer:
    policies = write_policy(tmp_path / "policies", POLICY)
    return await start_gateway(gateway_config(provider.url, policies, store={"kind": "redis", **store},
                                              server={"access_log": False}, demo={"enabled": False}))


async def call(http: aiohttp.ClientSession, url: str, key: str) -> int:
    """One embedding call; it must be answered within ANSWER_BOUND_S, whatever the store is going through."""
    async with http.post(f"{url}/v1/embeddings", json=EMBED, headers={"Authorization": f"Bearer {key}"},
                         timeout=aiohttp.ClientTimeout(total=ANSWER_BOUND_S)) as response:
        await response.read()
        return response.status


async def balance(url: str, key: str) -> dict[str, int]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{url}/v1/me", headers={"Authorization": f"Bearer {key}"}) as response:
            assert response.status == 200, await response.text()
            return (await response.json())["balance"]


async def load_through(url: str, fail_over: Callable[[], Awaitable[Any]]) -> dict[str, Counter[int]]:
    """Every account calls until its budget is spent (8 calls at a time each) while `fail_over` runs once
    early on; returns the statuses per account."""
    statuses: dict[str, Counter[int]] = {account: Counter() for account in KEYS}

    async def caller(http: aiohttp.ClientSession, account: str) -> None:
        while statuses[account][402] < 8:  # the budget is gone (and said so) for 8 calls: stop
            statuses[account][await call(http, url, KEYS[account])] += 1

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        callers = [asyncio.create_task(caller(http, a)) for a in KEYS for _ in range(8)]
        await asyncio.sleep(0.2)
        await fail_over()
        await asyncio.gather(*callers)
    return statuses


async def assert_budgets_exact(url: str, statuses: dict[str, Counter[int]]) -> None:
    """What was answered 200 is what was spent, unanswered holds are all released, and the budget is exact."""
    for account, key in KEYS.items():
        assert set(statuses[account]) <= {200, 402, 503}, statuses[account]
        deadline = time.monotonic() + 10
        while (state := await balance(url, key))["held"] and time.monotonic() < deadline:
            await asyncio.sleep(0.1)  # queued settles and cancels of calls cut by the failover land
        assert (state["spent"], state["held"]) == (statuses[account][200], 0), (account, state, statuses[account])
        # A call whose admit was cut may have held a credit until its cancel landed (docs/metering.md): the
        # calls refused meanwhile leave it unspent, and it is still there to spend, never more.
        async with aiohttp.ClientSession() as http:
            rest = [await call(http, url, key) for _ in range(BUDGET - statuses[account][200] + 1)]
        assert rest == [200] * (len(rest) - 1) + [402], (account, statuses[account], rest)


async def test_cluster_spreads_accounts_over_primaries(cluster: LocalCluster, provider: MockProvider,
                                                       gateway_env: None, tmp_path: Path) -> None:
    server = await gateway_on(provider, tmp_path, {"redis_url": cluster.url, "redis_mode": "cluster"})
    try:
        async with aiohttp.ClientSession() as http:
            assert {await call(http, server.url, key) for key in KEYS.values()} == {200}
        client = RedisCluster.from_url(cluster.url)
        try:
            await client.initialize()
            owners = {client.get_node_from_key(f"{{{account}}}").name for account in KEYS}
        finally:
            await client.aclose()
        assert len(owners) >= 2, "the accounts' hash tags should land on different primaries"
        for port in cluster.primaries():  # as on a replica promoted without the scripts
            assert "OK" in redis_cli(port, "SCRIPT", "FLUSH")
        async with aiohttp.ClientSession() as http:
            assert {await call(http, server.url, key) for key in KEYS.values()} == {200}
    finally:
        await server.stop()


async def test_the_ledger_exporter_drains_every_accounts_stream_on_every_primary(cluster: LocalCluster,
                                                                                 tmp_path: Path) -> None:
    """Each account's ledger stream lives in its own slot: the exporter finds them on every primary, and reads,
    claims and acknowledges each in its slot."""
    for port in cluster.primaries():
        redis_cli(port, "FLUSHALL")
    store = RedisStore(cluster.url, mode="cluster")
    try:
        meter = Meter(store, reservation_ttl_s=60)
        for i in range(12):
            account = f"acct{i % 3}"
            principal = Principal(kind="api_key", account=account, plan="paid", key_id=account)
            await (await meter.admit(principal, "m/a", LEDGER_BUDGET, f"r{i}")).settle(0.5, 1, CallUsage())
        out = tmp_path / "usage.jsonl"
        settings = ExportSettings(batch_size=5, claim_idle_s=0.1)
        counts = await Exporter(store, JsonlSink(out), settings).run(once=True)
        exported = [json.loads(line) for line in out.read_text().splitlines()]
        assert counts.exported == 12 and sorted(r["request_id"] for r in exported) == sorted(f"r{i}" for i in range(12))
        assert {r["account"] for r in exported} == set(KEYS)
        streams = await store.ledger_streams()
        assert [await store.claim_ledger(s, settings.group, "next", 0) for s in streams] == [[], [], []]
    finally:
        await store.close()  # writes the index of the streams it appended to (one key, in its own slot)
    reader = RedisStore(cluster.url, mode="cluster")
    try:
        assert await reader.active_ledger_streams(0) == streams
    finally:
        await reader.close()


async def test_cluster_failover_under_load_keeps_budgets_exact(cluster: LocalCluster, provider: MockProvider,
                                                               gateway_env: None, tmp_path: Path) -> None:
    for port in cluster.primaries():
        redis_cli(port, "FLUSHALL")
    server = await gateway_on(provider, tmp_path, {"redis_url": cluster.url, "redis_mode": "cluster"})
    try:
        replica = cluster.replicas()[0]
        statuses = await load_through(server.url, lambda: asyncio.to_thread(cluster.fail_over, replica))
        await assert_budgets_exact(server.url, statuses)
    finally:
        await server.stop()


async def test_sentinel_failover_under_load_keeps_budgets_exact(sentinels: LocalSentinels, provider: MockProvider,
                                                                gateway_env: None, tmp_path: Path) -> None:
    server = await gateway_on(provider, tmp_path, {"redis_url": sentinels.url, "redis_mode": "sentinel"})
    try:
        before = sentinels.primary_port()
        statuses = await load_through(server.url, lambda: asyncio.to_thread(sentinels.fail_over))
        assert sentinels.primary_port() != before
        await assert_budgets_exact(server.url, statuses)
    finally:
        await server.stop()


@pytest.mark.parametrize(("store", "message"), [
    ({"redis_mode": "sentinel", "redis_url": "redis://127.0.0.1:26379"}, "names the service"),
    ({"redis_mode": "sentinel", "redis_url": "redis://host-without-port/mymaster"}, "is not host:port"),
    ({"redis_mode": "replicated", "redis_url": "redis://h:1"}, "use one of standalone, cluster, sentinel"),
    ({"redis_url": "redis://h:1", "redis_password_env": "EDGE_PROXY_TEST_UNSET"}, "which is not set"),
    ({"redis_url": "redis://h:1", "redis_password_file": "/nonexistent/password"}, "not a readable file"),
])
def test_bad_redis_topology_settings_stop_start_up(store: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config({"store": {"kind": "redis", **store}}, "config.yaml")


def test_sentinel_url_names_sentinels_service_database_and_credentials() -> None:
    address = SentinelAddress.parse("rediss://gw:p%40ss@10.0.0.1:26379,[fd00::2]:26380/mymaster/2")
    assert address.sentinels == (("10.0.0.1", 26379), ("fd00::2", 26380))
    assert (address.service, address.db, address.tls, address.username, address.password) == \
        ("mymaster", 2, True, "gw", "p@ss")
    assert "p@ss" not in repr(address)


async def test_acl_user_and_password_from_a_file(tmp_path: Path) -> None:
    """The URL carries no secret; the password comes from a file (a mounted Secret); a wrong one is refused."""
    with RedisServer(args=["--user", "gateway", "on", ">s3cret", "~*", "&*", "+@all"]) as server:
        (tmp_path / "password").write_text("s3cret\n")
        store = RedisStore(server.url, credentials=Credentials("gateway", password_file=str(tmp_path / "password")))
        try:
            assert await store.ping()
        finally:
            await store.close()
        (tmp_path / "password").write_text("wrong\n")
        refused = RedisStore(server.url, credentials=Credentials("gateway", password_file=str(tmp_path / "password")))
        try:
            assert not await refused.ping()
        finally:
            await refused.close()
