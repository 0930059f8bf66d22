"""`GET /v1/usage` through a running gateway: the caller's own figures only (a token with `sub` sees its user's,
a key its account's, another account nothing of them), the stable JSON shape, and bad parameters refused; and
`GET /v1/admin/usage` for any account, with the admin token only."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import openai
import pytest

from proxy.auth.api_keys import hash_key

from .gateway_harness import gateway_config, start_gateway, write_policy
from .mock_provider import MockProvider

BACKEND_KEY = "sk_test_backend_" + "b" * 32
RIVAL_KEY = "sk_test_rival_" + "r" * 34
ADMIN_TOKEN = "adm_" + "u" * 40
POLICY = f"""
plans:
  pro:
    models: ["mock/*"]
    budget: {{credits: 1000, period: month, scope: account}}
keys:
  - {{id: backend, hash: "{hash_key(BACKEND_KEY)}", plan: pro, account: acme}}
  - {{id: rival, hash: "{hash_key(RIVAL_KEY)}", plan: pro, account: globex}}
prices:
  "mock/*": {{per_request: 1}}
"""
EMBED = {"model": "mock/embed", "input": "hi"}
FIGURES = {"calls", "credits", "tokens_in", "tokens_out", "images", "seconds"}


class Client:
    def __init__(self, url: str, http: aiohttp.ClientSession) -> None:
        self.url, self.http = url, http

    async def call(self, method: str, path: str, credential: str | None, body: Any = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {credential}"} if credential else {}
        async with self.http.request(method, self.url + path, json=body, headers=headers) as response:
            return response.status, await response.json()

    async def usage(self, credential: str, query: str = "") -> tuple[int, Any]:
        """The caller's own usage; with the admin token, the admin route."""
        path = "/v1/admin/usage" if credential == ADMIN_TOKEN else "/v1/usage"
        return await self.call("GET", f"{path}{query}", credential)


@pytest.fixture
async def client(
    provider: MockProvider, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gateway_env: None
) -> AsyncIterator[Client]:
    monkeypatch.setenv("TEST_ADMIN_TOKEN", ADMIN_TOKEN)
    config = gateway_config(provider.url, write_policy(tmp_path / "policies", POLICY), demo={"enabled": False},
                            admin={"token_env": "TEST_ADMIN_TOKEN"})
    server = await start_gateway(config)
    async with aiohttp.ClientSession() as http:
        yield Client(server.url, http)
    await server.stop()


async def test_each_caller_sees_its_own_usage_only(client: Client) -> None:
    for _ in range(2):
        assert (await client.call("POST", "/v1/embeddings", BACKEND_KEY, EMBED))[0] == 200
    status, minted = await client.call("POST", "/v1/tokens", BACKEND_KEY, {"sub": "alice"})
    assert status == 200
    token = minted["token"]
    async with openai.AsyncOpenAI(base_url=f"{client.url}/v1", api_key=token, max_retries=0, timeout=10) as sdk:
        await sdk.chat.completions.create(model="mock/chat", messages=[{"role": "user", "content": "hi"}])
    today = datetime.now(timezone.utc).date().isoformat()

    status, account = await client.usage(BACKEND_KEY)
    assert status == 200
    assert set(account) == {"scope", "account", "user", "from", "to", "group_by", "data", "total"}
    assert (account["scope"], account["account"], account["user"]) == ("account", "acme", None)
    assert account["to"] == today and account["from"] == today[:8] + "01" and account["group_by"] == ["day", "model"]
    rows = {(row["day"], row["model"]): row for row in account["data"]}
    assert set(rows) == {(today, "mock/chat"), (today, "mock/embed")}
    assert all(set(row) == {"day", "model", *FIGURES} for row in account["data"])
    assert (rows[today, "mock/embed"]["calls"], rows[today, "mock/embed"]["credits"]) == (2, 2.0)
    assert account["total"]["calls"] == 3 and account["total"]["credits"] == 3.0
    assert rows[today, "mock/chat"]["tokens_in"] > 0 and rows[today, "mock/chat"]["tokens_out"] > 0

    status, own = await client.usage(token)  # a token with `sub`: its user's usage, not the account's
    assert status == 200 and (own["scope"], own["user"]) == ("user", "u:g:alice")
    assert [(row["model"], row["calls"]) for row in own["data"]] == [("mock/chat", 1)]
    assert own["total"]["calls"] == 1

    for sub in ("bob", "u:g:alice", "alice:", "*"):  # other users, and names that try to pass for alice's key
        status, minted = await client.call("POST", "/v1/tokens", BACKEND_KEY, {"sub": sub})
        status, other = await client.usage(minted["token"])
        assert status == 200 and other["scope"] == "user" and other["user"] != "u:g:alice"
        assert other["data"] == [] and other["total"]["calls"] == 0, sub

    status, rival = await client.usage(RIVAL_KEY)  # another account sees nothing of acme's
    assert status == 200 and rival["account"] == "globex" and rival["data"] == [] and rival["total"]["calls"] == 0

    status, by_model = await client.usage(BACKEND_KEY, "?group_by=model")
    assert status == 200 and [set(row) for row in by_model["data"]] == [{"model", *FIGURES}] * 2
    status, totals = await client.usage(BACKEND_KEY, "?group_by=")
    assert status == 200 and totals["data"] == [totals["total"]]
    status, past = await client.usage(BACKEND_KEY, "?from=2020-01-01&to=2020-01-31")
    assert status == 200 and past["data"] == [] and past["total"]["calls"] == 0


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ("?from=2026-13-01", "from"),
        ("?from=yesterday", "from"),
        ("?to=20260101", "to"),
        ("?to=2026-1-01", "to"),
        ("?from=2026-02-01&to=2026-01-01", "from"),
        ("?from=2025-01-01&to=2025-12-31", "from"),  # more than 92 days
        ("?group_by=week", "group_by"),
        ("?group_by=day,day", "group_by"),
        ("?to=2026-01-01&to=2026-01-02", "to"),
        ("?account=globex", "account"),  # no way to ask for another account
        ("?user=u:g:bob", "user"),
    ],
)
async def test_bad_parameters_are_refused_with_a_stable_code(client: Client, query: str, param: str) -> None:
    status, answer = await client.usage(BACKEND_KEY, query)
    assert status == 400
    assert (answer["error"]["code"], answer["error"]["param"]) == ("invalid_request", param)


async def test_usage_needs_a_credential(client: Client) -> None:
    status, answer = await client.call("GET", "/v1/usage", None)
    assert status == 401 and answer["error"]["code"] == "missing_credentials"


async def test_a_range_of_exactly_92_days_is_accepted(client: Client) -> None:
    last = datetime.now(timezone.utc).date()
    first = last - timedelta(days=91)
    status, answer = await client.usage(BACKEND_KEY, f"?from={first.isoformat()}&to={last.isoformat()}")
    assert status == 200 and answer["from"] == first.isoformat()


async def test_the_admin_reads_any_account_and_user_and_nobody_else_can(client: Client) -> None:
    assert (await client.call("POST", "/v1/embeddings", BACKEND_KEY, EMBED))[0] == 200
    status, minted = await client.call("POST", "/v1/tokens", BACKEND_KEY, {"sub": "alice"})
    assert (await client.call("POST", "/v1/embeddings", minted["token"], EMBED))[0] == 200
    assert (await client.call("POST", "/v1/embeddings", RIVAL_KEY, EMBED))[0] == 200

    status, acme = await client.usage(ADMIN_TOKEN, "?account=acme&group_by=model")
    assert status == 200 and (acme["scope"], acme["account"], acme["user"]) == ("account", "acme", None)
    assert acme["data"] == [{"model": "mock/embed", **acme["total"]}] and acme["total"]["calls"] == 2
    status, alice = await client.usage(ADMIN_TOKEN, "?account=acme&user=u:g:alice")
    assert status == 200 and alice["scope"] == "user" and alice["total"]["calls"] == 1
    status, globex = await client.usage(ADMIN_TOKEN, "?account=globex")
    assert status == 200 and globex["total"]["calls"] == 1
    status, nobody = await client.usage(ADMIN_TOKEN, "?account=nobody")
    assert status == 200 and nobody["data"] == [] and nobody["total"]["calls"] == 0

    for credential in (BACKEND_KEY, minted["token"]):  # the caller's own route; the admin route refuses them
        status, answer = await client.call("GET", "/v1/admin/usage?account=acme", credential)
        assert (status, answer["error"]["code"]) == (403, "admin_required")
    for query, param in [("", "account"), ("?account=", "account"), ("?account=acme&user=a%00b", "user"),
                         ("?account=acme&from=2026-02-30", "from"), ("?account=acme&sort=credits", "sort")]:
        status, answer = await client.usage(ADMIN_TOKEN, query)
        assert (status, answer["error"]["code"], answer["error"]["param"]) == (400, "invalid_request", param), query
