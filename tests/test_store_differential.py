"""Differential property test: random sequences of admit, peek, settle, renew, cancel (of a lost admit), a
late replay of an admit, and clock steps, with amounts from 0 to beyond the bounds, give identical answers from MemoryStore and RedisStore (a real redis-server)
at every step. One Python reference, one Lua twin: any divergence is a bug in one of them."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from typing import Any, Awaitable, Callable

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from proxy.store import AdmitRequest, CreditSpec, LeaseSpec, LimitSpec, MemoryStore, RedisStore, Reservation, Store
from proxy.store.base import MAX_AMOUNT, MAX_BUDGET, MAX_TOKENS, AdmitCancelled, CallUsage, LedgerSpec
from proxy.store.ledger import account_usage_key, day_of, stream_key, user_usage_key

CREDIT = 1_000_000
LEDGER_LIFETIME_MS = 30 * 86_400_000  # beyond any clock the steps reach: both stores keep the ledger

amounts = st.one_of(
    st.just(0),
    st.integers(1, 5 * CREDIT),
    st.integers(0, MAX_AMOUNT),
    st.just(MAX_AMOUNT),
    st.integers(MAX_AMOUNT + 1, 10**30),  # refused by both, before anything changes
    st.integers(-3, -1),
)
call_usages = st.builds(
    CallUsage,
    outcome=st.sampled_from(["settled", "released"]),
    provider=st.sampled_from(["", "p"]),
    tokens_in=st.integers(0, 5000),
    tokens_out=st.one_of(st.integers(0, 5000), st.just(MAX_TOKENS)),
    images=st.integers(0, 3),
    seconds_ms=st.integers(0, 90_000),
)
token_counts = st.one_of(
    st.just(0), st.integers(1, 2000), st.just(MAX_TOKENS), st.integers(MAX_TOKENS + 1, 10**30), st.just(-1)
)
budgets = st.sampled_from([0, 3 * CREDIT, 10 * CREDIT, MAX_AMOUNT, MAX_BUDGET])
ttls = st.sampled_from([1, 700, 5000, 60_000])
steps = st.sampled_from([0, 1, 7, 699, 700, 4999, 5000, 20_000, 60_001, 3_600_000])


def outcome(call: Callable[[], Awaitable[Any]], loop: asyncio.AbstractEventLoop) -> tuple[str, Any]:
    try:
        return "ok", loop.run_until_complete(call())
    except (ValueError, AdmitCancelled) as exc:
        return type(exc).__name__, str(exc)


class MemoryVersusRedis(RuleBasedStateMachine):
    """Both stores get the very same calls; the injected clock never runs behind the real one (Redis expires
    keys by its own clock, which must never get ahead of the logical expiry the stores judge by)."""

    redis_url = ""
    requests = Bundle("requests")  # every admit sent, taken or not: settling one never taken is a no-op

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.memory = MemoryStore()
        self.redis = RedisStore(self.redis_url)  # the shipped timeouts
        self.tag = f"d{uuid.uuid4().hex[:12]}"
        self.skew = 0
        self.started = self.wall_ms()
        self.serial = 0
        self.days = {day_of(self.now())}

    @staticmethod
    def wall_ms() -> int:
        return int(time.time() * 1000)

    def now(self) -> int:
        return self.wall_ms() + self.skew

    def both(self, call: Callable[[Store], Awaitable[Any]]) -> Any:
        from_memory = outcome(lambda: call(self.memory), self.loop)
        from_redis = outcome(lambda: call(self.redis), self.loop)
        assert from_memory == from_redis
        return from_memory[1] if from_memory[0] == "ok" else None

    def request(self, tokens: int, amount: int, budget: int | None, lease: int | None, ttl: int, who: int) -> AdmitRequest:
        self.serial += 1
        base = f"t:{{{self.tag}}}"
        rid = f"r{self.serial}"
        limits = (
            LimitSpec(f"{base}:rl:req:{who}", limit=3, window_ms=60_000, cost=1),
            LimitSpec(f"{base}:rl:tok", limit=1000, window_ms=60_000, cost=tokens, tokens=True),
        )
        credits = None
        if budget is not None:
            expire_at = self.started + LEDGER_LIFETIME_MS if who else 0
            credits = CreditSpec(f"{base}:cr:{who}", f"{base}:cr:{who}:holds", budget, amount, expire_at)
        # the usage ledger: both stores write the same records and aggregates (trimming aside: Redis trims
        # approximately, so the bound is out of reach here)
        ledger = LedgerSpec(base, f"q{self.serial}", self.tag, "k", f"u:g:{who}", f"m{who}", LEDGER_LIFETIME_MS, 10**6)
        return AdmitRequest(
            rid, f"{base}:tk:{rid}", self.now(), ttl, limits,
            LeaseSpec(f"{base}:cc", lease) if lease is not None else None, credits, ledger,
        )

    @rule(
        target=requests,
        tokens=token_counts, amount=amounts, budget=st.one_of(st.none(), budgets),
        lease=st.sampled_from([None, 0, 1, 3]), ttl=ttls, who=st.integers(0, 1),
    )
    def admit(self, tokens: int, amount: int, budget: int | None, lease: int | None, ttl: int, who: int) -> Any:
        req = self.request(tokens, amount, budget, lease, ttl, who)
        self.both(lambda store: store.admit(req))
        return req

    @rule(req=requests)
    def cancel(self, req: AdmitRequest) -> None:
        now = self.now()
        self.both(lambda store: store.cancel(req, now))

    @rule(req=requests)
    def replay_admit(self, req: AdmitRequest) -> None:
        """The same admit (same ticket) reaching the store again, later (Redis running a call whose answer was
        lost). With the time of its arrival: the memory store, like time, only moves forward."""
        late = dataclasses.replace(req, now_ms=self.now())
        self.both(lambda store: store.admit(late))

    @rule(budget=st.one_of(st.none(), budgets), lease=st.sampled_from([None, 3]), who=st.integers(0, 1))
    def peek(self, budget: int | None, lease: int | None, who: int) -> None:
        req = self.request(0, 0, budget, lease, 1000, who)
        self.both(lambda store: store.peek(req))

    @rule(req=requests, amount=amounts, tokens=token_counts, usage=call_usages)
    def settle(self, req: AdmitRequest, amount: int, tokens: int, usage: CallUsage) -> None:
        now = self.now()
        self.both(lambda store: store.settle(Reservation(req), amount, tokens, now, usage))

    @rule(req=requests, ttl=ttls)
    def renew(self, req: AdmitRequest, ttl: int) -> None:
        now = self.now()
        self.both(lambda store: store.renew(Reservation(req), ttl, now))

    @rule(step=steps)
    def clock_step(self, step: int) -> None:
        self.skew += step
        self.days.add(day_of(self.now()))

    @invariant()
    def same_ledger(self) -> None:
        """The same records (but their stream ids: Redis's clock) and the same daily aggregates."""
        base = f"t:{{{self.tag}}}"
        keys = [key for day in sorted(self.days) for key in
                (account_usage_key(base, day), *(user_usage_key(base, f"u:g:{who}", day) for who in (0, 1)))]

        async def ledger(store: Any) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
            records = await store.read_ledger(stream_key(base), count=10**6)
            return [record.fields for record in records], await store.read_usage(keys)

        assert self.loop.run_until_complete(ledger(self.memory)) == self.loop.run_until_complete(ledger(self.redis))

    def teardown(self) -> None:
        self.loop.run_until_complete(self.redis.close())
        self.loop.close()


def test_memory_and_redis_agree_at_every_step(redis_url: str) -> None:
    MemoryVersusRedis.redis_url = redis_url
    run_state_machine_as_test(
        MemoryVersusRedis,
        settings=settings(
            max_examples=40, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
        ),
    )
