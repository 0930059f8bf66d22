"""The HTTP surface against hostile or odd clients: duplicated credentials, foreign CORS headers, the error docs."""

from __future__ import annotations

import re
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from proxy.errors import CATALOGUE

from .gateway_harness import REPO, TEST_KEY
from .mock_provider import MockProvider

AUTH = {"Authorization": f"Bearer {TEST_KEY}"}
CHAT = {"model": "mock/chat", "messages": [{"role": "user", "content": "hi"}]}


async def test_two_authorization_headers_are_refused_whatever_their_order(gateway: str) -> None:
    async with aiohttp.ClientSession() as http:
        for first, second in ((f"Bearer {TEST_KEY}", "Bearer sk_other_key_0000"),
                              ("Bearer sk_other_key_0000", f"Bearer {TEST_KEY}")):
            headers = CIMultiDict([("Authorization", first), ("Authorization", second)])
            for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/me"), ("POST", "/v1/tokens")):
                async with http.request(method, f"{gateway}{path}", json=CHAT, headers=headers) as r:
                    error = (await r.json())["error"]
                    assert (r.status, error["code"], error["param"]) == (400, "invalid_request", "Authorization")


async def test_upstream_cors_headers_never_reach_the_client(gateway: str, provider: MockProvider) -> None:
    async def permissive(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        return web.json_response({"choices": []}, headers={
            "Access-Control-Allow-Origin": "*", "Access-Control-Allow-Credentials": "true",
            "access-control-expose-headers": "X-Secret", "X-Upstream-Note": "kept",
        })

    provider.handler = permissive
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{gateway}/v1/chat/completions", json=CHAT,
                             headers={**AUTH, "Origin": "https://evil.example"}) as r:
            assert r.status == 200 and r.headers["X-Upstream-Note"] == "kept"
            assert not [name for name in r.headers if name.lower().startswith("access-control-")]
        async with http.post(f"{gateway}/v1/chat/completions", json=CHAT,
                             headers={**AUTH, "Origin": "https://app.example.com"}) as r:
            assert r.headers.getall("Access-Control-Allow-Origin") == ["https://app.example.com"]
            assert "Access-Control-Allow-Credentials" not in r.headers
            assert r.headers.getall("Access-Control-Expose-Headers") != ["X-Secret"]
            assert len(r.headers.getall("Access-Control-Expose-Headers")) == 1


def documented_codes() -> dict[str, int]:
    """code -> status from the table of docs/errors.md."""
    rows = re.findall(r"^\| (\d{3}) \| (.+?) \|", (REPO / "docs" / "errors.md").read_text(), re.MULTILINE)
    return {code: int(status) for status, codes in rows for code in re.findall(r"`([a-z_]+)`", codes)}


def test_docs_list_every_catalogue_code_with_its_status() -> None:
    assert documented_codes() == {code: status for code, (status, _) in CATALOGUE.items()}
