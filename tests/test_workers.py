"""`edge-proxy serve --workers N`: the real supervisor and worker processes on a real redis-server.

Both workers answer, a token minted by one verifies on the other, a budget stays exact across them, the
metrics port shows the sum of all workers, a killed worker is replaced, SIGTERM drains an open stream and
exits 0, and workers never outlive their supervisor. The worker count's rules are tested without processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest
import redis.asyncio as aioredis
import yaml
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from proxy.accesslog import BatchingWriter
from proxy.auth.api_keys import hash_key
from proxy.config import ConfigError, parse_config
from proxy.server import DRAIN_MARGIN_S
from proxy.workers import available_cores, worker_count
from tests.gateway_harness import PROVIDER_KEY, REPO, TEST_KEY, gateway_config, gateway_process, write_policy
from tests.mock_provider import MockProvider, chat_chunk, open_sse, sse, usage_chunk
from tests.redis_server import RedisServer

BUDGET = 30  # credits; mock/embed costs exactly 1 and reserves exactly that
REQUESTS = 40
GRACE_S = 6.0
STREAM_CHUNKS = 6
EMBED = {"model": "mock/embed", "input": "hi"}
STREAMER_KEY = "sk_test_" + "s" * 40  # on a plan without a budget: streams after the budget ran out
POLICY = f"""
plans:
  demo:
    models: ["mock/*"]
    budget: {{credits: {BUDGET}, period: month, scope: account}}
  roomy:
    models: ["mock/*"]
keys:
  - {{id: streamer, hash: "{hash_key(STREAMER_KEY)}", plan: roomy}}
prices:
  "mock/*": {{per_request: 1}}
"""


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def stream_or_default(provider: MockProvider, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
    """Streams take ~1.5 s (to be cut by a drain if it were not graceful); everything else answers at once."""
    if not body.get("stream"):
        return await provider.default(request, body)
    response = await open_sse(request)
    for i in range(STREAM_CHUNKS):
        await response.write(sse(chat_chunk(f"t{i}")))
        await asyncio.sleep(0.25)
    await response.write(sse(usage_chunk(3, STREAM_CHUNKS)))
    await response.write(sse("[DONE]"))
    return response


@pytest.fixture
async def workers(
    provider: MockProvider, redis_server: RedisServer, tmp_path: Path
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str, Path]]:
    """`python -m proxy serve` with server.workers 2 on a flushed Redis; yields the process, URL and output file."""
    async with aioredis.from_url(redis_server.url) as client:
        await client.flushdb()
    provider.handler = lambda request, body: stream_or_default(provider, request, body)
    policies = write_policy(tmp_path / "policies", POLICY)
    config = gateway_config(
        provider.url, policies, server={"workers": 2, "shutdown_grace_s": GRACE_S},
        store={"kind": "redis", "redis_url": redis_server.url},
    )
    output = tmp_path / "gateway.log"
    async with gateway_process(config, tmp_path, output) as (process, url):
        yield process, url, output


async def worker_pids(output: Path) -> set[int]:
    """From the supervisor's line, printed once every worker serves (the first may answer before)."""
    await eventually(lambda: "serving on" in output.read_text())
    line = next(line for line in output.read_text().splitlines() if "serving on" in line)
    pids = re.search(r"with 2 workers \(pids (\d+), (\d+)\)", line)
    assert pids, line
    return {int(pids[1]), int(pids[2])}


def log_lines(output: Path) -> list[dict[str, Any]]:
    """Every JSON line the processes wrote (all of them must parse: workers share one stdout)."""
    return [json.loads(line) for line in output.read_text().splitlines() if line.startswith("{")]


async def fresh_connections(url: str, path: str, key: str, body: dict[str, Any] | None, count: int) -> list[int]:
    """`count` concurrent calls, each on its own connection (the kernel spreads connections, not requests)."""
    connector = aiohttp.TCPConnector(force_close=True, limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=20)) as http:

        async def one() -> int:
            method = http.post if body is not None else http.get
            async with method(f"{url}{path}", json=body, headers=auth(key)) as response:
                await response.read()
                return response.status

        return list(await asyncio.gather(*(one() for _ in range(count))))


async def requests_counted(url: str, route: str) -> float:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{url}/metrics") as response:
            text = await response.text()
    return sum(
        sample.value for family in text_string_to_metric_families(text) if family.name == "edge_proxy_requests"
        for sample in family.samples if sample.name == "edge_proxy_requests_total" and sample.labels["route"] == route
    )


async def eventually(condition: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the condition"
        await asyncio.sleep(0.05)


async def test_two_workers_share_the_port_tokens_budget_and_metrics_then_drain(
    workers: tuple[asyncio.subprocess.Process, str, Path], tmp_path: Path
) -> None:
    process, url, output = workers
    pids = await worker_pids(output)

    statuses = await fresh_connections(url, "/v1/embeddings", TEST_KEY, EMBED, REQUESTS)
    assert Counter(statuses) == {200: BUDGET, 402: REQUESTS - BUDGET}  # one budget, however the calls spread

    async with aiohttp.ClientSession() as http:
        async with http.post(f"{url}/v1/tokens", json={"sub": "user-1"}, headers=auth(TEST_KEY)) as response:
            assert response.status == 200, await response.text()
            token = (await response.json())["token"]
    assert set(await fresh_connections(url, "/v1/me", token, None, 20)) == {200}

    expected = {"/v1/embeddings": REQUESTS, "/v1/tokens": 1, "/v1/me": 20}
    await eventually(lambda: expected.items() <= Counter(
        line.get("route") for line in log_lines(output) if line.get("msg") == "access").items())
    access = [line for line in log_lines(output) if line.get("msg") == "access"]
    assert {line["pid"] for line in access if line["route"] == "/v1/embeddings"} == pids, "one worker took every call"
    assert {line["pid"] for line in access if line["principal_type"] == "gateway_token"} == pids, \
        "a token minted by one worker must verify on the other"
    assert await requests_counted(url, "/v1/embeddings") == REQUESTS  # any worker's scrape sums both

    victim = min(pids)
    os.kill(victim, signal.SIGKILL)
    await eventually(lambda: "restarted (pid" in output.read_text())
    replacement = int(re.search(r"worker \d restarted \(pid (\d+)\)", output.read_text())[1])
    assert replacement not in pids
    assert set(await fresh_connections(url, "/v1/me", TEST_KEY, None, 20)) == {200}
    assert await requests_counted(url, "/v1/embeddings") == REQUESTS, "the dead worker's counts were lost"

    payload = {"model": "mock/chat", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{url}/v1/chat/completions", json=payload, headers=auth(STREAMER_KEY)) as response:
            assert response.status == 200
            received = await response.content.readuntil(b"\n\n")
            process.send_signal(signal.SIGTERM)
            received += await asyncio.wait_for(response.content.read(), GRACE_S)
    assert received.decode().rstrip().endswith("data: [DONE]")
    assert await asyncio.wait_for(process.wait(), GRACE_S) == 0
    assert not list(tmp_path.glob("edge-proxy-metrics-*")), "the supervisor left its metrics directory behind"
    for pid in pids - {victim} | {replacement}:
        assert not Path(f"/proc/{pid}").exists(), f"worker {pid} outlived the supervisor's drain"


def test_workers_drain_when_the_supervisor_is_killed(redis_server: RedisServer, tmp_path: Path) -> None:
    """A SIGKILLed supervisor cannot drain them: each worker sees its lifeline close and stops by itself."""
    supervisor, _, pids = start_supervisor(redis_server, tmp_path, {})
    try:
        supervisor.kill()
        supervisor.wait()
        wait_until_gone(pids, 10, "workers kept running without their supervisor")
    finally:
        supervisor.kill()
        supervisor.wait()
        kill_leftovers(pids)


def test_workers_end_within_the_grace_when_their_shutdown_is_stuck(redis_server: RedisServer, tmp_path: Path) -> None:
    """Without a supervisor, a worker whose shutdown cannot finish (here: its log lines cannot be written, the
    stdout pipe is full and nobody reads it) still ends, within shutdown_grace_s and DRAIN_MARGIN_S."""
    grace_s = 1.0
    supervisor, url, pids = start_supervisor(redis_server, tmp_path, {"shutdown_grace_s": grace_s})
    try:
        assert supervisor.stdout is not None
        fcntl.fcntl(supervisor.stdout.fileno(), fcntl.F_SETPIPE_SZ, PIPE_SIZE)  # full after a few access lines
        for _ in range(3 * PIPE_SIZE // 200):  # an access line is more than 200 bytes
            urllib.request.urlopen(urllib.request.Request(f"{url}/v1/me", headers=auth(TEST_KEY)), timeout=5).read()
        supervisor.kill()
        supervisor.wait()
        wait_until_gone(pids, grace_s + DRAIN_MARGIN_S + 2, "a worker whose shutdown was stuck outlived it")
    finally:
        supervisor.kill()
        supervisor.wait()
        kill_leftovers(pids)


PIPE_SIZE = 4096  # the smallest a pipe can be


def start_supervisor(
    redis_server: RedisServer, tmp_path: Path, server: dict[str, Any]
) -> tuple[subprocess.Popen[str], str, list[int]]:
    """`python -m proxy serve` with 2 workers, its stdout a pipe read up to the line naming the workers;
    returns the process, its URL and the workers' pids."""
    config = gateway_config("http://127.0.0.1:9", write_policy(tmp_path / "policies"),
                            server={"workers": 2, "port": 0, **server},
                            store={"kind": "redis", "redis_url": redis_server.url})
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": str(REPO), "EDGE_PROXY_DEMO_KEY": TEST_KEY, "MOCK_PROVIDER_KEY": PROVIDER_KEY,
           "TMPDIR": str(tmp_path)}  # the killed supervisor cannot remove its metrics directory
    supervisor = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config", str(tmp_path / "config.yaml")],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert supervisor.stdout is not None
    line, deadline = "", time.monotonic() + 20
    while "serving on" not in line:  # log lines (the ephemeral signing key's warning) come first
        if time.monotonic() >= deadline or supervisor.poll() is not None:
            supervisor.kill()
            supervisor.wait()
            raise AssertionError("the supervisor did not start")
        if select.select([supervisor.stdout], [], [], 0.1)[0]:
            line = supervisor.stdout.readline()
    url, first, second = re.search(r"serving on (\S+) with 2 workers \(pids (\d+), (\d+)\)", line).groups()  # type: ignore[union-attr]
    return supervisor, url, [int(first), int(second)]


def wait_until_gone(pids: list[int], timeout_s: float, failure: str) -> None:
    deadline = time.monotonic() + timeout_s
    while any(Path(f"/proc/{pid}").exists() and "Z" not in _state(pid) for pid in pids):
        assert time.monotonic() < deadline, failure
        time.sleep(0.05)


def kill_leftovers(pids: list[int]) -> None:
    """A worker that failed the test must not outlive it."""
    for pid in pids:
        if "Z" not in _state(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def test_several_workers_on_the_memory_store_are_refused(tmp_path: Path) -> None:
    config = parse_config({"server": {"workers": 3}}, "config.yaml")
    with pytest.raises(ConfigError) as refused:
        worker_count(config, None)
    assert "store.kind is memory" in str(refused.value) and "Fix: use store.kind redis" in str(refused.value)
    with pytest.raises(ConfigError):
        worker_count(parse_config({}, "config.yaml"), 2)  # --workers, too
    (tmp_path / "config.yaml").write_text("server: {port: 0}\n")
    cli = subprocess.run([sys.executable, "-m", "proxy", "serve", "--config", str(tmp_path / "config.yaml"),
                          "--workers", "2"], env={**os.environ, "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, timeout=20)
    assert cli.returncode == 2 and "store.kind is memory" in cli.stderr and not cli.stdout


def test_worker_count_defaults() -> None:
    memory = parse_config({}, "config.yaml")
    redis = parse_config({"store": {"kind": "redis", "redis_url": "redis://127.0.0.1:1/0"}}, "config.yaml")
    assert worker_count(memory, None) == 1  # the quick start keeps exact limits
    assert worker_count(memory, 1) == 1
    assert worker_count(redis, None) == available_cores()
    assert worker_count(redis, 3) == 3
    configured = parse_config({"server": {"workers": 4}, "store": {"kind": "redis", "redis_url": "redis://h/0"}}, "c")
    assert worker_count(configured, None) == 4 and worker_count(configured, 2) == 2  # the flag wins


@pytest.mark.parametrize(("files", "expected"), [
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu.max": "150000 100000\n"}, 2),
    ({"cpu.max": "50000 100000\n"}, 1),
    ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({}, None),
])
def test_available_cores_honours_the_cgroup_quota(tmp_path: Path, files: dict[str, str], expected: int | None) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    affinity = len(os.sched_getaffinity(0))
    assert available_cores(tmp_path) == (affinity if expected is None else min(affinity, expected))


class Writes:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def write(self, text: str) -> None:
        self.calls.append(text)

    def flush(self) -> None:
        pass


def test_log_batches_are_written_in_whole_lines_that_a_pipe_writes_atomically() -> None:
    """Workers share one stdout pipe: a write above PIPE_BUF could be split by another worker's lines."""
    stream = Writes()
    writer = BatchingWriter(stream, interval_s=3600)  # type: ignore[arg-type]
    lines = [f"line {i} " + "x" * (i % 300) for i in range(500)]
    for line in lines:
        writer._lines.append(line)
    writer.close()
    assert all(len(call.encode()) <= select.PIPE_BUF and call.endswith("\n") for call in stream.calls)
    assert "".join(stream.calls).splitlines() == lines
