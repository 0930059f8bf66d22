from __future__ import annotations

from typing import AsyncIterator

import pytest

from .gateway_harness import PROVIDER_KEY, TEST_KEY, gateway_config, start_gateway
from .mock_provider import MockProvider


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
async def gateway(provider: MockProvider, gateway_env: None) -> AsyncIterator[str]:
    """The URL of a gateway in front of the mock provider."""
    server = await start_gateway(gateway_config(provider.url))
    yield server.url
    await server.stop()
