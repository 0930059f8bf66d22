"""Shared fixtures: a real redis-server on a free port for the whole session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

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
