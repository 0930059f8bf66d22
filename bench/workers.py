"""Throughput against the number of workers: `edge-proxy serve --workers N` on a real redis-server.

    python bench/workers.py [--workers 1 2] [--seconds 5] [--concurrency 32] [--json out.json]

For each N, starts a gateway with N workers (Redis store, the demo key on a roomy plan) in front of the
demo-format upstream of bench/relay.py, drives closed-loop JSON chat calls over `--concurrency` connections for
`--seconds`, and prints requests/s, the ratio to one worker and to the upstream called directly in the same run.
The load generator runs on the same machine: on a small one it takes part of a core, so read the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.relay import KEY, REPO_ROOT, UPSTREAM, drive, free_port, gateway_config, wait_ready  # noqa: E402
from proxy.workers import available_cores  # noqa: E402


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no"], stdout=subprocess.DEVNULL)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(timeout=10)


@contextlib.contextmanager
def gateway(upstream_port: int, redis_url: str, workers: int) -> Iterator[str]:
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        config = gateway_config(upstream_port, tmp, store={"kind": "redis", "redis_url": redis_url})
        process = subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", "--config", config, "--port", str(port), "--workers", str(workers)],
            env={**os.environ, "EDGE_PROXY_DEMO_KEY": KEY}, cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
        )
        try:
            yield f"http://127.0.0.1:{port}/v1/chat/completions"
        finally:
            process.terminate()
            process.wait(timeout=60)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=sorted({1, available_cores()}))
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        sys.exit("bench/workers.py needs redis-server on PATH")

    upstream_port = free_port()
    upstream = subprocess.Popen([sys.executable, "-c", UPSTREAM, str(upstream_port), "1"])
    results: dict[str, float] = {}
    try:
        direct_url = f"http://127.0.0.1:{upstream_port}/v1/chat/completions"
        await wait_ready(direct_url)
        results["direct"] = (await drive(direct_url, False, args.seconds, args.concurrency)).rps(args.seconds)
        for workers in args.workers:
            with redis_server() as redis_url, gateway(upstream_port, redis_url, workers) as url:
                await wait_ready(url)
                await drive(url, False, 1.0, args.concurrency)  # warm up: connections, scripts loaded
                results[f"workers={workers}"] = (await drive(url, False, args.seconds, args.concurrency)).rps(args.seconds)
    finally:
        upstream.terminate()
        upstream.wait(timeout=30)

    one = results.get("workers=1") or results[f"workers={args.workers[0]}"]
    print(f"\n{os.cpu_count()} CPUs ({available_cores()} usable), concurrency {args.concurrency}, "
          f"{args.seconds:g}s per cell, JSON chat calls, Redis store\n")
    print(f"{'target':<12} {'req/s':>9} {'vs 1 worker':>12} {'vs direct':>10}")
    for name, rps in results.items():
        print(f"{name:<12} {rps:>9.0f} {rps / one:>12.2f} {rps / results['direct']:>10.2f}")
    if args.json:
        args.json.write_text(json.dumps({"concurrency": args.concurrency, "seconds": args.seconds,
                                         "requests_per_s": results}, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
