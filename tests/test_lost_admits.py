"""Lost admit replies: an admit that timed out, was cancelled or failed on the wire may still run in Redis.
The meter cancels it by its ticket, so no slot stays taken and nothing is charged for a request that got 503."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import AsyncIterator

import pytest

from proxy.auth.principal import Principal
from proxy.errors import ApiError
from proxy.meter import Meter
from proxy.policy.types import Budget, Decision, RateLimit
from proxy.store import RedisStore, Reservation, ResilientStore, Store, StoreError
from tests.redis_server import RedisServer
from tests.test_store import CREDIT, T0, make_request, tokens_limit

ACME = Principal(kind="api_key", account="acme", plan="pro", key_id="key1", subject="alice")
DECISION = Decision(
    allowed=True, plan="pro", concurrency=50, budget=Budget(credits=1000, period="none", scope="account"),
    rate_limits=(RateLimit(per=("account",), unit="tokens", limit=100_000, window_s=60),),
    reserve_credits=2.0, estimated_tokens=500,
)


async def test_cancel_undoes_an_admit_like_a_release_and_is_idempotent(store: Store) -> None:
    limit = tokens_limit(10_000, 400)
    req = make_request(limits=(limit,), lease=5, budget=10 * CREDIT, amount=CREDIT)
    assert (await store.admit(req)).allowed
    assert await store.cancel(req, T0 + 1) is True
    assert await store.cancel(req, T0 + 2) is False
    state = await store.peek(make_request(T0 + 2, limits=(limit,), lease=5, budget=10 * CREDIT))
    assert state.in_flight == 0
    assert state.balance is not None and (state.balance.spent, state.balance.held) == (0, 0)
    assert state.limits[0].remaining == 10_000  # the token estimate came back
    assert await store.settle(Reservation(req), CREDIT, 400, T0 + 3) is False  # nothing left to settle


async def test_an_admit_arriving_after_its_cancel_takes_nothing(store: Store) -> None:
    req = make_request(lease=1, budget=10 * CREDIT, amount=CREDIT)
    assert await store.cancel(req, T0) is False  # nothing to undo yet: leaves a tombstone
    with pytest.raises(StoreError) as late:
        await store.admit(req)
    assert late.value.certain
    state = await store.peek(make_request(lease=1, budget=10 * CREDIT))
    assert state.in_flight == 0 and state.balance is not None and state.balance.held == 0


async def test_cancel_after_the_hold_expired_takes_back_its_charge(store: Store) -> None:
    req = make_request(budget=10 * CREDIT, amount=3 * CREDIT, ttl_ms=1000)
    assert (await store.admit(req)).allowed
    swept = await store.peek(make_request(T0 + 1500, budget=10 * CREDIT))
    assert swept.balance is not None and swept.balance.spent == 3 * CREDIT  # charged at the reserve
    assert await store.cancel(req, T0 + 1600) is True
    state = await store.peek(make_request(T0 + 1700, budget=10 * CREDIT))
    assert state.balance is not None and (state.balance.spent, state.balance.held) == (0, 0)


@pytest.fixture
async def frozen_redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    with RedisServer(workdir=tmp_path) as server:
        yield server


async def settled(meter: Meter, timeout_s: float = 15.0) -> dict:  # type: ignore[type-arg]
    """The account state once the store answers again and the meter's queue of settles and cancels is empty."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        if meter.pending_settles:
            continue
        try:
            return await meter.state(ACME, DECISION, "m")
        except ApiError:  # the breaker is still open
            continue
    raise AssertionError(f"still {meter.pending_settles} queued settles or cancels after {timeout_s}s")


async def test_admits_lost_while_redis_was_frozen_hold_no_slot_and_charge_nothing(frozen_redis: RedisServer) -> None:
    """SIGSTOP Redis under load: admits time out (503) while Redis still has them queued; after SIGCONT it runs
    them. The cancels the meter queued make every one of them a no-op, or undo it."""
    store = ResilientStore(RedisStore(frozen_redis.url))
    meter = Meter(store, reservation_ttl_s=600)
    meter.start()
    # scripts loaded and 8 connections open, as on a replica under load
    await asyncio.gather(*(meter.state(ACME, DECISION, "m") for _ in range(8)))
    frozen_redis.pause()
    try:
        outcomes = await asyncio.gather(
            *(meter.admit(ACME, "m", DECISION, f"req{i}") for i in range(8)), return_exceptions=True
        )
    finally:
        frozen_redis.resume()
    assert all(isinstance(o, ApiError) and o.code == "store_unavailable" for o in outcomes), outcomes
    await asyncio.sleep(0.2)  # Redis runs what queued up while it was frozen
    state = await settled(meter)
    assert state["concurrency"]["in_flight"] == 0
    assert (state["balance"]["spent"], state["balance"]["held"]) == (0, 0)
    assert state["rate_limits"][0]["remaining"] == 100_000
    await meter.close()
    await store.close()


async def test_a_caller_that_goes_away_during_its_admit_leaves_nothing_behind(frozen_redis: RedisServer) -> None:
    store = ResilientStore(RedisStore(frozen_redis.url))
    meter = Meter(store, reservation_ttl_s=600)
    meter.start()
    assert (await meter.state(ACME, DECISION, "m"))["concurrency"]["in_flight"] == 0  # scripts loaded
    frozen_redis.pause()
    try:
        admit = asyncio.create_task(meter.admit(ACME, "m", DECISION, "gone"))
        await asyncio.sleep(0.1)
        admit.cancel()  # the client hung up: aiohttp cancels the handler
        with pytest.raises(asyncio.CancelledError):
            await admit
    finally:
        frozen_redis.resume()
    await asyncio.sleep(0.2)
    state = await settled(meter)
    assert state["concurrency"]["in_flight"] == 0
    assert (state["balance"]["spent"], state["balance"]["held"]) == (0, 0)
    await meter.close()
    await store.close()


async def test_an_admit_answered_by_the_local_fallback_is_cancelled_in_redis(frozen_redis: RedisServer) -> None:
    """Rate limits fail open: the request is admitted locally after the shared admit timed out, and that shared
    admit, which Redis runs after the freeze, is cancelled there."""
    store = ResilientStore(RedisStore(frozen_redis.url))
    meter = Meter(store, reservation_ttl_s=600)
    meter.start()
    limits_only = Decision(allowed=True, plan="pro", concurrency=5)
    assert (await meter.state(ACME, limits_only, "m"))["concurrency"]["in_flight"] == 0
    frozen_redis.pause()
    try:
        admission = await meter.admit(ACME, "m", limits_only, "fallback")
    finally:
        frozen_redis.resume()
    assert await admission.release()  # settled locally, where it was taken
    deadline = time.monotonic() + 15
    while (meter.pending_settles or store.breaker_state != "closed") and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        await store.ping()  # readiness probes close the breaker once Redis answers
    assert (await meter.state(ACME, limits_only, "m"))["concurrency"]["in_flight"] == 0
    await meter.close()
    await store.close()
