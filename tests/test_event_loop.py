"""`edge-proxy serve` runs on uvloop when it is installed (the `fast` extra), on asyncio's loop when told not to,
and says which in its start-up line; one process and workers both serve a metered call on it and stop cleanly."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.gateway_harness import TEST_KEY, gateway_config, gateway_process
from tests.mock_provider import MockProvider
from tests.redis_server import RedisServer


@pytest.mark.parametrize(("switch", "workers", "expected"),
                         [(None, 1, "uvloop"), ("0", 1, "asyncio"), (None, 2, "uvloop")])
async def test_serve_picks_the_event_loop_and_serves_on_it(
    provider: MockProvider, policies_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    redis_server: RedisServer, switch: str | None, workers: int, expected: str,
) -> None:
    if switch is None:
        monkeypatch.delenv("EDGE_PROXY_UVLOOP", raising=False)
    else:
        monkeypatch.setenv("EDGE_PROXY_UVLOOP", switch)
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # where a supervisor makes its metrics directory
    overrides: dict[str, Any] = {"server": {"workers": workers, "shutdown_grace_s": 5}}
    if workers > 1:  # several workers need a shared store
        overrides["store"] = {"kind": "redis", "redis_url": redis_server.url}
    output = tmp_path / "gateway.log"
    config = gateway_config(provider.url, policies_dir, **overrides)
    async with gateway_process(config, tmp_path, output) as (process, url):
        payload = {"model": "mock/chat", "messages": [{"role": "user", "content": "hi"}]}
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{url}/v1/chat/completions", json=payload,
                                 headers={"Authorization": f"Bearer {TEST_KEY}"}) as response:
                assert response.status == 200, await response.text()
                assert (await response.json())["choices"]
        # A supervisor announces once every worker is ready, which can be after the first one answered.
        started = await started_lines(output)
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0  # bounded by shutdown_grace_s, with room for a busy CI
    assert len(started) == 1 and f", {expected} event loop " in started[0], started


async def started_lines(output: Path, timeout_s: float = 20.0) -> list[str]:
    """The start-up lines in `output`, once there is one (or when `timeout_s` has passed)."""
    deadline = time.monotonic() + timeout_s
    while True:
        lines = [line for line in output.read_text().splitlines() if "serving on" in line]
        if lines or time.monotonic() > deadline:
            return lines
        await asyncio.sleep(0.1)


def test_a_serving_process_freezes_its_start_up_heap_and_collects_young_objects_less_often() -> None:
    """`serve` calls settle_heap once started: in a child interpreter, so this test process's collector is not
    changed."""
    probe = ("import gc; from proxy.event_loop import settle_heap, YOUNG_GC_THRESHOLD; settle_heap(); "
             "print(gc.get_freeze_count() > 0, gc.get_threshold()[0] == YOUNG_GC_THRESHOLD > 700)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.stdout.split() == ["True", "True"], done.stderr


def test_sigterm_still_ends_a_process_after_its_loop_ended() -> None:
    """uvloop leaves its handler of the closed loop installed, which swallowed SIGTERM: a process stuck after its
    loop ended (joining a thread) could only be SIGKILLed. In a child interpreter, on the default loop (uvloop)."""
    probe = ("import asyncio, signal, time; from proxy.event_loop import run_event_loop\n"
             "async def main(): asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, print)\n"
             "run_event_loop(main()); print('loop ended', flush=True); time.sleep(30)")
    child = subprocess.Popen([sys.executable, "-c", probe], stdout=subprocess.PIPE, text=True,
                             cwd=Path(__file__).resolve().parents[1])
    try:
        assert child.stdout is not None and child.stdout.readline() == "loop ended\n"
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=10) == -signal.SIGTERM
    finally:
        child.kill()
        child.wait()
