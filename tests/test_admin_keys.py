"""The keys admin API over real HTTP: two gateway replicas on one real Redis, the admin token from the environment,
a real identity provider's token, and the access log as written."""

from __future__ import annotations

import asyncio
import io
import json
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest
import redis.asyncio as aioredis
from cryptography.hazmat.primitives import serialization

from proxy.__main__ import main
from proxy.accesslog import configure_logging
from proxy.api.state import GATEWAY
from proxy.config import ConfigError, parse_config
from proxy.errors import ApiError
from proxy.gateway import build_gateway
from proxy.auth.api_keys import hash_key
from proxy.auth.tokens import SigningKey
from proxy.server import RunningServer
from proxy.store import RedisStore, Store
from proxy.store.base import MAX_BUDGET, Adjustment, LedgerSpec
from proxy.store.ledger import LedgerReader
from proxy.store.keys import RECORDS_KEY, VERSION_KEY

from .gateway_harness import DEFAULT_POLICY, PROVIDER_KEY, TEST_KEY, gateway_config, start_gateway, write_policy
from .jwks_server import JwksServer, RsaKey, clerk_claims
from .mock_provider import MockProvider

ADMIN_TOKEN = "adm_" + "a" * 40
REFRESH_S = 0.2  # admin.keys_refresh_s of the replicas
BOUND_S = REFRESH_S + 1.0  # the documented bound: one refresh period plus one store call (op and connect timeouts)
ADMIN_ROUTES = [
    ("POST", "/v1/admin/keys"),
    ("GET", "/v1/admin/keys"),
    ("GET", "/v1/admin/keys/some-key"),
    ("PATCH", "/v1/admin/keys/some-key"),
    ("POST", "/v1/admin/keys/some-key/disable"),
    ("POST", "/v1/admin/keys/some-key/enable"),
    ("POST", "/v1/admin/keys/some-key/rotate"),
    ("GET", "/v1/admin/usage?account=acme"),
    ("POST", "/v1/admin/accounts/some-account/credits"),
]


def policy_text(extra_keys: str = "") -> str:
    return (DEFAULT_POLICY.replace("plans:\n", "plans:\n  pro:\n    models: [\"mock/*\"]\n", 1)
            + f"keys:\n  - {{id: backend, hash: \"{hash_key('sk_backend_' + 'b' * 30)}\", plan: pro}}\n" + extra_keys)


@dataclass
class Replicas:
    a: str
    b: str
    servers: list[RunningServer]
    http: aiohttp.ClientSession
    log: io.StringIO
    idp: JwksServer
    idp_key: RsaKey
    policies: Path

    async def call(self, method: str, url: str, path: str, credential: str | None = ADMIN_TOKEN,
                   body: Any = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {credential}"} if credential else {}
        async with self.http.request(method, url + path, headers=headers,
                                     data=None if body is None else json.dumps(body)) as r:
            return r.status, await r.json()

    async def admin(self, method: str, path: str, body: Any = None, url: str | None = None) -> Any:
        status, answer = await self.call(method, url or self.a, path, ADMIN_TOKEN, body)
        assert status in (200, 201), answer
        return answer

    async def chat_status(self, url: str, credential: str) -> int:
        body = {"model": "mock/chat", "messages": [{"role": "user", "content": "hi"}]}
        status, _ = await self.call("POST", url, "/v1/chat/completions", credential, body)
        return status

    async def logged(self, text: str) -> None:
        """Wait for the batching log writer (it writes every 50 ms) to have written `text`."""
        for _ in range(100):
            if text in self.log.getvalue():
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"{text!r} was not logged")

    async def within_bound(self, url: str, credential: str, status: int) -> float:
        """Seconds until `credential` gets `status` on `url`; fails past the documented bound."""
        started = time.monotonic()
        while (got := await self.chat_status(url, credential)) != status:
            assert time.monotonic() - started < BOUND_S, f"still {got} after {BOUND_S}s"
            await asyncio.sleep(0.02)
        return time.monotonic() - started


@pytest.fixture
async def replicas(tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Replicas]:
    monkeypatch.setenv("MOCK_PROVIDER_KEY", PROVIDER_KEY)
    monkeypatch.setenv("EDGE_PROXY_DEMO_KEY", TEST_KEY)
    monkeypatch.setenv("TEST_ADMIN_TOKEN", ADMIN_TOKEN)
    signing = SigningKey.generate().private_key
    assert signing is not None
    monkeypatch.setenv("TEST_SIGNING_KEY", signing.private_bytes(  # shared: a token minted on one verifies on both
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode())
    client = aioredis.Redis.from_url(redis_url)
    await client.delete(RECORDS_KEY, VERSION_KEY)
    await client.aclose()
    log = io.StringIO()
    stop_logging = configure_logging("info", stream=log)
    provider = await MockProvider().start()
    policies = write_policy(tmp_path / "policies", policy_text())
    servers: list[RunningServer] = []
    idp_key = RsaKey.generate()
    async with JwksServer([idp_key]) as idp:
        try:
            config = gateway_config(
                provider.url, policies, store={"kind": "redis", "redis_url": redis_url},
                admin={"token_env": "TEST_ADMIN_TOKEN", "keys_refresh_s": REFRESH_S},
                auth={"signing_keys": [{"env": "TEST_SIGNING_KEY"}]},
                issuers={"clerk": {"issuer": idp.issuer, "jwks_url": idp.jwks_url, "plan": "pro",
                                   "authorized_parties": ["https://app.example.com"]}},
            )
            for _ in range(2):
                servers.append(await start_gateway(config))
            async with aiohttp.ClientSession() as http:
                yield Replicas(servers[0].url, servers[1].url, servers, http, log, idp, idp_key, policies)
        finally:
            for server in servers:
                await server.stop()
            await provider.stop()
            stop_logging()


async def test_every_admin_route_refuses_every_non_admin_credential(replicas: Replicas) -> None:
    status, minted = await replicas.call("POST", replicas.a, "/v1/tokens", TEST_KEY, {})
    assert status == 200
    idp_token = replicas.idp_key.sign(clerk_claims(replicas.idp.issuer))
    assert await replicas.chat_status(replicas.a, idp_token) == 200  # a valid session: still no admin
    refused = {
        None: (401, "missing_credentials"),
        TEST_KEY: (403, "admin_required"),
        minted["token"]: (403, "admin_required"),
        idp_token: (403, "admin_required"),
        "sk_unknown_" + "x" * 30: (403, "admin_required"),
        ADMIN_TOKEN + "x": (401, "invalid_admin_token"),
        "adm_" + "b" * 40: (401, "invalid_admin_token"),
    }
    for method, path in ADMIN_ROUTES:
        for credential, (status, code) in refused.items():
            got, answer = await replicas.call(method, replicas.a, path, credential, {"plan": "pro"})
            assert (got, answer["error"]["code"]) == (status, code), (method, path, credential)
    status, keys = await replicas.call("GET", replicas.a, "/v1/admin/keys")
    assert status == 200 and not [k for k in keys["keys"] if k["source"] == "store"]  # nothing was created


async def test_admin_api_is_off_without_an_admin_credential(
    provider: MockProvider, gateway_env: None, policies_dir: Path
) -> None:
    server = await start_gateway(gateway_config(provider.url, policies_dir))
    try:
        async with aiohttp.ClientSession() as http:
            for method, path in ADMIN_ROUTES:
                for credential in (ADMIN_TOKEN, TEST_KEY):
                    headers = {"Authorization": f"Bearer {credential}"}
                    async with http.request(method, server.url + path, headers=headers, json={"plan": "demo"}) as r:
                        assert r.status == 404 and (await r.json())["error"]["code"] == "admin_api_disabled"
    finally:
        await server.stop()


async def test_a_key_created_disabled_enabled_and_rotated_on_one_replica_follows_on_the_other(
    replicas: Replicas,
) -> None:
    created = await replicas.admin("POST", "/v1/admin/keys", {"id": "team-a", "plan": "pro", "account": "acme",
                                                              "reason": "onboarding"})
    secret = created["secret"]
    assert secret.startswith("sk_") and created["key"]["in_effect"] and created["key"]["billing_account"] == "acme"
    assert await replicas.chat_status(replicas.a, secret) == 200  # at once on the replica that created it
    await replicas.within_bound(replicas.b, secret, 200)
    status, minted = await replicas.call("POST", replicas.b, "/v1/tokens", secret, {"sub": "u1"})
    assert status == 200
    token = minted["token"]

    await replicas.admin("POST", "/v1/admin/keys/team-a/disable", {"reason": "leaked"})
    assert await replicas.chat_status(replicas.a, secret) == 401
    await replicas.within_bound(replicas.b, secret, 401)
    assert await replicas.chat_status(replicas.b, token) == 401  # its minted tokens die with it

    await replicas.admin("POST", "/v1/admin/keys/team-a/enable", url=replicas.b)
    await replicas.within_bound(replicas.a, secret, 200)
    assert await replicas.chat_status(replicas.a, token) == 200

    rotated = await replicas.admin("POST", "/v1/admin/keys/team-a/rotate")
    new_secret = rotated["secret"]
    assert new_secret != secret and new_secret.startswith("sk_")
    await replicas.within_bound(replicas.b, secret, 401)
    await replicas.within_bound(replicas.b, new_secret, 200)
    assert await replicas.chat_status(replicas.b, token) == 401  # minted from the old secret

    listed = (await replicas.admin("GET", "/v1/admin/keys", url=replicas.b))["keys"]
    mine = [k for k in listed if k["id"] == "team-a"]
    assert len(mine) == 1 and mine[0]["source"] == "store" and mine[0]["in_effect"]
    assert {"backend", "demo"} <= {k["id"] for k in listed if k["source"] == "policy"}
    text = json.dumps(listed) + replicas.log.getvalue()
    for value in (secret, new_secret, ADMIN_TOKEN, hash_key(secret).removeprefix("sha256:")):
        assert value not in text  # never listed, never logged
    await replicas.logged('"admin_action":"key.rotate"')
    audit = [json.loads(line) for line in replicas.log.getvalue().splitlines() if '"admin_action"' in line]
    actions = [(a["admin_action"], a["admin_target"], a["admin_reason"], a["status"]) for a in audit
               if a.get("admin_action")]
    assert ("key.create", "team-a", "onboarding", 201) in actions
    assert ("key.disable", "team-a", "leaked", 200) in actions
    assert ("key.rotate", "team-a", None, 200) in actions


async def test_ids_conflicting_with_policy_keys_are_refused(replicas: Replicas) -> None:
    for key_id in ("backend", "demo"):
        status, answer = await replicas.call("POST", replicas.a, "/v1/admin/keys", body={"id": key_id, "plan": "pro"})
        assert status == 409 and answer["error"]["code"] == "key_exists" and answer["error"]["source"] == "policy"
        status, answer = await replicas.call("POST", replicas.a, f"/v1/admin/keys/{key_id}/disable")
        assert status == 409 and answer["error"]["code"] == "key_managed_by_policy"
    await replicas.admin("POST", "/v1/admin/keys", {"id": "dup", "plan": "pro"})
    status, answer = await replicas.call("POST", replicas.b, "/v1/admin/keys", body={"id": "dup", "plan": "pro"})
    assert status == 409 and answer["error"]["code"] == "key_exists"
    status, answer = await replicas.call("POST", replicas.a, "/v1/admin/keys/nope/disable")
    assert status == 404 and answer["error"]["code"] == "key_not_found"


async def test_a_policy_reload_that_claims_a_stored_id_wins_and_leaves_the_stored_key_out(replicas: Replicas) -> None:
    stored = (await replicas.admin("POST", "/v1/admin/keys", {"id": "team-x", "plan": "pro"}))["secret"]
    await replicas.within_bound(replicas.b, stored, 200)
    declared = "sk_declared_" + "d" * 30
    write_policy(replicas.policies, policy_text(f"  - {{id: team-x, hash: \"{hash_key(declared)}\", plan: pro}}\n"))
    for server in replicas.servers:
        assert server.runner.app[GATEWAY].policy.reload()  # the reload is not refused
    for url in (replicas.a, replicas.b):
        assert await replicas.chat_status(url, declared) == 200
        assert await replicas.chat_status(url, stored) == 401
    key = (await replicas.admin("GET", "/v1/admin/keys/team-x"))["key"]
    assert key["source"] == "policy"
    listed = [k for k in (await replicas.admin("GET", "/v1/admin/keys"))["keys"] if k["id"] == "team-x"]
    shadowed = next(k for k in listed if k["source"] == "store")
    assert not shadowed["in_effect"] and "already exists in the policy files" in shadowed["problem"]
    await replicas.logged("admin-managed key team-x is not in effect")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "plan"),
        ({"plan": "nope"}, "plan"),
        ({"plan": 7}, "plan"),
        ({"plan": "pro", "id": "has space"}, "id"),
        ({"plan": "pro", "id": "{tag}"}, "id"),
        ({"plan": "pro", "account": ""}, "account"),
        ({"plan": "pro", "allow_direct": "yes"}, "allow_direct"),
        ({"plan": "pro", "overrides": 5}, "overrides"),
        ({"plan": "pro", "overrides": {"concurency": 2}}, "overrides"),
        ({"plan": "pro", "overrides": {"models": ["other/*"]}}, "overrides"),
        ({"plan": "pro", "overrides": {"budget": {"period": "day"}}}, "plan"),
        ({"plan": "pro", "secret": "sk_mine"}, "secret"),
        ({"plan": "pro", "reason": "x" * 501}, "reason"),
    ],
)
async def test_bad_input_is_a_400_naming_the_field(replicas: Replicas, body: dict[str, Any], param: str) -> None:
    status, answer = await replicas.call("POST", replicas.a, "/v1/admin/keys", body=body)
    assert status == 400 and answer["error"]["code"] == "invalid_request", answer
    assert answer["error"]["param"] == param, answer
    async with replicas.http.post(replicas.a + "/v1/admin/keys", data=b"{not json",
                                  headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as r:
        assert r.status == 400 and (await r.json())["error"]["code"] == "invalid_request"


def test_admin_token_settings_are_checked_at_start_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_SUCH_ADMIN_TOKEN", raising=False)
    monkeypatch.setenv("WEAK_ADMIN_TOKEN", "short")
    monkeypatch.setenv("KEY_AS_ADMIN_TOKEN", TEST_KEY)
    cases = [
        ({"token_env": "NO_SUCH_ADMIN_TOKEN"}, "admin.token_env: env var NO_SUCH_ADMIN_TOKEN is not set"),
        ({"token_env": "WEAK_ADMIN_TOKEN"}, "at least 32 characters"),
        ({"token_env": "KEY_AS_ADMIN_TOKEN"}, "not look like an API key"),
        ({"token_file": "missing.txt"}, "admin.token_file: cannot read"),
        ({"token_sha256": ["sha256:ABC"]}, r"admin.token_sha256\[0\]: not sha256:"),
        ({"tokn_env": "X"}, "admin.tokn_env: unknown key"),
    ]
    for admin, message in cases:
        with pytest.raises(ConfigError, match=message):
            build_gateway(parse_config(gateway_config("http://127.0.0.1:1", write_policy(tmp_path / "p"),
                                                      admin=admin), "test-config"), announce=False)
    (tmp_path / "admin-token").write_text(ADMIN_TOKEN + "\n")
    config = parse_config(gateway_config("http://127.0.0.1:1", write_policy(tmp_path / "p"),
                                         admin={"token_file": str(tmp_path / "admin-token"),
                                                "token_sha256": [hash_key("adm_" + "c" * 40)]}), "test-config")
    credential = build_gateway(config, announce=False).admin
    for token in (ADMIN_TOKEN, "adm_" + "c" * 40):
        credential.check(f"Bearer {token}")  # either configured token passes
    with pytest.raises(ApiError) as refused:
        credential.check(f"Bearer {hash_key(ADMIN_TOKEN).removeprefix('sha256:')}")  # its hash is not it
    assert refused.value.code == "invalid_admin_token"


async def test_a_top_up_changes_the_balance_exactly_on_every_replica(replicas: Replicas, redis_url: str) -> None:
    started_ms = int(time.time() * 1000)
    secret = (await replicas.admin("POST", "/v1/admin/keys", {"id": "payer", "plan": "demo", "account": "acme"}))[
        "secret"]
    await replicas.within_bound(replicas.b, secret, 200)  # one call: 1 credit spent

    async def balance() -> dict[str, float]:
        status, me = await replicas.call("GET", replicas.b, "/v1/me", secret)
        assert status == 200, me
        return me["balance"]

    async def remaining() -> float:
        return (await balance())["remaining"]

    spent = (await balance())["spent"]
    before = await remaining()
    answer = await replicas.admin("POST", "/v1/admin/accounts/acme/credits", {"credits": 12.5, "reason": "goodwill"})
    assert answer["period"] == "month" and answer["spent"] == spent - 12.5
    assert await remaining() == before + 12.5
    await replicas.admin("POST", "/v1/admin/accounts/acme/credits", {"credits": -2.25, "reason": "correction"})
    assert await remaining() == before + 10.25
    await replicas.logged('"admin_action":"credits.adjust","admin_target":"acme","admin_reason":"correction",'
                          f'"admin_actor":"admin:{hash_key(ADMIN_TOKEN)[7:19]}"')
    # each adjustment is a ledger record, written with it: its reason, the admin actor, the balance change
    reader = RedisStore(redis_url)
    try:
        records = [r.fields for r in await reader.read_ledger("ep:{acme}:lg", count=10_000)
                   if r.fields["outcome"] in ("topup", "adjustment") and int(r.fields["ts"]) >= started_ms]
    finally:
        await reader.close()
    assert [(r["outcome"], int(r["credits"]), r["reason"]) for r in records] == [
        ("topup", -12_500_000, "goodwill"), ("adjustment", 2_250_000, "correction")]
    assert all(r["actor"] == f"admin:{hash_key(ADMIN_TOKEN)[7:19]}" and r["account"] == "acme"
               and r["request_id"].startswith("req_") and r["key"] == "" for r in records)

    for body, param in [
        ({"credits": 0, "reason": "x"}, "credits"),
        ({"credits": 4e-7, "reason": "x"}, "credits"),  # below one micro-credit: it would change nothing
        ({"credits": -4e-7, "reason": "x"}, "credits"),
        ({"credits": "5", "reason": "x"}, "credits"),
        ({"credits": True, "reason": "x"}, "credits"),
        ({"credits": 10**10, "reason": "x"}, "credits"),
        ({"credits": 5}, "reason"),
        ({"credits": 5, "reason": "x", "period": "week"}, "period"),
        ({"credits": 5, "reason": "x", "note": "?"}, "note"),
    ]:
        status, refused = await replicas.call("POST", replicas.a, "/v1/admin/accounts/acme/credits", body=body)
        assert status == 400 and refused["error"]["param"] == param, (body, refused)
    status, refused = await replicas.call("POST", replicas.a, "/v1/admin/accounts/nobody/credits",
                                          body={"credits": 5, "reason": "x"})
    assert status == 400 and refused["error"]["param"] == "period"  # no key of that account has a budget
    assert await remaining() == before + 10.25  # refused calls changed nothing


async def test_the_key_list_is_paged_by_cursor_and_bad_paging_is_a_400(replicas: Replicas) -> None:
    for key_id in ("page-c", "page-a", "page-b"):
        await replicas.admin("POST", "/v1/admin/keys", {"id": key_id, "plan": "pro"})
    everything = await replicas.admin("GET", "/v1/admin/keys?limit=1000")
    assert everything["next_cursor"] is None
    expected = [(k["source"], k["id"]) for k in everything["keys"]]
    assert expected[:3] == [("store", "page-a"), ("store", "page-b"), ("store", "page-c")]  # stored, then files'
    assert len(expected) > 4 and all(source == "policy" for source, _ in expected[3:])
    paged: list[tuple[str, str]] = []
    path = "/v1/admin/keys?limit=2"
    while True:
        page = await replicas.admin("GET", path, url=replicas.b)
        assert 1 <= len(page["keys"]) <= 2
        paged += [(k["source"], k["id"]) for k in page["keys"]]
        if page["next_cursor"] is None:
            break
        path = f"/v1/admin/keys?limit=2&cursor={page['next_cursor']}"
    assert paged == expected
    assert len((await replicas.admin("GET", "/v1/admin/keys"))["keys"]) == len(expected)  # default page: 100
    for query, param in [("limit=0", "limit"), ("limit=1001", "limit"), ("limit=2x", "limit"), ("limit=%C2%B2", "limit"),
                         ("cursor=elsewhere:page-a", "cursor"), ("cursor=store:", "cursor"), ("offset=2", "offset"),
                         ("limit=2&limit=3", "limit")]:
        status, refused = await replicas.call("GET", replicas.a, f"/v1/admin/keys?{query}")
        assert status == 400 and refused["error"]["param"] == param, (query, refused)


async def test_credit_adjustments_are_exact_in_both_stores_and_each_is_a_ledger_record(store: Store) -> None:
    ledger = "ep:{acct}:cr:account:acct:none"
    now_ms = int(time.time() * 1000)
    audit = Adjustment(LedgerSpec("ep:{acct}", "req-adm", "acct", "", "", "", 86_400_000, 100), "adj-1", now_ms,
                       "invoice 7", "admin:0123456789ab")
    assert await store.adjust_credits(ledger, 3_000_000, 0, audit) == -3_000_000
    assert await store.adjust_credits(ledger, -500_001, 0, audit) == -2_499_999
    for bad in (MAX_BUDGET + 1, -MAX_BUDGET - 1):
        with pytest.raises(ValueError):
            await store.adjust_credits(ledger, bad, 0, audit)
    assert await store.adjust_credits(ledger, 0, 0, audit) == -2_499_999
    reader: LedgerReader = store  # type: ignore[assignment]
    records = [r.fields for r in await reader.read_ledger("ep:{acct}:lg")]
    assert [(r["outcome"], int(r["credits"])) for r in records] == [
        ("topup", -3_000_000), ("adjustment", 500_001), ("adjustment", 0)]  # the refused ones wrote nothing
    assert records[0]["reason"] == "invoice 7" and records[0]["actor"] == "admin:0123456789ab"
    assert (records[0]["tokens_in"], records[0]["model"], records[0]["late"]) == ("0", "", "0")  # as in Redis
    # a balance change, not usage: the daily aggregates do not count it
    day = datetime.fromtimestamp(now_ms / 1000, timezone.utc).strftime("%Y%m%d")
    assert await reader.read_usage([f"ep:{{acct}}:us:a:{day}"]) == [{}]


async def test_cli_verbs_drive_a_running_gateway(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setenv("EDGE_PROXY_URL", replicas.a)
    monkeypatch.delenv("EDGE_PROXY_ADMIN_TOKEN", raising=False)

    async def cli(*argv: str) -> tuple[int, Any, str]:
        status = await asyncio.to_thread(main, ["keys", *argv])  # the HTTP client blocks; the gateway serves
        out, err = capsys.readouterr()
        return status, json.loads(out) if status == 0 else None, err

    status, _, err = await cli("list")
    assert status == 1 and "no admin token: export EDGE_PROXY_ADMIN_TOKEN" in err
    monkeypatch.setenv("EDGE_PROXY_ADMIN_TOKEN", ADMIN_TOKEN)
    status, created, _ = await cli("create", "--plan", "demo", "--id", "cli-key", "--account", "cli-acct",
                                   "--overrides", '{"concurrency": 3}', "--reason", "from the CLI")
    secret = created["secret"]
    assert status == 0 and created["key"]["overrides"] == {"concurrency": 3}
    await replicas.within_bound(replicas.b, secret, 200)
    status, listed, _ = await cli("list")
    assert "cli-key" in {k["id"] for k in listed["keys"]} and secret not in json.dumps(listed)
    monkeypatch.setattr("proxy.admin_client.PAGE", 2)  # several pages: `list` follows next_cursor through them
    status, paged, _ = await cli("list")
    assert status == 0 and paged == listed and len(listed["keys"]) > 2
    status, changed, _ = await cli("set", "cli-key", "--allow-direct", "false", "--overrides", "null")
    assert changed["key"]["allow_direct"] is False and changed["key"]["overrides"] == {}
    await replicas.within_bound(replicas.b, secret, 403)  # mint-only now
    await cli("set", "cli-key", "--allow-direct", "true")
    await cli("disable", "cli-key", "--reason", "test")
    await replicas.within_bound(replicas.b, secret, 401)
    status, enabled, _ = await cli("enable", "cli-key")
    assert status == 0 and not enabled["key"]["disabled"]
    status, rotated, _ = await cli("rotate", "cli-key")
    await replicas.within_bound(replicas.b, rotated["secret"], 200)
    status, got, _ = await cli("get", "cli-key")
    assert status == 0 and got["key"]["in_effect"]
    status, topped, _ = await cli("topup", "cli-acct", "7.5", "--reason", "promo")
    assert status == 0 and topped["credits"] == 7.5 and topped["period"] == "month"
    status, _, err = await cli("topup", "cli-acct", "-1", "--reason", "fix", "--url", "http://127.0.0.1:1")
    assert status == 1 and "cannot reach" in err
    status, _, err = await cli("create", "--plan", "demo", "--id", "cli-key")
    assert status == 1 and "HTTP 409" in err and "key_exists" in err
    (tmp_path / "wrong").write_text("adm_" + "w" * 40)
    status, _, err = await cli("list", "--token-file", str(tmp_path / "wrong"))
    assert status == 1 and "HTTP 401" in err and "invalid_admin_token" in err
    assert secret not in replicas.log.getvalue() and rotated["secret"] not in replicas.log.getvalue()


async def test_cli_answers_a_bad_url_or_a_non_json_answer_with_a_message_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    monkeypatch.setenv("EDGE_PROXY_ADMIN_TOKEN", ADMIN_TOKEN)
    for url in ("", "http://[broken", "127.0.0.1:8080"):
        assert await asyncio.to_thread(main, ["keys", "list", "--url", url]) == 1
        assert "edge-proxy keys list:" in capsys.readouterr().err
    async def login_page(_: web.Request) -> web.Response:
        return web.Response(text="<html>a login page</html>")

    not_a_gateway = web.Application()
    not_a_gateway.router.add_get("/v1/admin/keys", login_page)
    async with TestServer(not_a_gateway, host="127.0.0.1") as server:
        status = await asyncio.to_thread(main, ["keys", "list", "--url", str(server.make_url(""))])
    assert status == 1 and "not JSON: is it the gateway?" in capsys.readouterr().err


HOSTILE_BODIES: list[bytes] = [
    b"[]", b"7", b"null", b'"x"', b"{}", b'{"plan": NaN}', b'{"credits": Infinity}', b'{"credits": 1e400}',
    b'{"credits": -1e400}', b'{"credits": ' + b"9" * 5000 + b"}", b'{"credits": 1e-400, "reason": "r"}',
    b'{"credits": "5", "reason": "r"}', b'{"credits": 1, "reason": "r", "period": []}',
    b'{"credits": 1, "reason": "r", "period": {"a": 1}}', b'{"credits": true, "reason": "r"}',
    b'{"plan": "pro", "plan": "nope"}', b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    b'{"plan": "pro", "reason": "' + b"x" * 2_000_000 + b'"}', b'{"plan": "pro", "reason": "\\u0000"}',
    b'{"plan": "pro", "reason": "\\ud800"}', b'{"plan": ["pro"]}', b'{"plan": {"pro": 1}}',
    b'{"plan": "pro", "id": "\xc3\xa9t\xc3\xa9"}', b'{"plan": "pro", "id": ' + b"1" * 400 + b"}",
    b'{"plan": "pro", "overrides": {"concurrency": 1e400}}', b'{"plan": "pro", "overrides": {"concurrency": -1}}',
    b'{"plan": "pro", "overrides": {"budget": {"credits": 1e400, "period": "day"}}}',
    b'{"plan": "pro", "overrides": {"budget": []}}', b'{"plan": "pro", "overrides": []}', b'{"plan": "pro", "allow_direct": 1}', b"\xff\xfe{",
]
HOSTILE_PATHS = ["/v1/admin/keys/%00", "/v1/admin/keys/" + "k" * 5000, "/v1/admin/keys/%C3%A9",
                 "/v1/admin/keys/..%2Fetc", "/v1/admin/accounts/%00/credits", "/v1/admin/accounts/" + "a" * 5000 + "/credits"]


async def test_hostile_bodies_paths_and_queries_are_json_errors_never_a_500(replicas: Replicas) -> None:
    async def expect_4xx(method: str, path: str, data: bytes | None = None, credential: str = ADMIN_TOKEN) -> None:
        async with replicas.http.request(method, replicas.a + path, data=data,
                                         headers={"Authorization": f"Bearer {credential}"}) as r:
            assert 400 <= r.status < 500, (method, path[:80], (data or b"")[:60], r.status, await r.text())
            assert isinstance((await r.json())["error"]["code"], str)

    body_routes = [("POST", "/v1/admin/keys"), ("PATCH", "/v1/admin/keys/backend"),
                   ("POST", "/v1/admin/accounts/acme/credits"), ("PATCH", "/v1/admin/keys/missing")]
    for method, path in body_routes:
        for data in HOSTILE_BODIES:
            if method == "PATCH" and data in (b"{}",):
                continue
            await expect_4xx(method, path, data)
    for path in HOSTILE_PATHS:
        for method in ("GET", "PATCH", "POST"):
            await expect_4xx(method, path, b'{"credits": 1, "reason": "r", "plan": "pro"}')
    for query in ["cursor=" + "9" * 5000, "cursor=-1", "cursor=store:%00", "cursor=store:" + "z" * 5000,
                  "cursor=%FF", "limit=-1", "limit=1e3", "limit=" + "9" * 5000, "limit=", "cursor=", "limit=%00",
                  "limit=NaN", "limit=Infinity", "limit=%EF%BC%91"]:
        await expect_4xx("GET", "/v1/admin/keys?" + query)
    for query in ["account=", "account=%00", "account=" + "a" * 5000, "account=acme&from=-1", "account=acme&from=NaN",
                  "account=acme&from=9" + "9" * 400, "account=acme&to=2026-13-40", "account=acme&group_by=%00",
                  "account=acme&account=b", "account=%F0%9F%98%80%0A"]:
        await expect_4xx("GET", "/v1/admin/usage?" + query)
    for query in ["from=-1", "from=" + "9" * 5000, "from=2026-02-30", "to=%00", "group_by=" + "x" * 5000,
                  "group_by=day&group_by=model", "from=2026-01-01&to=2025-01-01", "from=NaN", "user=x"]:
        await expect_4xx("GET", "/v1/usage?" + query, credential=TEST_KEY)
