"""The official `openai` Node SDK's chat completions to an Anthropic and a Gemini model, translated by the gateway:
JSON, streaming, a tool call (whole and streamed), a provider's 429; against the mocks speaking each wire format,
metered from the provider's usage on a real redis-server. One Node process serves the whole module."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator

import pytest
import redis.asyncio as aioredis
from aiohttp import web

from proxy.server import RunningServer

from . import mock_anthropic, mock_gemini
from .gateway_harness import (
    TEST_KEY, TOKEN_PRICE, MeteredGateway, budget_policy, gateway_config, start_gateway, token_cost, with_text_model, write_policy,
)
from .mock_provider import Handler, LoopbackMock, MockProvider
from .openai_node import NodeChatClient
from .test_anthropic_translate import answer_with, tool_stream_events

MESSAGES = [{"role": "user", "content": "Hi"}]
TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]


def streamed(events: Callable[[str], list[bytes]], opens: Callable[[web.Request], Any]) -> Handler:
    """A mock handler that streams `events(model)` (the model from the body, else from the path)."""
    async def answer(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        response = await opens(request)
        for raw in events(body.get("model") or request.match_info["model"]):
            await response.write(raw)
        return response
    return answer


def replying(answer: Callable[[], web.Response]) -> Handler:
    """A mock handler that replies `answer()` (a fresh response per call)."""
    async def reply(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        return answer()
    return reply


GEMINI_CALL = {"functionCall": {"name": "weather", "args": {"city": "Paris"}}}


@dataclass(frozen=True)
class Translated:
    """A provider kind behind the translation, its mock and what the mock answers."""
    kind: str
    model: str
    upstream_model: str
    mock: Callable[[], LoopbackMock]
    base_path: str  # appended to the mock's URL for the provider's base_url
    texts: tuple[str, ...]
    input_tokens: int
    output_tokens: int
    usage_details: dict[str, Any]  # the OpenAI usage's *_details the provider's figures fill
    tool_call: Handler
    streamed_tool_call: Handler
    rate_limited: Callable[[], web.Response]
    rate_limit_message: str
    retry_after: str | None  # what the mock's 429 asks, relayed to the SDK


ANTHROPIC_INPUT = sum(v for k, v in mock_anthropic.USAGE.items() if k != "output_tokens")
GEMINI_INPUT = mock_gemini.USAGE["promptTokenCount"] + mock_gemini.USAGE["toolUsePromptTokenCount"]
PROVIDERS = [
    Translated(
        "anthropic", "mock/claude", "claude-up", mock_anthropic.MockAnthropic, "", ("Hello", " from", " Claude"),
        ANTHROPIC_INPUT, mock_anthropic.USAGE["output_tokens"],
        {"prompt_tokens_details": {"cached_tokens": mock_anthropic.USAGE["cache_read_input_tokens"]}},
        answer_with([{"type": "text", "text": "Let me look."},
                     {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}}], "tool_use"),
        streamed(tool_stream_events, mock_anthropic.open_stream),
        lambda: mock_anthropic.error_response(429, "rate_limit_error", "Too many tokens", **{"retry-after": "7"}),
        "Too many tokens", "7",
    ),
    Translated(
        "gemini", "mock/gemini", "gemini-up", mock_gemini.MockGemini, "/v1beta", ("Hello", " from", " Gemini"),
        GEMINI_INPUT, mock_gemini.USAGE["candidatesTokenCount"] + mock_gemini.USAGE["thoughtsTokenCount"],
        {"prompt_tokens_details": {"cached_tokens": 0},
         "completion_tokens_details": {"reasoning_tokens": mock_gemini.USAGE["thoughtsTokenCount"]}},
        replying(lambda: web.json_response(mock_gemini.response("gemini-up", [{"text": "Let me look."}, GEMINI_CALL],
                                                                mock_gemini.USAGE))),
        streamed(lambda model: [mock_gemini.text_event(model, "Let me look."),
                                mock_gemini.event(mock_gemini.response(model, [GEMINI_CALL], mock_gemini.USAGE))],
                 mock_gemini.open_stream),
        lambda: mock_gemini.error_response(429, "RESOURCE_EXHAUSTED", "You exceeded your current quota."),
        "You exceeded your current quota.", None,
    ),
]


class Env(MeteredGateway):
    def __init__(self, url: str, upstream: LoopbackMock, provider: Translated) -> None:
        super().__init__(url, {"Authorization": f"Bearer {TEST_KEY}"})
        self.upstream, self.provider = upstream, provider

    def charge(self) -> int:
        """What one call answered with the mock's usage costs."""
        return token_cost(self.provider.input_tokens, self.provider.output_tokens)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeChatClient]:
    with (tmp_path_factory.mktemp("node") / "stderr").open("wb") as stderr:
        client = NodeChatClient(stderr)
        yield client
        client.close()


@pytest.fixture(params=PROVIDERS, ids=lambda p: p.kind)
async def env(request: pytest.FixtureRequest, provider: MockProvider, gateway_env: None, tmp_path: Path,
              redis_url: str) -> AsyncIterator[Env]:
    translated: Translated = request.param
    async with aioredis.from_url(redis_url) as client:
        await client.flushdb()
    upstream = await translated.mock().start()
    policy = write_policy(tmp_path / "policies", budget_policy(1_000_000, {translated.model: TOKEN_PRICE}))
    config = with_text_model(
        gateway_config(provider.url, policy, store={"kind": "redis", "redis_url": redis_url}),
        translated.kind, translated.kind, upstream.url + translated.base_path, translated.model,
        translated.upstream_model, 500,
    )
    server: RunningServer = await start_gateway(config)
    yield Env(server.url, upstream, translated)
    await server.stop()
    await upstream.stop()


def delta_texts(chunks: list[dict[str, Any]]) -> list[str]:
    return [c["choices"][0]["delta"]["content"] for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]


def finish_reasons(chunks: list[dict[str, Any]]) -> list[str]:
    return [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]


def joined_tool_calls(chunks: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(name, arguments) per tool call index, the streamed fragments joined as a client must."""
    calls: dict[int, list[str]] = {}
    for chunk in chunks:
        for call in (chunk["choices"][0]["delta"].get("tool_calls") or []) if chunk["choices"] else []:
            name, arguments = calls.setdefault(call["index"], ["", ""])
            calls[call["index"]] = [name + (call["function"].get("name") or ""),
                                    arguments + (call["function"].get("arguments") or "")]
    return [(name, arguments) for name, arguments in calls.values()]


async def test_node_chat_is_translated_and_charged_the_providers_usage(env: Env, node: NodeChatClient) -> None:
    got = await node.create(f"{env.url}/v1", model=env.provider.model, messages=MESSAGES)
    completion = got["completion"]
    assert completion["object"] == "chat.completion" and completion["model"] == env.provider.upstream_model
    choice = completion["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"] == "".join(env.provider.texts)
    assert choice["finish_reason"] == "stop"
    usage = env.provider.input_tokens, env.provider.output_tokens
    assert completion["usage"] == {"prompt_tokens": usage[0], "completion_tokens": usage[1], "total_tokens": sum(usage),
                                   **env.provider.usage_details}
    assert await env.spent() == env.charge()


async def test_node_stream_is_translated_with_the_usage_asked_for(env: Env, node: NodeChatClient) -> None:
    got = await node.create(f"{env.url}/openai/v1", model=env.provider.model, messages=MESSAGES, stream=True,
                            stream_options={"include_usage": True})
    chunks = got["chunks"]
    assert "error" not in got and chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert delta_texts(chunks) == list(env.provider.texts)
    assert finish_reasons(chunks) == ["stop"]
    assert chunks[-1]["choices"] == []
    usage = env.provider.input_tokens, env.provider.output_tokens
    assert chunks[-1]["usage"] == {"prompt_tokens": usage[0], "completion_tokens": usage[1], "total_tokens": sum(usage),
                                   **env.provider.usage_details}
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == env.provider.upstream_model for c in chunks)
    assert await env.spent() == env.charge()


async def test_node_tool_call_is_translated(env: Env, node: NodeChatClient) -> None:
    env.upstream.handler = env.provider.tool_call
    got = await node.create(f"{env.url}/v1", model=env.provider.model, messages=MESSAGES, tools=TOOLS)
    choice = got["completion"]["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == "Let me look."
    [call] = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"]
    assert (call["function"]["name"], json.loads(call["function"]["arguments"])) == ("weather", {"city": "Paris"})
    assert await env.spent() == env.charge()


async def test_node_streamed_tool_call_arrives_in_fragments_that_join(env: Env, node: NodeChatClient) -> None:
    env.upstream.handler = env.provider.streamed_tool_call
    got = await node.create(f"{env.url}/v1", model=env.provider.model, messages=MESSAGES, tools=TOOLS, stream=True)
    chunks = got["chunks"]
    assert "error" not in got and delta_texts(chunks) == ["Let me look."]
    [(name, arguments)] = joined_tool_calls(chunks)
    assert (name, json.loads(arguments)) == ("weather", {"city": "Paris"})
    assert finish_reasons(chunks) == ["tool_calls"]
    assert await env.spent() == env.charge()


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_node_sdk_raises_rate_limit_error_for_the_providers_429(env: Env, node: NodeChatClient, stream: bool) -> None:
    env.upstream.handler = replying(env.provider.rate_limited)
    got = await node.create(f"{env.url}/v1", model=env.provider.model, messages=MESSAGES, stream=stream)
    assert got["error"] == {
        "name": "RateLimitError", "status": 429, "code": "rate_limit", "type": "rate_limit_error", "param": None,
        "message": f"429 the provider refused the call: {env.provider.rate_limit_message}",
        "retryAfter": env.provider.retry_after,
    }
    assert got.get("chunks", []) == [] and "completion" not in got
    assert len(env.upstream.received) == 1  # the SDK did not retry (maxRetries 0) and the gateway did not either
    assert await env.spent() == 0
