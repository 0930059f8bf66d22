from __future__ import annotations

from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable, Iterator

import pytest
import redis.asyncio as aioredis

from tests.gateway_harness import PROVIDER_KEY, TEST_KEY, gateway_config, start_gateway, write_policy
from tests.mock_provider import MockProvider
from proxy.server import RunningServer
from proxy.store import MemoryStore, RedisStore, Store
from tests.redis_server import RedisServer


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server per test session; tests that kill it should start their own RedisServer."""
    with RedisServer(workdir=tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer) -> str:
    """URL of the session's redis-server (database 0); flush it yourself if a test needs it empty."""
    return redis_server.url


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    """Each test runs against both implementations; Redis starts from an empty database."""
    if request.param == "memory":
        yield MemoryStore()
        return
    url = request.getfixturevalue("redis_url")
    client = aioredis.Redis.from_url(url)
    await client.flushdb()
    await client.aclose()
    redis_store = RedisStore(url)  # the shipped defaults: a loaded machine must not turn into timeouts
    yield redis_store
    await redis_store.close()


@pytest.fixture
async def provider() -> AsyncIterator[MockProvider]:
    mock = await MockProvider().start()
    yield mock
    await mock.stop()


@pytest.fixture
def gateway_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGE_PROXY_DEMO_KEY", TEST_KEY)
    monkeypatch.setenv("MOCK_PROVIDER_KEY", PROVIDER_KEY)


@pytest.fixture
def policies_dir(tmp_path: Path) -> Path:
    return write_policy(tmp_path / "policies")


@pytest.fixture
async def gateway(provider: MockProvider, gateway_env: None, policies_dir: Path) -> AsyncIterator[str]:
    """The URL of a gateway in front of the mock provider."""
    server = await start_gateway(gateway_config(provider.url, policies_dir))
    yield server.url
    await server.stop()


StartGateway = Callable[..., Awaitable[str]]


@pytest.fixture
async def start_with(provider: MockProvider, gateway_env: None, tmp_path: Path) -> AsyncIterator[StartGateway]:
    """Start a gateway on the memory store with this policy; `model_caps` sets models' max_output_tokens."""
    servers: list[RunningServer] = []

    async def start(policy: str, model_caps: dict[str, int] | None = None) -> str:
        config = gateway_config(provider.url, write_policy(tmp_path / "policies", policy))
        for model in config["models"]:
            if model["id"] in (model_caps or {}):
                model["max_output_tokens"] = model_caps[model["id"]]
        servers.append(await start_gateway(config))
        return servers[-1].url

    yield start
    for server in servers:
        await server.stop()
