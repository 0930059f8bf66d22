"""Drive many users through the meter against a private redis-server and show that DBSIZE stays flat.

Every second a new cohort of users arrives and the previous one goes quiet; some requests are settled,
some abandoned (a crashed replica). Rate-limit keys, leases and tickets expire; ledgers are one per
account and period. The usage ledger's keys (a stream per account, daily aggregates per account and per user:
docs/usage.md) are counted apart: they stay for the usage retention (35 days), one per account or user and day. Run: `python bench/store_keys.py [--seconds 12] [--users-per-second 300]`.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import redis.asyncio as aioredis  # noqa: E402

from proxy.auth.principal import Principal  # noqa: E402
from proxy.errors import ApiError  # noqa: E402
from proxy.meter import Meter  # noqa: E402
from proxy.policy.types import Budget, Decision, RateLimit  # noqa: E402
from proxy.store import RedisStore  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402

DECISION = Decision(
    allowed=True,
    plan="bench",
    rate_limits=(RateLimit(("user",), "requests", 5, 1), RateLimit(("user",), "tokens", 2000, 1)),
    concurrency=2,
    budget=Budget(credits=10**9, period="month"),
    reserve_credits=1.0,
    estimated_tokens=300,
)


async def drive_cohort(meter: Meter, cohort: int, users: int, accounts: int, rng: random.Random) -> tuple[int, int]:
    """Every user of the cohort sends a few requests; returns (admitted, denied)."""

    async def one(user: int) -> bool:
        principal = Principal(kind="issuer", account=f"acct{user % accounts}", plan="bench", subject=f"u{cohort}-{user}")
        try:
            admission = await meter.admit(principal, "bench/model", DECISION, f"c{cohort}-{user}")
        except ApiError:
            return False
        if rng.random() < 0.8:  # the rest are abandoned: their lease and hold expire on their own
            await admission.settle(rng.random(), rng.randrange(50, 300))
        return True

    outcomes = await asyncio.gather(*(one(user) for user in range(users) for _ in range(3)))
    return sum(outcomes), len(outcomes) - sum(outcomes)


async def run(seconds: float, users_per_second: int, accounts: int, idle_seconds: float) -> None:
    with RedisServer() as server:
        store = RedisStore(server.url, max_connections=32)
        client = aioredis.Redis.from_url(server.url)
        meter = Meter(store, reservation_ttl_s=2.0)
        rng = random.Random(1)
        print(f"{'t (s)':>6} {'users':>7} {'admitted':>9} {'denied':>7} {'DBSIZE':>7} {'usage':>7} {'others':>7}")
        started = time.monotonic()
        admitted = denied = users = 0
        for tick in range(int(seconds + idle_seconds)):
            if tick < seconds:  # cohort `tick` arrives; the one before goes quiet for good
                ok, no = await drive_cohort(meter, tick, users_per_second, accounts, rng)
                admitted, denied, users = admitted + ok, denied + no, users + users_per_second
            elapsed = time.monotonic() - started
            total, usage = await client.dbsize(), await usage_keys(client)
            print(f"{elapsed:6.1f} {users:7d} {admitted:9d} {denied:7d} {total:7d} {usage:7d} {total - usage:7d}", flush=True)
            await asyncio.sleep(max(0.0, started + tick + 1 - time.monotonic()))
        await client.aclose()
        await store.close()
    print(f"{users} distinct users; besides the usage ledger's keys, what is left is the {accounts} account ledgers"
          " (+ their holds) of this month")


async def usage_keys(client: aioredis.Redis) -> int:
    """The usage ledger's keys: streams (`:lg`) and daily aggregates (`:us:`)."""
    return sum([1 async for _ in client.scan_iter(match="ep:*:us:*", count=1000)]) + sum(
        [1 async for _ in client.scan_iter(match="ep:*:lg", count=1000)]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=12.0, help="how long users keep arriving")
    parser.add_argument("--users-per-second", type=int, default=300)
    parser.add_argument("--accounts", type=int, default=5)
    parser.add_argument("--idle-seconds", type=float, default=8.0, help="quiet time at the end to watch keys expire")
    args = parser.parse_args()
    asyncio.run(run(args.seconds, args.users_per_second, args.accounts, args.idle_seconds))


if __name__ == "__main__":
    main()
