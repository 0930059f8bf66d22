"""Azure OpenAI (kind azure_openai) through the official openai SDK: deployment URLs, api-version, the api-key
header or an Entra bearer token re-read from its file, routing across kinds of one dialect, metering exact."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import openai
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from proxy.server import RunningServer
from tests.gateway_harness import PROVIDER_KEY, TEST_KEY, TOKEN_PRICE, budget_policy, gateway_config, start_gateway, write_policy
from tests.mock_provider import MockProvider, Received
from tests.test_metering_e2e import chat_cost, settled_balance

PRICES = {"mock/chat": TOKEN_PRICE}
BUDGET = 1_000_000
DEPLOYMENT = "gpt-4o-mini-prod"
NOT_FOUND = {"error": {"code": "404", "message": "Resource not found"}}
DENIED = {"error": {"code": "401", "message": "Access denied due to invalid subscription key or wrong API endpoint. "
                    "Make sure to provide a valid key for an active subscription and use a correct regional API "
                    "endpoint for your resource."}}


class MockAzure:
    """An Azure OpenAI resource on loopback: answers only `/openai/deployments/<DEPLOYMENT>/...` with the expected
    api-version and credential (Azure's 404 and 401 bodies otherwise); answers are OpenAI's (MockProvider's)."""

    def __init__(self, api_version: str, accepts: Callable[[dict[str, str]], bool]) -> None:
        self.api_version, self.accepts = api_version, accepts
        self.openai = MockProvider()
        self.received: list[Received] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> "MockAzure":
        app = web.Application()
        app.router.add_post("/openai/deployments/{deployment}/{tail:.*}", self._dispatch)
        app.router.add_post("/openai/responses", self._dispatch)  # not per deployment: the deployment is `model`
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        return self

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.received.append(Received(request.path_qs, dict(request.headers), body))
        deployment = request.match_info.get("deployment", body.get("model"))
        if deployment != DEPLOYMENT or request.query.get("api-version") != self.api_version:
            return web.json_response(NOT_FOUND, status=404)
        if not self.accepts(dict(request.headers)):
            return web.json_response(DENIED, status=401)
        return await self.openai.default(request, body)


def azure_config(azure_url: str, openai_url: str, policies: Path, **provider: Any) -> dict[str, Any]:
    config = gateway_config(openai_url, policies, store={"kind": "redis", "redis_url": ""})
    config["providers"]["azure"] = {"kind": "azure_openai", "base_url": azure_url, "api_key_env": "MOCK_PROVIDER_KEY",
                                    "timeouts": {"connect_s": 2, "first_byte_s": 2, "idle_s": 2, "total_s": 30},
                                    **provider}
    config["models"][0] = {**config["models"][0], "provider": "azure", "upstream_model": DEPLOYMENT}
    return config


Start = Callable[..., Awaitable[tuple[str, MockAzure]]]


@pytest.fixture
async def start_azure(
    provider: MockProvider, gateway_env: None, tmp_path: Path, redis_url: str
) -> AsyncIterator[Start]:
    """A gateway on a freshly flushed redis-server whose mock/chat is an Azure deployment."""
    async with aioredis.from_url(redis_url) as client:
        await client.flushdb()
    servers: list[RunningServer] = []
    mocks: list[MockAzure] = []

    async def start(expect_version: str = "2024-10-21", accepts: Callable[[dict[str, str]], bool] | None = None,
                    edit: Callable[[dict[str, Any]], None] = lambda c: None, **provider_settings: Any
                    ) -> tuple[str, MockAzure]:
        mock = await MockAzure(expect_version, accepts or (lambda h: h.get("api-key") == PROVIDER_KEY)).start()
        mocks.append(mock)
        config = azure_config(mock.url, provider.url, write_policy(tmp_path / "policies", budget_policy(BUDGET, PRICES)),
                              **provider_settings)
        config["store"] = {"kind": "redis", "redis_url": redis_url}
        edit(config)
        servers.append(await start_gateway(config))
        return servers[-1].url, mock

    yield start
    for server in servers:
        await server.stop()
    for mock in mocks:
        assert mock.runner is not None
        await mock.runner.cleanup()


def sdk(gateway: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{gateway}/v1", api_key=TEST_KEY, max_retries=0, timeout=10)


async def test_json_and_stream_reach_the_deployment_url_with_api_version_and_api_key(start_azure: Start) -> None:
    gateway, azure = await start_azure()
    async with sdk(gateway) as client:
        answer = await client.chat.completions.create(model="mock/chat", messages=[{"role": "user", "content": "hi"}])
        stream = await client.chat.completions.create(
            model="mock/chat", messages=[{"role": "user", "content": "hi"}], stream=True)
        chunks = [chunk async for chunk in stream]
    assert answer.choices[0].message.content == "Hello from the mock"
    assert answer.usage is not None and (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (7, 4)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello from the mock"
    assert all(c.usage is None for c in chunks)  # the usage chunk the gateway asked for is not the client's
    expected = f"/openai/deployments/{DEPLOYMENT}/chat/completions?api-version=2024-10-21"
    assert [r.path for r in azure.received] == [expected, expected]
    for received in azure.received:
        assert received.headers["api-key"] == PROVIDER_KEY and "Authorization" not in received.headers
    assert azure.received[1].body["stream_options"] == {"include_usage": True}
    state = await settled_balance(gateway)
    assert (state["spent"], state["held"]) == (2 * chat_cost(7, 4), 0)


async def test_api_version_comes_from_the_provider_config(start_azure: Start) -> None:
    gateway, azure = await start_azure(expect_version="2025-01-01-preview", api_version="2025-01-01-preview")
    async with sdk(gateway) as client:
        answer = await client.chat.completions.create(model="mock/chat", messages=[{"role": "user", "content": "x"}])
    assert answer.choices[0].finish_reason == "stop"
    assert azure.received[0].path.endswith("?api-version=2025-01-01-preview")


async def test_entra_bearer_token_is_read_from_its_file_and_re_read_when_it_changes(
    start_azure: Start, tmp_path: Path
) -> None:
    token = tmp_path / "entra-token"
    token.write_text("eyJ0eXAiOiJKV1QiLCJhbGciOi.first\n")
    valid = {"Bearer eyJ0eXAiOiJKV1QiLCJhbGciOi.first", "Bearer eyJ0eXAiOiJKV1QiLCJhbGciOi.second"}
    gateway, azure = await start_azure(
        accepts=lambda h: h.get("Authorization") in valid and "api-key" not in h,
        api_key_env=None, api_key_file=str(token), auth_scheme="Bearer")
    async with sdk(gateway) as client:
        await client.chat.completions.create(model="mock/chat", messages=[{"role": "user", "content": "x"}])
        replacement = tmp_path / "entra-token.new"  # written aside and renamed over: how token refreshers swap it
        replacement.write_text("eyJ0eXAiOiJKV1QiLCJhbGciOi.second\n")
        replacement.replace(token)
        await asyncio.sleep(1.1)  # the file is looked at at most once a second
        await client.chat.completions.create(model="mock/chat", messages=[{"role": "user", "content": "x"}])
        token.unlink()  # gone mid-rotation: the last token read stays in use
        await asyncio.sleep(1.1)
        await client.chat.completions.create(model="mock/chat", messages=[{"role": "user", "content": "x"}])
    assert [r.headers["Authorization"] for r in azure.received] == [
        "Bearer eyJ0eXAiOiJKV1QiLCJhbGciOi.first"] + 2 * ["Bearer eyJ0eXAiOiJKV1QiLCJhbGciOi.second"]


async def test_a_model_served_by_openai_and_azure_deployments_fails_over_across_kinds(
    start_azure: Start, provider: MockProvider
) -> None:
    async def overloaded(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        return web.json_response({"error": {"message": "overloaded", "type": "server_error"}}, status=503)

    provider.handler = overloaded

    def both(config: dict[str, Any]) -> None:
        chat = config["models"][0]
        del chat["provider"], chat["upstream_model"]
        chat["deployments"] = [{"provider": "mock", "upstream_model": "gpt-4o-mini", "weight": 1000},
                               {"provider": "azure", "upstream_model": DEPLOYMENT, "weight": 0.001}]

    gateway, azure = await start_azure(edit=both)
    async with sdk(gateway) as client:
        stream = await client.chat.completions.create(
            model="mock/chat", messages=[{"role": "user", "content": "hi"}], stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "Hello from the mock"
    assert [r.body["model"] for r in provider.received] == ["gpt-4o-mini"]  # tried first: the heavier weight
    assert len(azure.received) == 1 and DEPLOYMENT in azure.received[0].path
    state = await settled_balance(gateway)
    assert state["spent"] == chat_cost(7, 4)


async def test_a_wrong_key_is_the_providers_401_and_charges_nothing(start_azure: Start) -> None:
    gateway, _ = await start_azure(accepts=lambda h: False)
    async with sdk(gateway) as client:
        with pytest.raises(openai.AuthenticationError) as refused:
            await client.chat.completions.create(model="mock/chat", messages=[{"role": "user", "content": "x"}])
    assert PROVIDER_KEY not in str(refused.value.body)
    state = await settled_balance(gateway)
    assert (state["spent"], state["held"]) == (0, 0)


async def test_the_responses_api_goes_to_the_resources_responses_path_with_the_deployment_as_model(
    start_azure: Start
) -> None:
    gateway, azure = await start_azure()
    async with openai.AsyncOpenAI(base_url=f"{gateway}/openai/v1", api_key=TEST_KEY, max_retries=0) as client:
        answer = await client.responses.create(model="mock/chat", input="hi", max_output_tokens=20)
    assert answer.output_text == "Hello from the mock"
    [received] = azure.received
    assert received.path == "/openai/responses?api-version=2024-10-21" and received.body["model"] == DEPLOYMENT
    assert received.headers["api-key"] == PROVIDER_KEY
    state = await settled_balance(gateway)
    assert (state["spent"], state["held"]) == (chat_cost(7, 4), 0)
