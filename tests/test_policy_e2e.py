"""Policy end to end over real HTTP: model discovery per plan and scope, /v1/me, hot reload under load, `check`."""

from __future__ import annotations

import asyncio
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest
import yaml

from proxy.__main__ import main
from proxy.auth.api_keys import hash_key

from .gateway_harness import DEFAULT_POLICY, PROVIDER_KEY, TEST_KEY, gateway_config, start_gateway, write_policy
from .gateway_harness import gateway_process as harness_process
from .mock_provider import MockProvider

TEXT_KEY = "sk_test_text_" + "t" * 32
CHAT_KEY = "sk_test_chat_" + "c" * 32
CHAT = {"model": "mock/chat", "messages": [{"role": "user", "content": "hi"}]}
TEXT_MODELS = [
    {"id": "mock/chat", "name": "Mock Chat", "creator": "Tests", "capability": "text2text"},
    {"id": "mock/embed", "name": "Mock Embed", "creator": "Tests", "capability": "text2text"},
]


def policy_text(*, requests: int = 100, hide: bool = False) -> str:
    return f"""
plans:
  text:
    capabilities: [text2text]
    rate_limits: [{{per: user, requests: {requests}, window: 1m}}]
    budget: {{credits: 1000, period: month, scope: account}}
  chat:
    models: [mock/chat]
keys:
  - {{id: text-key, hash: "{hash_key(TEXT_KEY)}", plan: text}}
  - {{id: chat-key, hash: "{hash_key(CHAT_KEY)}", plan: chat}}
prices:
  "mock/*": {{per_request: 1}}
defaults:
  hide_unauthorized_models: {str(hide).lower()}
"""


@dataclass
class Env:
    url: str
    http: aiohttp.ClientSession
    policies: Path

    async def call(self, method: str, path: str, credential: str | None = TEXT_KEY, body: Any = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {credential}"} if credential else {}
        async with self.http.request(method, self.url + path, json=body, headers=headers) as r:
            return r.status, (await r.json() if r.content_type == "application/json" else await r.text())


async def running(tmp_path: Path, policy: str) -> AsyncIterator[Env]:
    provider = await MockProvider().start()
    policies = write_policy(tmp_path / "policies", policy)
    config = gateway_config(provider.url, policies, demo={"enabled": False}, policies={"watch_interval_s": 0.05})
    server = await start_gateway(config)
    try:
        async with aiohttp.ClientSession() as http:
            yield Env(server.url, http, policies)
    finally:
        await server.stop()
        await provider.stop()


@pytest.fixture
async def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Env]:
    monkeypatch.setenv("MOCK_PROVIDER_KEY", PROVIDER_KEY)
    async for e in running(tmp_path, policy_text()):
        yield e


@pytest.fixture
async def hidden_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Env]:
    monkeypatch.setenv("MOCK_PROVIDER_KEY", PROVIDER_KEY)
    async for e in running(tmp_path, policy_text(hide=True)):
        yield e


async def test_models_list_only_what_the_plan_and_token_scopes_permit(env: Env) -> None:
    assert await env.call("GET", "/v1/models") == (200, TEXT_MODELS)
    assert await env.call("GET", "/v1/models?groupBy=capability") == (200, {"text2text": TEXT_MODELS})
    assert await env.call("GET", "/v1/models", CHAT_KEY) == (200, TEXT_MODELS[:1])

    # A token narrowed to one model id of a capability plan sees just that model.
    status, minted = await env.call("POST", "/v1/tokens", TEXT_KEY, {"scopes": ["mock/chat"]})
    assert status == 200, minted
    assert await env.call("GET", "/v1/models?groupBy=capability", minted["token"]) == (200, {"text2text": TEXT_MODELS[:1]})


async def test_one_model_is_200_in_scope_403_out_of_scope_404_unknown(env: Env) -> None:
    assert await env.call("GET", "/v1/models/mock/embed") == (200, TEXT_MODELS[1])
    status, answer = await env.call("GET", "/v1/models/mock/image")
    assert status == 403 and answer["error"]["code"] == "provider_not_authorized"
    status, answer = await env.call("GET", "/v1/models/nope/model")
    assert status == 404 and answer["error"]["code"] == "model_not_found"


async def test_hidden_out_of_scope_model_is_indistinguishable_from_an_unknown_one(hidden_env: Env) -> None:
    hidden = await hidden_env.call("GET", "/v1/models/mock/image")
    unknown = await hidden_env.call("GET", "/v1/models/mock/imagf")  # same length, not in the catalogue
    assert hidden[0] == unknown[0] == 404
    assert hidden[1]["error"]["message"].replace("mock/image", "X") == unknown[1]["error"]["message"].replace("mock/imagf", "X")
    assert {**hidden[1]["error"], "message": ""} == {**unknown[1]["error"], "message": ""}
    status, answer = await hidden_env.call("POST", "/v1/images/generations", body={"model": "mock/image", "prompt": "x"})
    assert (status, answer["error"]["code"]) == (404, "model_not_found")


async def test_me_shows_plan_scopes_budget_and_rate_limits_that_move_after_a_request(env: Env) -> None:
    status, before = await env.call("GET", "/v1/me")
    assert status == 200 and before["plan"] == "text"
    assert before["scopes"] == {"models": [], "capabilities": ["text2text"]}
    assert before["balance"]["budget"] == 1000 and before["balance"]["remaining"] == 1000
    assert [(r["limit"], r["remaining"]) for r in before["rate_limits"]] == [(100, 100)]

    assert (await env.call("POST", "/v1/chat/completions", body=CHAT))[0] == 200
    _, after = await env.call("GET", "/v1/me")
    assert after["balance"]["spent"] == 1 and after["balance"]["remaining"] == 999
    assert after["rate_limits"][0]["remaining"] == 99


def metric_value(text: str, sample: str) -> float:
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[1])
    return 0.0


async def until(predicate: Any, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not await predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def test_hot_reload_under_load_never_fails_a_request_and_a_broken_file_keeps_the_old_policy(env: Env) -> None:
    statuses: list[int] = []
    stop = asyncio.Event()

    async def client() -> None:
        while not stop.is_set():
            statuses.append((await env.call("POST", "/v1/chat/completions", body=CHAT))[0])

    async def reloads(outcome: str) -> float:
        text = (await env.call("GET", "/metrics"))[1]
        return metric_value(text, f'edge_proxy_policy_reloads_total{{outcome="{outcome}"}}')

    async def limit_served() -> int:
        return (await env.call("GET", "/v1/me"))[1]["rate_limits"][0]["limit"]

    write_policy(env.policies, policy_text(requests=100_000))  # room for all the traffic below
    await until(lambda: _equals(limit_served(), 100_000))
    clients = [asyncio.create_task(client()) for _ in range(4)]
    try:
        for limit in (100_001, 100_002, 100_003, 100_004):
            write_policy(env.policies, policy_text(requests=limit))
            await until(lambda: _equals(limit_served(), limit))
        assert await reloads("success") >= 5

        (env.policies / "test.yaml").write_text("plans: [not, a, mapping\n")
        await until(lambda: _at_least(reloads("failure"), 1))
        before = len(statuses)
        await until(lambda: _true(len(statuses) >= before + 8))  # traffic goes on under the old policy
    finally:
        stop.set()
        await asyncio.gather(*clients)
    assert len(statuses) > 20 and set(statuses) == {200}
    assert await limit_served() == 100_004

    status, ready = await env.call("GET", "/readyz")
    # The previous policy serves fine, so readiness holds; the rejected reload is reported, not fatal.
    assert status == 200 and ready["ready"] is True and "policy" not in ready["checks"]
    assert ready["policy"]["last_reload_ok"] is False


async def _equals(value: Any, expected: Any) -> bool:
    return await value == expected


async def _at_least(value: Any, minimum: float) -> bool:
    return await value >= minimum


async def _true(value: bool) -> bool:
    return value


def write_config(tmp_path: Path, policy: str) -> Path:
    write_policy(tmp_path / "policies", policy)
    config = gateway_config("http://127.0.0.1:9/v1", Path("policies"), demo={"enabled": False})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize(("policy", "expected"), [
    ("plans: {p: {models: [mock/*]}}\nkeys: [{id: k, hash: 'sha256:" + "0" * 64 + "', plan: gold}]\n",
     ["policies/test.yaml", "keys[0].plan", "plan 'gold' is not defined", "define plans.gold"]),
    ("plans: {p: {models: [other/*]}}\n",
     ["policies/test.yaml", "plans.p.models[0]", "matches no model", "add the model to config.yaml models"]),
])
def test_check_validates_policies_with_the_config_and_names_file_key_and_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, policy: str, expected: list[str]
) -> None:
    monkeypatch.setenv("MOCK_PROVIDER_KEY", PROVIDER_KEY)
    assert main(["check", "--config", str(write_config(tmp_path, policy))]) == 2
    err = capsys.readouterr().err
    for part in expected:
        assert part in err


def test_check_accepts_a_valid_config_with_its_policies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MOCK_PROVIDER_KEY", PROVIDER_KEY)
    assert main(["check", "--config", str(write_config(tmp_path, policy_text()))]) == 0
    assert "OK (4 models, 1 providers, 2 plans, 2 keys" in capsys.readouterr().out


async def test_sighup_reloads_policies_in_a_running_process(provider: MockProvider, tmp_path: Path) -> None:
    """With the file watch off, SIGHUP alone swaps in the edited policy (the operator's reload switch)."""
    policies = write_policy(tmp_path / "policies", DEFAULT_POLICY.replace("requests: 10000", "requests: 7"))
    config = gateway_config(provider.url, policies)  # the harness turns the file watch off

    async def request_limit(url: str) -> int:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{url}/v1/me", headers={"Authorization": f"Bearer {TEST_KEY}"}) as response:
                return (await response.json())["rate_limits"][0]["limit"]

    async with harness_process(config, tmp_path) as (process, url):
        assert await request_limit(url) == 7
        write_policy(policies, DEFAULT_POLICY.replace("requests: 10000", "requests: 9"))
        await asyncio.sleep(0.2)
        assert await request_limit(url) == 7  # no watch: nothing changes by itself
        process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while await request_limit(url) != 9:
            assert time.monotonic() < deadline, "SIGHUP did not reload the policy"
            await asyncio.sleep(0.05)
        assert process.returncode is None  # SIGHUP reloads; it does not stop the process
