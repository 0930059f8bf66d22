"""A burst on gateway replicas sharing one Redis, with every store setting at its shipped default.

    python bench/burst.py [--replicas 4] [--concurrency 400] [--rounds 3]

Starts a redis-server, the demo-format upstream and `replicas` gateway processes (store: redis, nothing else
configured) on loopback. Each round sends `concurrency` calls at once, round-robin over the replicas:
  - `direct`: the same burst straight to the upstream (the baseline),
  - `roomy`: through the gateways on a plan that never refuses: every call must be a 200,
  - `budget`: through the gateways against a fresh 100-credit budget at 1 credit a call: exactly 100 are
    admitted, the rest are 402.
A 503 (`store_unavailable` or `overloaded`) would mean the burst was misread as a Redis outage or overflowed
the admission queue. The first round starts with at most one Redis connection open per replica (cold).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from relay import KEY, REPO_ROOT, UPSTREAM, free_port, gateway_config, wait_ready  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402

BUDGET = 100  # credits of each `budget` round; a call costs 1


def budget_key(round_no: int) -> str:
    return f"sk_bench_budget{round_no}_" + "b" * 32


def _hash(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def burst_policy(rounds: int) -> dict:
    """Plan `demo` (the demo key) never refuses; each round's budget key has BUDGET credits of its own."""
    roomy = {"rate_limits": [{"per": "user", "requests": 10**9, "window": "1m"}],
             "budget": {"credits": 10**9, "period": "month", "scope": "account"}}
    return {
        "plans": {"demo": {"models": ["bench/*"], **roomy},
                  "hundred": {"models": ["bench/*"], "budget": {"credits": BUDGET, "period": "none", "scope": "key"}}},
        "prices": {"bench/chat": {"per_request": 1}},
        "keys": [{"id": f"budget{r}", "hash": _hash(budget_key(r)), "plan": "hundred"} for r in range(rounds)],
    }


@dataclass
class Replicas:
    """The upstream's port and the gateway base URLs."""
    upstream_port: int
    gateways: list[str] = field(default_factory=list)


@contextlib.contextmanager
def replicas_on_redis(count: int, policy: dict, redis_url: str) -> Iterator[Replicas]:
    """The demo-format upstream and `count` gateways on one Redis (store defaults), stopped on exit."""
    up_port = free_port()
    env = {**os.environ, "EDGE_PROXY_DEMO_KEY": KEY}
    processes: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmp:
        processes.append(subprocess.Popen([sys.executable, "-c", UPSTREAM, str(up_port), "1"]))
        running = Replicas(up_port)
        try:
            config = gateway_config(up_port, tmp, policy, store={"kind": "redis", "redis_url": redis_url})
            for _ in range(count):
                port = free_port()
                processes.append(subprocess.Popen(
                    [sys.executable, "-m", "proxy", "serve", "--config", config, "--port", str(port)],
                    env=env, cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                ))
                running.gateways.append(f"http://127.0.0.1:{port}")
            yield running
        finally:
            for process in reversed(processes):
                process.terminate()
            for process in processes:
                process.wait(timeout=30)


@dataclass
class Burst:
    statuses: Counter[str]
    latencies: list[float]
    seconds: float

    def p(self, q: float) -> float:
        data = sorted(self.latencies)
        return data[min(len(data) - 1, int(q * len(data)))] * 1000


async def burst(urls: list[str], key: str, concurrency: int) -> Burst:
    """`concurrency` calls at once, round-robin over `urls`; statuses (with the error code) and latencies."""
    body = json.dumps({"model": "bench/chat", "messages": [{"role": "user", "content": "hi"}]})
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    latencies: list[float] = []
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as http:

        async def one(i: int) -> str:
            start = time.monotonic()
            async with http.post(f"{urls[i % len(urls)]}/v1/chat/completions", data=body, headers=headers) as r:
                payload = await r.read()
            latencies.append(time.monotonic() - start)
            if r.status == 200:
                return "200"
            return f"{r.status} {json.loads(payload)['error']['code']}"

        started = time.monotonic()
        statuses = Counter(await asyncio.gather(*(one(i) for i in range(concurrency))))
        return Burst(statuses, latencies, time.monotonic() - started)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    rows: list[tuple[int, str, Burst]] = []
    with tempfile.TemporaryDirectory() as workdir, RedisServer(workdir=Path(workdir)) as redis_server:
        with replicas_on_redis(args.replicas, burst_policy(args.rounds), redis_server.url) as running:
            direct = [f"http://127.0.0.1:{running.upstream_port}"]
            await wait_ready(f"{direct[0]}/v1/chat/completions")
            for gateway in running.gateways:
                await wait_ready(f"{gateway}/v1/chat/completions")
            for round_no in range(args.rounds):
                rows.append((round_no + 1, "direct", await burst(direct, KEY, args.concurrency)))
                rows.append((round_no + 1, "roomy", await burst(running.gateways, KEY, args.concurrency)))
                budget = await burst(running.gateways, budget_key(round_no), args.concurrency)
                rows.append((round_no + 1, "budget", budget))

    print(f"\n{args.concurrency} concurrent calls per burst, {args.replicas} gateway replicas on one redis-server, "
          f"store defaults; budget rounds: {BUDGET} credits at 1 per call\n")
    print(f"{'round':>5} {'target':<7} {'200':>5} {'402':>5} {'503':>5} {'other':>5} "
          f"{'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'wall s':>7}")
    for round_no, target, b in rows:
        ok, refused = b.statuses["200"], b.statuses["402 insufficient_credits"]
        unavailable = sum(n for s, n in b.statuses.items() if s.startswith("503"))
        other = sum(b.statuses.values()) - ok - refused - unavailable
        print(f"{round_no:>5} {target:<7} {ok:>5} {refused:>5} {unavailable:>5} {other:>5} "
              f"{b.p(0.5):>8.1f} {b.p(0.99):>8.1f} {max(b.latencies) * 1000:>8.1f} {b.seconds:>7.2f}")
    odd = {s: n for _, _, b in rows for s, n in b.statuses.items() if s not in ("200", "402 insufficient_credits")}
    print(f"\nnon-200/402 answers: {odd or 'none'}")
    exact = all(b.statuses["200"] == BUDGET for _, target, b in rows if target == "budget")
    print(f"every budget round admitted exactly {BUDGET}: {exact}")


if __name__ == "__main__":
    asyncio.run(main())
