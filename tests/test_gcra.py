"""GCRA is exact: a burst admits exactly `limit` for every limit and window, and the advisory state
(`RateLimit-Remaining`, reset) equals the rational arithmetic in every state. Both stores."""

from __future__ import annotations

import math
import random
from fractions import Fraction

import pytest

from proxy.store import LimitSpec, MemoryStore, Store
from tests.test_store import T0, make_request

WINDOWS_MS = (7, 1000, 60_000, 3_600_000)
# Redis answers ~10x slower per call; a spread of limits (primes, powers, the 7/hour) keeps it quick.
# Its windows are long: the test's clock stands still while Redis expires keys (PX = tat − now) in real time.
REDIS_LIMITS = (1, 2, 3, 7, 10, 13, 49, 64, 97, 100, 199)
BOTH_WINDOWS_MS = (3_600_000, 86_399_999)


def spec(limit: int, window_ms: int, cost: int = 1) -> LimitSpec:
    return LimitSpec(f"t:{{acme}}:rl:{limit}:{window_ms}", limit=limit, window_ms=window_ms, cost=cost)


def expected_state(limit: int, window_ms: int, tat: Fraction, now: int) -> tuple[int, int]:
    """(remaining, reset ms) by exact rational arithmetic."""
    busy = max(Fraction(0), tat - now)
    interval = Fraction(window_ms, limit)
    return max(0, math.floor((window_ms - busy) / interval)), math.ceil(busy)


async def burst_then_walk(store: Store, limit: int, window_ms: int, rng: random.Random) -> None:
    remaining = []
    while True:
        result = await store.admit(make_request(limits=(spec(limit, window_ms),)))
        if not result.allowed:
            break
        remaining.append(result.limits[0].remaining)
    assert remaining == list(range(limit - 1, -1, -1)), f"{limit}/{window_ms}ms"
    interval = Fraction(window_ms, limit)
    assert result.denial is not None and result.denial.retry_after_ms == math.ceil(interval)

    tat = Fraction(T0 + window_ms)  # the burst filled the window exactly
    offsets = {math.floor(k * interval) + d for k in rng.sample(range(limit + 1), min(limit + 1, 6)) for d in (-1, 0, 1)}
    for offset in sorted(o for o in offsets if 0 <= o <= window_ms):
        state = await store.peek(make_request(T0 + offset, limits=(spec(limit, window_ms),)))
        got = (state.limits[0].remaining, state.limits[0].reset_ms)
        assert got == expected_state(limit, window_ms, tat, T0 + offset), f"{limit}/{window_ms}ms at +{offset}"


async def test_every_limit_from_1_to_200_admits_exactly_its_burst_and_states_are_exact() -> None:
    store, rng = MemoryStore(), random.Random(9)
    for window_ms in WINDOWS_MS:
        for limit in range(1, 201):
            await burst_then_walk(store, limit, window_ms, rng)


@pytest.mark.parametrize("window_ms", BOTH_WINDOWS_MS)
async def test_bursts_and_states_are_exact_on_both_stores(store: Store, window_ms: int) -> None:
    rng = random.Random(window_ms)
    for limit in REDIS_LIMITS:
        await burst_then_walk(store, limit, window_ms, rng)


async def test_seven_per_hour_refills_one_every_interval_exactly(store: Store) -> None:
    seven = spec(7, 3_600_000)
    for _ in range(7):
        assert (await store.admit(make_request(limits=(seven,)))).allowed
    refill = Fraction(3_600_000, 7)  # 514 285.714… ms
    for k in range(1, 8):
        just_before = T0 + math.ceil(k * refill) - 1
        assert not (await store.admit(make_request(just_before, limits=(seven,)))).allowed
        assert (await store.admit(make_request(just_before + 1, limits=(seven,)))).allowed


async def test_token_debt_from_a_settle_is_exact(store: Store) -> None:
    tokens = LimitSpec("t:{acme}:rl:tok", limit=3, window_ms=100_000, cost=1, tokens=True)
    admitted = await store.admit(make_request(limits=(tokens,)))
    assert admitted.reservation is not None
    assert await store.settle(admitted.reservation, 0, 3, T0)  # used 3: the limit is empty until T0 + 100 s
    state = await store.peek(make_request(T0 + 33_333, limits=(tokens,)))
    assert (state.limits[0].remaining, state.limits[0].reset_ms) == (0, 66_667)
    state = await store.peek(make_request(T0 + 33_334, limits=(tokens,)))
    assert (state.limits[0].remaining, state.limits[0].reset_ms) == (1, 66_666)
