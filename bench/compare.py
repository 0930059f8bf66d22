"""The gateway with its full pipeline against nginx `proxy_pass` and a direct connection, in one run.

    python bench/compare.py [--quick] [--seconds 5] [--rate 200] [--idle-streams 1000] [--json compare.json]

Starts on loopback, and stops by itself: a real redis-server, one mock OpenAI-format upstream, nginx in front of it
(`proxy_pass`, buffering off, one worker) and one gateway process with everything on: an API key from the
policies, a plan with two rate limits, concurrency, a budget and token prices, the Redis store, the access log (to a
file) and metrics. Every scenario runs against the three targets in turn:

- closed loop: max throughput (wrk, or an aiohttp client when wrk cannot be had), and the CPU each target's
  process spent per request, so "requests/s per core" compares fairly on a shared machine;
- open loop: a fixed rate, each latency measured from the request's intended send time (no coordinated
  omission); added p50/p99 against direct;
- SSE: streams whose upstream stamps each event with its send time; the client's receive time minus that stamp
  is the per-chunk delay, over every event and over the events sent once every stream had its first ("steady":
  the earlier ones leave while the other streams are still starting); plus time to first byte;
- concurrent stream starts: rounds of N streams started at once, time to first byte;
- idle streams: N streams open at once, each holding after its first event; RSS growth per stream;
- Redis: CPU, commands and round trips per gateway request (`INFO cpu`, `INFO commandstats` and `INFO stats`
  `total_reads_processed` deltas over the closed loop; commandstats counts the commands the Lua scripts run too,
  EVALSHA per request is the script calls, socket reads the round trips that carried them).

nginx and wrk come from the machine or from Debian's packages (bench/debian_tools.py); a comparator that cannot
be had is skipped with a message. LiteLLM's proxy is left out (a heavy install of its own). The machine is
usually shared: read the ratios, which compare targets measured in the same run, not the absolutes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import aiohttp
import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from debian_tools import Tool, find_tool  # noqa: E402
from relay import REPO_ROOT, UPSTREAM, free_port  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402

KEY = "sk_bench_pipeline_" + "p" * 32
MODEL = "bench/chat"
PATH = "/v1/chat/completions"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def pipeline_policy(idle_streams: int) -> dict[str, Any]:
    """One API key on a plan with everything metered; limits far above the load (the bench measures the work
    of checking them, not refusals)."""
    return {
        "plans": {"bench": {
            "models": ["bench/*"],
            "rate_limits": [{"per": "user", "requests": 10**9, "window": "1m"},
                            {"per": ["account", "model"], "tokens": 10**9, "window": "1m"}],
            "concurrency": max(1000, 2 * idle_streams),
            "budget": {"credits": 10**9, "period": "month", "scope": "account"},
        }},
        "prices": {MODEL: {"input_per_1k_tokens": 0.5, "output_per_1k_tokens": 1.5}},
        "keys": [{"id": "bench", "account": "bench-account", "plan": "bench",
                  "hash": "sha256:" + hashlib.sha256(KEY.encode()).hexdigest()}],
    }


def pipeline_config(directory: Path, upstream_port: int, redis_url: str, idle_streams: int) -> Path:
    (directory / "policies").mkdir()
    (directory / "policies" / "bench.yaml").write_text(json.dumps(pipeline_policy(idle_streams)))
    path = directory / "config.yaml"
    path.write_text(json.dumps({
        "store": {"kind": "redis", "redis_url": redis_url},
        "server": {"log_level": "warning", "access_log": True, "workers": 1},  # CPU and RSS read from one process
        "providers": {"up": {"base_url": f"http://127.0.0.1:{upstream_port}/v1",
                             "max_connections": max(1000, idle_streams + 100),
                             "max_connections_per_account": max(1000, idle_streams + 100)}},
        "models": [{"id": MODEL, "name": "Bench", "creator": "bench", "capability": "text2text",
                    "provider": "up", "upstream_model": "bench"}],
    }))
    return path


NGINX_CONF = """
daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile {files};
error_log {dir}/error.log warn;
pid {dir}/nginx.pid;
events {{ worker_connections {connections}; }}
http {{
    access_log {dir}/access.log;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream up {{ server 127.0.0.1:{upstream}; keepalive 256; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://up;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 3600s;
        }}
    }}
}}
"""


@dataclass
class Target:
    name: str
    url: str
    pid: int | None  # the process whose CPU and RSS are read (None: not measured)


@dataclass
class Environment:
    targets: list[Target]
    redis: redis.Redis
    skipped: list[str] = field(default_factory=list)
    redis_commands: dict[str, int] = field(default_factory=dict)  # in the gateway's closed loop


@contextlib.contextmanager
def process(args: list[str], **popen: Any) -> Iterator[subprocess.Popen[bytes]]:
    child = subprocess.Popen(args, **popen)
    try:
        yield child
    finally:
        child.terminate()
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait(timeout=10)


@contextlib.contextmanager
def environment(idle_streams: int, use_nginx: bool, launcher: tuple[str, ...] = ()) -> Iterator[Environment]:
    """redis-server, the upstream, nginx (when it can be had) and the gateway; all stopped on exit. `launcher`:
    what runs the gateway's `-m proxy serve ...` instead of the interpreter alone (bench/profile_gateway.py)."""
    up_port, gw_port, ngx_port = free_port(), free_port(), free_port()
    skipped: list[str] = []
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        directory = Path(tmp)
        server = RedisServer()
        server.start()
        stack.callback(server.stop)
        upstream = stack.enter_context(process([sys.executable, "-c", UPSTREAM, str(up_port), "1"]))
        targets = [Target("direct", f"http://127.0.0.1:{up_port}{PATH}", upstream.pid)]
        nginx = find_tool("nginx") if use_nginx else "nginx: off (--no-nginx)"
        if isinstance(nginx, Tool):
            conf = directory / "nginx.conf"
            conf.write_text(NGINX_CONF.format(dir=directory, upstream=up_port, port=ngx_port,
                                              connections=2 * idle_streams + 1024, files=4 * idle_streams + 4096))
            child = stack.enter_context(process([str(nginx.path), "-p", tmp, "-e", f"{tmp}/error.log", "-c", str(conf)],
                                                env={**os.environ, **nginx.env}, stderr=subprocess.DEVNULL))
            targets.append(Target("nginx", f"http://127.0.0.1:{ngx_port}{PATH}", child.pid))
        else:
            skipped.append(nginx)
        config = pipeline_config(directory, up_port, server.url, idle_streams)
        log = stack.enter_context((directory / "gateway.log").open("wb"))
        gateway = stack.enter_context(process(
            [sys.executable, *launcher, "-m", "proxy", "serve", "--config", str(config), "--port", str(gw_port)],
            cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT))
        targets.append(Target("gateway", f"http://127.0.0.1:{gw_port}{PATH}", gateway.pid))
        client = redis.Redis.from_url(server.url)
        stack.callback(client.close)
        yield Environment(targets, client, skipped)


def request_body(stream: bool, **extra: Any) -> bytes:
    return json.dumps({"model": MODEL, "stream": stream, "messages": [{"role": "user", "content": "hi"}],
                       **extra}).encode()


HEADERS = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}


async def wait_ready(session: aiohttp.ClientSession, target: Target) -> None:
    for _ in range(300):
        with contextlib.suppress(aiohttp.ClientConnectionError):
            async with session.post(target.url, data=request_body(False), headers=HEADERS) as r:
                if r.status == 200:
                    await r.read()
                    return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"{target.name} at {target.url} did not answer 200")


# ---- measurements of a process ----------------------------------------------------------------------------

def cpu_times(pid: int) -> tuple[float, float]:
    """The process's CPU seconds in user space and in the kernel on its behalf (utime, stime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def cpu_seconds(pid: int) -> float:
    return sum(cpu_times(pid))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def percentile(values: list[float], q: float) -> float:
    data = sorted(values)
    return data[min(len(data) - 1, int(q * len(data)))] if data else float("nan")


# ---- scenarios ---------------------------------------------------------------------------------------------

@dataclass
class ClosedLoop:
    requests: int
    seconds: float
    errors: int
    cpu_s: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @property
    def rps_per_core(self) -> float:
        return self.requests / self.cpu_s if self.cpu_s else float("nan")


WRK_SCRIPT = 'wrk.method = "POST"\nwrk.body = {body}\nwrk.headers["Content-Type"] = "application/json"\n' \
             'wrk.headers["Authorization"] = "Bearer {key}"\n'


async def closed_loop(target: Target, wrk: Tool | None, seconds: float, connections: int) -> ClosedLoop:
    assert target.pid is not None
    cpu_before = cpu_seconds(target.pid)
    if wrk is not None:
        requests, elapsed, errors = await _wrk(wrk, target.url, seconds, connections)
    else:
        requests, elapsed, errors = await _aiohttp_loop(target.url, seconds, connections)
    return ClosedLoop(requests, elapsed, errors, cpu_seconds(target.pid) - cpu_before)


async def _wrk(wrk: Tool, url: str, seconds: float, connections: int) -> tuple[int, float, int]:
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        script.write(WRK_SCRIPT.format(body=json.dumps(request_body(False).decode()), key=KEY))
        script.flush()
        child = await asyncio.create_subprocess_exec(
            str(wrk.path), "-t1", f"-c{connections}", f"-d{seconds:g}s", "-s", script.name, url,
            env={**os.environ, **wrk.env}, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out = (await child.communicate())[0].decode()
    done = re.search(r"(\d+) requests in ([\d.]+)(m?s)", out)
    if done is None:
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    elapsed = float(done.group(2)) / (1000 if done.group(3) == "ms" else 1)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = (int(bad.group(1)) if bad else 0) + (sum(map(int, socket_errors.groups())) if socket_errors else 0)
    return int(done.group(1)), elapsed, errors


async def _aiohttp_loop(url: str, seconds: float, connections: int) -> tuple[int, float, int]:
    counts = {"ok": 0, "bad": 0}
    body = request_body(False)
    start = time.monotonic()
    deadline = start + seconds

    async def worker(session: aiohttp.ClientSession) -> None:
        while time.monotonic() < deadline:
            async with session.post(url, data=body, headers=HEADERS) as r:
                await r.read()
                counts["ok" if r.status == 200 else "bad"] += 1

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections)) as session:
        await asyncio.gather(*(worker(session) for _ in range(connections)))
    return counts["ok"] + counts["bad"], time.monotonic() - start, counts["bad"]


async def open_loop(target: Target, rate: float, seconds: float) -> list[float]:
    """Latencies (s) of JSON calls sent at `rate`, each from its intended send time, so a stall delays the
    latency of every call scheduled behind it instead of silently sending fewer calls."""
    body = request_body(False)
    latencies: list[float] = []
    failures: list[int] = []

    async def call(session: aiohttp.ClientSession, intended: float) -> None:
        async with session.post(target.url, data=body, headers=HEADERS) as r:
            await r.read()
            if r.status != 200:
                failures.append(r.status)
        latencies.append(time.monotonic() - intended)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        tasks = []
        start = time.monotonic() + 0.05
        for i in range(int(rate * seconds)):
            intended = start + i / rate
            await asyncio.sleep(max(0.0, intended - time.monotonic()))
            tasks.append(asyncio.create_task(call(session, intended)))
        await asyncio.gather(*tasks)
    if failures:
        raise RuntimeError(f"{target.name}: {len(failures)} open-loop calls failed, e.g. {failures[0]}")
    return latencies


STAMP = re.compile(rb'"t":([\d.]+)')


@dataclass
class Hold:
    """Streams kept open after their first event, until `release` is set; at most `opening` being opened at once
    (a SYN flood of 10k would only measure the listen backlog)."""

    release: asyncio.Event = field(default_factory=asyncio.Event)
    opening: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(200))
    open_streams: int = 0


async def stream_once(session: aiohttp.ClientSession, target: Target, chunks: int, delay_ms: float,
                      hold: Hold | None = None) -> tuple[float, list[tuple[float, float]]]:
    """One SSE call: (time to first byte, every event's (upstream send stamp, delay from it)). With `hold`, stop
    reading after the first event and keep the stream open until `hold.release` is set."""
    start = time.monotonic()
    events: list[tuple[float, float]] = []
    ttfb = float("nan")
    async with session.post(target.url, headers=HEADERS,
                            data=request_body(True, bench_chunks=chunks, bench_delay_ms=delay_ms)) as r:
        if r.status != 200:
            raise RuntimeError(f"{target.name}: stream answered {r.status}: {(await r.read())[:200]!r}")
        async for line in r.content:
            now = time.time()
            if ttfb != ttfb:  # the first line (NaN until set)
                ttfb = time.monotonic() - start
            stamp = STAMP.search(line)
            if stamp:
                sent = float(stamp.group(1))
                events.append((sent, now - sent))
                if hold is not None:
                    hold.open_streams += 1
                    hold.opening.release()
                    await hold.release.wait()
                    break
    return ttfb, events


@dataclass
class SseDelays:
    ttfb: list[float]
    chunks: list[float]  # every event's delay
    steady: list[float]  # of the events sent once every stream had its first: the ones before leave while other
    # streams are still being admitted and opened (the stream-start cost, not the per-chunk one)


async def sse_delays(target: Target, streams: int, chunks: int, delay_ms: float) -> SseDelays:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        results = await asyncio.gather(*(stream_once(session, target, chunks, delay_ms) for _ in range(streams)))
    all_started = max(sent + delay for _, events in results for sent, delay in events[:1])
    every = [event for _, events in results for event in events]
    return SseDelays([t for t, _ in results], [d for _, d in every], [d for sent, d in every if sent > all_started])


async def stream_starts(target: Target, at_once: int, rounds: int) -> list[float]:
    """Time to first byte of `at_once` streams started together (new connections), over `rounds` rounds."""
    ttfbs: list[float] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True)) as session:
        for _ in range(rounds):
            results = await asyncio.gather(*(stream_once(session, target, 3, 0) for _ in range(at_once)))
            ttfbs.extend(t for t, _ in results)
            await asyncio.sleep(0.1)
    return ttfbs


async def idle_stream_rss(target: Target, count: int) -> float:
    """KiB of RSS the target's process grows by per open stream, with `count` streams open and idle."""
    assert target.pid is not None
    hold = Hold()

    async def one(session: aiohttp.ClientSession) -> None:
        await hold.opening.acquire()
        await stream_once(session, target, 2, 600_000, hold)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        before = rss_kib(target.pid)
        tasks = [asyncio.create_task(one(session)) for _ in range(count)]
        try:
            await _all_open(target, hold, tasks, count)
            after = rss_kib(target.pid)
        finally:
            hold.release.set()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return (after - before) / count


async def _all_open(target: Target, hold: Hold, tasks: list[asyncio.Task[None]], count: int) -> None:
    deadline = time.monotonic() + 30 + count / 100
    while hold.open_streams < count and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        failed = [t for t in tasks if t.done() and t.exception() is not None]
        if failed:
            raise RuntimeError(f"{target.name}: an idle stream failed: {failed[0].exception()!r}")
    if hold.open_streams < count:
        raise RuntimeError(f"{target.name}: only {hold.open_streams} of {count} idle streams opened in time")
    await asyncio.sleep(0.5)  # let the process finish allocating for the last ones


def redis_snapshot(client: redis.Redis) -> tuple[float, int, dict[str, int]]:
    """Redis's CPU seconds, its socket reads (the round trips) and its command counts."""
    cpu = client.info("cpu")
    stats = client.info("commandstats")
    reads = int(client.info("stats")["total_reads_processed"])
    return (float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]), reads,
            {name.removeprefix("cmdstat_"): int(values["calls"]) for name, values in stats.items()
             if name != "cmdstat_info"})  # our own INFO calls are not the gateway's


# ---- the run ------------------------------------------------------------------------------------------------

@dataclass
class Row:
    scenario: str
    metric: str
    values: dict[str, float]  # target name -> value; "added" rows have no direct

    def ratio(self, numerator: str, denominator: str) -> float | None:
        a, b = self.values.get(numerator), self.values.get(denominator)
        return a / b if a is not None and b is not None and b > 0 else None  # an added delay <= 0 has no ratio


def ms(seconds: float) -> float:
    return seconds * 1000


def latency_rows(scenario: str, label: str, samples: dict[str, list[float]]) -> list[Row]:
    """p50/p99 per target, then what each proxy adds to direct's."""
    rows = [Row(scenario, f"{label} p{q}", {n: ms(percentile(v, q / 100)) for n, v in samples.items()}) for q in (50, 99)]
    for row in list(rows):
        direct = row.values.get("direct")
        if direct is not None:
            rows.append(Row(scenario, f"added {row.metric}", {n: v - direct for n, v in row.values.items() if n != "direct"}))
    return rows


async def settle() -> None:
    """Let the gateway finish what the last scenario left (settles, streams being read to their end)."""
    await asyncio.sleep(1.0)


async def run(args: argparse.Namespace, env: Environment) -> list[Row]:
    wrk_tool = find_tool("wrk") if not args.no_wrk else "wrk: off (--no-wrk)"
    wrk = wrk_tool if isinstance(wrk_tool, Tool) else None
    if wrk is None:
        env.skipped.append(f"{wrk_tool}; closed loop driven by an aiohttp client instead")
    async with aiohttp.ClientSession() as session:
        for target in env.targets:
            await wait_ready(session, target)
    for target in env.targets:  # warm up every target (connection pools, caches, scripts loaded)
        await closed_loop(target, wrk, 1.0, args.connections)
    await settle()

    rows: list[Row] = []
    closed: dict[str, ClosedLoop] = {}
    redis_cpu, redis_reads, redis_calls = 0.0, 0, {}
    for target in env.targets:
        cpu0, reads0, calls0 = redis_snapshot(env.redis)
        closed[target.name] = await closed_loop(target, wrk, args.seconds, args.connections)
        if target.name == "gateway":
            cpu1, reads1, calls1 = redis_snapshot(env.redis)
            redis_cpu, redis_reads, redis_calls = cpu1 - cpu0, reads1 - reads0, {k: v - calls0.get(k, 0) for k, v in calls1.items() if v - calls0.get(k, 0)}
            env.redis_commands = redis_calls
        await settle()
    scenario = f"closed loop, {args.connections} connections"
    rows += [
        Row(scenario, "requests/s", {n: c.rps for n, c in closed.items()}),
        Row(scenario, "CPU ms per request", {n: ms(c.cpu_s / c.requests) for n, c in closed.items()}),
        Row(scenario, "requests/s per core", {n: c.rps_per_core for n, c in closed.items()}),
        Row(scenario, "errors", {n: float(c.errors) for n, c in closed.items()}),
    ]
    gateway_requests = closed["gateway"].requests
    rows += [
        Row("redis (gateway closed loop)", "CPU us per request", {"gateway": redis_cpu / gateway_requests * 1e6}),
        Row("redis (gateway closed loop)", "EVALSHA per request", {"gateway": redis_calls.get("evalsha", 0) / gateway_requests}),
        Row("redis (gateway closed loop)", "commands per request", {"gateway": sum(redis_calls.values()) / gateway_requests}),
        Row("redis (gateway closed loop)", "round trips (socket reads) per request", {"gateway": redis_reads / gateway_requests}),
        Row("redis (gateway closed loop)", "requests/s per Redis core",
            {"gateway": gateway_requests / redis_cpu if redis_cpu else float("nan")}),
    ]

    open_samples = {}
    for target in env.targets:
        open_samples[target.name] = await open_loop(target, args.rate, args.rate_seconds)
        await settle()
    rows += latency_rows(f"open loop, {args.rate:g} req/s", "latency ms", open_samples)

    sse = {}
    for target in env.targets:
        sse[target.name] = await sse_delays(target, args.sse_streams, args.sse_chunks, args.sse_delay_ms)
        await settle()
    scenario = f"SSE, {args.sse_streams} streams x {args.sse_chunks} chunks every {args.sse_delay_ms:g} ms"
    rows += latency_rows(scenario, "chunk delay ms", {n: d.chunks for n, d in sse.items()})
    rows += latency_rows(scenario, "steady chunk delay ms", {n: d.steady for n, d in sse.items()})
    rows += latency_rows(scenario, "TTFB ms", {n: d.ttfb for n, d in sse.items()})

    starts = {}
    for target in env.targets:
        starts[target.name] = await stream_starts(target, args.stream_starts, args.start_rounds)
        await settle()
    rows += latency_rows(f"{args.stream_starts} concurrent stream starts x {args.start_rounds}", "TTFB ms", starts)

    if args.idle_streams:
        idle = {}
        for target in env.targets[1:]:  # the upstream itself is not a proxy
            idle[target.name] = await idle_stream_rss(target, args.idle_streams)
            await asyncio.sleep(2.0)  # the held upstream calls end
        rows.append(Row(f"{args.idle_streams} open idle streams", "RSS KiB per stream", idle))
    return rows


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value != value:
        return "n/a"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"


def print_table(rows: list[Row], names: list[str]) -> None:
    header = f"{'scenario':<46} {'metric':<26}" + "".join(f"{n:>10}" for n in names) + f"{'gw/nginx':>10}{'gw/direct':>10}"
    print(header)
    print("-" * len(header))
    for row in rows:
        cells = "".join(f"{fmt(row.values.get(n)):>10}" for n in names)
        print(f"{row.scenario:<46} {row.metric:<26}{cells}{fmt(row.ratio('gateway', 'nginx')):>10}"
              f"{fmt(row.ratio('gateway', 'direct')):>10}")


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    versions = {}
    for package in ("aiohttp", "redis", "hiredis", "uvloop", "orjson", "pyjwt"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpu": cpu, "cores": os.cpu_count(),
            "load_before": os.getloadavg(), "python": platform.python_version(), "packages": versions}


def raise_file_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, needed)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    if want < needed:
        raise SystemExit(f"{needed} open files needed for the idle streams, the limit is {want}: lower --idle-streams")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a short smoke run (about 40 s)")
    parser.add_argument("--seconds", type=float, default=5.0, help="closed loop: seconds per target")
    parser.add_argument("--connections", type=int, default=32, help="closed loop: connections")
    parser.add_argument("--rate", type=float, default=200.0, help="open loop: requests per second")
    parser.add_argument("--rate-seconds", type=float, default=10.0, help="open loop: seconds per target")
    parser.add_argument("--sse-streams", type=int, default=20)
    parser.add_argument("--sse-chunks", type=int, default=100)
    parser.add_argument("--sse-delay-ms", type=float, default=20.0)
    parser.add_argument("--stream-starts", type=int, default=20, help="streams started at once")
    parser.add_argument("--start-rounds", type=int, default=10)
    parser.add_argument("--idle-streams", type=int, default=1000, help="open idle streams (10000 for the issue's target; 0: skip)")
    parser.add_argument("--no-nginx", action="store_true")
    parser.add_argument("--no-wrk", action="store_true", help="drive the closed loop with the aiohttp client")
    parser.add_argument("--json", default="compare.json", help="where to write the results")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.rate_seconds, args.sse_chunks, args.start_rounds = 2.0, 3.0, 30, 3
        args.idle_streams = min(args.idle_streams, 200)
    return args


async def main() -> None:
    args = parse_args()
    raise_file_limit(4 * args.idle_streams + 4096)
    info = machine()
    started = time.monotonic()
    with environment(args.idle_streams, not args.no_nginx) as env:
        rows = await run(args, env)
        names = [t.name for t in env.targets]
    info["load_after"] = os.getloadavg()
    for message in env.skipped:
        print(f"skipped: {message}")
    print(f"\n{info['date']}  {info['cpu']} x {info['cores']}  load {info['load_before'][0]:.2f} -> "
          f"{info['load_after'][0]:.2f}  ({time.monotonic() - started:.0f} s)\n")
    print_table(rows, names)
    Path(args.json).write_text(json.dumps({
        "machine": info, "arguments": vars(args), "skipped": env.skipped,
        "redis_commands_in_gateway_closed_loop": env.redis_commands,
        "rows": [{"scenario": r.scenario, "metric": r.metric, **r.values, "gateway/nginx": r.ratio("gateway", "nginx"),
                  "gateway/direct": r.ratio("gateway", "direct")} for r in rows],
    }, indent=2))
    print(f"\nwritten: {args.json}")


if __name__ == "__main__":
    asyncio.run(main())
