"""What the usage ledger costs the settle: the same admit + settle calls with and without their ledger record,
against one redis-server, in one run.

    python bench/ledger.py [--calls 4000] [--concurrency 64] [--rounds 3]

Starts a redis-server on loopback and drives a RedisStore (the shipped defaults) with `calls` admit + settle
pairs per target, `concurrency` at a time, over 50 accounts (a budget, a per-user rate limit and a lease each):
  - `ping`: a Redis PING per call (the round trip itself, the baseline),
  - `off`: admit and settle with no ledger (the settle script as before the ledger),
  - `ledger`: admit and settle writing one ledger record and two daily aggregates per call.
Prints settle latency (p50, p99), calls per second, Redis's own time per call (INFO commandstats: the
commands alone), Redis's CPU per call (INFO cpu: with the round trips, which the store batches), this
process's CPU per call (the client: RedisStore, redis-py and the driver), the ledger/off ratios, and Redis
memory per record. The machine is shared and noisy: read the ratios, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from proxy.store import AdmitRequest, CreditSpec, LeaseSpec, LimitSpec, RedisStore  # noqa: E402
from proxy.store.base import CallUsage, LedgerSpec  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402

ACCOUNTS = 50
USAGE = CallUsage(provider="bench", deployment="bench-a", tokens_in=812, tokens_out=1204)


def request(serial: int, now_ms: int, with_ledger: bool) -> AdmitRequest:
    account = f"acct{serial % ACCOUNTS}"
    base = f"ep:{{{account}}}"
    rid = f"req_{serial:08d}.{serial:012x}"
    ledger = None
    if with_ledger:
        ledger = LedgerSpec(base, f"req_{serial:08d}", account, "key1", f"u:g:user{serial % 7}", "bench/chat",
                            35 * 86_400_000, 100_000)
    return AdmitRequest(
        rid, f"{base}:tk:{rid}", now_ms, 600_000,
        limits=(LimitSpec(f"{base}:rl:user:{serial % 7}", 10**9, 60_000, 1),),
        lease=LeaseSpec(f"{base}:cc:user{serial % 7}", 10**6),
        credits=CreditSpec(f"{base}:cr:account:all", f"{base}:cr:account:all:holds", 10**15, 4_000_000),
        ledger=ledger,
    )


async def drive(store: RedisStore, client: aioredis.Redis, target: str, calls: int, concurrency: int,
                offset: int) -> tuple[list[float], float]:
    """Settle latencies (ms) and the wall time of `calls` admit + settle pairs (or pings)."""
    latencies: list[float] = []
    gate = asyncio.Semaphore(concurrency)

    async def one(serial: int) -> None:
        async with gate:
            if target == "ping":
                started = time.perf_counter()
                await client.ping()
                latencies.append((time.perf_counter() - started) * 1000)
                return
            now_ms = int(time.time() * 1000)
            admitted = await store.admit(request(offset + serial, now_ms, target == "ledger"))
            assert admitted.reservation is not None
            started = time.perf_counter()
            assert await store.settle(admitted.reservation, 1_500_000, 2016, now_ms, USAGE)
            latencies.append((time.perf_counter() - started) * 1000)

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(calls)))
    return latencies, time.perf_counter() - started


async def redis_cpu_s(client: aioredis.Redis) -> float:
    cpu = await client.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


async def main(calls: int, concurrency: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory() as workdir, RedisServer(workdir=Path(workdir)) as server:
        store = RedisStore(server.url)
        client = aioredis.Redis.from_url(server.url)
        rows: dict[str, list[tuple[float, float, float]]] = {"ping": [], "off": [], "ledger": []}
        redis_us: dict[str, list[float]] = {"ping": [], "off": [], "ledger": []}
        redis_cpu_us: dict[str, list[float]] = {"ping": [], "off": [], "ledger": []}
        client_cpu_us: dict[str, list[float]] = {"ping": [], "off": [], "ledger": []}
        record_bytes: list[float] = []
        for round_no in range(rounds):
            for target in rows:
                before = int((await client.info("memory"))["used_memory"])
                await client.config_resetstat()
                cpu_before, client_cpu_before = await redis_cpu_s(client), time.process_time()
                latencies, wall = await drive(store, client, target, calls, concurrency, (round_no * 3 + len(rows[target])) * calls)
                client_cpu_us[target].append((time.process_time() - client_cpu_before) / calls * 1e6)
                redis_cpu_us[target].append((await redis_cpu_s(client) - cpu_before) / calls * 1e6)
                latencies.sort()
                stats = await client.info("commandstats")
                # Redis's own time per call: admit + settle scripts (EVALSHA), or the PING
                command = stats["cmdstat_ping" if target == "ping" else "cmdstat_evalsha"]
                redis_us[target].append(command["usec"] / calls)
                rows[target].append((statistics.median(latencies), latencies[int(len(latencies) * 0.99)], calls / wall))
                if target == "ledger":
                    record_bytes.append((int((await client.info("memory"))["used_memory"]) - before) / calls)
        print(f"\n{calls} admit + settle pairs per target, {concurrency} at a time, {ACCOUNTS} accounts, {rounds} rounds;"
              " settle latency (ping: the PING)")
        print(f"{'target':8} {'p50 ms':>8} {'p99 ms':>8} {'calls/s':>9} {'redis us/call':>14} "
              f"{'redis cpu us/call':>18} {'client cpu us/call':>19}")
        best = {target: min(rows[target], key=lambda row: row[0]) for target in rows}
        inside = {target: min(redis_us[target]) for target in rows}
        for target, (p50, p99, rate) in best.items():
            cpu = "/".join(f"{us:.0f}" for us in redis_cpu_us[target])
            own = "/".join(f"{us:.0f}" for us in client_cpu_us[target])
            print(f"{target:8} {p50:8.2f} {p99:8.2f} {rate:9.0f} {inside[target]:14.1f} {cpu:>18} {own:>19}")
        pipeline = getattr(store, "auto_pipeline", None)  # absent before auto-pipelining
        if pipeline is not None:
            print(f"auto-pipelining: {pipeline.calls / max(pipeline.round_trips, 1):.1f} calls per round trip")
        off, on = best["off"], best["ledger"]
        print(f"\nledger/off: settle p50 x{on[0] / off[0]:.2f}, p99 x{on[1] / off[1]:.2f}, calls/s x{on[2] / off[2]:.2f}, "
              f"Redis time per admit + settle x{inside['ledger'] / inside['off']:.2f}")
        print(f"Redis memory per call with the ledger (admit + settle, records and aggregates kept): "
              f"{statistics.median(record_bytes):.0f} bytes")
        await client.aclose()
        await store.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.calls, args.concurrency, args.rounds))
