"""Relay overhead: the same load sent directly to an upstream and through the gateway, in one run.

    python bench/relay.py [--seconds 5] [--concurrency 20] [--stream-chunks 50]

Starts a demo-format upstream and a gateway (memory store) as separate processes on loopback, drives each
target for a fixed time, and prints a table with the gateway/direct ratios. The machine is shared and noisy:
read the ratios, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import aiohttp

REPO_ROOT = Path(__file__).resolve().parents[1]  # `python -m proxy` must run from the checkout

KEY = "sk_bench_" + "b" * 40
# argv: port, chunks per stream, [answer every N-th call 503 (0: never)], [ms between stream chunks].
# A request may override the chunks and the delay with `bench_chunks` and `bench_delay_ms` (the gateway
# forwards unknown body fields); with `bench_delay_ms`, every chunk carries its send time `t` (time.time()),
# so a client on the same machine can tell how long each event took to reach it.
UPSTREAM = r'''
import asyncio, itertools, json, sys, time
from aiohttp import web
CHUNKS = int(sys.argv[2])
FAIL_EVERY = int(sys.argv[3]) if len(sys.argv) > 3 else 0
CHUNK_DELAY_S = float(sys.argv[4]) / 1000 if len(sys.argv) > 4 else 0.0
calls = itertools.count(1)
async def chat(request):
    body = await request.json()
    if FAIL_EVERY and next(calls) % FAIL_EVERY == 0:
        return web.json_response({"error": {"message": "overloaded"}}, status=503)
    if not body.get("stream"):
        return web.json_response({"id": "x", "object": "chat.completion", "choices": [{"index": 0,
            "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}})
    chunks = int(body.get("bench_chunks", CHUNKS))
    delay_s = float(body["bench_delay_ms"]) / 1000 if "bench_delay_ms" in body else CHUNK_DELAY_S
    stamped = "bench_delay_ms" in body
    r = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await r.prepare(request)
    for i in range(chunks):
        stamp = b',"t":%.6f' % time.time() if stamped else b""
        await r.write(b'data: {"id":"x","object":"chat.completion.chunk"%s,"choices":[{"index":0,"delta":{"content":"tok "},"finish_reason":null}]}\n\n' % stamp)
        if delay_s:
            await asyncio.sleep(delay_s)
    await r.write(b'data: {"id":"x","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":%d,"total_tokens":%d}}\n\n' % (chunks, chunks + 5))
    await r.write(b"data: [DONE]\n\n")
    return r
app = web.Application()
app.router.add_post("/v1/chat/completions", chat)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
'''


@dataclass
class Result:
    requests: int
    latencies: list[float]
    ttfb: list[float]

    def rps(self, seconds: float) -> float:
        return self.requests / seconds

    def p(self, q: float, values: list[float] | None = None) -> float:
        data = sorted(values if values is not None else self.latencies)
        return data[min(len(data) - 1, int(q * len(data)))] * 1000 if data else float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_ready(url: str) -> None:
    async with aiohttp.ClientSession() as http:
        for _ in range(200):
            try:
                async with http.post(url, json={"model": "bench/chat", "messages": []},
                                     headers={"Authorization": f"Bearer {KEY}"}) as r:
                    if r.status < 500:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.05)
    raise RuntimeError(f"{url} did not come up")


async def drive(url: str, stream: bool, seconds: float, concurrency: int) -> Result:
    body = json.dumps({"model": "bench/chat", "stream": stream, "messages": [{"role": "user", "content": "hi"}]})
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    latencies: list[float] = []
    ttfb: list[float] = []
    deadline = time.monotonic() + seconds
    connector = aiohttp.TCPConnector(limit=concurrency)

    async def worker(http: aiohttp.ClientSession) -> None:
        while time.monotonic() < deadline:
            start = time.monotonic()
            async with http.post(url, data=body, headers=headers) as r:
                first = await r.content.readany()
                ttfb.append(time.monotonic() - start)
                rest = await r.read()
                if r.status != 200 or not (first + rest).rstrip().endswith((b"[DONE]", b"}")):
                    raise RuntimeError(f"bad answer {r.status}: {(first + rest)[:200]!r}")
            latencies.append(time.monotonic() - start)

    async with aiohttp.ClientSession(connector=connector) as http:
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
    return Result(len(latencies), latencies, ttfb)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# Limits far above what the bench sends: the bench measures the relay, not the limiter's refusals.
BENCH_POLICY: dict = {
    "plans": {"demo": {"models": ["bench/*"], "rate_limits": [{"per": "user", "requests": 10**9, "window": "1m"}],
                       "budget": {"credits": 10**9, "period": "month", "scope": "account"}}},
    "prices": {"bench/chat": {"per_request": 1}},
}


def gateway_config(upstream_port: int, directory: str, policy: dict = BENCH_POLICY, store: dict | None = None) -> str:
    """Write a config (one model `bench/chat` on the upstream, `store` or the memory store) and `policy` into
    `directory`; return the config path."""
    path = Path(directory) / "config.yaml"
    Path(directory, "policies").mkdir()
    Path(directory, "policies", "bench.yaml").write_text(json.dumps(policy))
    path.write_text(json.dumps({
        "store": store or {"kind": "memory"},
        "server": {"sse_keepalive_s": 0, "log_level": "warning", "workers": 1},  # `--workers` overrides it
        "demo": {"enabled": True, "plan": "demo"},
        "providers": {"up": {"base_url": f"http://127.0.0.1:{upstream_port}/v1", "max_connections": 1000}},
        "models": [{"id": "bench/chat", "name": "Bench", "creator": "bench", "capability": "text2text",
                    "provider": "up", "upstream_model": "bench"}],
    }))
    return str(path)


@dataclass
class Processes:
    """Where the started upstream and gateway listen, and the gateway's pid (for RSS readings)."""
    upstream_port: int
    gateway_port: int
    gateway_pid: int


@contextlib.contextmanager
def upstream_and_gateway(
    stream_chunks: int, policy: dict = BENCH_POLICY, fail_every: int = 0, chunk_delay_ms: float = 0.0,
) -> Iterator[Processes]:
    """Run the demo-format upstream and a gateway (memory store, demo key KEY) as processes on loopback;
    both are stopped on exit, whatever happened."""
    up_port, gw_port = free_port(), free_port()
    env = {**os.environ, "EDGE_PROXY_DEMO_KEY": KEY}
    with tempfile.TemporaryDirectory() as tmp:
        upstream = subprocess.Popen(
            [sys.executable, "-c", UPSTREAM, str(up_port), str(stream_chunks), str(fail_every), str(chunk_delay_ms)])
        try:
            gateway = subprocess.Popen(
                [sys.executable, "-m", "proxy", "serve", "--config", gateway_config(up_port, tmp, policy),
                 "--port", str(gw_port)],
                env=env, cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
            )
            try:
                yield Processes(up_port, gw_port, gateway.pid)
            finally:
                gateway.terminate()
                gateway.wait(timeout=30)
        finally:
            upstream.terminate()
            upstream.wait(timeout=30)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--stream-chunks", type=int, default=50)
    args = parser.parse_args()

    with upstream_and_gateway(args.stream_chunks) as running:
        direct = f"http://127.0.0.1:{running.upstream_port}/v1/chat/completions"
        proxied = f"http://127.0.0.1:{running.gateway_port}/v1/chat/completions"
        await wait_ready(direct)
        await wait_ready(proxied)
        rss_idle = rss_mib(running.gateway_pid)
        rows = []
        for stream in (False, True):
            d = await drive(direct, stream, args.seconds, args.concurrency)
            g = await drive(proxied, stream, args.seconds, args.concurrency)
            rows.append(("stream" if stream else "json", d, g))
        rss_loaded = rss_mib(running.gateway_pid)

    print(f"\nconcurrency {args.concurrency}, {args.seconds:g}s per cell, {args.stream_chunks} chunks per stream\n")
    print(f"{'kind':<7} {'metric':<14} {'direct':>10} {'gateway':>10} {'ratio':>7}")
    for kind, d, g in rows:
        for name, dv, gv in (
            ("req/s", d.rps(args.seconds), g.rps(args.seconds)),
            ("p50 ms", d.p(0.5), g.p(0.5)),
            ("p99 ms", d.p(0.99), g.p(0.99)),
            ("ttfb p50 ms", d.p(0.5, d.ttfb), g.p(0.5, g.ttfb)),
        ):
            print(f"{kind:<7} {name:<14} {dv:>10.1f} {gv:>10.1f} {gv / dv:>7.2f}")
    print(f"\ngateway RSS: {rss_idle:.0f} MiB idle, {rss_loaded:.0f} MiB after load")
    print(f"median overhead per JSON call: {statistics.median(rows[0][2].latencies) * 1000 - statistics.median(rows[0][1].latencies) * 1000:.2f} ms")


if __name__ == "__main__":
    asyncio.run(main())
