"""Where the gateway's CPU goes per metered JSON call, by component, under a closed loop.

    python bench/profile_gateway.py [--seconds 10] [--out profile] [--connections 32] [--py-spy [--native]]

Starts the same set-up as bench/compare.py (a real redis-server, the mock OpenAI upstream, one gateway process
with the full pipeline; no nginx), drives the gateway with wrk (or an aiohttp client) after a warm-up, and prints
its CPU per request and a table: the share of CPU samples by component and what that is in µs per request.
A sample belongs to the first component in COMPONENTS matched by its innermost frames (so redis-py called from
the meter counts as redis-py); "inclusive" counts every stack a component appears in. `<out>.txt` keeps the
collapsed stacks (`frame;frame;... count`, outermost first) for grep or flamegraph.pl.

The samples come from bench/cpu_sampler.py, which runs the gateway under a CPU-time timer (ITIMER_PROF):
only CPU is sampled. `--py-spy` records with `py-spy record` instead (`--native` for C frames; it pauses the
process per sample, so keep `--rate` low): on this machine py-spy's idle detection counts a thread waiting in
epoll, or preempted after a `send()`, as active, so its shares are wall time, not CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
from collections import Counter
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare import closed_loop, cpu_times, environment, wait_ready  # noqa: E402
from debian_tools import Tool, find_tool  # noqa: E402

SAMPLER = str(Path(__file__).resolve().parent / "cpu_sampler.py")

# (component, substrings of a frame "function (file:line)"), the first match wins, innermost frame first.
COMPONENTS: list[tuple[str, tuple[str, ...]]] = [
    ("metrics (prometheus-client)", ("prometheus_client/", "proxy/metrics.py")),
    ("access log", ("proxy/accesslog.py",)),
    ("tracing", ("opentelemetry/", "proxy/tracing.py", "proxy/otel_tracing.py")),
    ("redis-py (client, pool, parser)", ("redis/",)),
    ("store calls (gate, deadline, retries)", ("proxy/store/",)),
    ("meter (keys, arguments)", ("proxy/meter.py", "proxy/pending_settles.py")),
    ("authentication", ("proxy/auth/",)),
    ("policy decision", ("proxy/policy/",)),
    ("JSON encode/decode", ("json/", "orjson")),
    ("aiohttp client (upstream request/response)", ("aiohttp/client", "aiohttp/connector", "yarl/")),
    ("relay, routing, providers", ("proxy/upstream/",)),
    ("gateway routes and pipeline", ("proxy/",)),
    ("aiohttp server (parse, dispatch, write)", ("aiohttp/", "multidict/")),
]
# Standard-library frames (asyncio's timeouts and locks, contextlib, dataclasses...) count for their caller;
# a stack of only those and of the frames that run the loop is the event loop's own work (uvloop's I/O
# callbacks, task steps).
STDLIB = sysconfig.get_paths()["stdlib"] + "/"
RUNS_THE_LOOP = ("proxy/__main__.py", "proxy/server.py", "proxy/event_loop.py", "cpu_sampler.py")
LOOP = "event loop (uvloop callbacks, task steps)"


def component(frames: list[str]) -> str:
    for frame in reversed(frames):
        if (STDLIB in frame and "/json/" not in frame) or any(r in frame for r in RUNS_THE_LOOP):
            continue
        for name, needles in COMPONENTS:
            if any(n in frame for n in needles):
                return name
    return LOOP


def read_collapsed(path: Path) -> tuple[Counter[str], list[tuple[int, int, float]]]:
    """The stacks, and the sampler's garbage collection lines: (generation, collections, CPU seconds)."""
    stacks: Counter[str] = Counter()
    collections = []
    for line in path.read_text().splitlines():
        if line.startswith("#gc "):
            generation, runs, seconds = line.split()[1:]
            collections.append((int(generation), int(runs), float(seconds)))
            continue
        stack, _, count = line.rpartition(" ")
        stacks[stack] += int(count)
    return stacks, collections


def print_breakdown(stacks: Counter[str], us_per_request: float) -> None:
    owned: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for stack, count in stacks.items():
        frames = stack.split(";")
        owned[component(frames)] += count
        for name, needles in COMPONENTS:
            if any(n in f for f in frames for n in needles):
                inclusive[name] += count
    total = sum(owned.values())
    print("| component | share of CPU | µs per request | inclusive share |\n|---|---:|---:|---:|")
    for name, count in owned.most_common():
        print(f"| {name} | {count / total:.1%} | {count / total * us_per_request:.0f} | {inclusive[name] / total:.1%} |")


def py_spy_command(args: argparse.Namespace, pid: int, out: Path) -> list[str]:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return [py_spy, "record", *(["--native"] if args.native else ["--nonblocking"]), "--rate", str(args.rate),
            "--format", "raw", "--duration", str(int(args.seconds)), "--pid", str(pid), "--output", str(out)]


async def profile(args: argparse.Namespace) -> None:
    wrk_tool = find_tool("wrk")
    wrk = wrk_tool if isinstance(wrk_tool, Tool) else None
    out = Path(f"{args.out}.txt").resolve()
    launcher = () if args.py_spy else (SAMPLER, str(out))
    with environment(idle_streams=0, use_nginx=False, launcher=launcher) as env:
        gateway = next(t for t in env.targets if t.name == "gateway")
        assert gateway.pid is not None
        async with aiohttp.ClientSession() as session:
            await wait_ready(session, gateway)
        await closed_loop(gateway, wrk, 2.0, args.connections)  # warm-up: pools and caches filled
        recorder = None
        if not args.py_spy:
            os.kill(gateway.pid, signal.SIGUSR2)  # the sampler starts
        else:
            recorder = subprocess.Popen(py_spy_command(args, gateway.pid, out), stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT)
            await asyncio.sleep(0.5)
        system_before = cpu_times(gateway.pid)[1]
        result = await closed_loop(gateway, wrk, args.seconds, args.connections)
        system_s = cpu_times(gateway.pid)[1] - system_before
        if not args.py_spy:
            os.kill(gateway.pid, signal.SIGUSR2)  # the sampler stops and writes
            await asyncio.sleep(1.0)
        if recorder is not None:
            said, _ = recorder.communicate(timeout=args.seconds + 30)
            if recorder.returncode:
                raise SystemExit(f"py-spy failed: {said.decode(errors='replace')}")
    stacks, collections = read_collapsed(out)
    us_per_request = result.cpu_s / result.requests * 1e6
    print(f"{result.requests} requests, {result.rps:,.0f}/s, gateway CPU {us_per_request:.0f} µs per request; "
          f"{sum(stacks.values())} samples in {out}")
    print(f"in the kernel (system CPU, spread over the rows below): {system_s / result.requests * 1e6:.0f} µs per request")
    print_breakdown(stacks, us_per_request)
    if collections:
        gc_us = sum(seconds for _, _, seconds in collections) / result.requests * 1e6
        runs = ", ".join(f"gen {g}: {n / result.requests:.2f}" for g, n, _ in collections)
        print(f"\nof which garbage collection (spread over the rows above): {gc_us:.0f} µs per request "
              f"(collections per request: {runs})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--out", default="profile", help="output prefix: <out>.txt (collapsed stacks)")
    parser.add_argument("--py-spy", action="store_true", help="sample with py-spy (wall time here), not CPU time")
    parser.add_argument("--native", action="store_true", help="with --py-spy: C frames too")
    parser.add_argument("--rate", type=int, default=200, help="with --py-spy: samples per second")
    asyncio.run(profile(parser.parse_args()))


if __name__ == "__main__":
    main()
