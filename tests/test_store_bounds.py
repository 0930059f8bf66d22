"""Amounts at the edges (0, the largest accepted, beyond) and script errors, against both stores."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import redis.asyncio as aioredis

from proxy.api.metered import settle_or_charge_reserve
from proxy.auth.principal import Principal
from proxy.meter import Meter
from proxy.policy.types import Budget, Decision, Price, RateLimit, Usage
from proxy.upstream.relay import RelayOutcome
from proxy.store import LimitSpec, MemoryStore, RedisStore, ResilientStore, Store
from proxy.store.base import MAX_AMOUNT, MAX_TOKENS, StoreScriptError
from tests.test_store import CREDIT, MINUTE_MS, T0, RecordingObserver, make_request, tokens_limit

ALICE = Principal(kind="api_key", account="acme", plan="pro", key_id="key1", subject="alice")


async def test_a_zero_hold_settles_at_the_real_cost(store: Store) -> None:
    admitted = await store.admit(make_request(budget=10 * CREDIT, amount=0, lease=5))
    assert admitted.reservation is not None
    assert await store.settle(admitted.reservation, 3 * CREDIT, 0, T0 + 1)
    state = await store.peek(make_request(T0 + 2, budget=10 * CREDIT, lease=5))
    assert state.balance is not None and (state.balance.spent, state.balance.held) == (3 * CREDIT, 0)
    assert state.in_flight == 0


async def test_an_unsettled_zero_hold_expires_without_locking_a_lifetime_ledger(store: Store) -> None:
    # period "none": the ledger never expires, so a hold that broke it would lock the account out for good
    assert (await store.admit(make_request(budget=10 * CREDIT, amount=0, ttl_ms=1000))).allowed
    later = await store.admit(make_request(T0 + 1001, budget=10 * CREDIT, amount=CREDIT))
    assert later.allowed and later.balance is not None
    assert (later.balance.spent, later.balance.held) == (0, CREDIT)


async def test_the_largest_amounts_settle_whole_and_larger_ones_are_refused_before_anything_changes(
    store: Store,
) -> None:
    admitted = await store.admit(
        make_request(budget=2 * MAX_AMOUNT, amount=MAX_AMOUNT, lease=1, limits=(tokens_limit(10, 5),))
    )
    assert admitted.reservation is not None
    for amount, tokens in ((MAX_AMOUNT + 1, 0), (0, MAX_TOKENS + 1), (-1, 0), (0, -1)):
        with pytest.raises(ValueError):
            await store.settle(admitted.reservation, amount, tokens, T0 + 1)
    assert await store.settle(admitted.reservation, MAX_AMOUNT, MAX_TOKENS, T0 + 1)
    state = await store.peek(make_request(T0 + 1, budget=2 * MAX_AMOUNT, lease=1, limits=(tokens_limit(10, 5),)))
    assert state.balance is not None and (state.balance.spent, state.balance.held) == (MAX_AMOUNT, 0)
    assert state.in_flight == 0 and state.limits[0].remaining == 0  # the token debt is charged too


async def resilient(redis_url: str, observer: RecordingObserver) -> ResilientStore:
    client = aioredis.Redis.from_url(redis_url)
    await client.flushdb()
    await client.aclose()
    return ResilientStore(RedisStore(redis_url, op_timeout_s=5), observer=observer)


async def test_calls_to_a_free_model_do_not_open_the_breaker(redis_url: str) -> None:
    observer = RecordingObserver()
    store = await resilient(redis_url, observer)
    for i in range(8):  # reserve 0, settle 0: a free model
        admitted = await store.admit(make_request(T0 + i, budget=10 * CREDIT, amount=0, account="free"))
        assert admitted.reservation is not None
        assert await store.settle(admitted.reservation, 0, 0, T0 + i)
    assert store.breaker_state == "closed" and observer.breaker_states == []
    assert (await store.admit(make_request(T0 + 9, budget=10 * CREDIT, amount=CREDIT, account="other"))).allowed
    await store.close()


async def test_a_script_error_is_counted_but_never_opens_the_breaker(redis_url: str) -> None:
    observer = RecordingObserver()
    store = await resilient(redis_url, observer)
    client = aioredis.Redis.from_url(redis_url)
    await client.set("t:{broken}:cr", "not a hash")  # every script touching this ledger fails (WRONGTYPE)
    await client.aclose()
    for _ in range(8):
        with pytest.raises(StoreScriptError):
            await store.admit(make_request(budget=10 * CREDIT, amount=CREDIT, account="broken"))
    assert store.breaker_state == "closed" and store.healthy
    assert ("admit", "script_error") in observer.outcomes and ("admit", "error") not in observer.outcomes
    assert (await store.admit(make_request(budget=10 * CREDIT, amount=CREDIT, account="fine"))).allowed
    await store.close()



def metered_decision(reserve: float = 2.0) -> Decision:
    return Decision(
        allowed=True, plan="pro", concurrency=1, budget=Budget(100), reserve_credits=reserve,
        price=Price(input_per_1k_tokens=1.0), rate_limits=(RateLimit(("user",), "tokens", 1000, 60),),
        estimated_tokens=100,
    )


async def spent_and_in_flight(meter: Meter) -> tuple[float, int]:
    state = await meter.state(ALICE, metered_decision(), "m/a")
    return state["balance"]["spent"], state["concurrency"]["in_flight"]


@pytest.mark.parametrize(
    ("credits", "tokens", "charged"),
    [
        (float("inf"), 10**400, MAX_AMOUNT / CREDIT),  # clamped to the bounds, never an exception
        (10**400, -5, MAX_AMOUNT / CREDIT),
        (float("nan"), 7, 2.0),  # not a number at all: the reserve
        (-3.0, 0, 0.0),
        (1e-9, 0, 0.0),
    ],
    ids=["infinite", "400-digit", "nan", "negative", "below-a-micro-credit"],
)
async def test_hostile_settle_figures_are_clamped_and_free_the_slot(
    store: Store, credits: float, tokens: int, charged: float
) -> None:
    meter = Meter(store, clock=lambda: T0 / 1000)
    admission = await meter.admit(ALICE, "m/a", metered_decision(), "req")
    assert await admission.settle(credits, tokens)
    assert await spent_and_in_flight(meter) == (charged, 0)


async def test_a_settle_whose_cost_cannot_be_worked_out_charges_the_reserve_and_frees_the_slot(store: Store) -> None:
    meter = Meter(store, clock=lambda: T0 / 1000)
    decision = metered_decision()
    admission = await meter.admit(ALICE, "m/a", decision, "req")
    outcome = RelayOutcome(status=200, usage=Usage(input_tokens=10**400), completed=True)  # cost() overflows
    ctx = SimpleNamespace(usage=None, credits_charged=0.0)
    await settle_or_charge_reserve(None, ctx, decision, admission, outcome, 0)  # type: ignore[arg-type]
    assert admission.settled
    assert await spent_and_in_flight(meter) == (2.0, 0)


async def test_the_memory_stores_expiry_heap_stays_bounded_over_120k_requests() -> None:
    store = MemoryStore()
    limits = (LimitSpec("t:{acme}:rl:req", 10**6, MINUTE_MS, 1),)
    now = T0
    for i in range(120_000):  # every request moves the deadlines of its limits, lease, ledger and holds
        now += 1
        admitted = await store.admit(
            make_request(now, limits=limits, lease=100, budget=10**15, amount=CREDIT, account=f"a{i % 60}")
        )
        assert admitted.reservation is not None
        assert await store.settle(admitted.reservation, CREDIT // 2, 40, now)
    live = store.key_count(now)
    assert store.deadline_entries <= 2 * live + 1024, (live, store.deadline_entries)
