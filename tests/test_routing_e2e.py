"""Routing end to end: three mock upstreams that refuse, stall, fail or throttle; one clean answer whenever any
deployment can serve and nothing was sent yet; never a retry once the answer started; charged as who answered."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from proxy.config import parse_config
from proxy.gateway import build_gateway
from proxy.server import RunningServer, start_server
from tests.gateway_harness import TEST_KEY, budget_policy, gateway_config, start_gateway, write_policy
from tests.mock_provider import MockProvider, chat_chunk, open_sse, sse
from tests.redis_server import free_port

pytestmark = pytest.mark.usefixtures("gateway_env")

AUTH = {"Authorization": f"Bearer {TEST_KEY}"}
TIMEOUTS = {"connect_s": 2, "first_byte_s": 2, "idle_s": 2, "total_s": 30}
FIRST, LAST = 1000, 0.001  # weights that make `a` the first choice but for a chance of one in a million
PRICES = {"mock/primary": "{per_request: 3}", "mock/backup": "{per_request: 1}", "mock/pricey": "{per_request: 50}"}


def chat(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


def models() -> list[dict[str, Any]]:
    def entry(model_id: str, **serving: Any) -> dict[str, Any]:
        return {"id": model_id, "name": model_id, "creator": "Tests", "capability": "text2text", **serving}

    return [
        entry("mock/routed", deployments=[
            {"provider": "a", "upstream_model": "up-a", "weight": FIRST},
            {"provider": "b", "upstream_model": "up-b", "weight": LAST},
        ]),
        entry("mock/three", deployments=[
            {"provider": "a", "upstream_model": "up-a"}, {"provider": "b", "upstream_model": "up-b"},
            {"provider": "c", "upstream_model": "up-c"},
        ]),
        entry("mock/sticky", selection="sticky", deployments=[
            {"provider": "a", "upstream_model": "up-a"}, {"provider": "b", "upstream_model": "up-b"},
        ]),
        entry("mock/fastest", selection="latency", deployments=[
            {"provider": "a", "upstream_model": "up-a"}, {"provider": "b", "upstream_model": "up-b"},
        ]),
        entry("mock/solo", provider="a", upstream_model="up-a"),
        entry("mock/primary", provider="a", upstream_model="up-a", fallbacks=["mock/pricey", "mock/backup"]),
        entry("mock/pricey", provider="c", upstream_model="up-c"),
        entry("mock/backup", provider="b", upstream_model="up-b"),
    ]


Upstreams = dict[str, MockProvider]
Start = Callable[..., Awaitable[str]]


@pytest.fixture
async def upstreams() -> AsyncIterator[Upstreams]:
    mocks = {name: await MockProvider().start() for name in "abc"}
    yield mocks
    for mock in mocks.values():
        await mock.stop()


@pytest.fixture
async def start(upstreams: Upstreams, tmp_path: Path) -> AsyncIterator[Start]:
    """A gateway with providers a, b, c on the mocks; `urls` / `timeouts` replace a provider's; `plan_lines` are
    added to the policy's plan, whose account has `budget` credits."""
    servers: list[RunningServer] = []

    async def starter(urls: dict[str, str] | None = None, timeouts: dict[str, dict[str, float]] | None = None,
                      spans: InMemorySpanExporter | None = None, plan_lines: tuple[str, ...] = (),
                      budget: int = 1_000_000, **routing: Any) -> str:
        providers = {
            name: {"base_url": (urls or {}).get(name, mock.url), "api_key_env": "MOCK_PROVIDER_KEY",
                   "timeouts": {**TIMEOUTS, **(timeouts or {}).get(name, {})}}
            for name, mock in upstreams.items()
        }
        policies = write_policy(tmp_path / "policies", budget_policy(budget, PRICES, plan_lines))
        config = gateway_config(upstreams["a"].url, policies, providers=providers, models=models(), routing=routing)
        if spans is None:
            servers.append(await start_gateway(config))
        else:
            parsed = parse_config({**config, "tracing": {"enabled": True, "exporter": "none"}}, "test-config")
            gateway = build_gateway(parsed, span_exporter=spans)
            servers.append(await start_server(parsed, "127.0.0.1", 0, gateway=gateway))
        return servers[-1].url

    yield starter
    for server in servers:
        await server.stop()


async def post(
    gateway: str, body: dict[str, Any], path: str = "/v1/chat/completions"
) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{gateway}{path}", json=body, headers=AUTH) as response:
            return response.status, dict(response.headers), await response.read()


async def spent(gateway: str) -> float:
    """Credits spent once nothing is held any more (a settle may land just after the answer)."""
    async with aiohttp.ClientSession() as http:
        for _ in range(100):
            async with http.get(f"{gateway}/v1/me", headers=AUTH) as response:
                balance = (await response.json())["balance"]
            if balance["held"] == 0:
                return float(balance["spent"])
            await asyncio.sleep(0.05)
    raise AssertionError(f"credits still held: {balance}")


def failing(status: int, headers: dict[str, str] | None = None) -> Callable[..., Awaitable[web.StreamResponse]]:
    async def answer(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        return web.json_response({"error": {"message": "nope"}}, status=status, headers=headers)

    return answer


async def stall(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
    await asyncio.sleep(5)
    return web.json_response({})


async def dies_mid_stream(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
    response = await open_sse(request)
    await response.write(sse(chat_chunk("one")))
    assert request.transport is not None
    request.transport.close()
    return response


def slowed(mock: MockProvider, seconds: float) -> Callable[..., Awaitable[web.StreamResponse]]:
    """The mock's usual answer, its headers `seconds` late."""

    async def answer(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        await asyncio.sleep(seconds)
        return await mock.default(request, body)

    return answer


def answered_by(upstreams: Upstreams) -> dict[str, int]:
    return {name: len(mock.received) for name, mock in upstreams.items()}


async def test_a_refused_connection_is_retried_on_the_next_deployment(start: Start, upstreams: Upstreams) -> None:
    gateway = await start(urls={"a": f"http://127.0.0.1:{free_port()}/v1"})
    status, _, body = await post(gateway, chat("mock/routed"))
    assert status == 200 and b"Hello from the mock" in body
    assert upstreams["b"].received[-1].body["model"] == "up-b"


async def test_a_stall_before_headers_is_retried_within_first_byte_s(start: Start, upstreams: Upstreams) -> None:
    upstreams["a"].handler = stall
    gateway = await start(timeouts={"a": {"first_byte_s": 0.3}})
    began = time.monotonic()
    status, _, body = await post(gateway, chat("mock/routed", stream=True))
    assert status == 200 and b"[DONE]" in body and b'"error"' not in body
    assert time.monotonic() - began < 2
    assert answered_by(upstreams) == {"a": 1, "b": 1, "c": 0}


async def test_a_500_is_retried_and_logged_with_the_deployment_and_attempts(
    start: Start, upstreams: Upstreams, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="edge_proxy.access")
    upstreams["a"].handler = failing(500)
    gateway = await start()
    status, _, body = await post(gateway, chat("mock/routed"))
    assert status == 200 and b"Hello from the mock" in body
    assert answered_by(upstreams) == {"a": 1, "b": 1, "c": 0}
    lines = [r.access for r in caplog.records if getattr(r, "access", None)]  # type: ignore[attr-defined]
    assert [(line["deployment"], line["attempts"], line["provider"]) for line in lines] == [("b", 2, "b")]
    assert await spent(gateway) == 1  # one request, charged once


async def test_a_retry_sends_the_whole_body_although_the_opened_call_lets_it_go(
    start: Start, upstreams: Upstreams
) -> None:
    """The handler empties the parsed body once a call is opened (a stream keeps its frames): every attempt before
    that is sent all of it."""
    upstreams["a"].handler = failing(500)
    gateway = await start()
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "word " * 2000}]
    status, _, body = await post(gateway, chat("mock/routed", stream=True, temperature=0.5) | {"messages": messages})
    assert status == 200 and b"[DONE]" in body
    sent = [upstreams[name].received[-1].body for name in ("a", "b")]
    assert [(b["model"], b["messages"], b["temperature"]) for b in sent] == [
        ("up-a", messages, 0.5), ("up-b", messages, 0.5)]


async def test_a_429_rests_its_deployment_for_retry_after(start: Start, upstreams: Upstreams) -> None:
    upstreams["a"].handler = failing(429, {"Retry-After": "30"})
    gateway = await start()
    for _ in range(3):
        status, _, _ = await post(gateway, chat("mock/routed"))
        assert status == 200
    assert answered_by(upstreams) == {"a": 1, "b": 3, "c": 0}  # a is not asked again while it rests


async def test_the_last_deployments_answer_is_passed_on_as_before(start: Start, upstreams: Upstreams) -> None:
    upstreams["a"].handler = failing(429, {"Retry-After": "1"})
    upstreams["b"].handler = failing(500)
    gateway = await start()
    status, headers, body = await post(gateway, chat("mock/routed"))
    assert answered_by(upstreams) == {"a": 1, "b": 1, "c": 0}
    assert status == 502 and b"upstream_error" in body
    status, headers, body = await post(gateway, chat("mock/solo"))  # a rests: no deployment left
    assert status == 503 and b"generation_unavailable" in body and headers["Retry-After"] == "1"
    assert answered_by(upstreams)["a"] == 1
    assert await spent(gateway) == 0


async def test_a_stream_that_dies_after_its_first_byte_is_never_retried(start: Start, upstreams: Upstreams) -> None:
    upstreams["a"].handler = dies_mid_stream
    gateway = await start()
    status, _, body = await post(gateway, chat("mock/routed", stream=True))
    assert status == 200 and b'"content": "one"' in body and b'"error"' in body
    assert answered_by(upstreams) == {"a": 1, "b": 0, "c": 0}


async def test_a_fallback_model_answers_and_is_charged_its_own_price(start: Start, upstreams: Upstreams) -> None:
    upstreams["a"].handler = failing(503)
    gateway = await start()
    status, _, body = await post(gateway, chat("mock/primary"))
    assert status == 200 and b"Hello from the mock" in body
    # mock/pricey (50) could cost more than the hold of mock/primary (3): skipped; mock/backup (1) answered.
    assert answered_by(upstreams) == {"a": 1, "b": 1, "c": 0}
    assert upstreams["b"].received[-1].body["model"] == "up-b"
    assert await spent(gateway) == 1


async def test_responses_route_retries_before_the_upstream_answered(start: Start, upstreams: Upstreams) -> None:
    upstreams["a"].handler = failing(500)
    gateway = await start()
    status, _, body = await post(gateway, {"model": "mock/routed", "prompt": "hi"}, "/v1/responses")
    assert status == 200 and b"generation.completed" in body and b"generation.failed" not in body
    assert answered_by(upstreams) == {"a": 1, "b": 1, "c": 0}


async def test_breaker_opens_half_opens_and_closes(start: Start, upstreams: Upstreams) -> None:
    upstreams["a"].handler = failing(500)
    gateway = await start(breaker={"failures": 2, "cooldown_s": 0.5})
    assert [(await post(gateway, chat("mock/solo")))[0] for _ in range(2)] == [502, 502]
    status, headers, body = await post(gateway, chat("mock/solo"))
    assert status == 503 and b"generation_unavailable" in body and headers["Retry-After"] == "1"
    assert answered_by(upstreams)["a"] == 2  # open: not called
    await asyncio.sleep(0.6)
    upstreams["a"].handler = None  # healthy again: the half-open probe succeeds and closes the breaker
    assert [(await post(gateway, chat("mock/solo")))[0] for _ in range(3)] == [200, 200, 200]
    assert answered_by(upstreams)["a"] == 5
    async with aiohttp.ClientSession() as http, http.get(f"{gateway}/metrics") as response:
        scrape = await response.text()
    assert 'edge_proxy_deployment_ejections_total{deployment="a",model="mock/solo"} 1.0' in scrape
    assert 'edge_proxy_deployment_breaker_state{deployment="a",model="mock/solo"} 0.0' in scrape


async def test_a_total_outage_is_bounded_attempts_then_fast_refusals(start: Start, upstreams: Upstreams) -> None:
    for mock in upstreams.values():
        mock.handler = failing(500)
    gateway = await start()  # shipped defaults: 3 attempts, breakers open after 5 failures in a row
    statuses = [(await post(gateway, chat("mock/three")))[0] for _ in range(30)]
    # Five requests of three attempts each open every breaker; the rest are refused without an upstream call.
    assert statuses == [502] * 5 + [503] * 25
    assert answered_by(upstreams) == {"a": 5, "b": 5, "c": 5}
    assert await spent(gateway) == 0


async def test_a_sticky_model_keeps_one_caller_on_one_deployment(start: Start, upstreams: Upstreams) -> None:
    gateway = await start()
    assert [(await post(gateway, chat("mock/sticky")))[0] for _ in range(12)] == [200] * 12
    assert sorted(answered_by(upstreams).values()) == [0, 0, 12]


async def test_each_attempt_is_its_own_client_span(start: Start, upstreams: Upstreams) -> None:
    upstreams["a"].handler = failing(500)
    spans = InMemorySpanExporter()
    gateway = await start(spans=spans)
    assert (await post(gateway, chat("mock/routed")))[0] == 200
    server = next(s for s in spans.get_finished_spans() if s.kind == SpanKind.SERVER)
    clients = [s for s in spans.get_finished_spans() if s.kind == SpanKind.CLIENT]
    assert [(s.attributes["edge_proxy.provider"], s.attributes["http.response.status_code"],
             s.attributes["edge_proxy.upstream_outcome"]) for s in clients] == [("a", 500, "error"), ("b", 200, "ok")]
    assert all(s.parent is not None and s.parent.span_id == server.context.span_id for s in clients)
    for name, span in zip("ab", clients):  # each upstream saw its own attempt's span as its parent
        assert upstreams[name].received[-1].headers["traceparent"].split("-")[2] == format(span.context.span_id, "016x")


async def test_a_burst_into_a_total_outage_is_bounded_by_max_attempts_then_refused_at_once(
    start: Start, upstreams: Upstreams
) -> None:
    async def slow_500(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        await asyncio.sleep(0.05)  # the burst's calls overlap: breakers learn only as answers come back
        return web.json_response({"error": {"message": "down"}}, status=500)

    for mock in upstreams.values():
        mock.handler = slow_500
    gateway = await start()
    burst = await asyncio.gather(*(post(gateway, chat("mock/three")) for _ in range(20)))
    assert {status for status, _, _ in burst} <= {502, 503}
    calls = sum(answered_by(upstreams).values())
    assert calls <= 20 * 3  # never more than max_attempts per request
    after = await asyncio.gather(*(post(gateway, chat("mock/three")) for _ in range(20)))
    assert [status for status, _, _ in after] == [503] * 20  # every breaker is open: no upstream call at all
    assert sum(answered_by(upstreams).values()) == calls


async def test_an_answer_that_spends_the_quota_rests_its_deployment_until_the_reset(
    start: Start, upstreams: Upstreams
) -> None:
    async def last_of_the_quota(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        response = await upstreams["a"].default(request, body)
        response.headers.update({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "6m0s"})
        return response

    upstreams["a"].handler = last_of_the_quota
    gateway = await start()
    assert [(await post(gateway, chat("mock/routed")))[0] for _ in range(3)] == [200, 200, 200]
    assert answered_by(upstreams) == {"a": 1, "b": 2, "c": 0}  # no sure 429 collected from a
    async with aiohttp.ClientSession() as http, http.get(f"{gateway}/metrics") as response:
        scrape = await response.text()
    assert 'edge_proxy_deployment_quota_remaining{deployment="a",model="mock/routed"} 0.0' in scrape


@pytest.mark.parametrize("remaining", ["\u00b2", "9" * 5000, "-1", "1.5", "\u0661"])
async def test_an_unreadable_quota_header_is_ignored_not_a_500(
    start: Start, upstreams: Upstreams, remaining: str
) -> None:
    """A provider's remaining quota that int() cannot take (a superscript digit, past Python's 4,300-digit limit)
    or that is no plain count is not a quota: the answer is relayed and the deployment keeps serving."""

    async def odd_quota(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        response = await upstreams["a"].default(request, body)
        response.headers["x-ratelimit-remaining-requests"] = remaining
        return response

    upstreams["a"].handler = odd_quota
    gateway = await start()
    assert [(await post(gateway, chat("mock/routed")))[0] for _ in range(2)] == [200, 200]
    assert answered_by(upstreams) == {"a": 2, "b": 0, "c": 0}


async def test_a_client_leaving_while_a_fallback_works_pays_the_fallbacks_price(
    start: Start, upstreams: Upstreams
) -> None:
    async def thinks(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        await asyncio.sleep(1)  # longer than the client waits
        return web.json_response({})

    upstreams["a"].handler = failing(503)
    upstreams["b"].handler = thinks
    gateway = await start()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.5)) as http:
        with pytest.raises(asyncio.TimeoutError):
            await http.post(f"{gateway}/v1/chat/completions", json=chat("mock/primary"), headers=AUTH)
    assert answered_by(upstreams) == {"a": 1, "b": 1, "c": 0}
    assert await spent(gateway) == 1  # the cut call's estimate at mock/backup's price, not mock/primary's (3)


async def test_a_latency_model_sends_its_calls_to_the_deployment_whose_headers_come_first(
    start: Start, upstreams: Upstreams
) -> None:
    upstreams["a"].handler = slowed(upstreams["a"], 0.2)
    gateway = await start(latency_explore=0)  # no exploring: the order is the measured one
    assert [(await post(gateway, chat("mock/fastest")))[0] for _ in range(10)] == [200] * 10
    assert answered_by(upstreams) == {"a": 1, "b": 9, "c": 0}  # a is measured once, then b is always faster


async def test_a_deployment_slower_than_max_latency_s_is_ejected_then_probed_back(
    start: Start, upstreams: Upstreams
) -> None:
    upstreams["a"].handler = slowed(upstreams["a"], 0.3)
    gateway = await start(breaker={"max_latency_s": 0.15, "latency_samples": 2, "cooldown_s": 0.5})
    assert [(await post(gateway, chat("mock/solo")))[0] for _ in range(3)] == [200, 200, 503]
    assert answered_by(upstreams)["a"] == 2  # ejected after two slow answers: not called
    await asyncio.sleep(0.6)
    upstreams["a"].handler = None  # fast again: the half-open probe closes the breaker
    assert [(await post(gateway, chat("mock/solo")))[0] for _ in range(3)] == [200, 200, 200]
    async with aiohttp.ClientSession() as http, http.get(f"{gateway}/metrics") as response:
        scrape = await response.text()
    assert 'edge_proxy_deployment_ejections_total{deployment="a",model="mock/solo"} 1.0' in scrape
    assert 'edge_proxy_deployment_breaker_state{deployment="a",model="mock/solo"} 0.0' in scrape


async def test_a_plan_allowing_pricier_fallbacks_holds_for_the_dearest_and_pays_the_one_that_answered(
    start: Start, upstreams: Upstreams
) -> None:
    upstreams["a"].handler = failing(503)
    gateway = await start(plan_lines=("fallbacks: {allow_pricier: true}",))
    status, _, body = await post(gateway, chat("mock/primary"))
    assert status == 200 and b"Hello from the mock" in body
    assert answered_by(upstreams) == {"a": 1, "b": 0, "c": 1}  # mock/pricey (50) answered: it comes first
    assert upstreams["c"].received[-1].body["model"] == "up-c"
    assert await spent(gateway) == 50  # charged at the price of the model that answered
    upstreams["a"].handler = None
    assert (await post(gateway, chat("mock/primary")))[0] == 200
    assert await spent(gateway) == 50 + 3  # the primary answered: its own price, the rest of the hold released


async def test_a_budget_that_cannot_hold_the_pricier_fallback_refuses_the_call_up_front(
    start: Start, upstreams: Upstreams
) -> None:
    gateway = await start(plan_lines=("fallbacks: {allow_pricier: true}",), budget=10)
    status, _, body = await post(gateway, chat("mock/primary"))  # mock/primary (3) fits, mock/pricey (50) not
    assert status == 402 and b"insufficient_credits" in body
    assert answered_by(upstreams) == {"a": 0, "b": 0, "c": 0}
    assert (await post(gateway, chat("mock/backup")))[0] == 200  # a model with no pricier fallback still fits
