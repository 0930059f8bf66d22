"""Several keys per provider: spread over calls, a refused (401) or throttled (429) key rests while the call goes
out with another, key files re-read when they change, and no key ever in logs, access log, metrics or errors."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from proxy.config import ConfigError, parse_config
from proxy.upstream.credentials import KeySource, ProviderKeys, provider_keys
from tests.gateway_harness import TEST_KEY, gateway_config, gateway_process, start_gateway
from tests.mock_provider import MockProvider
from tests.test_metering_e2e import settled_balance

KEYS = {"KEY_A": "sk-proj-alpha-" + "a" * 32, "KEY_B": "sk-proj-bravo-" + "b" * 32, "KEY_C": "sk-proj-charlie-" + "c" * 30}
AUTH = {"Authorization": f"Bearer {TEST_KEY}"}


def keys_of(*values: str, selection: str = "round_robin", clock: list[float] | None = None) -> ProviderKeys:
    now = clock if clock is not None else [100.0]
    return ProviderKeys([KeySource(f"env:K{i}", v) for i, v in enumerate(values)],
                        lambda key: {"Authorization": f"Bearer {key}"}, selection, 60.0, lambda: now[0])


def used(keys: ProviderKeys, calls: int) -> list[str]:
    return [keys.choose().headers["Authorization"].removeprefix("Bearer ") for _ in range(calls)]


def test_round_robin_skips_a_resting_key_until_its_rest_ends() -> None:
    clock = [100.0]
    keys = keys_of("a", "b", "c", clock=clock)
    assert used(keys, 4) == ["a", "b", "c", "a"]
    assert keys.refused(keys.choose(), 429, "30") is True  # b throttled for its Retry-After: a and c remain
    assert used(keys, 4) == ["c", "a", "c", "a"]
    clock[0] += 31
    assert used(keys, 3) == ["b", "c", "a"]
    assert keys.refused(keys.choose(), 200, None) is False and keys.refused(keys.choose(), 500, None) is False


def test_a_refused_key_rests_key_rest_s_and_when_all_rest_the_first_to_wake_answers() -> None:
    clock = [100.0]
    keys = keys_of("a", "b", clock=clock)
    assert keys.refused(keys.choose(), 401, "1") is True  # a 401's Retry-After does not shorten the rest
    clock[0] += 10
    assert keys.refused(keys.choose(), 429, "5") is False  # b rests too: nothing left to retry with
    assert used(keys, 2) == ["b", "b"]  # b wakes first (in 5 s, a in 50 s)
    clock[0] += 6
    assert used(keys, 2) == ["b", "b"]
    clock[0] += 45
    assert used(keys, 2) == ["a", "b"]


def test_least_recently_throttled_prefers_the_key_throttled_longest_ago() -> None:
    clock = [100.0]
    keys = keys_of("a", "b", "c", selection="least_recently_throttled", clock=clock)
    first = keys.choose()
    keys.refused(first, 429, "1")  # a at 100
    clock[0] += 0.5
    keys.refused(keys.choose(), 429, "1")  # b at 100.5
    clock[0] += 2  # both rested; c never throttled
    assert used(keys, 2) == ["c", "c"]
    keys.refused(keys.choose(), 429, "1")  # c at 102.5
    clock[0] += 2
    assert used(keys, 1) == ["a"]


def test_a_key_file_is_re_read_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_text("first\n")
    settings = parse_config(config_with({"api_key_file": str(path)}), "t").providers["mock"]
    keys = provider_keys("mock", settings, tmp_path, lambda key: {"api-key": key})
    assert keys is not None
    source = keys.sources[0]
    assert source.current(1000.0) == "first"
    path.write_text("second-longer\n")
    assert source.current(1000.5) == "first"  # looked at no more than once a second
    assert source.current(1001.5) == "second-longer"
    path.write_text("")  # an empty file mid-write: the last key stays
    assert source.current(1003.0) == "second-longer"


def config_with(provider: dict[str, Any]) -> dict[str, Any]:
    config = gateway_config("http://127.0.0.1:9/v1", Path("policies"))
    config["providers"]["mock"] = {"base_url": "http://127.0.0.1:9/v1", **provider}
    return config


@pytest.mark.parametrize("provider, message", [
    ({"api_keys_env": ["KEY_A", "NOT_SET_ANYWHERE"]}, "providers.mock.api_keys_env: environment variable NOT_SET"),
    ({"api_key_files": ["missing.key"]}, "providers.mock.api_key_files: cannot read missing.key"),
])
def test_a_missing_key_names_its_setting(
    provider: dict[str, Any], message: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("KEY_A", KEYS["KEY_A"])
    settings = parse_config(config_with(provider), "t").providers["mock"]
    with pytest.raises(ConfigError, match=message):
        provider_keys("mock", settings, tmp_path, lambda key: {})


def test_config_refuses_an_unknown_selection_and_api_version_outside_azure() -> None:
    for provider, fragment in (({"key_selection": "random"}, "key_selection"), ({"api_version": "2024-10-21"},
                                                                                  "azure_openai only")):
        with pytest.raises(ConfigError, match=fragment):
            parse_config(config_with({"api_key_env": "KEY_A", **provider}), "t")


def keyed_mock(provider: MockProvider, refuse: dict[str, int]) -> None:
    """The mock refuses the keys in `refuse` with that status (429 with a Retry-After), answers the others."""

    async def by_key(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        status = refuse.get(request.headers.get("Authorization", "").removeprefix("Bearer "))
        if status == 429:
            return web.json_response({"error": {"message": "Rate limit reached", "type": "requests",
                                                "code": "rate_limit_exceeded"}}, status=429,
                                     headers={"Retry-After": "30"})
        if status == 401:
            return web.json_response({"error": {"message": "Incorrect API key provided: sk-proj-****",
                                                "type": "invalid_request_error", "code": "invalid_api_key"}},
                                     status=401)
        return await provider.default(request, body)

    provider.handler = by_key


@pytest.fixture
def three_keys(monkeypatch: pytest.MonkeyPatch, gateway_env: None) -> dict[str, Any]:
    for name, value in KEYS.items():
        monkeypatch.setenv(name, value)
    return {"api_key_env": None, "api_keys_env": list(KEYS)}


async def test_keys_are_spread_and_a_throttled_or_refused_key_is_skipped_within_the_call(
    provider: MockProvider, three_keys: dict[str, Any], policies_dir: Path
) -> None:
    config = gateway_config(provider.url, policies_dir)
    config["providers"]["mock"].update(three_keys)
    server = await start_gateway(config)
    try:
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=TEST_KEY, max_retries=0) as client:
            async def ask() -> str | None:
                answer = await client.chat.completions.create(model="mock/chat", messages=[{"role": "user",
                                                                                            "content": "x"}])
                return answer.choices[0].message.content

            for _ in range(3):
                await ask()
            sent = [r.headers["Authorization"].removeprefix("Bearer ") for r in provider.received]
            assert sent == [KEYS["KEY_A"], KEYS["KEY_B"], KEYS["KEY_C"]]
            keyed_mock(provider, {KEYS["KEY_A"]: 429, KEYS["KEY_B"]: 401})
            provider.received.clear()
            assert await ask() == "Hello from the mock"  # A throttled, B refused, C answers: one client call
            assert await ask() == "Hello from the mock"  # A and B rest: straight to C
            sent = [r.headers["Authorization"].removeprefix("Bearer ") for r in provider.received]
            assert sent == [KEYS["KEY_A"], KEYS["KEY_B"], KEYS["KEY_C"], KEYS["KEY_C"]]
        state = await settled_balance(server.url)
        assert state["held"] == 0
    finally:
        await server.stop()


async def test_no_key_appears_in_logs_access_log_metrics_or_errors(
    provider: MockProvider, three_keys: dict[str, Any], policies_dir: Path, tmp_path: Path
) -> None:
    keyed_mock(provider, {KEYS["KEY_A"]: 429, KEYS["KEY_B"]: 401, KEYS["KEY_C"]: 429})
    output = tmp_path / "gateway.out"
    config = gateway_config(provider.url, policies_dir, server={"log_level": "debug"})
    config["providers"]["mock"].update(three_keys)
    seen: list[str] = []
    async with gateway_process(config, tmp_path, output=output) as (_, url):
        async with aiohttp.ClientSession() as http:
            for stream in (False, True, False):
                body = {"model": "mock/chat", "messages": [{"role": "user", "content": "x"}], "stream": stream}
                async with http.post(f"{url}/v1/chat/completions", json=body, headers=AUTH) as response:
                    seen.append(f"{response.status} {dict(response.headers)} {await response.text()}")
            async with http.get(f"{url}/metrics") as response:
                seen.append(await response.text())
            async with http.get(f"{url}/v1/me", headers=AUTH) as response:
                seen.append(await response.text())
        await asyncio.sleep(0.3)  # the log writer flushes every 50 ms
    seen.append(output.read_text())
    assert seen[0].startswith("429 ")  # every key refused: the provider's answer, the keys all resting
    lines = [json.loads(line) for line in seen[-1].splitlines() if line.startswith("{")]
    assert any(line.get("status") == 429 for line in lines), seen[-1]  # the access log did record the calls
    everything = "\n".join(seen)
    for value in KEYS.values():
        assert value not in everything and value[-12:] not in everything
