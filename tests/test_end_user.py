"""`X-End-User-Id`: a server-side API-key caller attributes its calls to an end user (the ledger's `user`,
`GET /v1/usage`, per-user limits, the access log), like a minted token's `sub`; a token's own `sub` is never
overridden, and bad values are JSON 400s."""

from __future__ import annotations

from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest

from proxy.accesslog import end_user_log_id, principal_log_id
from proxy.auth.api_keys import hash_key
from proxy.auth.end_user import with_end_user
from proxy.auth.principal import Principal
from proxy.errors import ApiError

from .gateway_harness import gateway_config, start_gateway, write_policy
from .mock_provider import MockProvider

BACKEND_KEY = "sk_test_backend_" + "e" * 32
POLICY = f"""
plans:
  pro:
    models: ["mock/*"]
    rate_limits: [{{per: user, requests: 2, window: 1m}}]
    budget: {{credits: 1000, period: month, scope: account}}
keys:
  - {{id: backend, hash: "{hash_key(BACKEND_KEY)}", plan: pro, account: acme}}
prices:
  "mock/*": {{per_request: 1}}
"""
EMBED = {"model": "mock/embed", "input": "hi"}


class Client:
    def __init__(self, url: str, http: aiohttp.ClientSession) -> None:
        self.url, self.http = url, http

    async def call(
        self, method: str, path: str, credential: str, end_user: str | None = None, body: Any = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        sent = {"Authorization": f"Bearer {credential}", **(headers or {})}
        if end_user is not None:
            sent["X-End-User-Id"] = end_user
        async with self.http.request(method, self.url + path, json=body, headers=sent) as response:
            return response.status, await response.json()


@pytest.fixture
async def client(provider: MockProvider, tmp_path: Path, gateway_env: None) -> AsyncIterator[Client]:
    config = gateway_config(provider.url, write_policy(tmp_path / "policies", POLICY), demo={"enabled": False})
    server = await start_gateway(config)
    async with aiohttp.ClientSession() as http:
        yield Client(server.url, http)
    await server.stop()


async def test_an_api_key_attributes_usage_and_per_user_limits_to_the_end_user(client: Client) -> None:
    for _ in range(2):
        assert (await client.call("POST", "/v1/embeddings", BACKEND_KEY, "alice", EMBED))[0] == 200
    status, limited = await client.call("POST", "/v1/embeddings", BACKEND_KEY, "alice", EMBED)
    assert (status, limited["error"]["code"]) == (429, "rate_limit")  # alice's own 2 a minute
    assert (await client.call("POST", "/v1/embeddings", BACKEND_KEY, "bob", EMBED))[0] == 200  # bob has his own

    status, alice = await client.call("GET", "/v1/usage", BACKEND_KEY, "alice")
    assert status == 200 and (alice["scope"], alice["user"]) == ("user", "u:g:alice")
    assert alice["total"]["calls"] == 2
    status, account = await client.call("GET", "/v1/usage", BACKEND_KEY)
    assert status == 200 and account["scope"] == "account" and account["total"]["calls"] == 3

    # The same end user as a token minted for alice from the same key: one user, one counter.
    status, minted = await client.call("POST", "/v1/tokens", BACKEND_KEY, body={"sub": "alice"})
    status, limited = await client.call("POST", "/v1/embeddings", minted["token"], body=EMBED)
    assert (status, limited["error"]["code"]) == (429, "rate_limit")
    status, me = await client.call("GET", "/v1/me", BACKEND_KEY, "carol")
    assert status == 200 and me["principal"]["subject"] == "carol"


async def test_a_token_keeps_its_own_sub(client: Client) -> None:
    status, minted = await client.call("POST", "/v1/tokens", BACKEND_KEY, body={"sub": "alice"})
    token = minted["token"]
    status, refused = await client.call("POST", "/v1/embeddings", token, "mallory", EMBED)
    assert (status, refused["error"]["code"], refused["error"]["param"]) == (403, "forbidden", "X-End-User-Id")
    assert (await client.call("POST", "/v1/embeddings", token, "alice", EMBED))[0] == 200  # the same: harmless
    status, unnamed = await client.call("POST", "/v1/tokens", BACKEND_KEY, body={})
    status, refused = await client.call("GET", "/v1/usage", unnamed["token"], "alice")
    assert (status, refused["error"]["code"]) == (403, "forbidden")  # a token minted for no user stays so
    status, mallory = await client.call("GET", "/v1/usage", token, "alice")
    assert status == 200 and mallory["user"] == "u:g:alice" and mallory["total"]["calls"] == 1


@pytest.mark.parametrize("value", ["", "a" * 129, "alice bob", "alice\u00e9", "../alice", "a,b", "u%3Ag"])
async def test_bad_end_user_ids_are_json_400s(client: Client, value: str) -> None:
    status, answer = await client.call("POST", "/v1/embeddings", BACKEND_KEY, value, EMBED)
    assert (status, answer["error"]["code"], answer["error"]["param"]) == (400, "invalid_request", "X-End-User-Id")


async def test_two_end_user_headers_and_a_huge_one_are_refused(client: Client) -> None:
    two = [("Authorization", f"Bearer {BACKEND_KEY}"), ("X-End-User-Id", "alice"), ("X-End-User-Id", "bob")]
    async with client.http.post(client.url + "/v1/embeddings", json=EMBED, headers=two) as response:
        assert response.status == 400 and (await response.json())["error"]["param"] == "X-End-User-Id"
    status, answer = await client.call("POST", "/v1/embeddings", BACKEND_KEY, "a" * 9000, EMBED)
    assert (status, answer["error"]["code"]) == (431, "headers_too_large")


def test_the_access_log_names_the_end_user_by_a_hash_only() -> None:
    key = Principal(kind="api_key", account="acme", plan="pro", key_id="backend")
    assert end_user_log_id(key) is None
    named = with_end_user(key, ["alice"])
    assert principal_log_id(named) == "backend"
    assert end_user_log_id(named) == end_user_log_id(Principal("gateway_token", "acme", "pro", "backend", "alice"))
    assert "alice" not in (end_user_log_id(named) or "")
    with pytest.raises(ApiError):
        with_end_user(Principal("issuer", "acme", "members", subject="u1", issuer="clerk"), ["u2"])
