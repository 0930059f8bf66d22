"""Redis freezes under load: afterwards no request that got an error is charged and no concurrency slot is held.

    python bench/redis_freeze.py [--replicas 2] [--clients 40] [--seconds 8] [--freeze-at 2] [--freeze 3]

Starts a redis-server, the demo-format upstream and `replicas` gateways (store: redis, shipped defaults) on
loopback. `clients` callers send calls in a loop for `seconds`; at `freeze-at` redis-server gets SIGSTOP
(connections stay open, commands queue up unanswered, as in a long stall) and `freeze` seconds later SIGCONT,
after which it runs whatever queued up, including admits whose callers were long answered 503. When the load
stops, the bench waits for the replicas' queued settles and cancels to land and compares the ledger with what
the callers saw: each 200 costs exactly 1 credit, an error nothing, and nothing may stay held or in flight.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from burst import _hash, replicas_on_redis  # noqa: E402
from relay import wait_ready  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402

FREEZE_KEY = "sk_bench_freeze_" + "f" * 32
CONCURRENCY = 1000  # far above the clients: a leaked slot shows as in_flight > 0, never as a refusal
POLICY = {
    "plans": {"demo": {"models": ["bench/*"]},  # the demo key, used only to see that a replica is up
              "freeze": {"models": ["bench/*"], "concurrency": CONCURRENCY,
                         "budget": {"credits": 10**6, "period": "none", "scope": "key"}}},
    "prices": {"bench/chat": {"per_request": 1}},
    "keys": [{"id": "freeze", "hash": _hash(FREEZE_KEY), "plan": "freeze"}],
}
HEADERS = {"Authorization": f"Bearer {FREEZE_KEY}", "Content-Type": "application/json"}


async def load(urls: list[str], clients: int, seconds: float, phase: list[str]) -> Counter[tuple[str, str]]:
    """Callers in a loop until `seconds` pass; counts (phase when the call started, status and error code)."""
    body = json.dumps({"model": "bench/chat", "messages": [{"role": "user", "content": "hi"}]})
    outcomes: Counter[tuple[str, str]] = Counter()
    deadline = time.monotonic() + seconds
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as http:

        async def caller(i: int) -> None:
            while time.monotonic() < deadline:
                started_in = phase[0]
                async with http.post(f"{urls[i % len(urls)]}/v1/chat/completions", data=body, headers=HEADERS) as r:
                    payload = await r.read()
                status = "200" if r.status == 200 else f"{r.status} {json.loads(payload)['error']['code']}"
                outcomes[(started_in, status)] += 1
                if r.status != 200:
                    await asyncio.sleep(0.05)  # a client honouring Retry-After would wait longer

        await asyncio.gather(*(caller(i) for i in range(clients)))
    return outcomes


async def freeze(server: RedisServer, at: float, seconds: float, phase: list[str]) -> None:
    await asyncio.sleep(at)
    server.pause()
    phase[0] = "frozen"
    try:
        await asyncio.sleep(seconds)
    finally:
        server.resume()
        phase[0] = "after"


async def state(url: str) -> dict[str, Any] | None:
    """GET /v1/me of the freeze key, or None while the store does not answer yet."""
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{url}/v1/me", headers=HEADERS) as r:
            return await r.json() if r.status == 200 else None


async def settled_state(url: str, timeout_s: float) -> tuple[dict[str, Any], float]:
    """The account state once nothing is held or in flight (or at the timeout), and how long that took."""
    started = time.monotonic()
    current: dict[str, Any] | None = None
    while time.monotonic() - started < timeout_s:
        current = await state(url)
        if current and current["balance"]["held"] == 0 and current["concurrency"]["in_flight"] == 0:
            break
        await asyncio.sleep(0.2)
    assert current is not None, "the store never answered again"
    return current, time.monotonic() - started


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--clients", type=int, default=40)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--freeze-at", type=float, default=2.0)
    parser.add_argument("--freeze", type=float, default=3.0)
    parser.add_argument("--settle-timeout", type=float, default=30.0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as workdir, RedisServer(workdir=Path(workdir)) as redis_server:
        with replicas_on_redis(args.replicas, POLICY, redis_server.url) as running:
            for gateway in running.gateways:
                await wait_ready(f"{gateway}/v1/chat/completions")
            phase = ["before"]
            outcomes, _ = await asyncio.gather(
                load(running.gateways, args.clients, args.seconds, phase),
                freeze(redis_server, args.freeze_at, args.freeze, phase),
            )
            final, waited = await settled_state(running.gateways[0], args.settle_timeout)

    print(f"\n{args.replicas} replicas, {args.clients} callers for {args.seconds:g}s; redis-server frozen (SIGSTOP) "
          f"from {args.freeze_at:g}s for {args.freeze:g}s; 1 credit per call\n")
    statuses = sorted({status for _, status in outcomes})
    print(f"{'calls started':<14}" + "".join(f"{s:>28}" for s in statuses))
    for name in ("before", "frozen", "after"):
        print(f"{name:<14}" + "".join(f"{outcomes[(name, s)]:>28}" for s in statuses))
    answered_200 = sum(n for (_, status), n in outcomes.items() if status == "200")
    balance, concurrency = final["balance"], final["concurrency"]
    print(f"\n{'':<34}{'callers saw':>14}{'ledger':>10}")
    print(f"{'charged (credits)':<34}{answered_200:>14}{balance['spent']:>10g}")
    print(f"{'held (credits)':<34}{0:>14}{balance['held']:>10g}")
    print(f"{'slots in flight':<34}{0:>14}{concurrency['in_flight']:>10}")
    print(f"\nphantom charge: {balance['spent'] - answered_200:g} credits now, plus {balance['held']:g} still held "
          f"(charged at the reserve when the holds expire, reservation_ttl_s after the admit); "
          f"waited {waited:.1f}s for the ledger to settle")


if __name__ == "__main__":
    asyncio.run(main())
