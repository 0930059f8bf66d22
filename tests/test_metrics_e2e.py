"""A real gateway in front of the mock provider: a scripted mix of outcomes moves /metrics and the access log exactly."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from proxy.accesslog import configure_logging
from proxy.auth.api_keys import hash_key
from tests.gateway_harness import PROVIDER_KEY, TEST_KEY, gateway_config, start_gateway, write_policy
from tests.jwks_server import JwksServer, RsaKey, clerk_claims
from tests.mock_provider import MockProvider, chat_chunk, open_sse, sse

LIMITED_KEY = "sk_test_" + "l" * 40
BROKE_KEY = "sk_test_" + "b" * 40
PROMPT_TOKENS, COMPLETION_TOKENS = 7, 4  # what the mock reports (4 tokens in MockProvider.tokens)
PER_REQUEST, INPUT_PER_1K, OUTPUT_PER_1K = 1, 1000, 2000

POLICY = f"""
plans:
  demo:
    models: ["mock/*"]
    rate_limits: [{{per: user, requests: 10000, window: 1m}}]
  limited:
    models: ["mock/*"]
    rate_limits: [{{per: user, requests: 1, window: 1m}}]
  broke:
    models: ["mock/*"]
    budget: {{credits: 1, period: month, scope: account}}
prices:
  mock/chat: {{per_request: {PER_REQUEST}, input_per_1k_tokens: {INPUT_PER_1K}, output_per_1k_tokens: {OUTPUT_PER_1K}}}
keys:
  - {{id: limited-key, hash: "{hash_key(LIMITED_KEY)}", plan: limited}}
  - {{id: broke-key, hash: "{hash_key(BROKE_KEY)}", plan: broke}}
"""


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a /metrics page by (name, labels)."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text) for s in family.samples
    }


def total(page: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    """Sum of `name` over samples whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(value for (n, ls), value in page.items() if n == name and wanted <= ls)


async def fail_when_asked(provider: MockProvider, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
    """The mock's normal answers, except a 500 for `user: fail` and a body cut short for `user: cut`."""
    if body.get("user") == "fail":
        return web.json_response({"error": {"message": "boom"}}, status=500)
    if body.get("user") == "cut":
        response = await open_sse(request)
        await response.write(sse(chat_chunk("partial")))
        assert request.transport is not None
        request.transport.close()  # the provider drops the connection mid-stream
        return response
    return await provider.default(request, body)


@pytest.fixture
async def gateway(provider: MockProvider, gateway_env: None, tmp_path: Path) -> AsyncIterator[str]:
    provider.handler = lambda request, body: fail_when_asked(provider, request, body)
    server = await start_gateway(gateway_config(provider.url, write_policy(tmp_path / "policies", POLICY)))
    yield server.url
    await server.stop()


async def call(session: aiohttp.ClientSession, url: str, key: str, **body: Any) -> tuple[int, str, bytes]:
    payload = {"model": "mock/chat", "messages": [{"role": "user", "content": "hi"}], **body}
    async with session.post(f"{url}/v1/chat/completions", json=payload, headers={"Authorization": f"Bearer {key}"}) as r:
        return r.status, r.headers["X-Request-Id"], await r.read()


async def test_scripted_mix_moves_metrics_and_access_log_exactly(gateway: str) -> None:
    buffer = io.StringIO()
    stop_logging = configure_logging("warning", json=True, stream=buffer)
    try:
        async with aiohttp.ClientSession() as session:
            script = [
                ("json", await call(session, gateway, TEST_KEY)),
                ("stream", await call(session, gateway, TEST_KEY, stream=True)),
                ("limited_ok", await call(session, gateway, LIMITED_KEY)),
                ("rate_limited", await call(session, gateway, LIMITED_KEY)),
                ("broke", await call(session, gateway, BROKE_KEY)),
                ("bad_key", await call(session, gateway, "sk_test_" + "x" * 40)),
                ("upstream_500", await call(session, gateway, TEST_KEY, user="fail")),
            ]
            async with session.get(f"{gateway}/metrics") as response:
                page = samples(await response.text())
    finally:
        stop_logging()  # joins the writer thread: every access line is in the buffer now
    results = dict(script)
    assert {name: status for name, (status, _, _) in script} == {
        "json": 200, "stream": 200, "limited_ok": 200, "rate_limited": 429, "broke": 402, "bad_key": 401,
        "upstream_500": 502,
    }
    assert results["stream"][2].endswith(b"data: [DONE]\n\n")

    chat = {"route": "/v1/chat/completions"}
    assert total(page, "edge_proxy_requests_total", **chat, status_class="2xx") == 3
    assert total(page, "edge_proxy_requests_total", **chat, status_class="4xx") == 3
    assert total(page, "edge_proxy_requests_total", **chat, status_class="5xx") == 1
    assert total(page, "edge_proxy_requests_total", **chat, principal_type="api_key") == 6  # the 401 is anonymous
    for code in ("rate_limit", "insufficient_credits", "invalid_api_key", "upstream_error"):
        assert total(page, "edge_proxy_errors_total", **chat, code=code) == 1, code
    assert total(page, "edge_proxy_errors_total") == 4
    assert total(page, "edge_proxy_denials_total", kind="rate_limit", rule="user.requests.60s") == 1
    assert total(page, "edge_proxy_denials_total", kind="budget", rule="budget") == 1
    assert total(page, "edge_proxy_denials_total") == 2
    assert total(page, "edge_proxy_auth_failures_total", reason="invalid_api_key") == 1
    assert total(page, "edge_proxy_auth_failures_total") == 1

    successes = 3
    assert total(page, "edge_proxy_tokens_total", model="mock/chat", direction="input") == successes * PROMPT_TOKENS
    assert total(page, "edge_proxy_tokens_total", model="mock/chat", direction="output") == successes * COMPLETION_TOKENS
    cost = PER_REQUEST + PROMPT_TOKENS * INPUT_PER_1K / 1000 + COMPLETION_TOKENS * OUTPUT_PER_1K / 1000
    assert total(page, "edge_proxy_credits_total", action="settled") == pytest.approx(successes * cost)
    assert total(page, "edge_proxy_streams_in_flight") == 0
    assert total(page, "edge_proxy_upstream_errors_total", provider="mock", reason="status_5xx") == 1
    assert total(page, "edge_proxy_upstream_errors_total") == 1
    assert total(page, "edge_proxy_upstream_request_duration_seconds_count", provider="mock", outcome="ok") == successes
    # The mock is an `openai` provider (the default kind): every provider series says so.
    assert total(page, "edge_proxy_upstream_request_duration_seconds_count", provider_kind="openai") == successes + 1
    mock_requests = total(page, "edge_proxy_requests_total", **chat, provider="mock")
    assert mock_requests > 0 and total(page, "edge_proxy_requests_total", **chat, provider_kind="openai") == mock_requests
    assert total(page, "edge_proxy_time_to_first_byte_seconds_count", **chat) == successes + 1  # the 502 too

    lines = [json.loads(line) for line in buffer.getvalue().splitlines()]
    access = {line["request_id"]: line for line in lines if line["logger"] == "edge_proxy.access"}
    for name, (status, request_id, _) in script:
        line = access[request_id]
        assert line["status"] == status and line["route"] == "/v1/chat/completions", name
        # Authentication comes before the body is read, so a refused caller's line names no model.
        assert line["model"] == (None if name == "bad_key" else "mock/chat"), name
    assert (access[results["json"][1]]["tokens_in"], access[results["json"][1]]["tokens_out"]) == (
        PROMPT_TOKENS, COMPLETION_TOKENS)
    assert access[results["stream"][1]]["credits"] == pytest.approx(cost)
    assert access[results["rate_limited"][1]]["error"] == "rate_limit"
    assert access[results["bad_key"][1]]["principal_id"] is None
    assert access[results["upstream_500"][1]]["upstream_status"] == 500
    for secret in (TEST_KEY, LIMITED_KEY, BROKE_KEY, "sk_test_" + "x" * 40, PROVIDER_KEY):
        assert secret not in buffer.getvalue()


@pytest.mark.parametrize(("user", "reason", "outcome"), [
    ("fail", "status_5xx", "error"), ("cut", "stream_interrupted", "error"),
])
async def test_upstream_errors_are_counted_by_reason(gateway: str, user: str, reason: str, outcome: str) -> None:
    async with aiohttp.ClientSession() as session:
        await call(session, gateway, TEST_KEY, stream=True, user=user)
        async with session.get(f"{gateway}/metrics") as response:
            page = samples(await response.text())
    assert total(page, "edge_proxy_upstream_errors_total", provider="mock", reason=reason) == 1
    assert total(page, "edge_proxy_upstream_errors_total") == 1
    assert total(page, "edge_proxy_upstream_request_duration_seconds_count", provider="mock", outcome=outcome) == 1


async def test_jwks_fetches_are_counted_by_issuer_and_outcome(
    provider: MockProvider, gateway_env: None, policies_dir: Path,
) -> None:
    key = RsaKey.generate()
    async with JwksServer([key]) as idp, aiohttp.ClientSession() as session:
        issuer = {"issuer": idp.issuer, "jwks_url": idp.jwks_url, "plan": "demo", "unknown_kid_cooldown_s": 0}
        server = await start_gateway(gateway_config(provider.url, policies_dir, issuers={"clerk": issuer}))
        try:
            token = key.sign(clerk_claims(idp.issuer))
            idp.mode = "error"
            assert (await call(session, server.url, token))[0] == 503
            idp.mode = "ok"
            assert (await call(session, server.url, token))[0] == 200
            async with session.get(f"{server.url}/metrics") as response:
                page = samples(await response.text())
        finally:
            await server.stop()
    assert total(page, "edge_proxy_jwks_fetches_total", issuer="clerk", outcome="failure") == 1
    assert total(page, "edge_proxy_jwks_fetches_total", issuer="clerk", outcome="success") == 1
    assert total(page, "edge_proxy_requests_total", principal_type="clerk", status_class="2xx") == 1
