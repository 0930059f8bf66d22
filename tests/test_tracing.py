"""OpenTelemetry tracing through a real gateway: server and client spans, W3C context in and out, off by default."""

from __future__ import annotations

import builtins
import subprocess
import sys
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest
from aiohttp import web

pytest.importorskip("opentelemetry.sdk", reason="tracing tests need the `test` extra (opentelemetry-sdk)")

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from proxy.config import ConfigError, parse_config
from proxy.gateway import build_gateway
from proxy.server import RunningServer, start_server
from tests.gateway_harness import (
    PROVIDER_KEY,
    TEST_KEY,
    gateway_config,
    start_gateway,
    write_policy,
)
from tests.mock_provider import MockProvider

CALLER_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_TRACEPARENT = f"00-{CALLER_TRACE_ID}-00f067aa0ba902b7-01"
CHAT = {"model": "mock/chat", "messages": [{"role": "user", "content": "hi"}]}
AUTH = {"Authorization": f"Bearer {TEST_KEY}"}


pytestmark = pytest.mark.usefixtures("gateway_env")  # the demo and provider keys, from conftest


@pytest.fixture
def spans() -> InMemorySpanExporter:
    return InMemorySpanExporter()


def _config(provider: MockProvider, tmp_path: Path, **tracing: Any) -> dict[str, Any]:
    return gateway_config(provider.url, write_policy(tmp_path / "policies"), tracing=tracing)


@pytest.fixture
async def traced(provider: MockProvider, spans: InMemorySpanExporter, tmp_path: Path) -> AsyncIterator[str]:
    """A gateway with tracing on, its spans going to `spans`."""
    config = parse_config(_config(provider, tmp_path, enabled=True, exporter="none"), "test-config")
    server = await start_server(config, "127.0.0.1", 0, gateway=build_gateway(config, span_exporter=spans))
    yield server.url
    await server.stop()


async def _post(url: str, headers: dict[str, str], body: dict[str, Any] = CHAT) -> int:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{url}/v1/chat/completions", json=body, headers=headers) as response:
            await response.read()
            return response.status


def _one(spans: InMemorySpanExporter, kind: SpanKind) -> ReadableSpan:
    found = [s for s in spans.get_finished_spans() if s.kind == kind]
    assert len(found) == 1, [s.name for s in spans.get_finished_spans()]
    return found[0]


def _trace_id_of(traceparent: str) -> str:
    return traceparent.split("-")[1]  # version-traceid-spanid-flags


async def test_chat_completion_makes_a_server_span_with_a_client_child(
    traced: str, spans: InMemorySpanExporter, provider: MockProvider
) -> None:
    assert await _post(traced, AUTH) == 200
    server, client = _one(spans, SpanKind.SERVER), _one(spans, SpanKind.CLIENT)

    assert server.name == "POST /v1/chat/completions"
    assert server.parent is None
    attrs = dict(server.attributes or {})
    assert attrs["http.request.method"] == "POST"
    assert attrs["http.route"] == "/v1/chat/completions"
    assert attrs["http.response.status_code"] == 200
    assert attrs["edge_proxy.principal_type"] == "api_key"
    assert attrs["edge_proxy.model"] == "mock/chat"
    assert attrs["edge_proxy.request_id"].startswith("req_")
    assert "edge_proxy.error_code" not in attrs
    assert server.status.status_code == StatusCode.UNSET
    assert server.resource.attributes["service.name"] == "edge-proxy"

    assert client.parent is not None and client.parent.span_id == server.context.span_id
    assert client.context.trace_id == server.context.trace_id
    client_attrs = dict(client.attributes or {})
    assert client_attrs["edge_proxy.provider"] == "mock"
    assert client_attrs["http.response.status_code"] == 200
    assert client_attrs["edge_proxy.upstream_outcome"] == "ok"

    # The provider sees the client span as its parent, so its own spans join this trace.
    sent = provider.received[-1].headers["traceparent"]
    assert _trace_id_of(sent) == format(server.context.trace_id, "032x")
    assert sent.split("-")[2] == format(client.context.span_id, "016x")
    values = [str(v) for s in (server, client) for v in (s.attributes or {}).values()]
    assert not [v for v in values if TEST_KEY in v or PROVIDER_KEY in v]


async def test_incoming_traceparent_is_continued_and_passed_upstream(
    traced: str, spans: InMemorySpanExporter, provider: MockProvider
) -> None:
    assert await _post(traced, {**AUTH, "traceparent": CALLER_TRACEPARENT}) == 200
    server = _one(spans, SpanKind.SERVER)
    assert format(server.context.trace_id, "032x") == CALLER_TRACE_ID
    assert server.parent is not None and format(server.parent.span_id, "016x") == "00f067aa0ba902b7"
    assert _trace_id_of(provider.received[-1].headers["traceparent"]) == CALLER_TRACE_ID


async def test_refused_request_has_a_server_span_with_its_error_code(
    traced: str, spans: InMemorySpanExporter, provider: MockProvider
) -> None:
    assert await _post(traced, {"Authorization": "Bearer sk_test_" + "x" * 40}) == 401
    server = _one(spans, SpanKind.SERVER)
    attrs = dict(server.attributes or {})
    assert attrs["http.response.status_code"] == 401
    assert attrs["edge_proxy.error_code"] == "invalid_api_key"
    assert "edge_proxy.principal_type" not in attrs
    assert not [s for s in spans.get_finished_spans() if s.kind == SpanKind.CLIENT]
    assert provider.received == []


async def test_upstream_failure_marks_both_spans_as_errors(
    traced: str, spans: InMemorySpanExporter, provider: MockProvider
) -> None:
    async def fail(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        return web.json_response({"error": {"message": "boom"}}, status=503)

    provider.handler = fail
    assert await _post(traced, AUTH) == 502
    server, client = _one(spans, SpanKind.SERVER), _one(spans, SpanKind.CLIENT)
    assert server.status.status_code == StatusCode.ERROR
    assert dict(server.attributes or {})["edge_proxy.error_code"] == "upstream_error"
    assert client.status.status_code == StatusCode.ERROR
    assert dict(client.attributes or {})["http.response.status_code"] == 503
    assert dict(client.attributes or {})["edge_proxy.upstream_outcome"] == "error"
    assert any(event.name == "exception" for event in client.events)


async def test_tracing_off_sends_no_traceparent(provider: MockProvider, tmp_path: Path) -> None:
    server: RunningServer = await start_gateway(_config(provider, tmp_path))
    try:
        assert await _post(server.url, {**AUTH, "traceparent": CALLER_TRACEPARENT}) == 200
    finally:
        await server.stop()
    assert "traceparent" not in {h.lower() for h in provider.received[-1].headers}


def test_enabling_tracing_without_the_packages_names_the_key_and_the_fix(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    real_import = builtins.__import__

    def no_opentelemetry(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("opentelemetry"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "proxy.otel_tracing", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_opentelemetry)
    raw = gateway_config("http://127.0.0.1:9/v1", write_policy(tmp_path), tracing={"enabled": True})
    config = parse_config(raw, "cfg.yaml")
    with pytest.raises(ConfigError) as error:
        build_gateway(config, announce=False)
    assert "cfg.yaml: tracing.enabled" in str(error.value)
    assert 'pip install "edge-proxy[tracing]"' in str(error.value)


def test_tracing_section_rejects_unknown_keys_and_bad_ratios() -> None:
    with pytest.raises(ConfigError, match="tracing.sampler: unknown key"):
        parse_config({"tracing": {"sampler": "always"}}, "cfg.yaml")
    with pytest.raises(ConfigError, match="tracing.sample_ratio"):
        parse_config({"tracing": {"sample_ratio": 1.5}}, "cfg.yaml")
    assert parse_config({}, "cfg.yaml").tracing.enabled is False


# Blocks every opentelemetry import, then builds and serves a gateway app with tracing off.
_WITHOUT_OPENTELEMETRY = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "opentelemetry":
            raise ModuleNotFoundError(name)
sys.meta_path.insert(0, Block())
from proxy.app import create_app
from proxy.config import parse_config
from proxy.gateway import build_gateway
from tests.gateway_harness import gateway_config, write_policy
config = parse_config(gateway_config("http://127.0.0.1:9/v1", write_policy(__import__("pathlib").Path(sys.argv[1]))), "t")
create_app(config, build_gateway(config, announce=False))
assert not [m for m in sys.modules if m.startswith("opentelemetry")]
"""


def test_gateway_runs_without_opentelemetry_when_tracing_is_off(tmp_path: Path) -> None:
    env = {"MOCK_PROVIDER_KEY": PROVIDER_KEY, "EDGE_PROXY_DEMO_KEY": TEST_KEY, "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-c", _WITHOUT_OPENTELEMETRY, str(tmp_path)],
        cwd=Path(__file__).parent.parent, env={**env, "PYTHONPATH": "."}, capture_output=True, text=True, timeout=30,
    )
    assert done.returncode == 0, done.stderr
