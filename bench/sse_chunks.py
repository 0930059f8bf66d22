"""What one SSE chunk costs each target's process, and its delay: long streams, rounds interleaved.

    python bench/sse_chunks.py [--rounds 6] [--streams 20] [--chunks 200] [--no-nginx]

The same targets as bench/compare.py (a real redis-server, the mock upstream directly, nginx in front of it, one
gateway with the full pipeline), driven by its SSE client: `--streams` streams at once, a chunk every 20 ms each,
the upstream stamping each event with its send time. Per round and target: the CPU the target's main thread spent
per chunk (`/proc/PID/schedstat`, nanoseconds; stream set-up included, amortised over `--chunks`) and the p50/p99
delay of the chunks sent once every stream had its first. Prints the median and the range over the rounds; the
machine is usually shared, so compare targets within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from a checkout without installing

from compare import Target, environment, ms, percentile, sse_delays, wait_ready  # noqa: E402


def main_thread_cpu_s(pid: int) -> float:
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9


async def one_round(target: Target, args: argparse.Namespace) -> tuple[float, float, float]:
    """(CPU µs per chunk, steady p50 ms, steady p99 ms) of one round of streams."""
    assert target.pid is not None
    cpu_before = main_thread_cpu_s(target.pid)
    delays = await sse_delays(target, args.streams, args.chunks, 20.0)
    cpu = main_thread_cpu_s(target.pid) - cpu_before
    return cpu / len(delays.chunks) * 1e6, ms(percentile(delays.steady, 0.5)), ms(percentile(delays.steady, 0.99))


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):7.2f} ({min(values):.2f}-{max(values):.2f})"


async def run(args: argparse.Namespace) -> None:
    with environment(0, not args.no_nginx) as env:
        async with aiohttp.ClientSession() as session:
            for target in env.targets:
                await wait_ready(session, target)
        for target in env.targets:  # warm-up: connection pools, scripts loaded
            await sse_delays(target, args.streams, 5, 20.0)
        rounds: dict[str, list[tuple[float, float, float]]] = {t.name: [] for t in env.targets}
        for i in range(args.rounds):
            for target in env.targets if i % 2 == 0 else env.targets[::-1]:  # A B C, C B A, ...
                rounds[target.name].append(await one_round(target, args))
                await asyncio.sleep(0.5)
    print(f"load average {os.getloadavg()[0]:.2f}; {args.rounds} rounds of {args.streams} streams x {args.chunks} chunks\n")
    print(f"{'target':<10}{'CPU us per chunk':>26}{'steady p50 ms':>26}{'steady p99 ms':>26}")
    for name, values in rounds.items():
        print(f"{name:<10}" + "".join(f"{summary([v[k] for v in values]):>26}" for k in range(3)))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--streams", type=int, default=20)
    parser.add_argument("--chunks", type=int, default=200)
    parser.add_argument("--no-nginx", action="store_true")
    return parser.parse_args()


if __name__ == "__main__":
    asyncio.run(run(parse_args()))
