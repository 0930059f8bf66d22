"""Identity end to end over real HTTP: API keys, minted tokens, the JWKS, Clerk-shaped session tokens, revocation."""

from __future__ import annotations

import asyncio
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import jwt
import openai
import pytest

from proxy.accesslog import configure_logging
from proxy.auth.api_keys import hash_key
from proxy.server import RunningServer

from .gateway_harness import PROVIDER_KEY, gateway_config, start_gateway, write_policy
from .jwks_server import JwksServer, RsaKey, clerk_claims
from .mock_provider import MockProvider

BACKEND_KEY = "sk_test_backend_" + "b" * 32
MINTER_KEY = "sk_test_minter_" + "m" * 32
APP_ORIGIN = "https://app.example.com"
CHAT = {"model": "mock/chat", "messages": [{"role": "user", "content": "hi"}]}


def policy_text(*, backend_disabled: bool = False) -> str:
    # The lines `edge-proxy keys new` prints, with the test keys' hashes.
    return f"""
plans:
  pro:
    models: ["mock/*"]
    rate_limits: [{{per: user, requests: 2, window: 1m}}]
    budget: {{credits: 1000000, period: month, scope: account}}
keys:
  - {{id: backend, hash: "{hash_key(BACKEND_KEY)}", plan: pro, disabled: {str(backend_disabled).lower()}}}
  - {{id: minter, hash: "{hash_key(MINTER_KEY)}", plan: pro, allow_direct: false}}
prices:
  "mock/*": {{per_request: 1}}
"""


@dataclass
class Env:
    url: str
    http: aiohttp.ClientSession
    idp: JwksServer
    idp_key: RsaKey
    policies: Path
    log: io.StringIO

    async def call(self, method: str, path: str, credential: str | None = None, body: Any = None) -> tuple[int, Any, Any]:
        headers = {"Authorization": f"Bearer {credential}"} if credential else {}
        async with self.http.request(method, self.url + path, json=body, headers=headers) as r:
            return r.status, await r.json(), r.headers

    async def mint(self, key: str = BACKEND_KEY, **body: Any) -> str:
        status, answer, _ = await self.call("POST", "/v1/tokens", key, body)
        assert status == 200, answer
        return answer["token"]


@pytest.fixture
async def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Env]:
    monkeypatch.setenv("MOCK_PROVIDER_KEY", PROVIDER_KEY)
    log = io.StringIO()
    stop_logging = configure_logging("info", stream=log)
    provider = await MockProvider().start()
    idp_key = RsaKey.generate()
    policies = write_policy(tmp_path / "policies", policy_text())
    server: RunningServer | None = None
    async with JwksServer([idp_key]) as idp:
        try:
            config = gateway_config(
                provider.url, policies,
                demo={"enabled": False},
                policies={"watch_interval_s": 0.05},
                issuers={"clerk": {"issuer": idp.issuer, "jwks_url": idp.jwks_url,
                                   "authorized_parties": [APP_ORIGIN], "plan": "pro"}},
            )
            server = await start_gateway(config)
            async with aiohttp.ClientSession() as http:
                yield Env(server.url, http, idp, idp_key, policies, log)
        finally:
            if server is not None:
                await server.stop()
            await provider.stop()
            stop_logging()


async def test_minted_token_streams_through_the_sdk_and_verifies_with_the_served_jwks(env: Env) -> None:
    before = int(time.time())
    status, minted, headers = await env.call("POST", "/v1/tokens", BACKEND_KEY, {"sub": "user-1", "ttl": 120})
    assert status == 200 and set(minted) == {"token", "expires_at", "expires_in"}
    assert minted["expires_in"] == 120 and before + 120 <= minted["expires_at"] <= int(time.time()) + 120
    assert headers["Cache-Control"] == "no-store"
    token = minted["token"]

    async with openai.AsyncOpenAI(base_url=f"{env.url}/v1", api_key=token, max_retries=0, timeout=10) as client:
        stream = await client.chat.completions.create(
            model="mock/chat", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream])
    assert text == "Hello from the mock"

    status, jwks, _ = await env.call("GET", "/.well-known/jwks.json")
    assert status == 200
    kid = jwt.get_unverified_header(token)["kid"]
    served = next(k for k in jwks["keys"] if k["kid"] == kid)
    assert "d" not in served  # public half only
    claims = jwt.decode(token, jwt.PyJWK(served).key, algorithms=[served["alg"]],
                        audience="edge-proxy", issuer="edge-proxy")
    assert claims["sub"] == "user-1" and claims["key_id"] == "backend" and claims["exp"] == minted["expires_at"]


async def test_narrowed_token_is_refused_outside_its_scopes_and_wider_scopes_cannot_be_minted(env: Env) -> None:
    token = await env.mint(scopes=["mock/chat"])
    assert (await env.call("POST", "/v1/chat/completions", token, CHAT))[0] == 200
    status, answer, _ = await env.call("POST", "/v1/embeddings", token, {"model": "mock/embed", "input": "x"})
    assert status == 403 and answer["error"]["code"] == "provider_not_authorized"

    for wider in (["*"], ["other/model"], "mock/chat"):
        status, answer, _ = await env.call("POST", "/v1/tokens", BACKEND_KEY, {"scopes": wider})
        assert status == 400 and answer["error"]["code"] == "invalid_request", wider


async def test_per_user_rate_limit_counts_each_token_subject_separately(env: Env) -> None:
    alice, bob = await env.mint(sub="alice"), await env.mint(sub="bob")
    for token in (alice, bob):
        statuses = [(await env.call("POST", "/v1/chat/completions", token, CHAT))[0] for _ in range(3)]
        assert statuses == [200, 200, 429]  # the plan allows 2 per user per minute


async def test_mint_only_key_can_mint_but_not_call_models_and_tokens_cannot_mint(env: Env) -> None:
    status, answer, _ = await env.call("POST", "/v1/chat/completions", MINTER_KEY, CHAT)
    assert status == 403 and answer["error"]["code"] == "forbidden"
    token = await env.mint(MINTER_KEY)
    assert (await env.call("POST", "/v1/chat/completions", token, CHAT))[0] == 200

    status, answer, _ = await env.call("POST", "/v1/tokens", token, {})
    assert status == 403 and answer["error"]["code"] == "forbidden"


async def test_clerk_session_token_is_accepted_and_billed_to_the_namespaced_subject(env: Env) -> None:
    session = env.idp_key.sign(clerk_claims(env.idp.issuer, sub="user_42", azp=APP_ORIGIN))
    status, answer, _ = await env.call("POST", "/v1/chat/completions", session, CHAT)
    assert status == 200, answer
    status, me, _ = await env.call("GET", "/v1/me", session)
    assert status == 200
    assert me["principal"]["type"] == "issuer" and me["principal"]["issuer"] == "clerk"
    assert me["principal"]["account"] == "clerk:user_42" and me["plan"] == "pro"


@pytest.mark.parametrize(("claims", "code"), [
    ({"azp": "https://evil.example.com"}, "invalid_token"),
    ({"ttl": -120}, "token_expired"),
])
async def test_clerk_token_for_another_party_or_expired_is_401_with_a_challenge(
    env: Env, claims: dict[str, Any], code: str
) -> None:
    session = env.idp_key.sign(clerk_claims(env.idp.issuer, **claims))
    status, answer, headers = await env.call("POST", "/v1/chat/completions", session, CHAT)
    assert status == 401 and answer["error"]["code"] == code
    challenge = headers["WWW-Authenticate"]
    assert challenge.startswith("Bearer ") and 'error="invalid_token"' in challenge


async def test_missing_credentials_is_401_with_a_bare_challenge(env: Env) -> None:
    status, answer, headers = await env.call("POST", "/v1/chat/completions", None, CHAT)
    assert status == 401 and answer["error"]["code"] == "missing_credentials"
    assert headers["WWW-Authenticate"].startswith("Bearer realm=")


async def test_disabling_a_key_in_the_policy_kills_its_raw_use_and_its_minted_tokens(env: Env) -> None:
    token = await env.mint()
    assert (await env.call("POST", "/v1/chat/completions", token, CHAT))[0] == 200

    write_policy(env.policies, policy_text(backend_disabled=True))
    deadline = time.monotonic() + 5
    while (status := (await env.call("GET", "/v1/me", BACKEND_KEY))[0]) == 200 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)  # the watcher polls every 50 ms
    assert status == 401
    for credential, code in ((BACKEND_KEY, "invalid_api_key"), (token, "invalid_token")):
        status, answer, _ = await env.call("POST", "/v1/chat/completions", credential, CHAT)
        assert status == 401 and answer["error"]["code"] == code
    assert (await env.call("POST", "/v1/tokens", BACKEND_KEY, {}))[0] == 401


async def test_no_key_or_token_is_ever_logged(env: Env) -> None:
    token = await env.mint(sub="logged-user")
    session = env.idp_key.sign(clerk_claims(env.idp.issuer))
    for credential in (BACKEND_KEY, token, session, "sk_unknown_" + "u" * 30):
        await env.call("POST", "/v1/chat/completions", credential, CHAT)
    await env.call("POST", "/v1/tokens", MINTER_KEY, {})
    await env.call("GET", "/v1/me", token)
    await asyncio.sleep(0.2)  # the log writer runs on a background thread
    lines = [json.loads(line) for line in env.log.getvalue().splitlines() if line.strip()]
    access = [line for line in lines if line["logger"] == "edge_proxy.access"]
    callers = {(line["path"], line["principal_id"]) for line in access}
    # Every authenticated route names its caller, minting included (who minted is an audit question).
    assert {("/v1/chat/completions", "backend"), ("/v1/tokens", "minter"), ("/v1/me", "backend")} <= callers
    text = env.log.getvalue()
    for secret in (BACKEND_KEY, MINTER_KEY, token, session, token.split(".")[2], session.split(".")[2]):
        assert secret not in text
