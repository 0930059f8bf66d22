"""Start a real gateway on a loopback port for tests, configured from a dict like config.yaml."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import aiohttp
import yaml

from proxy.config import parse_config
from proxy.server import RunningServer, start_server
from tests.redis_server import free_port

REPO = Path(__file__).resolve().parents[1]

TEST_KEY = "sk_test_" + "k" * 40
PROVIDER_KEY = "provider-secret-123"

# The plan the test key (the demo key) is on: every mock model, roomy limits, real prices.
DEFAULT_POLICY = """
plans:
  demo:
    models: ["mock/*"]
    rate_limits: [{per: user, requests: 10000, window: 1m}]
    budget: {credits: 1000000, period: month, scope: account}
prices:
  "mock/*": {per_request: 1}
  mock/chat: {per_request: 1, input_per_1k_tokens: 1000, output_per_1k_tokens: 2000}
"""


# A token price for budget_policy's `prices`, and what it charges: tests check settles to the credit against it.
TOKEN_PRICE = "{per_request: 1, input_per_1k_tokens: 1000, output_per_1k_tokens: 2000}"


def token_cost(input_tokens: int, output_tokens: int) -> int:
    """TOKEN_PRICE applied: 1 per request, 1 per input token, 2 per output token."""
    return 1 + input_tokens + 2 * output_tokens


def budget_policy(budget: int, prices: dict[str, str], plan_lines: tuple[str, ...] = ()) -> str:
    """Policy text: plan `demo` on every mock model with a monthly account budget, `plan_lines` added to the
    plan, every mock model at 1 per request unless `prices` (model -> YAML flow mapping) says otherwise."""
    plan = "".join(f"    {line}\n" for line in plan_lines)
    priced = "".join(f"  {model}: {price}\n" for model, price in prices.items())
    return (f'plans:\n  demo:\n    models: ["mock/*"]\n{plan}'
            f"    budget: {{credits: {budget}, period: month, scope: account}}\n"
            f'prices:\n  "mock/*": {{per_request: 1}}\n{priced}')


def write_policy(directory: Path, text: str = DEFAULT_POLICY) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "test.yaml").write_text(text)
    return directory


def gateway_config(provider_url: str, policies_dir: Path, **overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "policies": {"dir": str(policies_dir), "watch_interval_s": 0},
        "server": {"sse_keepalive_s": 0, "max_body_bytes": 64 * 1024, "cors_allow_origins": ["https://app.example.com"]},
        "demo": {"enabled": True, "plan": "demo"},
        "providers": {
            "mock": {"base_url": provider_url, "api_key_env": "MOCK_PROVIDER_KEY",
                     "timeouts": {"connect_s": 2, "first_byte_s": 2, "idle_s": 2, "total_s": 30}},
        },
        "models": [
            {"id": "mock/chat", "name": "Mock Chat", "creator": "Tests", "capability": "text2text",
             "provider": "mock", "upstream_model": "mock-up"},
            {"id": "mock/embed", "name": "Mock Embed", "creator": "Tests", "capability": "text2text",
             "provider": "mock", "upstream_model": "mock-embed"},
            {"id": "mock/image", "name": "Mock Image", "creator": "Tests", "capability": "text2image",
             "provider": "mock", "upstream_model": "mock-image"},
            {"id": "mock/speech", "name": "Mock Speech", "creator": "Tests", "capability": "text2speech",
             "provider": "mock", "upstream_model": "mock-tts"},
        ],
    }
    for section, values in overrides.items():
        if isinstance(values, dict) and isinstance(config.get(section), dict):
            config[section] = {**config[section], **values}
        else:
            config[section] = values
    return config


async def start_gateway(config: dict[str, Any]) -> RunningServer:
    return await start_server(parse_config(config, "test-config"), host="127.0.0.1", port=0)


def with_text_model(
    config: dict[str, Any], provider: str, kind: str, base_url: str, model: str, upstream_model: str,
    max_output_tokens: int,
) -> dict[str, Any]:
    """`config` plus a provider of `kind` (the mock's key, short timeouts) serving one text model."""
    config["providers"][provider] = {
        "kind": kind, "base_url": base_url, "api_key_env": "MOCK_PROVIDER_KEY",
        "timeouts": {"connect_s": 2, "first_byte_s": 2, "idle_s": 2, "total_s": 30},
    }
    config["models"] = [*config["models"], {
        "id": model, "name": f"Mock {model.rsplit('/', 1)[-1].capitalize()}",  # mock/claude: Mock Claude
        "creator": "Tests", "capability": "text2text",
        "provider": provider, "upstream_model": upstream_model, "max_output_tokens": max_output_tokens,
    }]
    return config


class MeteredGateway:
    """A running gateway as tests of one route family use it: raw JSON posts (with that family's `headers` by
    default), and what the test key's account has spent."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        self.url, self.headers = url, headers

    async def post(self, path: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> tuple[int, Any]:
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{self.url}{path}", json=body, headers=self.headers if headers is None else headers) as r:
                return r.status, await r.json()

    async def spent(self, settled: Callable[[dict[str, Any]], bool] = lambda b: b["held"] == 0) -> float:
        """Credits spent, once nothing is held any more (a settle may finish just after the answer ends)."""
        async with aiohttp.ClientSession() as http:
            for _ in range(100):
                async with http.get(f"{self.url}/v1/me", headers={"Authorization": f"Bearer {TEST_KEY}"}) as r:
                    current = (await r.json())["balance"]
                if settled(current):
                    return float(current["spent"])
                await asyncio.sleep(0.05)
        raise AssertionError(f"the call was never settled: {current}")


async def wait_healthy(url: str, exited: Callable[[], bool], timeout_s: float = 20.0) -> None:
    """Poll `/healthz` until it answers 200; fail fast if the gateway process `exited()`."""
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            assert not exited(), f"the gateway at {url} exited during start-up"
            try:
                async with http.get(f"{url}/healthz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.1)
    raise TimeoutError(f"the gateway at {url} did not become healthy within {timeout_s}s")


@asynccontextmanager
async def gateway_process(
    config: dict[str, Any], directory: Path, output: Path | None = None
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """`python -m proxy serve` on a free port with `config` (written to `directory`); killed if still running.

    With `output`, the process's stdout and stderr both go to that file; else they are discarded.
    """
    port = free_port()
    config = {**config, "server": {**config.get("server", {}), "host": "127.0.0.1", "port": port}}
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    # TMPDIR: a killed worker supervisor leaves its metrics directory in the test's directory, not in /tmp.
    env = {**os.environ, "EDGE_PROXY_DEMO_KEY": TEST_KEY, "MOCK_PROVIDER_KEY": PROVIDER_KEY, "PYTHONPATH": str(REPO),
           "TMPDIR": str(directory)}
    sink = output.open("wb") if output is not None else None
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "serve", "--config", str(path), env=env,
        stdout=sink or asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.STDOUT if sink else asyncio.subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_healthy(url, lambda: process.returncode is not None)
        yield process, url
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        if sink is not None:
            sink.close()
