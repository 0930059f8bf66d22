"""Relay overhead: the same load sent directly to an upstream and through the gateway, in one run.

    python bench/relay.py [--seconds 5] [--concurrency 20] [--stream-chunks 50]

Starts a demo-format upstream and a gateway (memory store) as separate processes on loopback, drives each
target for a fixed time, and prints a table with the gateway/direct ratios. The machine is shared and noisy:
read the ratios, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import asyncio
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

import aiohttp

KEY = "sk_bench_" + "b" * 40
UPSTREAM = r'''
import asyncio, json, sys
from aiohttp import web
CHUNKS = int(sys.argv[2])
async def chat(request):
    body = await request.json()
    if not body.get("stream"):
        return web.json_response({"id": "x", "object": "chat.completion", "choices": [{"index": 0,
            "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}})
    r = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await r.prepare(request)
    for i in range(CHUNKS):
        await r.write(b'data: {"id":"x","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"tok "},"finish_reason":null}]}\n\n')
    await r.write(b'data: {"id":"x","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":%d,"total_tokens":%d}}\n\n' % (CHUNKS, CHUNKS + 5))
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


def gateway_config(upstream_port: int, directory: str) -> str:
    path = Path(directory) / "config.yaml"
    Path(directory, "policies").mkdir()
    # Limits far above what the bench sends: the bench measures the relay, not the limiter's refusals.
    Path(directory, "policies", "bench.yaml").write_text(json.dumps({
        "plans": {"demo": {"models": ["bench/*"], "rate_limits": [{"per": "user", "requests": 10**9, "window": "1m"}],
                           "budget": {"credits": 10**12, "period": "month", "scope": "account"}}},
        "prices": {"bench/chat": {"per_request": 1}},
    }))
    path.write_text(json.dumps({
        "server": {"sse_keepalive_s": 0, "log_level": "warning"},
        "demo": {"enabled": True, "plan": "demo"},
        "providers": {"up": {"base_url": f"http://127.0.0.1:{upstream_port}/v1", "max_connections": 1000}},
        "models": [{"id": "bench/chat", "name": "Bench", "creator": "bench", "capability": "text2text",
                    "provider": "up", "upstream_model": "bench"}],
    }))
    return str(path)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--stream-chunks", type=int, default=50)
    args = parser.parse_args()

    up_port, gw_port = free_port(), free_port()
    env = {**os.environ, "EDGE_PROXY_DEMO_KEY": KEY}
    with tempfile.TemporaryDirectory() as tmp:
        upstream = subprocess.Popen([sys.executable, "-c", UPSTREAM, str(up_port), str(args.stream_chunks)])
        gateway = subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", "--config", gateway_config(up_port, tmp), "--port", str(gw_port)],
            env=env, stdout=subprocess.DEVNULL,
        )
        try:
            direct = f"http://127.0.0.1:{up_port}/v1/chat/completions"
            proxied = f"http://127.0.0.1:{gw_port}/v1/chat/completions"
            await wait_ready(direct)
            await wait_ready(proxied)
            rss_idle = rss_mib(gateway.pid)
            rows = []
            for stream in (False, True):
                d = await drive(direct, stream, args.seconds, args.concurrency)
                g = await drive(proxied, stream, args.seconds, args.concurrency)
                rows.append(("stream" if stream else "json", d, g))
            rss_loaded = rss_mib(gateway.pid)
        finally:
            for process in (gateway, upstream):
                process.terminate()
                process.wait(timeout=30)

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
