"""A burst on one replica against a healthy Redis is latency, or a clear 503 `overloaded` from the store's own
admission queue; never `store_unavailable`, and never an open circuit breaker. Shipped store defaults."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import AsyncIterator

import pytest

from proxy.errors import ApiError
from proxy.meter import Meter
from proxy.policy.types import Budget, Decision
from proxy.auth.principal import Principal
from proxy.store import RedisStore, ResilientStore, StoreError, StoreOverloaded
from tests.redis_server import RedisServer
from tests.test_store import CREDIT, RecordingObserver, make_request

BURST = 400
# About what a gateway spends on the event loop per request besides the store call (parsing, auth, policy,
# relay, access log); bench/relay.py measures ~0.4 ms, this leaves room for a slower machine.
HANDLER_CPU_S = 0.001


def busy(seconds: float) -> None:
    """Hold the event loop, as a request handler's own work does."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    with RedisServer(workdir=tmp_path) as redis_server:
        yield redis_server


async def test_a_burst_of_400_admits_with_default_settings_is_never_a_store_outage(server: RedisServer) -> None:
    store = ResilientStore(RedisStore(server.url), fail_rate_limits="closed")

    async def one_request() -> str:
        busy(HANDLER_CPU_S)
        try:
            result = await store.admit(make_request(budget=10_000 * CREDIT, amount=CREDIT, lease=10_000))
        except StoreError as exc:
            return type(exc).__name__
        busy(HANDLER_CPU_S / 2)
        return "admitted" if result.allowed else "denied"

    outcomes = Counter(await asyncio.gather(*(one_request() for _ in range(BURST))))
    assert outcomes == {"admitted": BURST}
    assert store.breaker_state == "closed"
    await store.close()


def meter_principal() -> tuple[Principal, Decision]:
    principal = Principal(kind="api_key", account="acme", plan="pro", key_id="key1")
    budget = Budget(credits=1000, period="none", scope="account")
    return principal, Decision(allowed=True, plan="pro", budget=budget, reserve_credits=1.0)


async def test_a_full_admission_queue_is_503_overloaded_with_retry_after(server: RedisServer) -> None:
    """2 calls on the wire and 2 waiting while Redis stalls: the 3rd waiting call is refused at once, without
    touching the breaker; the others are answered once Redis moves again."""
    redis_store = RedisStore(server.url, max_connections=2, max_waiting_calls=2)
    observer = RecordingObserver()
    store = ResilientStore(redis_store, observer=observer)
    meter = Meter(store)
    principal, decision = meter_principal()
    assert await store.ping()
    server.pause()
    try:
        calls = [asyncio.create_task(meter.admit(principal, "m", decision, f"r{i}")) for i in range(4)]
        await asyncio.sleep(0.05)
        with pytest.raises(ApiError) as refused:
            await meter.admit(principal, "m", decision, "one-too-many")
    finally:
        server.resume()
    assert (refused.value.status, refused.value.code) == (503, "overloaded")
    assert refused.value.headers["Retry-After"] == "1"
    admitted = await asyncio.gather(*calls)
    assert all(admission.headers for admission in admitted)
    assert store.breaker_state == "closed" and observer.breaker_states == []
    assert ("admit", "overloaded") in observer.outcomes and ("admit", "error") not in observer.outcomes
    await store.close()


async def test_a_call_that_waits_longer_than_the_queue_timeout_is_overloaded_not_a_failure(server: RedisServer) -> None:
    redis_store = RedisStore(server.url, max_connections=1, queue_timeout_s=0.2, op_timeout_s=2)
    assert await redis_store.ping()
    server.pause()
    try:
        on_the_wire = asyncio.create_task(redis_store.admit(make_request(budget=CREDIT, amount=1)))
        await asyncio.sleep(0.02)
        with pytest.raises(StoreOverloaded):
            await redis_store.admit(make_request(budget=CREDIT, amount=1))
    finally:
        server.resume()
    assert (await on_the_wire).allowed
    assert redis_store.healthy
    await redis_store.close()


async def test_a_renewal_refused_by_a_full_queue_is_false_not_an_error(server: RedisServer) -> None:
    store = ResilientStore(RedisStore(server.url, max_connections=1, max_waiting_calls=0))
    admitted = await store.admit(make_request(budget=CREDIT, amount=1))
    assert admitted.reservation is not None
    server.pause()
    try:
        on_the_wire = asyncio.create_task(store.peek(make_request(budget=CREDIT)))
        await asyncio.sleep(0.02)
        assert await store.renew(admitted.reservation, 60_000, admitted.reservation.request.now_ms + 1) is False
    finally:
        server.resume()
    await on_the_wire
    assert store.breaker_state == "closed"
    await store.close()

