"""The meter stage over MemoryStore and RedisStore: keys from principals, errors, headers, settle, periods."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime, timezone
from decimal import ROUND_CEILING, ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any, Callable

import pytest
from hypothesis import given, settings, strategies as st
import redis.asyncio as aioredis

from proxy.auth.principal import Principal
from proxy.errors import ApiError
from proxy.meter import Meter, _bounded, format_credits, to_micro
from proxy.policy.types import Budget, Decision, RateLimit
from proxy.store import MemoryStore, RedisStore, Reservation, ResilientStore, Store
from proxy.store.base import MAX_TOKENS, CallUsage
from tests.redis_server import RedisServer, free_port

ALICE = Principal(kind="api_key", account="acme", plan="pro", key_id="key1", subject="alice")
BOB = Principal(kind="api_key", account="acme", plan="pro", key_id="key1", subject="bob")


class Clock:
    """An injectable wall clock (seconds since the epoch, UTC)."""

    def __init__(self, when: datetime) -> None:
        self.now = when.timestamp()

    def __call__(self) -> float:
        return self.now

    def set(self, when: datetime) -> None:
        self.now = when.timestamp()


@pytest.fixture
def clock() -> Clock:
    # now, so that Redis' real-time key expiry never runs ahead of the injected clock
    return Clock(datetime.fromtimestamp(time.time(), timezone.utc))


@pytest.fixture
def meter(store: Store, clock: Clock) -> Meter:
    return Meter(store, reservation_ttl_s=60, clock=clock)


def decide(**fields: object) -> Decision:
    return Decision(allowed=True, plan="pro", **fields)  # type: ignore[arg-type]


async def admit_error(meter: Meter, principal: Principal, decision: Decision, model: str = "m/a") -> ApiError:
    with pytest.raises(ApiError) as caught:
        await meter.admit(principal, model, decision, "req")
    return caught.value


async def test_rate_limit_429_with_retry_after_and_ratelimit_headers(meter: Meter) -> None:
    decision = decide(rate_limits=(RateLimit(("user",), "requests", 2, 60),))
    first = await meter.admit(ALICE, "m/a", decision, "req-1")
    second = await meter.admit(ALICE, "m/a", decision, "req-2")
    assert (first.headers["RateLimit-Remaining"], second.headers["RateLimit-Remaining"]) == ("1", "0")
    assert first.headers["RateLimit-Limit"] == "2" and first.headers["RateLimit-Reset"] == "30"

    error = await admit_error(meter, ALICE, decision)
    assert (error.status, error.code) == (429, "rate_limit")
    assert error.headers["Retry-After"] == "30"
    assert error.headers["RateLimit-Limit"] == "2" and error.headers["RateLimit-Remaining"] == "0"
    assert error.headers["RateLimit-Reset"] == "60"
    assert error.details["rule"] == "user.requests.60s"

    assert await meter.admit(BOB, "m/a", decision, "req-3")  # per user: Bob has his own


async def test_limits_are_keyed_by_each_dimension(meter: Meter) -> None:
    per_account = decide(rate_limits=(RateLimit(("account",), "requests", 1, 60),))
    await meter.admit(ALICE, "m/a", per_account, "r")
    assert (await admit_error(meter, BOB, per_account)).code == "rate_limit"  # same account

    per_model = decide(rate_limits=(RateLimit(("key", "model"), "requests", 1, 60),))
    await meter.admit(ALICE, "m/a", per_model, "r")
    await meter.admit(ALICE, "m/b", per_model, "r")
    assert (await admit_error(meter, BOB, per_model, "m/b")).code == "rate_limit"  # same key, same model


async def test_dimension_values_are_escaped_so_principals_cannot_collide(meter: Meter) -> None:
    decision = decide(rate_limits=(RateLimit(("account", "user"), "requests", 1, 60),))
    tricky = Principal(kind="issuer", account="a:b", plan="pro", subject="c")
    plain = Principal(kind="issuer", account="a", plan="pro", subject="b:c")
    braces = Principal(kind="issuer", account="a}", plan="pro", subject="{b:c")
    for principal in (tricky, plain, braces):
        assert await meter.admit(principal, "m/a", decision, "r")


async def test_tightest_limit_drives_the_headers(meter: Meter) -> None:
    decision = decide(
        rate_limits=(RateLimit(("user",), "requests", 100, 60), RateLimit(("user",), "tokens", 1000, 60)),
        estimated_tokens=900,
    )
    admission = await meter.admit(ALICE, "m/a", decision, "r")
    assert admission.headers["RateLimit-Limit"] == "1000" and admission.headers["RateLimit-Remaining"] == "100"


async def test_token_estimate_is_corrected_at_settle(meter: Meter) -> None:
    decision = decide(rate_limits=(RateLimit(("user",), "tokens", 1000, 60),), estimated_tokens=800)
    admission = await meter.admit(ALICE, "m/a", decision, "r")
    assert (await admit_error(meter, ALICE, decision)).code == "rate_limit"
    assert await admission.settle(0.0, 150)
    state = await meter.state(ALICE, decision)
    assert state["rate_limits"][0]["remaining"] == 850
    assert await meter.admit(ALICE, "m/a", decision, "r")


async def test_concurrency_limit_429_and_release_frees_the_slot(meter: Meter) -> None:
    decision = decide(concurrency=1)
    admission = await meter.admit(ALICE, "m/a", decision, "r")
    error = await admit_error(meter, ALICE, decision)
    assert (error.status, error.code, error.details["limit"]) == (429, "concurrency_limit", 1)
    assert await admission.release()
    assert not await admission.release()
    assert await meter.admit(ALICE, "m/a", decision, "r")


async def test_keepalive_holds_the_slot_and_the_hold_past_the_ttl_until_the_body_ends(store: Store) -> None:
    ttl_s = 0.3
    meter = Meter(store, reservation_ttl_s=ttl_s)  # the real clock: the heartbeat runs in real time
    decision = decide(concurrency=1, budget=Budget(credits=10), reserve_credits=4)
    admission = await meter.admit(ALICE, "m/a", decision, "r")
    async with admission.keepalive():
        await asyncio.sleep(3 * ttl_s)
        assert (await admit_error(meter, ALICE, decision)).code == "concurrency_limit"
        state = await meter.state(ALICE, decision)
        assert (state["balance"]["held"], state["balance"]["spent"]) == (4, 0)
    # no more heartbeats (as when a replica dies): the hold expires and is charged at the reserve
    await asyncio.sleep(ttl_s + 0.1)
    state = await meter.state(ALICE, decision)
    assert (state["balance"]["held"], state["balance"]["spent"], state["concurrency"]["in_flight"]) == (0, 4, 0)


async def test_settle_inside_keepalive_stops_the_heartbeat() -> None:
    class Counting(MemoryStore):
        renewals = 0

        async def renew(self, reservation: Reservation, ttl_ms: int, now_ms: int) -> bool:
            self.renewals += 1
            return await super().renew(reservation, ttl_ms, now_ms)

    store = Counting()
    admission = await Meter(store, reservation_ttl_s=0.15).admit(ALICE, "m/a", decide(concurrency=1), "r")
    async with admission.keepalive():
        await asyncio.sleep(0.35)
        assert store.renewals >= 2
        assert await admission.settle(0.0, 0)
        beats = store.renewals
        await asyncio.sleep(0.2)
    assert store.renewals == beats


async def test_keepalive_starts_no_task_until_a_renewal_is_due(store: Store) -> None:
    """A call that ends before its first renewal (nearly all of them) costs a timer, not a task per request."""
    admission = await Meter(store, reservation_ttl_s=600).admit(ALICE, "m/a", decide(concurrency=1), "r")
    before = len(asyncio.all_tasks())
    async with admission.keepalive():
        await asyncio.sleep(0)
        assert len(asyncio.all_tasks()) == before
    assert await admission.release()


async def test_keepalive_never_raises_while_the_store_is_down(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="proxy.meter")
    with RedisServer(workdir=tmp_path) as server:
        store = RedisStore(server.url, connect_timeout_s=0.1, op_timeout_s=0.1)
        admission = await Meter(store, reservation_ttl_s=0.3).admit(ALICE, "m/a", decide(concurrency=1), "r")
        server.kill()
        async with admission.keepalive():
            await asyncio.sleep(0.5)
        await store.close()
    assert any("renew failed" in record.getMessage() for record in caplog.records)


async def test_insufficient_credits_402_with_needed_and_balance(meter: Meter) -> None:
    decision = decide(budget=Budget(credits=4), reserve_credits=2.5)
    admission = await meter.admit(ALICE, "m/a", decision, "r")
    assert admission.headers["X-Credits-Balance"] == "1.5"
    error = await admit_error(meter, ALICE, decision)
    assert (error.status, error.code) == (402, "insufficient_credits")
    assert (error.details["credits_needed"], error.details["credits_balance"]) == (2.5, 1.5)
    assert error.body()["error"]["credits_balance"] == 1.5


async def test_settle_charges_exact_micro_credits_once(meter: Meter) -> None:
    decision = decide(budget=Budget(credits=5, scope="user"), reserve_credits=0.5)
    for _ in range(10):
        admission = await meter.admit(ALICE, "m/a", decision, "r")
        assert await admission.settle(0.1, 10)
        assert not await admission.settle(0.4, 10)  # idempotent
    balance = (await meter.state(ALICE, decision))["balance"]
    assert (balance["spent"], balance["held"], balance["remaining"]) == (1.0, 0.0, 4.0)
    assert (await meter.state(BOB, decision))["balance"]["spent"] == 0.0  # user-scoped budget


async def test_state_takes_nothing_and_reports_all_parts(meter: Meter) -> None:
    decision = decide(
        rate_limits=(RateLimit(("user",), "requests", 10, 60), RateLimit(("model",), "requests", 5, 60)),
        concurrency=3,
        budget=Budget(credits=100, period="month"),
        reserve_credits=7,
    )
    await meter.admit(ALICE, "m/a", decision, "r")
    first, second = await meter.state(ALICE, decision), await meter.state(ALICE, decision)
    assert first == second
    assert first["balance"]["held"] == 7.0 and first["balance"]["remaining"] == 93.0
    assert first["balance"]["resets_at"].endswith("+00:00")
    assert [limit["rule"] for limit in first["rate_limits"]] == ["user.requests.60s"]  # model-scoped needs a model
    assert first["rate_limits"][0]["remaining"] == 9
    assert first["concurrency"] == {"limit": 3, "in_flight": 1}
    with_model = await meter.state(ALICE, decision, "m/a")
    assert [limit["remaining"] for limit in with_model["rate_limits"]] == [9, 4]


@pytest.mark.parametrize(
    ("period", "last_moment", "next_period"),
    [
        ("day", datetime(2031, 5, 9, 23, 59, 59, tzinfo=timezone.utc), datetime(2031, 5, 10, 0, 0, 1, tzinfo=timezone.utc)),
        ("month", datetime(2031, 12, 31, 23, 0, tzinfo=timezone.utc), datetime(2032, 1, 1, 0, 0, 1, tzinfo=timezone.utc)),
    ],
)
async def test_budget_period_rolls_over_without_a_cron(period: str, last_moment: datetime, next_period: datetime) -> None:
    clock = Clock(last_moment)
    meter = Meter(MemoryStore(), reservation_ttl_s=60, clock=clock)
    decision = decide(budget=Budget(credits=3, period=period), reserve_credits=3)  # type: ignore[arg-type]
    admission = await meter.admit(ALICE, "m/a", decision, "r")
    await admission.settle(3, 0)
    assert (await admit_error(meter, ALICE, decision)).code == "insufficient_credits"
    clock.set(next_period)
    assert (await meter.state(ALICE, decision))["balance"]["spent"] == 0.0
    assert await meter.admit(ALICE, "m/a", decision, "r")


async def test_period_rollover_on_redis_uses_a_new_ledger_key(redis_url: str, clock: Clock) -> None:
    """The period lives in the key: the old ledger is untouched, the new one starts from zero, both expire."""
    store = RedisStore(redis_url)
    meter = Meter(store, reservation_ttl_s=60, clock=clock)
    account = Principal(kind="api_key", account="rollover", plan="pro", key_id="k")
    decision = decide(budget=Budget(credits=2, period="day"), reserve_credits=2)
    await (await meter.admit(account, "m/a", decision, "r")).settle(2, 0)
    assert (await admit_error(meter, account, decision)).code == "insufficient_credits"
    clock.now += 86_400
    assert await meter.admit(account, "m/a", decision, "r")
    client = aioredis.Redis.from_url(redis_url)
    ledgers = sorted([key async for key in client.scan_iter(match="ep:{rollover}:cr:*")])
    ttls = [await client.pttl(key) for key in ledgers]
    await client.aclose()
    await store.close()
    assert len([k for k in ledgers if not k.endswith(b":holds")]) == 2
    assert all(ttl > 0 for ttl in ttls)


async def test_no_limits_no_budget_means_no_store_call() -> None:
    class Unreachable(MemoryStore):
        async def admit(self, request):  # type: ignore[no-untyped-def]
            raise AssertionError("the store must not be called")

    admission = await Meter(Unreachable()).admit(ALICE, "m/a", decide(), "r")
    assert admission.headers == {} and not await admission.settle(1.0, 1)


async def test_store_down_means_503_store_unavailable_for_credits() -> None:
    dead = RedisStore(f"redis://127.0.0.1:{free_port()}/0", op_timeout_s=0.3)
    meter = Meter(ResilientStore(dead, fail_credits="closed"))
    started = time.monotonic()
    error = await admit_error(meter, ALICE, decide(budget=Budget(credits=10), reserve_credits=1))
    assert (error.status, error.code) == (503, "store_unavailable")
    assert time.monotonic() - started < 1.0
    await dead.close()


def outage_meter(server: RedisServer, clock: Clock, **meter: Any) -> tuple[Meter, ResilientStore]:
    """A meter on a real Redis the test kills and restarts, with timeouts and breaker short enough for a test."""
    redis_store = RedisStore(server.url, connect_timeout_s=0.2, op_timeout_s=0.3)
    store = ResilientStore(redis_store, breaker_reset_s=0.2)
    return Meter(store, reservation_ttl_s=60, clock=clock, **meter), store


async def until(condition: Callable[[], bool], timeout_s: float) -> bool:
    """Poll until the condition holds or the time is up; returns its last value."""
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return condition()


@pytest.mark.parametrize("hold_expired", [False, True], ids=["hold-alive", "hold-expired-and-charged"])
async def test_settle_while_store_is_down_is_queued_and_applied_once_it_is_back(
    tmp_path: Path, clock: Clock, hold_expired: bool
) -> None:
    """The settle returns at once and waits in the queue; when Redis is back the retry charges the actual amount,
    also when the hold expired meanwhile and was charged at the reserve (the late settle corrects it)."""
    decision = decide(budget=Budget(credits=10), reserve_credits=4)
    lengths: list[int] = []
    with RedisServer(workdir=tmp_path, persistent=True) as server:
        meter, store = outage_meter(server, clock, on_pending_settles=lengths.append)
        meter.start()
        admission = await meter.admit(ALICE, "m/a", decision, "r")
        server.kill()
        started = time.monotonic()
        assert not await admission.settle(0.5, 10)
        assert time.monotonic() - started < 1.0 and meter.pending_settles == 1 and lengths == [1]
        assert not await admission.settle(0.7, 10) and meter.pending_settles == 1  # handed over once
        if hold_expired:
            clock.now += 61  # past the hold's ttl, within the ticket's (2 x ttl)
        server.start()
        assert await until(lambda: meter.pending_settles == 0, timeout_s=5.0)
        balance = (await meter.state(ALICE, decision))["balance"]
        await meter.close()
        await store.close()
    assert (balance["spent"], balance["held"]) == (0.5, 0)
    assert lengths[-1] == 0


async def test_a_full_settle_queue_drops_the_longest_waiting(
    tmp_path: Path, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """Bounded: the dropped settle's hold stays held (and will be charged at the reserve), the others apply."""
    decision = decide(budget=Budget(credits=10), reserve_credits=2)
    with RedisServer(workdir=tmp_path, persistent=True) as server:
        meter, store = outage_meter(server, clock, max_pending_settles=2)
        admissions = [await meter.admit(ALICE, "m/a", decision, f"r{i}") for i in range(3)]
        server.kill()
        for admission in admissions:
            await admission.settle(1.0, 0)
        assert meter.pending_settles == 2
        assert any("settle queue full" in record.getMessage() for record in caplog.records)
        server.start()
        meter.start()
        assert await until(lambda: meter.pending_settles == 0, timeout_s=5.0)
        balance = (await meter.state(ALICE, decision))["balance"]
        await meter.close()
        await store.close()
    assert (balance["spent"], balance["held"]) == (2.0, 2.0)


async def test_close_makes_one_last_bounded_attempt_to_apply_queued_settles(tmp_path: Path, clock: Clock) -> None:
    decision = decide(budget=Budget(credits=10), reserve_credits=4)
    with RedisServer(workdir=tmp_path, persistent=True) as server:
        meter, store = outage_meter(server, clock)  # not started: only close() applies the queue
        admission = await meter.admit(ALICE, "m/a", decision, "r")
        server.kill()
        await admission.settle(1.5, 0)
        started = time.monotonic()
        await meter.close(flush_timeout_s=0.5)  # still down: bounded, the settle stays queued
        assert time.monotonic() - started < 1.0 and meter.pending_settles == 1
        server.start()
        await asyncio.sleep(0.25)  # the breaker lets a probe through again
        await meter.close(flush_timeout_s=2.0)
        assert meter.pending_settles == 0
        balance = (await meter.state(ALICE, decision))["balance"]
        await store.close()
    assert (balance["spent"], balance["held"]) == (1.5, 0)


def test_credit_conversions_are_exact() -> None:
    assert to_micro(0.1) == 100_000 and to_micro(0.1, round_up=True) == 100_000
    assert to_micro(1e-7, round_up=True) == 1 and to_micro(1e-7) == 0
    assert format_credits(1_500_000) == "1.5" and format_credits(3_000_000) == "3"


def _decimal_to_micro(credits: float, round_up: bool) -> int:
    """The reference: the decimal `repr` writes, times a million, rounded by Decimal (the meter's former way)."""
    rounding = ROUND_CEILING if round_up else ROUND_HALF_UP
    return int((Decimal(repr(credits)) * 1_000_000).to_integral_value(rounding=rounding))


@settings(max_examples=2000, deadline=None)
@given(st.floats(min_value=1e-12, max_value=999_999.0) | st.integers(min_value=1, max_value=999_999))
def test_integer_credit_conversions_match_decimal_arithmetic(credits: float) -> None:
    assert to_micro(credits) == _decimal_to_micro(credits, False)
    assert to_micro(credits, round_up=True) == _decimal_to_micro(credits, True)


@given(st.integers(min_value=-(10**16), max_value=10**16))
def test_formatted_credits_match_decimal_formatting(micro: int) -> None:
    text = f"{Decimal(micro) / 1_000_000:f}"
    assert format_credits(micro) == (text.rstrip("0").rstrip(".") if "." in text else text)


def test_ledger_record_figures_are_clamped_and_kept_as_they_are_within_bounds() -> None:
    hostile = CallUsage(tokens_in=10**400, tokens_out=-5, images=3, seconds_ms=2**60)
    assert _bounded(hostile) == CallUsage(tokens_in=MAX_TOKENS, tokens_out=0, images=3, seconds_ms=2**46)
    usual = CallUsage(provider="p", deployment="d", tokens_in=10, tokens_out=20, seconds_ms=1500)
    assert _bounded(usual) is usual
