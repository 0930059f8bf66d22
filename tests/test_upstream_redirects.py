"""A provider's redirect never sends the prompt or the provider credential anywhere the operator did not name."""

from __future__ import annotations

from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from proxy.config import ConfigError, parse_config

from .gateway_harness import PROVIDER_KEY, TEST_KEY, gateway_config, start_gateway
from .mock_provider import MockProvider

AUTH = {"Authorization": f"Bearer {TEST_KEY}"}
CHAT = {"model": "mock/chat", "messages": [{"role": "user", "content": "a secret prompt"}]}


class Elsewhere:
    """Another origin on loopback that records every request it gets, whatever the method or path."""

    def __init__(self) -> None:
        self.received: list[tuple[str, dict[str, str], bytes]] = []
        self.authority = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> "Elsewhere":
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._record)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.authority = f"127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def _record(self, request: web.Request) -> web.Response:
        self.received.append((request.method, dict(request.headers), await request.read()))
        return web.json_response({
            "id": "chatcmpl-elsewhere", "object": "chat.completion", "created": 1700000000, "model": "mock-up",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "from elsewhere"},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
        })

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def elsewhere() -> AsyncIterator[Elsewhere]:
    server = await Elsewhere().start()
    yield server
    await server.stop()


def redirect_to(location: str, status: int):  # type: ignore[no-untyped-def]
    async def redirect(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        return web.Response(status=status, headers={"Location": location})

    return redirect


async def chat_via(
    provider: MockProvider, policies_dir: Path, **provider_settings: Any
) -> tuple[int, dict[str, Any]]:
    config = gateway_config(provider.url, policies_dir)
    # A custom key header, as some providers use: aiohttp strips only Authorization on a cross-origin redirect.
    config["providers"]["mock"] |= {"auth_header": "xi-api-key", "auth_scheme": "", **provider_settings}
    server = await start_gateway(config)
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{server.url}/v1/chat/completions", json=CHAT, headers=AUTH) as r:
                return r.status, await r.json()
    finally:
        await server.stop()


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_a_redirect_is_a_502_and_nothing_is_sent_elsewhere(
    status: int, provider: MockProvider, elsewhere: Elsewhere, gateway_env: None, policies_dir: Path
) -> None:
    provider.handler = redirect_to(f"http://{elsewhere.authority}/v1/chat/completions", status)
    answer_status, body = await chat_via(provider, policies_dir)
    assert (answer_status, body["error"]["code"], body["error"]["upstream_status"]) == (502, "upstream_error", status)
    assert elsewhere.received == []
    assert len(provider.received) == 1  # nothing re-sent either


@pytest.mark.parametrize("status", [307, 308])
async def test_named_host_gets_307_and_308_with_the_same_body(
    status: int, provider: MockProvider, elsewhere: Elsewhere, gateway_env: None, policies_dir: Path
) -> None:
    provider.handler = redirect_to(f"http://{elsewhere.authority}/v1/chat/completions", status)
    status, body = await chat_via(provider, policies_dir, follow_redirects_to=[elsewhere.authority])
    assert status == 200 and body["choices"][0]["message"]["content"] == "from elsewhere"
    [(method, headers, sent)] = elsewhere.received
    assert method == "POST" and b"a secret prompt" in sent and headers["xi-api-key"] == PROVIDER_KEY


@pytest.mark.parametrize(
    ("status", "named"),
    [(302, "elsewhere"), (303, "elsewhere"), (307, "127.0.0.1:1"), (307, "localhost")],
    ids=["302-named", "303-named", "307-other-port", "307-other-host"],
)
async def test_only_307_and_308_to_a_named_host_are_followed(
    status: int, named: str, provider: MockProvider, elsewhere: Elsewhere, gateway_env: None, policies_dir: Path
) -> None:
    provider.handler = redirect_to(f"http://{elsewhere.authority}/v1/chat/completions", status)
    allowed = elsewhere.authority if named == "elsewhere" else named
    answer_status, _ = await chat_via(provider, policies_dir, follow_redirects_to=[allowed])
    assert answer_status == 502 and elsewhere.received == []


@pytest.mark.parametrize("entry", ["https://api.example.com", "api.example.com/v1", "", "api.example.com:x"])
def test_follow_redirects_to_takes_host_or_host_and_port_only(entry: str, policies_dir: Path) -> None:
    config = gateway_config("http://127.0.0.1:9/v1", policies_dir)
    config["providers"]["mock"]["follow_redirects_to"] = [entry]
    with pytest.raises(ConfigError, match=r"providers\.mock\.follow_redirects_to"):
        parse_config(config, "test-config")
