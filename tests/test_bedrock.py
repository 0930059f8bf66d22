"""Bedrock (kind bedrock) through the official openai SDK on /v1/chat/completions: Converse and ConverseStream
translated both ways, SigV4 checked by the mock, event-stream framing decoded by botocore, metering exact on a
real redis-server, errors in OpenAI's shape, cut streams, client disconnects and no buffering."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import aiohttp
import openai
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from botocore.credentials import RefreshableCredentials
from botocore.eventstream import EventStreamBuffer

from proxy.config import ConfigError, parse_config
from proxy.server import RunningServer
from proxy.upstream.aws import AwsSigner
from tests.gateway_harness import TEST_KEY, TOKEN_PRICE, budget_policy, gateway_config, start_gateway, write_policy
from tests.mock_bedrock import (
    ACCESS_KEY, REGION, SECRET_KEY, MockBedrock, error_response, event, exception, frame, open_event_stream,
    text_events, wait_for,
)
from tests.test_metering_e2e import chat_cost, settled_balance

MODEL_ID = "anthropic.claude-3-haiku-20240307-v1:0"
PRICES = {"mock/chat": TOKEN_PRICE}
BUDGET = 1_000_000
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Static test credentials through the standard chain's env step; nothing else of the machine's is read."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE",
                 "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


Start = Callable[..., Awaitable[str]]


@pytest.fixture
async def bedrock() -> AsyncIterator[MockBedrock]:
    mock = await MockBedrock().start()
    yield mock
    await mock.stop()


@pytest.fixture
async def start_bedrock(
    bedrock: MockBedrock, aws_env: None, gateway_env: None, tmp_path: Path, redis_url: str
) -> AsyncIterator[Start]:
    async with aioredis.from_url(redis_url) as client:
        await client.flushdb()
    servers: list[RunningServer] = []

    async def start(model_cap: int | None = None, **provider: Any) -> str:
        config = gateway_config("http://127.0.0.1:9/v1", write_policy(tmp_path / "policies",
                                                                     budget_policy(BUDGET, PRICES)),
                                store={"kind": "redis", "redis_url": redis_url})
        config["providers"]["aws"] = {"kind": "bedrock", "region": REGION, "base_url": bedrock.url,
                                      "timeouts": {"connect_s": 2, "first_byte_s": 2, "idle_s": 2, "total_s": 30},
                                      **provider}
        config["models"][0] = {**config["models"][0], "provider": "aws", "upstream_model": MODEL_ID,
                               "max_output_tokens": model_cap}
        servers.append(await start_gateway(config))
        return servers[-1].url

    yield start
    for server in servers:
        await server.stop()


def sdk(gateway: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{gateway}/v1", api_key=TEST_KEY, max_retries=0, timeout=10)


def reserved(body: dict[str, Any], max_tokens: int) -> int:
    """The gateway's hold for mock/chat: input bounded by the body's bytes, output by max_tokens."""
    return chat_cost(len(json.dumps(body, separators=(",", ":"))), max_tokens)


async def test_json_answer_is_translated_and_charged_exactly(start_bedrock: Start, bedrock: MockBedrock) -> None:
    gateway = await start_bedrock()
    async with sdk(gateway) as client:
        answer = await client.chat.completions.create(
            model="mock/chat", max_tokens=50, temperature=0.2, top_p=0.9, stop=["\n\n"],
            messages=[{"role": "system", "content": "Be brief."}, *HI])
    assert answer.choices[0].message.content == "Hello from bedrock"
    assert answer.choices[0].finish_reason == "stop" and answer.object == "chat.completion"
    assert answer.usage is not None and (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (9, 4)
    [call] = bedrock.calls
    assert (call.model_id, call.operation) == (MODEL_ID, "converse")
    assert call.body == {"messages": [{"role": "user", "content": [{"text": "hi"}]}],
                         "system": [{"text": "Be brief."}],
                         "inferenceConfig": {"maxTokens": 50, "temperature": 0.2, "topP": 0.9,
                                             "stopSequences": ["\n\n"]}}
    assert call.headers["Authorization"].startswith(f"AWS4-HMAC-SHA256 Credential={ACCESS_KEY}/")
    state = await settled_balance(gateway)
    assert (state["spent"], state["held"]) == (chat_cost(9, 4), 0)


async def test_stream_is_translated_chunk_by_chunk_and_charged_from_its_metadata(
    start_bedrock: Start, bedrock: MockBedrock
) -> None:
    gateway = await start_bedrock(model_cap=64)
    async with sdk(gateway) as client:
        stream = await client.chat.completions.create(
            model="mock/chat", messages=HI, stream=True, stream_options={"include_usage": True})
        chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello from bedrock"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (9, 4)
    [call] = bedrock.calls
    assert call.operation == "converse-stream" and call.body["inferenceConfig"] == {"maxTokens": 64}  # the cap
    state = await settled_balance(gateway)
    assert (state["spent"], state["held"]) == (chat_cost(9, 4), 0)


async def tool_stream(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
    response = await open_event_stream(request)
    for message in [
        event("messageStart", {"role": "assistant"}),
        event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "Checking."}}),
        event("contentBlockStop", {"contentBlockIndex": 0}),
        event("contentBlockStart", {"contentBlockIndex": 1,
                                    "start": {"toolUse": {"toolUseId": "tooluse_kZJMlvQmRJ6eAyJE5GIl7Q",
                                                          "name": "get_weather"}}}),
        event("contentBlockDelta", {"contentBlockIndex": 1, "delta": {"toolUse": {"input": "{\"city\": "}}}),
        event("contentBlockDelta", {"contentBlockIndex": 1, "delta": {"toolUse": {"input": "\"Paris\"}"}}}),
        event("contentBlockStop", {"contentBlockIndex": 1}),
        event("messageStop", {"stopReason": "tool_use"}),
        event("metadata", {"usage": {"inputTokens": 30, "outputTokens": 12, "totalTokens": 42}, "metrics": {}}),
    ]:
        await response.write(message)
    return response


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


async def test_tool_calls_both_ways(start_bedrock: Start, bedrock: MockBedrock) -> None:
    bedrock.handler = tool_stream
    gateway = await start_bedrock()
    async with sdk(gateway) as client:
        stream = await client.chat.completions.create(model="mock/chat", messages=HI, tools=TOOLS,
                                                      tool_choice="required", stream=True)
        chunks = [c async for c in stream]
        calls = [t for c in chunks if c.choices for t in (c.choices[0].delta.tool_calls or [])]
        assert (calls[0].id, calls[0].function.name, calls[0].index) == (
            "tooluse_kZJMlvQmRJ6eAyJE5GIl7Q", "get_weather", 0)
        assert json.loads("".join(t.function.arguments or "" for t in calls)) == {"city": "Paris"}
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        bedrock.handler = None
        await client.chat.completions.create(model="mock/chat", tools=TOOLS, messages=[
            *HI,
            {"role": "assistant", "content": None, "tool_calls": [{"id": "tooluse_1", "type": "function",
                                                                  "function": {"name": "get_weather",
                                                                               "arguments": "{\"city\":\"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "tooluse_1", "content": "18C, sunny"},
        ])
    assert bedrock.calls[0].body["toolConfig"] == {"tools": [{"toolSpec": {
        "name": "get_weather", "description": "Weather of a city",
        "inputSchema": {"json": TOOLS[0]["function"]["parameters"]}}}], "toolChoice": {"any": {}}}
    assert bedrock.calls[1].body["messages"] == [
        {"role": "user", "content": [{"text": "hi"}]},
        {"role": "assistant", "content": [{"toolUse": {"toolUseId": "tooluse_1", "name": "get_weather",
                                                        "input": {"city": "Paris"}}}]},
        {"role": "user", "content": [{"toolResult": {"toolUseId": "tooluse_1", "content": [{"text": "18C, sunny"}]}}]},
    ]
    state = await settled_balance(gateway)
    assert state["spent"] == chat_cost(30, 12) + chat_cost(9, 4)


async def test_images_from_data_urls_go_as_bytes(start_bedrock: Start, bedrock: MockBedrock) -> None:
    gateway = await start_bedrock()
    png = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 16).decode()
    async with sdk(gateway) as client:
        await client.chat.completions.create(model="mock/chat", messages=[{"role": "user", "content": [
            {"type": "text", "text": "what is it?"},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}}]}])
    assert bedrock.calls[0].body["messages"][0]["content"] == [
        {"text": "what is it?"}, {"image": {"format": "png", "source": {"bytes": png}}}]


@pytest.mark.parametrize("extra, param", [
    ({"n": 2}, "n"),
    ({"logprobs": True}, "logprobs"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"tool_choice": "none", "tools": TOOLS}, "tool_choice"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url",
                                                  "image_url": {"url": "https://example.com/cat.png"}}]}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio",
                                                  "input_audio": {"data": "AAAA", "format": "wav"}}]}]}, "messages"),
])
async def test_what_converse_cannot_take_is_a_clear_400_and_nothing_is_sent(
    start_bedrock: Start, bedrock: MockBedrock, extra: dict[str, Any], param: str
) -> None:
    gateway = await start_bedrock()
    async with sdk(gateway) as client:
        with pytest.raises(openai.BadRequestError) as refused:
            await client.chat.completions.create(model="mock/chat", **{"messages": HI, **extra})
    assert (refused.value.code, refused.value.param) == ("invalid_request", param)
    assert "docs/providers.md#bedrock" in refused.value.message
    assert bedrock.calls == []
    state = await settled_balance(gateway)
    assert (state["spent"], state["held"]) == (0, 0)


@pytest.mark.parametrize("status, kind, error", [
    (400, "ValidationException", openai.BadRequestError),
    (429, "ThrottlingException", openai.RateLimitError),
    (429, "ModelNotReadyException", openai.RateLimitError),
    (403, "AccessDeniedException", openai.PermissionDeniedError),
])
async def test_bedrock_errors_reach_the_sdk_in_openai_shape(
    start_bedrock: Start, bedrock: MockBedrock, status: int, kind: str, error: type[openai.APIStatusError]
) -> None:
    async def refuse(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        return error_response(status, kind, f"{kind} says no")

    bedrock.handler = refuse
    gateway = await start_bedrock()
    async with sdk(gateway) as client:
        for stream in (False, True) if status != 429 else (True,):  # a 429 rests the only deployment a while
            with pytest.raises(error) as raised:
                await client.chat.completions.create(model="mock/chat", messages=HI, stream=stream)
            assert raised.value.code == kind and raised.value.body["message"] == f"{kind} says no"  # type: ignore[index]
    state = await settled_balance(gateway)
    assert state["held"] == 0


async def test_a_bad_signature_is_bedrocks_403(
    start_bedrock: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    gateway = await start_bedrock()
    async with sdk(gateway) as client:
        with pytest.raises(openai.PermissionDeniedError) as refused:
            await client.chat.completions.create(model="mock/chat", messages=HI)
    assert refused.value.code == "InvalidSignatureException"
    assert "not-the-secret" not in str(refused.value.body)


async def test_an_exception_event_mid_stream_ends_it_with_an_openai_error_and_charges_an_estimate(
    start_bedrock: Start, bedrock: MockBedrock
) -> None:
    async def throttled_mid_way(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        response = await open_event_stream(request)
        for message in text_events(("Hel", "lo"), None)[:3]:
            await response.write(message)
        await response.write(exception("throttlingException", "Too many tokens, please wait before trying again."))
        return response

    bedrock.handler = throttled_mid_way
    gateway = await start_bedrock()
    body = {"model": "mock/chat", "messages": HI, "stream": True, "max_tokens": 100}
    async with sdk(gateway) as client:
        stream = await client.chat.completions.create(**body)
        seen: list[str] = []
        with pytest.raises(openai.APIError, match="Too many tokens"):
            async for chunk in stream:
                seen.append(chunk.choices[0].delta.content or "")
    assert "".join(seen) == "Hello"
    state = await settled_balance(gateway)
    assert 0 < state["spent"] <= reserved(body, 100) and state["held"] == 0


async def test_a_stream_cut_mid_way_is_charged_an_estimate_capped_at_the_reservation(
    start_bedrock: Start, bedrock: MockBedrock
) -> None:
    async def cut(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        response = await open_event_stream(request)
        for message in text_events(tuple("x" * 200), None)[:150]:
            await response.write(message)
        assert request.transport is not None
        request.transport.close()  # the connection drops: no messageStop, no metadata
        return response

    bedrock.handler = cut
    gateway = await start_bedrock()
    body = {"model": "mock/chat", "messages": HI, "stream": True, "max_tokens": 8}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{gateway}/v1/chat/completions", data=json.dumps(body, separators=(",", ":")),
                             headers={"Authorization": f"Bearer {TEST_KEY}",
                                      "Content-Type": "application/json"}) as response:
            text = await response.text()
    assert '"code": "upstream_error"' in text or '"code":"upstream_error"' in text
    state = await settled_balance(gateway)
    assert state["spent"] == reserved(body, 8) and state["held"] == 0  # 149 chunks seen: the estimate is capped at the hold


async def test_first_event_reaches_the_client_before_the_second_is_sent_and_a_disconnect_closes_upstream(
    start_bedrock: Start, bedrock: MockBedrock
) -> None:
    client_saw_first, upstream_closed = asyncio.Event(), asyncio.Event()

    async def gated(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        response = await open_event_stream(request)
        events = text_events(("one", "two"), (5, 2))
        try:
            await response.write(events[0] + events[1])
            await wait_for(client_saw_first)  # no buffering: the client must have it before anything more comes
            await response.write(events[2])
            await asyncio.sleep(30)  # then the client hangs up
        except asyncio.CancelledError:
            upstream_closed.set()
            raise
        return response

    bedrock.handler = gated
    gateway = await start_bedrock()
    async with sdk(gateway) as client:
        stream = await client.chat.completions.create(model="mock/chat", messages=HI, stream=True)
        texts = []
        async for chunk in stream:
            texts.append(chunk.choices[0].delta.content)
            if "one" in texts:
                client_saw_first.set()
            if "two" in texts:
                break
        await stream.close()
    await wait_for(upstream_closed)
    state = await settled_balance(gateway)
    assert state["spent"] > 0 and state["held"] == 0


def test_the_mocks_framing_is_what_botocore_decodes() -> None:
    """The mock's encoder, cross-checked by botocore's parser (which checks both CRC32s), fed byte by byte."""
    messages = text_events(("a", "é"), (1, 2)) + [exception("throttlingException", "slow down")]
    buffer = EventStreamBuffer()
    decoded = []
    for byte in b"".join(messages):
        buffer.add_data(bytes([byte]))
        decoded += list(buffer)
    assert [m.headers[":event-type"] for m in decoded[:-1]] == [
        "messageStart", "contentBlockDelta", "contentBlockDelta", "contentBlockStop", "messageStop", "metadata"]
    assert json.loads(decoded[2].payload)["delta"]["text"] == "é"
    assert decoded[-1].headers == {":exception-type": "throttlingException", ":content-type": "application/json",
                                   ":message-type": "exception"}
    broken = bytearray(frame({":event-type": "x"}, b"{}"))
    broken[-1] ^= 1
    buffer = EventStreamBuffer()
    buffer.add_data(bytes(broken))
    with pytest.raises(Exception, match="(?i)checksum|crc"):
        list(buffer)


async def test_a_bedrock_api_key_is_sent_as_a_bearer_token_instead_of_signing(
    start_bedrock: Start, bedrock: MockBedrock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BEDROCK_KEY", "ABSKQmVkcm9ja0FQSUtleS1leGFtcGxl")
    bedrock.api_keys = ("ABSKQmVkcm9ja0FQSUtleS1leGFtcGxl",)
    gateway = await start_bedrock(api_key_env="BEDROCK_KEY")
    async with sdk(gateway) as client:
        answer = await client.chat.completions.create(model="mock/chat", messages=HI)
    assert answer.choices[0].message.content == "Hello from bedrock"
    headers = bedrock.calls[0].headers
    assert headers["Authorization"] == "Bearer ABSKQmVkcm9ja0FQSUtleS1leGFtcGxl" and "X-Amz-Date" not in headers


def test_bedrock_config_needs_a_region_and_keeps_aws_settings_to_itself() -> None:
    base = gateway_config("http://127.0.0.1:9/v1", Path("policies"))
    for provider, fragment in (({"kind": "bedrock"}, "needs region"),
                               ({"kind": "bedrock", "region": "Mars"}, "region"),
                               ({"kind": "openai", "base_url": "http://127.0.0.1:9", "region": REGION}, "bedrock only")):
        with pytest.raises(ConfigError, match=fragment):
            parse_config({**base, "providers": {**base["providers"], "aws": provider}}, "t")
    config = parse_config({**base, "providers": {**base["providers"], "aws": {"kind": "bedrock", "region": REGION}}},
                          "t")
    assert config.providers["aws"].endpoint == f"https://bedrock-runtime.{REGION}.amazonaws.com"


async def test_a_hostile_upstream_gets_no_traceback_out_of_the_gateway(
    start_bedrock: Start, bedrock: MockBedrock, caplog: pytest.LogCaptureFixture
) -> None:
    script: list[bytes] = []

    async def hostile(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        if request.match_info["operation"] == "converse":
            return web.json_response({"output": ["not", "a", "message"], "stopReason": {"x": 1}, "usage": "lots"})
        response = await open_event_stream(request)
        for message in script:
            await response.write(message)
        return response

    bedrock.handler = hostile
    gateway = await start_bedrock()
    async with sdk(gateway) as client:
        answer = await client.chat.completions.create(model="mock/chat", messages=HI)
        assert (answer.choices[0].message.content, answer.choices[0].finish_reason, answer.usage) == ("", "stop", None)
        for script[:] in (
            [event("contentBlockStart", {"contentBlockIndex": "abc", "start": {"toolUse": "x"}}),
             frame({":event-type": "contentBlockDelta", ":message-type": "event"}, b"[1, 2]")],
            [event("messageStart", {"role": "assistant"}), b"\x00\x00\x00\x10garbage-not-a-frame" * 3],
        ):
            stream = await client.chat.completions.create(model="mock/chat", messages=HI, stream=True)
            with pytest.raises(openai.APIError, match="Bedrock"):
                async for _ in stream:
                    pass
    assert "Traceback" not in caplog.text and "unhandled" not in caplog.text
    state = await settled_balance(gateway)
    assert state["held"] == 0


async def test_a_slow_credential_refresh_never_blocks_the_event_loop() -> None:
    """botocore's refresh of temporary credentials blocks (STS, a metadata endpoint): it runs in a thread, and calls
    meanwhile are signed with the credentials already held."""
    generation = iter(["first", "second"])

    def slow_refresh() -> dict[str, str]:
        time.sleep(0.4)  # a slow STS round trip, blocking as botocore's refresh is
        return {"access_key": ACCESS_KEY, "secret_key": SECRET_KEY, "token": next(generation),
                "expiry_time": "2099-01-01T00:00:00Z"}

    signer = AwsSigner(REGION)
    signer._credentials = RefreshableCredentials.create_from_metadata(slow_refresh(), slow_refresh, "test")
    await signer.refresh()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    running = asyncio.create_task(ticker())
    signer._credentials._expiry_time = datetime.now(timezone.utc)  # due now: the next look refreshes them
    refreshing = asyncio.create_task(signer.refresh())
    await asyncio.sleep(0.1)
    during = signer.sign("https://bedrock-runtime.us-west-2.amazonaws.com/model/m/converse", {"Host": "x"}, b"{}")
    await refreshing
    running.cancel()
    assert during["X-Amz-Security-Token"] == "first" and ticks >= 20  # the loop kept running through the refresh
    after = signer.sign("https://bedrock-runtime.us-west-2.amazonaws.com/model/m/converse", {"Host": "x"}, b"{}")
    assert after["X-Amz-Security-Token"] == "second"
