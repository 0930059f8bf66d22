"""Auto-pipelining (proxy/store/autopipeline.py): concurrent script calls share round trips to a real
redis-server, and each caller still gets exactly what a call of its own would: its own reply, its own error, a
StoreError within its deadline when Redis freezes, and no harm to the others when it hangs up."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import AsyncIterator

import pytest
import redis.asyncio as aioredis
from redis.asyncio.connection import Connection
from redis.exceptions import ConnectionError as RedisConnectionError

from proxy.store import RedisStore, StoreError, autopipeline
from proxy.store.autopipeline import AutoPipeline, Command, packed
from proxy.store.base import AdmitResult, StoreScriptError
from tests.redis_server import RedisServer
from tests.test_store import CREDIT, make_request

CALLS = 50
WIRE_DEADLINE_S = 0.25 + 0.5  # the shipped connect_timeout_s + op_timeout_s


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    with RedisServer(workdir=tmp_path) as redis_server:
        yield redis_server


@pytest.fixture(params=["hiredis", "redis-py"])
async def store(
    request: pytest.FixtureRequest, server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[RedisStore]:
    """Each test runs with both packers: hiredis's (the `fast` extra) and redis-py's (a plain install)."""
    if request.param == "hiredis" and not autopipeline.HIREDIS_AVAILABLE:
        pytest.skip("hiredis is not installed")
    if request.param == "redis-py":
        monkeypatch.setattr(autopipeline, "HIREDIS_AVAILABLE", False)
    redis_store = RedisStore(server.url)
    await redis_store.peek(make_request(budget=CREDIT))  # one connection open and the scripts loaded
    yield redis_store
    await redis_store.close()


def pipeline_of(store: RedisStore) -> AutoPipeline:
    assert store.auto_pipeline is not None
    return store.auto_pipeline


async def connections_received(server: RedisServer) -> int:
    client = aioredis.Redis.from_url(server.url)
    try:
        return int((await client.info("stats"))["total_connections_received"])
    finally:
        await client.aclose()


def admit_amount(i: int) -> object:
    """Account `i` asks for a hold of `i + 1` credits: a reply handed to the wrong caller shows."""
    return make_request(budget=1000 * CREDIT, amount=(i + 1) * CREDIT, account=f"acct{i}")


def held(result: AdmitResult) -> int:
    assert result.balance is not None
    return result.balance.held


async def test_concurrent_admits_share_round_trips_and_each_gets_its_own_reply(
    store: RedisStore, server: RedisServer
) -> None:
    pipeline = pipeline_of(store)
    calls, round_trips = pipeline.calls, pipeline.round_trips
    connections = await connections_received(server)
    results = await asyncio.gather(*(store.admit(admit_amount(i)) for i in range(CALLS)))
    assert [held(result) for result in results] == [(i + 1) * CREDIT for i in range(CALLS)]
    assert pipeline.calls - calls == CALLS
    assert pipeline.round_trips - round_trips == 1  # queued in one loop iteration: one write
    # Redis saw them on the connection the ping opened (the counter includes this test's own INFO client)
    assert await connections_received(server) - connections == 1


async def test_a_script_error_in_a_batch_fails_only_its_own_call(store: RedisStore, server: RedisServer) -> None:
    client = aioredis.Redis.from_url(server.url)
    await client.set("t:{acct3}:cr", "not a hash")  # the admit of account 3 fails inside its script (WRONGTYPE)
    await client.aclose()
    round_trips = pipeline_of(store).round_trips
    results = await asyncio.gather(*(store.admit(admit_amount(i)) for i in range(8)), return_exceptions=True)
    assert pipeline_of(store).round_trips - round_trips == 1
    assert isinstance(results[3], StoreScriptError)
    assert [held(r) for i, r in enumerate(results) if i != 3] == [(i + 1) * CREDIT for i in range(8) if i != 3]
    assert store.healthy


async def test_scripts_flushed_from_redis_are_loaded_again_for_a_whole_batch(
    store: RedisStore, server: RedisServer
) -> None:
    client = aioredis.Redis.from_url(server.url)
    await client.script_flush()  # as after a restart: every EVALSHA of the batch gets NOSCRIPT
    await client.aclose()
    results = await asyncio.gather(*(store.admit(admit_amount(i)) for i in range(8)))
    assert [held(result) for result in results] == [(i + 1) * CREDIT for i in range(8)]


async def test_a_frozen_redis_fails_every_call_of_the_batch_within_its_deadline_and_later_calls_work(
    store: RedisStore, server: RedisServer
) -> None:
    server.pause()
    try:
        started = time.monotonic()
        outcomes = await asyncio.gather(*(store.admit(admit_amount(i)) for i in range(CALLS)),
                                        return_exceptions=True)
        waited = time.monotonic() - started
    finally:
        server.resume()
    assert all(isinstance(outcome, StoreError) and not outcome.certain for outcome in outcomes), outcomes
    assert waited < WIRE_DEADLINE_S + 2.0  # the deadline, and room for what a loaded machine adds to it
    assert not store.healthy
    # The frozen batch's connection was closed with its replies unread: what comes next gets its own replies.
    later = await asyncio.gather(*(store.admit(admit_amount(i)) for i in range(CALLS, CALLS + 8)))
    assert [held(result) for result in later] == [(i + 1) * CREDIT for i in range(CALLS, CALLS + 8)]
    assert store.healthy


async def test_a_caller_that_hangs_up_mid_batch_leaves_the_others_their_replies_and_the_connection(
    store: RedisStore, server: RedisServer
) -> None:
    round_trips = pipeline_of(store).round_trips
    connections = await connections_received(server)
    server.pause()  # the batch sits on the wire, unanswered
    try:
        admits = [asyncio.create_task(store.admit(admit_amount(i))) for i in range(10)]
        await asyncio.sleep(0.1)
        admits[4].cancel()  # its client hung up: aiohttp cancels the handler
    finally:
        server.resume()
    results = await asyncio.gather(*admits, return_exceptions=True)
    assert isinstance(results[4], asyncio.CancelledError)
    assert [held(r) for i, r in enumerate(results) if i != 4] == [(i + 1) * CREDIT for i in range(10) if i != 4]
    assert pipeline_of(store).round_trips - round_trips == 1
    assert (await store.admit(admit_amount(20))).allowed
    assert await connections_received(server) - connections == 1  # this test's INFO client: no reconnect
    assert held(await store.peek(make_request(budget=1000 * CREDIT, account="acct4"))) == 5 * CREDIT  # Redis ran it


async def test_a_call_whose_caller_goes_before_its_batch_leaves_is_still_sent(store: RedisStore) -> None:
    """As with redis-py alone, which writes a call before its caller can be cancelled: an alert's ack made just
    before shutdown, or a settle next to a hang-up, still reaches Redis."""
    calls = pipeline_of(store).calls
    admit = asyncio.create_task(store.admit(admit_amount(40)))
    await asyncio.sleep(0)  # the admit is queued; its batch leaves in the next loop iteration
    assert pipeline_of(store).calls == calls
    admit.cancel()
    with pytest.raises(asyncio.CancelledError):
        await admit
    await asyncio.sleep(0.2)
    assert pipeline_of(store).calls == calls + 1
    assert held(await store.peek(make_request(budget=1000 * CREDIT, account="acct40"))) == 41 * CREDIT


async def test_every_caller_of_a_batch_hanging_up_closes_its_connection_not_the_pool(
    store: RedisStore, server: RedisServer
) -> None:
    server.pause()
    try:
        admits = [asyncio.create_task(store.admit(admit_amount(i))) for i in range(5)]
        await asyncio.sleep(0.1)
        for admit in admits:
            admit.cancel()
        await asyncio.gather(*admits, return_exceptions=True)
        await asyncio.sleep(0.05)  # the batch notices it has no caller left
    finally:
        server.resume()
    # Had the connection gone back with five replies unread, this call would read the first of them.
    result = await store.admit(admit_amount(30))
    assert held(result) == 31 * CREDIT


async def test_a_connection_lost_mid_batch_fails_every_call_of_it_and_the_store_recovers(
    store: RedisStore, server: RedisServer
) -> None:
    server.pause()
    admits = [asyncio.create_task(store.admit(admit_amount(i))) for i in range(10)]
    await asyncio.sleep(0.1)  # the batch is written, its replies not yet read
    server.kill()  # the connection drops under it
    outcomes = await asyncio.gather(*admits, return_exceptions=True)
    assert all(isinstance(outcome, StoreError) and not outcome.certain for outcome in outcomes), outcomes
    assert all(isinstance(outcome.__cause__, RedisConnectionError) for outcome in outcomes)  # not a timeout
    assert not store.healthy
    server.start()  # same port, empty: the scripts are loaded again on NOSCRIPT
    results = await asyncio.gather(*(store.admit(admit_amount(i)) for i in range(10)))
    assert [held(result) for result in results] == [(i + 1) * CREDIT for i in range(10)]
    assert store.healthy


@pytest.mark.skipif(not autopipeline.HIREDIS_AVAILABLE, reason="hiredis is not installed")
def test_hiredis_packs_a_batch_into_the_bytes_redis_py_would_send() -> None:
    connection = Connection()
    commands: list[Command] = [
        ("EVALSHA", "a" * 40, 2, "t:{acme}:tk:r1", "t:{acme}:cc", 1764150000000, -1, 0, "u:g:zoë", b"\x00raw"),
        ("SCRIPT", "LOAD", "return redis.call('GET', KEYS[1])"),
    ]
    assert b"".join(packed(connection, commands)) == b"".join(connection.pack_commands(commands))
