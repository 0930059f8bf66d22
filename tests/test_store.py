"""One behavioural suite for MemoryStore and RedisStore (real redis-server), plus exactness and fault tests."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from proxy.store import (
    AdmitRequest,
    CreditSpec,
    LeaseSpec,
    LimitSpec,
    MemoryStore,
    RedisStore,
    ResilientStore,
    Store,
    StoreConfigError,
    StoreSettings,
    StoreUnavailable,
)
from tests.redis_server import RedisServer, free_port

MINUTE_MS = 60_000
CREDIT = 1_000_000  # micro-credits
# Injected "now": real time, so Redis' own key expiry (real clock) never runs ahead of the test's clock.
T0 = int(time.time() * 1000)
REPO = Path(__file__).resolve().parents[1]


_ids = iter(range(10**9))


def make_request(
    now: int = T0,
    *,
    limits: tuple[LimitSpec, ...] = (),
    lease: int | None = None,
    budget: int | None = None,
    amount: int = 0,
    ttl_ms: int = MINUTE_MS,
    account: str = "acme",
) -> AdmitRequest:
    """An admit request whose keys all carry the `{account}` hash tag."""
    rid = f"r{next(_ids)}"
    credits = None
    if budget is not None:
        credits = CreditSpec(f"t:{{{account}}}:cr", f"t:{{{account}}}:cr:holds", budget, amount)
    return AdmitRequest(
        reservation_id=rid,
        ticket_key=f"t:{{{account}}}:tk:{rid}",
        now_ms=now,
        ttl_ms=ttl_ms,
        limits=limits,
        lease=LeaseSpec(f"t:{{{account}}}:cc", lease) if lease is not None else None,
        credits=credits,
    )


def requests_limit(limit: int, key: str = "t:{acme}:rl:req") -> LimitSpec:
    return LimitSpec(key, limit=limit, window_ms=MINUTE_MS, cost=1)


def tokens_limit(limit: int, cost: int, key: str = "t:{acme}:rl:tok") -> LimitSpec:
    return LimitSpec(key, limit=limit, window_ms=MINUTE_MS, cost=cost, tokens=True)


async def test_gcra_admits_a_burst_of_limit_then_one_per_interval(store: Store) -> None:
    limit = requests_limit(5)  # interval 12 s
    results = [await store.admit(make_request(limits=(limit,))) for _ in range(5)]
    assert all(r.allowed for r in results)
    assert [r.limits[0].remaining for r in results] == [4, 3, 2, 1, 0]
    assert results[0].limits[0].reset_ms == 12_000 and results[-1].limits[0].reset_ms == MINUTE_MS

    denied = await store.admit(make_request(limits=(limit,)))
    assert not denied.allowed and denied.denial is not None
    assert (denied.denial.kind, denied.denial.retry_after_ms) == ("rate_limit", 12_000)
    assert denied.reservation is None

    assert not (await store.admit(make_request(T0 + 11_999, limits=(limit,)))).allowed
    assert (await store.admit(make_request(T0 + 12_000, limits=(limit,)))).allowed


async def test_token_limit_takes_the_cost_and_never_fits_beyond_capacity(store: Store) -> None:
    for _ in range(3):
        assert (await store.admit(make_request(limits=(tokens_limit(100, 30),)))).allowed
    denied = await store.admit(make_request(limits=(tokens_limit(100, 30),)))
    assert denied.denial is not None and denied.denial.retry_after_ms == 12_000  # 20 tokens short, 600 ms each
    assert denied.limits[0].remaining == 10

    too_big = await store.admit(make_request(limits=(tokens_limit(100, 101, key="t:{acme}:rl:other"),)))
    assert too_big.denial is not None and too_big.denial.retry_after_ms is None


async def test_a_denied_request_takes_nothing_from_its_other_limits_lease_or_credits(store: Store) -> None:
    tight, loose = requests_limit(1, "t:{acme}:rl:a"), requests_limit(10, "t:{acme}:rl:b")
    assert (await store.admit(make_request(limits=(tight,)))).allowed

    denied = await store.admit(make_request(limits=(loose, tight), lease=5, budget=10 * CREDIT, amount=CREDIT))
    assert denied.denial is not None and denied.denial.index == 1

    state = await store.peek(make_request(limits=(loose, tight), lease=5, budget=10 * CREDIT))
    assert state.limits[0].remaining == 10
    assert state.in_flight == 0
    assert state.balance is not None and (state.balance.spent, state.balance.held) == (0, 0)


async def test_credit_denial_also_takes_nothing(store: Store) -> None:
    limit = requests_limit(10)
    denied = await store.admit(make_request(limits=(limit,), lease=1, budget=CREDIT, amount=2 * CREDIT))
    assert denied.denial is not None and denied.denial.kind == "credits"
    state = await store.peek(make_request(limits=(limit,), lease=1))
    assert (state.limits[0].remaining, state.in_flight) == (10, 0)


async def test_concurrency_lease_is_taken_released_and_expires(store: Store) -> None:
    first = await store.admit(make_request(lease=2))
    second = await store.admit(make_request(lease=2))
    assert first.in_flight == 1 and second.in_flight == 2
    third = await store.admit(make_request(lease=2))
    assert third.denial is not None and third.denial.kind == "concurrency"

    assert first.reservation is not None
    assert await store.settle(first.reservation, 0, 0, T0 + 1)
    assert (await store.admit(make_request(T0 + 1, lease=2))).allowed
    assert not (await store.admit(make_request(T0 + 2, lease=2))).allowed

    # the leases of a replica that died are gone once their ttl has passed
    assert (await store.admit(make_request(T0 + MINUTE_MS + 1, lease=2))).in_flight == 1


async def test_reserve_then_settle_charges_the_actual_and_release_charges_nothing(store: Store) -> None:
    budget = 10 * CREDIT
    a = await store.admit(make_request(budget=budget, amount=3 * CREDIT))
    b = await store.admit(make_request(budget=budget, amount=2 * CREDIT))
    assert b.balance is not None and (b.balance.held, b.balance.remaining) == (5 * CREDIT, 5 * CREDIT)
    assert a.reservation and b.reservation

    assert await store.settle(a.reservation, 1_250_000, 0, T0)
    assert await store.settle(b.reservation, 0, 0, T0)  # release
    state = await store.peek(make_request(budget=budget))
    assert state.balance is not None and (state.balance.spent, state.balance.held) == (1_250_000, 0)


async def test_settle_twice_is_a_no_op(store: Store) -> None:
    admitted = await store.admit(
        make_request(limits=(tokens_limit(1000, 500),), lease=1, budget=10 * CREDIT, amount=4 * CREDIT)
    )
    assert admitted.reservation is not None
    assert await store.settle(admitted.reservation, CREDIT, 100, T0)
    assert not await store.settle(admitted.reservation, 3 * CREDIT, 900, T0)
    state = await store.peek(make_request(limits=(tokens_limit(1000, 0),), lease=1, budget=10 * CREDIT))
    assert state.balance is not None and (state.balance.spent, state.balance.held) == (CREDIT, 0)
    assert state.limits[0].remaining == 900 and state.in_flight == 0


async def test_settle_corrects_token_usage_from_estimate_to_actual(store: Store) -> None:
    admitted = await store.admit(make_request(limits=(tokens_limit(1000, 800),)))
    assert admitted.limits[0].remaining == 200 and admitted.reservation is not None
    assert await store.settle(admitted.reservation, 0, 300, T0)
    assert (await store.peek(make_request(limits=(tokens_limit(1000, 0),)))).limits[0].remaining == 700

    over = await store.admit(make_request(limits=(tokens_limit(1000, 100),)))
    assert over.reservation is not None
    assert await store.settle(over.reservation, 0, 600, T0)  # used more than estimated: the debt is kept
    assert (await store.peek(make_request(limits=(tokens_limit(1000, 0),)))).limits[0].remaining == 100


async def test_expired_reservation_is_charged_at_its_reserved_amount(store: Store) -> None:
    budget = 10 * CREDIT
    held = await store.admit(make_request(budget=budget, amount=4 * CREDIT, ttl_ms=1000))
    assert held.reservation is not None
    state = await store.peek(make_request(T0 + 1000, budget=budget))
    assert state.balance is not None and (state.balance.spent, state.balance.held) == (4 * CREDIT, 0)

    # a late settle (the replica survived, the stream outlived the ttl) still corrects to the actual
    assert await store.settle(held.reservation, CREDIT, 0, T0 + 1500)
    state = await store.peek(make_request(T0 + 1500, budget=budget))
    assert state.balance is not None and (state.balance.spent, state.balance.held) == (CREDIT, 0)


async def test_renewed_lease_and_hold_outlive_their_first_ttl_and_settle_exactly(store: Store) -> None:
    budget = 10 * CREDIT
    running = await store.admit(make_request(lease=1, budget=budget, amount=4 * CREDIT, ttl_ms=1000))
    assert running.reservation is not None
    for beat in (700, 1400, 2100):  # three heartbeats carry it to T0 + 3100
        assert await store.renew(running.reservation, 1000, T0 + beat)
    state = await store.peek(make_request(T0 + 3000, lease=1, budget=budget))
    assert state.balance is not None
    assert (state.balance.spent, state.balance.held, state.in_flight) == (0, 4 * CREDIT, 1)
    refused = await store.admit(make_request(T0 + 3000, lease=1, budget=budget, amount=CREDIT))
    assert refused.denial is not None and refused.denial.kind == "concurrency"
    # the ticket moved with the hold: a settle long after the first ticket expiry (2 x ttl) still lands
    assert await store.settle(running.reservation, CREDIT, 0, T0 + 3000)
    state = await store.peek(make_request(T0 + 3000, lease=1, budget=budget))
    assert state.balance is not None and (state.balance.spent, state.balance.held, state.in_flight) == (CREDIT, 0, 0)


async def test_renew_after_settle_is_a_no_op(store: Store) -> None:
    budget = 10 * CREDIT
    done = await store.admit(make_request(lease=1, budget=budget, amount=4 * CREDIT, ttl_ms=1000))
    assert done.reservation is not None
    assert await store.settle(done.reservation, CREDIT, 0, T0 + 100)
    assert not await store.renew(done.reservation, 1000, T0 + 200)
    assert (await store.admit(make_request(T0 + 200, lease=1))).allowed  # the slot stayed free
    state = await store.peek(make_request(T0 + 200, budget=budget))
    assert state.balance is not None and (state.balance.spent, state.balance.held) == (CREDIT, 0)


async def test_renew_after_expiry_returns_false_and_does_not_revive_the_hold(store: Store) -> None:
    budget = 10 * CREDIT
    dead = await store.admit(make_request(lease=1, budget=budget, amount=4 * CREDIT, ttl_ms=1000))
    assert dead.reservation is not None
    assert not await store.renew(dead.reservation, 1000, T0 + 1000)  # the ticket lives on, the hold does not
    state = await store.peek(make_request(T0 + 1100, lease=1, budget=budget))
    assert state.balance is not None
    assert (state.balance.spent, state.balance.held, state.in_flight) == (4 * CREDIT, 0, 0)
    # a late settle still corrects the charge: the renew did not disturb the ticket
    assert await store.settle(dead.reservation, CREDIT, 0, T0 + 1100)
    state = await store.peek(make_request(T0 + 1100, budget=budget))
    assert state.balance is not None and (state.balance.spent, state.balance.held) == (CREDIT, 0)


async def test_insufficient_credits_reports_the_balance(store: Store) -> None:
    budget = 10 * CREDIT
    assert (await store.admit(make_request(budget=budget, amount=7 * CREDIT))).allowed
    denied = await store.admit(make_request(budget=budget, amount=4 * CREDIT))
    assert denied.denial is not None and denied.denial.kind == "credits"
    assert denied.balance is not None and denied.balance.remaining == 3 * CREDIT
    assert (await store.admit(make_request(budget=budget, amount=3 * CREDIT))).allowed


async def test_accounts_do_not_share_state(store: Store) -> None:
    assert (await store.admit(make_request(budget=CREDIT, amount=CREDIT, account="a"))).allowed
    assert (await store.admit(make_request(budget=CREDIT, amount=CREDIT, account="b"))).allowed
    assert not (await store.admit(make_request(budget=CREDIT, amount=CREDIT, account="a"))).allowed


async def test_exactly_the_budget_is_admitted_under_400_concurrent_admits(store: Store) -> None:
    budget = 100 * CREDIT
    results = await asyncio.gather(
        *(store.admit(make_request(budget=budget, amount=CREDIT, lease=1000)) for _ in range(400))
    )
    admitted = [r.reservation for r in results if r.reservation is not None]
    assert len(admitted) == 100
    assert sum(1 for r in results if r.denial and r.denial.kind == "credits") == 300
    await asyncio.gather(*(store.settle(res, CREDIT, 0, T0) for res in admitted))
    state = await store.peek(make_request(budget=budget, lease=1000))
    assert state.balance is not None and (state.balance.spent, state.balance.held) == (budget, 0)
    assert state.in_flight == 0


WORKER = """
import asyncio, sys, time
from proxy.store import AdmitRequest, CreditSpec, RedisStore

async def main(url, start_at, worker, count):
    store = RedisStore(url, max_connections=32)
    await store.ping()  # connect before the start line
    await asyncio.sleep(max(0.0, start_at - time.time()))
    now = int(time.time() * 1000)
    requests = [
        AdmitRequest(f"w{worker}-{i}", f"x:{{acme}}:tk:w{worker}-{i}", now, 60000,
                     credits=CreditSpec("x:{acme}:cr", "x:{acme}:cr:holds", 100_000_000, 1_000_000))
        for i in range(count)
    ]
    admitted = 0
    for wave in range(0, count, 10):  # waves keep all processes racing while the budget runs out
        results = await asyncio.gather(*(store.admit(r) for r in requests[wave:wave + 10]))
        admitted += sum(1 for r in results if r.allowed)
        await asyncio.sleep(0.002)
    print(admitted)
    await store.close()

asyncio.run(main(sys.argv[1], float(sys.argv[2]), sys.argv[3], int(sys.argv[4])))
"""


async def test_four_processes_sharing_redis_admit_exactly_the_budget(redis_url: str) -> None:
    """Replica exactness at the store level: 4 OS processes race 400 admits for a budget of 100."""
    start_at = time.time() + 1.5  # all workers start together, after their imports
    workers = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", WORKER, redis_url, str(start_at), str(w), "100",
            stdout=subprocess.PIPE, cwd=REPO, env={"PYTHONPATH": str(REPO)},
        )
        for w in range(4)
    ]
    outputs = await asyncio.wait_for(asyncio.gather(*(w.communicate() for w in workers)), timeout=20)
    admitted = [int(out.decode()) for out, _ in outputs]
    assert all(w.returncode == 0 for w in workers)
    assert sum(admitted) == 100, admitted
    print("admitted per process:", admitted)
    client = aioredis.Redis.from_url(redis_url)
    ledger = await client.hgetall("x:{acme}:cr")
    await client.delete("x:{acme}:cr", "x:{acme}:cr:holds")
    await client.aclose()
    assert int(ledger[b"held"]) == 100 * CREDIT and int(ledger.get(b"spent", 0)) == 0


def wall_ms() -> int:
    """The real clock: in the fault tests the store really goes down and comes back."""
    return int(time.time() * 1000)


class RecordingObserver:
    """Collects what the metrics hooks would see."""

    def __init__(self) -> None:
        self.outcomes: set[tuple[str, str]] = set()
        self.breaker_states: list[str] = []

    def on_op(self, op: str, seconds: float, outcome: str) -> None:
        self.outcomes.add((op, outcome))

    def on_breaker(self, state: str) -> None:
        self.breaker_states.append(state)


@pytest.fixture
def observer() -> RecordingObserver:
    return RecordingObserver()


@pytest.fixture
async def crashable(tmp_path: Path, observer: RecordingObserver) -> AsyncIterator[tuple[RedisServer, ResilientStore]]:
    """A private redis-server the test may kill, behind a breaker with short timeouts."""
    server = RedisServer(workdir=tmp_path)
    server.start()
    store = ResilientStore(
        RedisStore(server.url, connect_timeout_s=0.2, op_timeout_s=0.3),
        breaker_failures=2,
        breaker_reset_s=0.3,
        fail_rate_limits="open",
        fail_credits="closed",
        observer=observer,
    )
    yield server, store
    await store.close()
    server.stop()


async def test_redis_killed_fails_closed_for_credits_open_for_limits_and_recovers(
    crashable: tuple[RedisServer, ResilientStore], observer: RecordingObserver
) -> None:
    server, store = crashable
    first = await store.admit(make_request(wall_ms(), budget=10 * CREDIT, amount=CREDIT))
    assert first.reservation is not None and not first.reservation.fallback and store.healthy

    server.kill()
    started = time.monotonic()
    assert not await store.renew(first.reservation, MINUTE_MS, wall_ms())  # a heartbeat never raises
    assert time.monotonic() - started < 1.0
    for _ in range(3):
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await store.admit(make_request(wall_ms(), budget=10 * CREDIT, amount=CREDIT))
        assert time.monotonic() - started < 1.0
    assert not store.healthy

    local = [await store.admit(make_request(wall_ms(), limits=(requests_limit(2),))) for _ in range(3)]
    assert [r.allowed for r in local] == [True, True, False]  # the local limiter still limits
    assert local[0].reservation is not None and local[0].reservation.fallback
    assert await store.renew(local[0].reservation, MINUTE_MS, wall_ms())  # renewed where it was taken
    assert await store.settle(local[0].reservation, 0, 0, wall_ms())

    server.start()
    deadline = time.monotonic() + 5
    while True:
        try:
            recovered = await store.admit(make_request(wall_ms(), budget=10 * CREDIT, amount=CREDIT))
            break
        except StoreUnavailable:
            assert time.monotonic() < deadline, "the store did not recover after redis came back"
            await asyncio.sleep(0.1)
    assert recovered.reservation is not None and not recovered.reservation.fallback
    assert store.healthy and store.breaker_state == "closed"
    assert observer.breaker_states[:2] == ["open", "half_open"] and observer.breaker_states[-1] == "closed"
    assert {("admit", "ok"), ("admit", "error"), ("renew", "error"), ("admit", "refused"), ("admit", "fallback")} <= observer.outcomes


async def test_rate_limits_fail_closed_when_configured() -> None:
    nothing_listens = f"redis://127.0.0.1:{free_port()}/0"
    store = ResilientStore(RedisStore(nothing_listens, op_timeout_s=0.3), fail_rate_limits="closed")
    started = time.monotonic()
    with pytest.raises(StoreUnavailable):
        await store.admit(make_request(wall_ms(), limits=(requests_limit(5),)))
    assert time.monotonic() - started < 1.0
    await store.close()


def test_store_settings_validate_and_name_the_key() -> None:
    settings = StoreSettings.from_mapping(
        {"kind": "redis", "redis_url": "redis://127.0.0.1:1/0", "fail_mode": {"rate_limits": "closed"}}
    )
    assert (settings.fail_rate_limits, settings.fail_credits) == ("closed", "closed")
    with pytest.raises(StoreConfigError, match=r"config.yaml: store.fail_mode.credits must be open or closed"):
        StoreSettings.from_mapping({"fail_mode": {"credits": "maybe"}})
    with pytest.raises(StoreConfigError, match=r"store.redis_url is empty"):
        StoreSettings.from_mapping({"kind": "redis"})
    with pytest.raises(StoreConfigError, match=r"unknown key store.timeout"):
        StoreSettings.from_mapping({"timeout": 1})
