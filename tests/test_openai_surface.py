"""OpenAI-SDK compatibility of the gateway's own surface: the official `openai` SDK from the documented base URLs
(`<gateway>/openai/v1`, and `<gateway>/v1` for what both surfaces share), next to the seeds' plain clients."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import AsyncIterator

import aiohttp
import openai
import pytest
import redis.asyncio as aioredis

from tests.gateway_harness import TEST_KEY, TOKEN_PRICE, budget_policy, gateway_config, start_gateway, write_policy
from tests.mock_provider import MockProvider

AUTH = {"Authorization": f"Bearer {TEST_KEY}"}
MOCK_IDS = ["mock/chat", "mock/embed", "mock/image", "mock/speech"]


def sdk(base_url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url, api_key=TEST_KEY, max_retries=0, timeout=10)


async def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, object]:
    async with aiohttp.ClientSession() as http:
        async with http.get(url, headers=AUTH if headers is None else headers) as r:
            return r.status, await r.json()


async def test_openai_sdk_lists_and_retrieves_models_from_both_base_urls(gateway: str) -> None:
    for base_url in (f"{gateway}/openai/v1", f"{gateway}/v1"):
        async with sdk(base_url) as client:
            listed = [m async for m in client.models.list()]
            one = await client.models.retrieve("mock/image")  # the SDK sends the id's slash as %2F
        assert [m.id for m in listed] == MOCK_IDS, base_url
        assert {(m.object, m.owned_by, m.created) for m in listed} == {("model", "Tests", 0)}
        assert (one.id, one.object, one.owned_by) == ("mock/image", "model", "Tests")
        assert one.model_extra == {"name": "Mock Image", "capability": "text2image"}


async def test_v1_models_keeps_the_seeds_shapes_unless_openai_is_asked_for(gateway: str) -> None:
    status, flat = await get(f"{gateway}/v1/models")
    assert status == 200 and flat == [
        {"id": "mock/chat", "name": "Mock Chat", "creator": "Tests", "capability": "text2text"},
        {"id": "mock/embed", "name": "Mock Embed", "creator": "Tests", "capability": "text2text"},
        {"id": "mock/image", "name": "Mock Image", "creator": "Tests", "capability": "text2image"},
        {"id": "mock/speech", "name": "Mock Speech", "creator": "Tests", "capability": "text2speech"},
    ]
    status, listed = await get(f"{gateway}/v1/models?format=openai")
    assert status == 200 and listed == {"object": "list", "data": [
        {"id": m["id"], "object": "model", "created": 0, "owned_by": m["creator"], "name": m["name"],
         "capability": m["capability"]} for m in flat  # type: ignore[index, union-attr]
    ]}
    # The SDK's User-Agent picks OpenAI's shape; an explicit format=gateway or groupBy wins over it.
    sdk_agent = {**AUTH, "User-Agent": "OpenAI/JS 6.9.1"}
    assert (await get(f"{gateway}/v1/models", sdk_agent)) == (200, listed)
    assert (await get(f"{gateway}/v1/models?format=gateway", sdk_agent)) == (200, flat)
    status, grouped = await get(f"{gateway}/v1/models?groupBy=capability", sdk_agent)
    assert status == 200 and list(grouped) == ["text2image", "text2text", "text2speech"]  # type: ignore[arg-type]
    # Another Stainless-built SDK (same X-Stainless-* headers) keeps the seeds' array.
    other = {**AUTH, "User-Agent": "Anthropic/Python 0.70.0", "X-Stainless-Lang": "python"}
    assert (await get(f"{gateway}/v1/models", other)) == (200, flat)
    assert (await get(f"{gateway}/v1/models/mock/chat?format=openai"))[1] == listed["data"][0]  # type: ignore[index]
    assert (await get(f"{gateway}/v1/models/mock/chat"))[1] == flat[0]  # type: ignore[index]


async def test_capability_filter_in_every_shape(gateway: str) -> None:
    assert await get(f"{gateway}/v1/models?capability=text2image") == (
        200, [{"id": "mock/image", "name": "Mock Image", "creator": "Tests", "capability": "text2image"}])
    status, grouped = await get(f"{gateway}/v1/models?capability=text2text&groupBy=capability")
    assert status == 200 and {k: [m["id"] for m in v] for k, v in grouped.items()} == {  # type: ignore[union-attr]
        "text2text": ["mock/chat", "mock/embed"]}
    status, listed = await get(f"{gateway}/openai/v1/models?capability=text2speech")
    assert status == 200 and [m["id"] for m in listed["data"]] == ["mock/speech"]  # type: ignore[index]
    assert await get(f"{gateway}/v1/models?capability=image2video") == (200, [])  # known, none configured


@pytest.mark.parametrize("query, param", [
    ("capability=text2everything", "capability"),
    ("capability=", "capability"),
    ("format=xml", "format"),
    ("groupBy=creator", "groupBy"),
    ("groupBy=capability&format=openai", "groupBy"),
])
async def test_bad_model_queries_are_400_naming_the_parameter(gateway: str, query: str, param: str) -> None:
    for path in ("/v1/models", "/openai/v1/models"):
        if path.startswith("/openai") and param != "capability":
            continue  # /openai/v1/models has one shape: format and groupBy are not its parameters
        status, body = await get(f"{gateway}{path}?{query}")
        assert status == 400, (path, query)
        assert (body["error"]["code"], body["error"]["param"]) == ("invalid_request", param)  # type: ignore[index]
    # Credentials are checked before the query: no hint to a caller without them.
    status, body = await get(f"{gateway}/v1/models?{query}", {})
    assert (status, body["error"]["code"]) == (401, "missing_credentials")  # type: ignore[index]


async def test_openai_sdk_errors_on_models_are_openai_errors(gateway: str) -> None:
    async with sdk(f"{gateway}/openai/v1") as client:
        with pytest.raises(openai.NotFoundError) as missing:
            await client.models.retrieve("no/such-model")
        with pytest.raises(openai.BadRequestError) as bad:
            await client.models.list(extra_query={"capability": "smell2text"})
    assert missing.value.code == "model_not_found" and missing.value.type == "not_found_error"
    assert bad.value.code == "invalid_request" and bad.value.param == "capability"
    async with openai.AsyncOpenAI(base_url=f"{gateway}/openai/v1", api_key="sk_wrong", max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError):
            await client.models.list()


@pytest.fixture
async def every_kind(provider: MockProvider, gateway_env: None, tmp_path: Path) -> AsyncIterator[str]:
    """A gateway with a provider of each kind: OpenAI-format (`openai`, and `http` its old name), the built-in
    demo, and Anthropic."""
    policy = 'plans:\n  demo:\n    models: ["*"]\nprices:\n  "*": {per_request: 0}\n'
    config = gateway_config(provider.url, write_policy(tmp_path / "policies", policy))
    config["providers"]["demo"] = {"kind": "demo"}
    config["providers"]["claude"] = {"kind": "anthropic", "base_url": provider.url, "api_key_env": "MOCK_PROVIDER_KEY"}
    config["providers"]["oai"] = {"kind": "openai", "base_url": provider.url, "api_key_env": "MOCK_PROVIDER_KEY"}
    config["models"] += [
        {"id": f"{name}/chat", "name": f"{name} chat", "creator": name, "capability": "text2text",
         "provider": name, "upstream_model": "up"} for name in ("demo", "claude", "oai")
    ]
    server = await start_gateway(config)
    yield server.url
    await server.stop()


async def test_models_of_every_provider_kind_are_listed(every_kind: str) -> None:
    ids = ["mock/chat", "mock/embed", "demo/chat", "claude/chat", "oai/chat"]
    status, flat = await get(f"{every_kind}/v1/models?capability=text2text")
    assert status == 200 and [m["id"] for m in flat] == ids  # type: ignore[index]
    async with sdk(f"{every_kind}/openai/v1") as client:
        assert [m.id async for m in client.models.list(extra_query={"capability": "text2text"})] == ids
        assert (await client.models.retrieve("claude/chat")).owned_by == "claude"


METERED_POLICY = budget_policy(1_000_000, {"mock/chat": TOKEN_PRICE})


@pytest.fixture
async def metered(provider: MockProvider, gateway_env: None, tmp_path: Path, redis_url: str) -> AsyncIterator[str]:
    """A gateway on a freshly flushed real Redis store, mock/chat priced per token."""
    async with aioredis.from_url(redis_url) as client:
        await client.flushdb()
    config = gateway_config(provider.url, write_policy(tmp_path / "policies", METERED_POLICY),
                            store={"kind": "redis", "redis_url": redis_url})
    server = await start_gateway(config)
    yield server.url
    await server.stop()


async def spent_once_settled(gateway: str) -> int:
    """The account's credits spent, once nothing is held any more (a settle may end after the answer)."""
    for _ in range(100):
        status, me = await get(f"{gateway}/v1/me")
        balance = me["balance"]  # type: ignore[index]
        if balance["held"] == 0:
            return balance["spent"]
        await asyncio.sleep(0.05)
    raise AssertionError(f"credits still held: {balance}")


async def test_openai_sdk_calls_every_generation_route_under_openai_v1(metered: str, provider: MockProvider) -> None:
    async with sdk(f"{metered}/openai/v1") as client:
        chat = await client.chat.completions.create(model="mock/chat", messages=[{"role": "user", "content": "hi"}])
        assert chat.choices[0].message.content == "Hello from the mock"
        assert await spent_once_settled(metered) == 1 + 7 + 2 * 4  # the mock's usage: 7 in, 4 out
        stream = await client.chat.completions.create(
            model="mock/chat", messages=[{"role": "user", "content": "hi"}], stream=True)
        assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices]) == "Hello from the mock"
        assert await spent_once_settled(metered) == 2 * (1 + 7 + 2 * 4)
        embedded = await client.embeddings.create(model="mock/embed", input="hi")
        assert embedded.data[0].embedding == [0.5, 0.25]
        image = await client.images.generate(model="mock/image", prompt="a cat")
        assert image.data and image.data[0].url == "http://127.0.0.1/img.png"
        speech = await client.audio.speech.create(model="mock/speech", input="hi", voice="alloy")
        assert speech.content.startswith(b"RIFF")
        completion = await client.completions.create(model="mock/chat", prompt="hi", max_tokens=5)
        assert completion.usage is not None and completion.usage.completion_tokens == 4
    assert [(r.path, r.body["model"]) for r in provider.received] == [
        ("/v1/chat/completions", "mock-up"), ("/v1/chat/completions", "mock-up"), ("/v1/embeddings", "mock-embed"),
        ("/v1/images/generations", "mock-image"), ("/v1/audio/speech", "mock-tts"), ("/v1/completions", "mock-up"),
    ]
    # The same bounds as on /v1: the streamed call asked for its usage, the output was capped for the reservation.
    assert provider.received[1].body["stream_options"] == {"include_usage": True}
    assert provider.received[5].body["max_tokens"] == 5


async def test_openai_v1_refusals_are_openai_errors_the_sdk_raises(metered: str) -> None:
    async with sdk(f"{metered}/openai/v1") as client:
        with pytest.raises(openai.NotFoundError) as unknown:
            await client.chat.completions.create(model="no/such", messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(openai.BadRequestError) as bad:
            await client.chat.completions.create(model="mock/chat", messages=[], max_tokens=-1)
        with pytest.raises(openai.NotFoundError) as no_route:
            await client.files.list()
    assert (unknown.value.code, unknown.value.type) == ("model_not_found", "not_found_error")
    assert (bad.value.code, bad.value.param) == ("invalid_request", "max_tokens")
    assert no_route.value.code == "not_found"
    assert await spent_once_settled(metered) == 0
