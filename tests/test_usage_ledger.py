"""The usage ledger over MemoryStore and RedisStore (real redis-server): one record per settle, written by the
settle itself, whose credits are exactly the balance change; none for a repeated settle; the expired hold of a
dead replica recorded when it is charged; daily aggregates; trimming; the exporters' reader with consumer groups."""

from __future__ import annotations

import asyncio
import time
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from proxy.auth.principal import Principal
from proxy.meter import MICRO, Meter
from proxy.policy.types import Budget
from proxy.store import MemoryStore, RedisStore, ResilientStore, Store
from proxy.store.base import CallUsage
from proxy.store.ledger import LedgerReader, LedgerRecord
from tests.redis_server import RedisServer
from tests.test_meter import ALICE, BOB, Clock, decide

CAROL = Principal(kind="api_key", account="globex", plan="pro", key_id="key9")
BUDGET = decide(budget=Budget(credits=100), reserve_credits=4)
USED = CallUsage(provider="mock", deployment="mock-a", tokens_in=12, tokens_out=30)


@pytest.fixture
def clock() -> Clock:
    return Clock(datetime.fromtimestamp(time.time(), timezone.utc))


def meter_on(store: Store, clock: Clock, **options: Any) -> Meter:
    return Meter(store, reservation_ttl_s=60, clock=clock, **options)


async def records(store: Store, account: str = "acme") -> list[LedgerRecord]:
    reader: LedgerReader = store  # type: ignore[assignment]
    return await reader.read_ledger(f"ep:{{{account}}}:lg", count=10_000)


async def spent(meter: Meter, principal: Principal = ALICE) -> int:
    state = await meter.state(principal, BUDGET)
    return round(state["balance"]["spent"] * MICRO)


def credits_of(found: list[LedgerRecord]) -> int:
    return sum(int(record.fields["credits"]) for record in found)


async def test_each_settle_writes_one_record_whose_credits_are_the_balance_change(store: Store, clock: Clock) -> None:
    meter = meter_on(store, clock)
    admission = await meter.admit(ALICE, "m/a", BUDGET, "req-1")
    assert await admission.settle(1.25, 42, USED)
    assert not await admission.settle(3.0, 42, USED)  # the Admission acts once
    # the store's own idempotency: the same settle again (a retry whose first answer was lost) writes nothing
    assert admission._reservation is not None
    assert not await store.settle(admission._reservation, 3 * MICRO, 42, int(clock() * 1000), USED)
    found = await records(store)
    assert len(found) == 1
    fields = found[0].fields
    assert fields["id"] == admission._reservation.request.reservation_id
    assert {k: fields[k] for k in ("request_id", "account", "key", "user", "model", "provider", "deployment")} == {
        "request_id": "req-1", "account": "acme", "key": "key1", "user": "u:g:alice", "model": "m/a",
        "provider": "mock", "deployment": "mock-a",
    }
    assert (fields["tokens_in"], fields["tokens_out"], fields["outcome"], fields["late"]) == ("12", "30", "settled", "0")
    assert (int(fields["credits"]), int(fields["reserved"])) == (1_250_000, 4 * MICRO)
    assert int(fields["ts"]) == int(clock() * 1000)
    assert credits_of(found) == await spent(meter) == 1_250_000


async def test_a_release_is_recorded_as_released_and_charges_nothing(store: Store, clock: Clock) -> None:
    meter = meter_on(store, clock)
    admission = await meter.admit(ALICE, "m/a", BUDGET, "req-1")
    await admission.release(CallUsage(provider="mock", deployment="mock-a"))
    [record] = await records(store)
    assert (record.fields["outcome"], record.fields["credits"], record.fields["provider"]) == ("released", "0", "mock")
    assert await spent(meter) == 0


async def test_a_dead_replicas_hold_is_recorded_when_charged_and_a_late_settle_records_the_correction(
    store: Store, clock: Clock
) -> None:
    """The hold expires (nobody renewed it) and the next admit charges it at the reserve, with an `expired`
    record naming the call; a settle arriving late (the ticket outlives the hold) corrects the charge with a
    second record: the records' credits always add up to the balance's `spent`."""
    meter = meter_on(store, clock)
    dying = await meter.admit(ALICE, "m/chat", BUDGET, "req-dies")
    clock.now += 61  # past the hold's ttl
    await (await meter.admit(BOB, "m/a", BUDGET, "req-next")).settle(0.5, 1, USED)
    found = await records(store)
    assert [r.fields["outcome"] for r in found] == ["expired", "settled"]
    expired = found[0].fields
    assert dying._reservation is not None
    assert expired["id"] == dying._reservation.request.reservation_id + ":expired"
    assert (expired["request_id"], expired["user"], expired["model"]) == ("req-dies", "u:g:alice", "m/chat")
    assert int(expired["credits"]) == 4 * MICRO and credits_of(found) == await spent(meter) == 4_500_000

    await dying.settle(1.0, 5, USED)  # late: corrects the charge from the reserve to the actual amount
    found = await records(store)
    late = found[-1].fields
    assert (late["outcome"], late["late"], int(late["credits"])) == ("settled", "1", -3 * MICRO)
    assert credits_of(found) == await spent(meter) == 1_500_000


async def test_a_cancelled_admit_is_recorded_once_and_a_cancel_of_nothing_writes_nothing(
    store: Store, clock: Clock
) -> None:
    meter = meter_on(store, clock)
    admission = await meter.admit(ALICE, "m/a", BUDGET, "req-1")
    assert admission._reservation is not None
    request = admission._reservation.request
    now = int(clock() * 1000)
    assert await store.cancel(request, now) and not await store.cancel(request, now)
    [record] = await records(store)
    assert (record.fields["outcome"], record.fields["credits"]) == ("cancelled", "0")
    await admission.settle(1.0, 0, USED)  # finds the tombstone: no charge, no record
    assert len(await records(store)) == 1 and await spent(meter) == 0


async def test_daily_aggregates_by_account_and_user(store: Store, clock: Clock) -> None:
    meter = meter_on(store, clock)
    for who, model, credits in [(ALICE, "m/a", 1.0), (ALICE, "m/b", 2.0), (BOB, "m/a", 0.25), (CAROL, "m/a", 9.0)]:
        await (await meter.admit(who, model, BUDGET, "r")).settle(credits, 42, USED)
    today = datetime.fromtimestamp(clock(), timezone.utc).date()
    [(_, account)] = await meter.usage("acme", None, [today])
    assert account == {
        "calls:m/a": 2, "credits:m/a": 1_250_000, "tokens_in:m/a": 24, "tokens_out:m/a": 60,
        "calls:m/b": 1, "credits:m/b": 2_000_000, "tokens_in:m/b": 12, "tokens_out:m/b": 30,
    }
    [(_, bob)] = await meter.usage("acme", "u:g:bob", [today])
    assert bob == {"calls:m/a": 1, "credits:m/a": 250_000, "tokens_in:m/a": 12, "tokens_out:m/a": 30}
    [(_, before)] = await meter.usage("acme", None, [date(2000, 1, 1)])
    assert before == {}


async def test_records_are_trimmed_to_the_configured_count(store: Store, clock: Clock) -> None:
    meter = meter_on(store, clock, usage_max_records=10)
    for _ in range(200):
        await (await meter.admit(ALICE, "m/a", BUDGET, "r")).settle(0.01, 1, USED)
    kept = len(await records(store))
    # Redis trims whole nodes (`MAXLEN ~`): it may keep a few more, never fewer; the memory store is exact
    assert 10 <= kept <= (10 if isinstance(store, MemoryStore) else 110)


async def test_consumer_groups_deliver_each_record_and_redeliver_unacknowledged_ones(store: Store, clock: Clock) -> None:
    """At least once: a consumer that died before acknowledging gets its records again as pending."""
    meter = meter_on(store, clock)
    reader: LedgerReader = store  # type: ignore[assignment]
    assert await reader.read_ledger_group("ep:{acme}:lg", "export", "c1") == []  # no stream yet
    for i in range(5):
        await (await meter.admit(ALICE, "m/a", BUDGET, f"r{i}")).settle(0.1, 1, USED)
    await (await meter.admit(CAROL, "m/a", BUDGET, "g")).settle(0.1, 1, USED)
    assert await reader.ledger_streams() == ["ep:{acme}:lg", "ep:{globex}:lg"]
    first = await reader.read_ledger_group("ep:{acme}:lg", "export", "c1", count=3)
    rest = await reader.read_ledger_group("ep:{acme}:lg", "export", "c1", count=10)
    assert [r.fields["request_id"] for r in first + rest] == [f"r{i}" for i in range(5)]
    assert await reader.read_ledger_group("ep:{acme}:lg", "export", "c1") == []
    assert await reader.ack_ledger("ep:{acme}:lg", "export", [r.id for r in first]) == 3
    again = await reader.read_ledger_group("ep:{acme}:lg", "export", "c1", pending=True)
    assert [r.id for r in again] == [r.id for r in rest] and again[0].fields == rest[0].fields
    other = await reader.read_ledger_group("ep:{acme}:lg", "audit", "c1", count=100)  # each group reads all
    assert len(other) == 5
    after = await reader.read_ledger("ep:{acme}:lg", after=first[-1].id)
    assert [r.id for r in after] == [r.id for r in rest]


async def test_records_survive_a_redis_restart_and_retried_settles_are_recorded_once(
    tmp_path: Path, clock: Clock
) -> None:
    """Settles that could not reach Redis wait in the meter's queue; after the restart each is applied once,
    with its one record, and the records' credits equal the balance change."""
    with RedisServer(workdir=tmp_path, persistent=True) as server:
        store = ResilientStore(RedisStore(server.url, connect_timeout_s=0.2, op_timeout_s=0.3), breaker_reset_s=0.2)
        meter = meter_on(store, clock)
        before = [await meter.admit(ALICE, "m/a", BUDGET, f"b{i}") for i in range(3)]
        for admission in before:
            await admission.settle(0.5, 1, USED)
        during = [await meter.admit(ALICE, "m/a", BUDGET, f"d{i}") for i in range(3)]
        server.kill()
        for admission in during:
            await admission.settle(0.25, 1, USED)  # queued
        assert meter.pending_settles == 3
        server.start()
        meter.start()
        deadline = time.monotonic() + 5
        while meter.pending_settles and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        found = await records(store)
        total = await spent(meter)
        await meter.close()
        await store.close()
    assert sorted(r.fields["request_id"] for r in found) == ["b0", "b1", "b2", "d0", "d1", "d2"]
    assert credits_of(found) == total == 2_250_000


async def test_a_ticket_expired_by_the_clock_names_nobody_even_while_redis_still_keeps_it(
    store: Store, clock: Clock
) -> None:
    """A hold swept after its ticket's logical expiry: the record has no request, key, user or model, in both
    stores (Redis keeps the ticket key for a grace period, but a key expired by the clock reads as absent)."""
    meter = Meter(store, reservation_ttl_s=0.001, clock=clock)  # hold: 1 ms, ticket: 2 ms (+ Redis's 2 s grace)
    await meter.admit(ALICE, "m/chat", BUDGET, "req-gone")
    clock.now += 0.005
    await meter.state(BOB, BUDGET)  # a peek sweeps the expired hold too
    [record] = await records(store)
    assert record.fields["outcome"] == "expired" and int(record.fields["credits"]) == 4 * MICRO
    assert [record.fields[name] for name in ("request_id", "key", "user", "model")] == ["", "", "", ""]


async def test_a_late_release_takes_back_the_expired_holds_call_and_charge(store: Store, clock: Clock) -> None:
    """A hold charged at expiry counts as a call; its late release (nothing billable after all) undoes both."""
    meter = meter_on(store, clock)
    dying = await meter.admit(ALICE, "m/chat", BUDGET, "req-late")
    clock.now += 61
    await meter.state(BOB, BUDGET)  # sweeps: charged at the reserve, one call
    today = datetime.fromtimestamp(clock(), timezone.utc).date()
    [(_, swept)] = await meter.usage("acme", None, [today])
    assert swept == {"calls:m/chat": 1, "credits:m/chat": 4 * MICRO}
    await dying.release()
    [(_, undone)] = await meter.usage("acme", "u:g:alice", [today])
    assert undone == {"calls:m/chat": 0, "credits:m/chat": 0}
    assert [r.fields["outcome"] for r in await records(store)] == ["expired", "released"]
    assert credits_of(await records(store)) == await spent(meter) == 0


async def test_records_a_dead_consumer_left_unacknowledged_are_claimed_after_the_idle_time(
    store: Store, clock: Clock
) -> None:
    meter = meter_on(store, clock, usage_max_records=3)
    reader: LedgerReader = store  # type: ignore[assignment]
    stream = "ep:{acme}:lg"
    assert await reader.claim_ledger(stream, "export", "c2", 0) == []  # no stream, no group: nothing
    for i in range(3):
        await (await meter.admit(ALICE, "m/a", BUDGET, f"r{i}")).settle(0.1, 1, USED)
    taken = await reader.read_ledger_group(stream, "export", "c1")  # c1 dies before acknowledging
    assert await reader.claim_ledger(stream, "export", "c2", 60_000) == []  # not idle long enough yet
    await asyncio.sleep(0.06)
    claimed = await reader.claim_ledger(stream, "export", "c2", 50, count=2)
    assert [r.id for r in claimed] == [r.id for r in taken[:2]] and claimed[0].fields == taken[0].fields
    again = await reader.claim_ledger(stream, "export", "c3", 50)  # c2's were just claimed: not idle
    assert [r.id for r in again] == [taken[2].id]
    assert [r.id for r in await reader.read_ledger_group(stream, "export", "c2", pending=True)] == [r.id for r in claimed]
    assert await reader.read_ledger_group(stream, "export", "c1", pending=True) == []
    for i in range(200):  # the unacknowledged records are trimmed away (at most 3 kept)
        await (await meter.admit(ALICE, "m/a", BUDGET, f"t{i}")).settle(0.1, 1, USED)
    await asyncio.sleep(0.06)
    lost = await reader.claim_ledger(stream, "export", "c3", 50)
    assert sorted(r.id for r in lost) == sorted(r.id for r in taken) and all(r.fields == {} for r in lost)
    assert await reader.claim_ledger(stream, "export", "c3", 0) == []  # and they are no longer pending


async def test_every_ledger_and_usage_key_keeps_its_expiry_when_settles_skip_resetting_it(redis_url: str, clock: Clock) -> None:
    """The scripts set an expiry when they create a key (a new aggregate field, a hold after an expired one), not on
    every settle: after on-time, late and repeated settles over two models, every key of the account still has one,
    and the day's aggregates expire at the end of the day plus the retention."""
    client = aioredis.Redis.from_url(redis_url)
    await client.flushdb()
    store = RedisStore(redis_url)
    meter, monthly = meter_on(store, clock), decide(budget=Budget(credits=100, period="month"), reserve_credits=4)
    dying = await meter.admit(ALICE, "m/a", monthly, "late")
    for model in ("m/a", "m/a", "m/b"):
        await (await meter.admit(ALICE, model, monthly, "r")).settle(0.5, 7, USED)
    clock.now += 61  # the first hold expires: charged by the next admit, corrected by its late settle
    await (await meter.admit(BOB, "m/a", monthly, "r")).settle(0.5, 7, USED)
    await dying.settle(1.0, 7, USED)
    keys = sorted([key.decode() async for key in client.scan_iter(match="ep:{acme}:*")])
    ttls = {key: await client.pttl(key) for key in keys}
    await client.aclose()
    await store.close()
    assert [any(part in key for key in keys) for part in (":us:a:", ":us:u:", ":lg", ":cr:")] == [True] * 4
    assert all(ttl > 0 for ttl in ttls.values()), ttls
    day_end_ms = (int(clock() * 1000) // 86_400_000 + 1) * 86_400_000
    for key in (key for key in keys if ":us:" in key):
        assert abs(time.time() * 1000 + ttls[key] - (day_end_ms + 35 * 86_400_000)) < 60_000
