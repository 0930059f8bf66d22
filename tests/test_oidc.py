"""External issuer verification against a local JWKS server: the attack battery and JWKS cache behaviour."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import AsyncIterator

import pytest
from cryptography.hazmat.primitives import serialization

from proxy.auth.oidc import IssuerSettings, IssuerVerifier
from proxy.errors import ApiError
from tests.jwks_server import JwksServer, RsaKey, clerk_claims

KEY = RsaKey.generate("ins_current")
ROTATED = RsaKey.generate("ins_rotated")
FOREIGN = RsaKey.generate("ins_current")  # same kid as KEY, different key material
APP = "https://app.example.com"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict, claims: dict, signature: bytes = b"") -> str:
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}.{b64(signature)}"


def settings_for(idp: JwksServer, **overrides) -> IssuerSettings:
    base = IssuerSettings(
        name="clerk", issuer=idp.issuer, jwks_url=idp.jwks_url, plan="members",
        authorized_parties=(APP,), fetch_timeout_s=0.3, unknown_kid_cooldown_s=10,
    )
    return dataclasses.replace(base, **overrides)


@pytest.fixture
async def idp() -> AsyncIterator[JwksServer]:
    async with JwksServer([KEY]) as server:
        yield server


@pytest.fixture
async def verifier(idp: JwksServer) -> AsyncIterator[IssuerVerifier]:
    v = IssuerVerifier(settings_for(idp))
    yield v
    await v.aclose()


async def rejected(verifier: IssuerVerifier, token: str, kid: str = KEY.kid) -> ApiError:
    with pytest.raises(ApiError) as info:
        await verifier.verify(token, kid)
    return info.value


async def test_valid_clerk_session_token_maps_to_principal(idp, verifier):
    claims = clerk_claims(idp.issuer, sub="user_42")
    principal = await verifier.verify(KEY.sign(claims), KEY.kid)
    assert (principal.kind, principal.issuer, principal.account, principal.subject, principal.plan) == (
        "issuer", "clerk", "clerk:user_42", "user_42", "members")
    assert principal.token_id == claims["jti"] and principal.label == "clerk"


async def test_alg_none_is_rejected(idp, verifier):
    token = forge({"alg": "none", "kid": KEY.kid, "typ": "JWT"}, clerk_claims(idp.issuer))
    assert (await rejected(verifier, token)).code == "invalid_token"


async def test_hs256_signed_with_the_public_key_pem_is_rejected(idp, verifier):
    # Algorithm confusion: a verifier that trusts the header's alg would use the public PEM as an HMAC secret.
    pem = KEY.private_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    header, claims = {"alg": "HS256", "kid": KEY.kid, "typ": "JWT"}, clerk_claims(idp.issuer)
    signing_input = forge(header, claims).rsplit(".", 1)[0].encode()
    token = forge(header, claims, hmac.new(pem, signing_input, hashlib.sha256).digest())
    err = await rejected(verifier, token)
    assert err.code == "invalid_token" and "alg" in err.message


async def test_expired_token_is_token_expired(idp, verifier):
    now = int(time.time())
    token = KEY.sign(clerk_claims(idp.issuer, iat=now - 600, nbf=now - 600, exp=now - 120))
    assert (await rejected(verifier, token)).code == "token_expired"


async def test_expiry_within_leeway_is_accepted(idp, verifier):
    token = KEY.sign(clerk_claims(idp.issuer, exp=int(time.time()) - 10))  # leeway is 30 s
    assert (await verifier.verify(token, KEY.kid)).subject == "user_2abc"


async def test_not_yet_valid_token_is_rejected(idp, verifier):
    token = KEY.sign(clerk_claims(idp.issuer, nbf=int(time.time()) + 300))
    err = await rejected(verifier, token)
    assert err.code == "invalid_token" and "not yet valid" in err.message


async def test_wrong_issuer_is_rejected_even_as_a_prefix_match(idp, verifier):
    token = KEY.sign(clerk_claims(idp.issuer + ".evil.example"))
    err = await rejected(verifier, token)
    assert err.code == "invalid_token" and "issuer" in err.message.lower()


async def test_wrong_authorized_party_is_rejected(idp, verifier):
    err = await rejected(verifier, KEY.sign(clerk_claims(idp.issuer, azp="https://evil.example.com")))
    assert err.code == "invalid_token" and "azp" in err.message


async def test_missing_authorized_party_is_rejected_when_parties_are_configured(idp, verifier):
    claims = clerk_claims(idp.issuer)
    del claims["azp"]
    assert (await rejected(verifier, KEY.sign(claims))).code == "invalid_token"


async def test_authorized_party_is_not_checked_when_none_configured(idp):
    v = IssuerVerifier(settings_for(idp, authorized_parties=()))
    try:
        assert (await v.verify(KEY.sign(clerk_claims(idp.issuer, azp="https://any.example")), KEY.kid)).kind == "issuer"
    finally:
        await v.aclose()


async def test_tampered_payload_is_rejected(idp, verifier):
    header, _, signature = KEY.sign(clerk_claims(idp.issuer, sub="user_victim")).split(".")
    payload = b64(json.dumps(clerk_claims(idp.issuer, sub="user_attacker")).encode())
    err = await rejected(verifier, f"{header}.{payload}.{signature}")
    assert err.code == "invalid_token" and "Signature" in err.message


async def test_token_signed_by_a_foreign_key_with_a_known_kid_is_rejected(idp, verifier):
    assert (await rejected(verifier, FOREIGN.sign(clerk_claims(idp.issuer)))).code == "invalid_token"


async def test_wrong_audience_is_rejected(idp):
    v = IssuerVerifier(settings_for(idp, audience="edge-proxy"))
    try:
        assert (await v.verify(KEY.sign(clerk_claims(idp.issuer, aud="edge-proxy")), KEY.kid)).kind == "issuer"
        err = await rejected(v, KEY.sign(clerk_claims(idp.issuer, aud="another-api")))
        assert err.code == "invalid_token" and "audience" in err.message.lower()
    finally:
        await v.aclose()


async def test_unknown_kid_is_rejected(idp, verifier):
    stranger = RsaKey.generate("ins_unknown")
    err = await rejected(verifier, stranger.sign(clerk_claims(idp.issuer)), stranger.kid)
    assert err.code == "invalid_token" and "kid" in err.message


async def test_a_thousand_random_kids_cause_a_bounded_number_of_fetches(idp, verifier):
    token = KEY.sign(clerk_claims(idp.issuer))
    kids = [secrets.token_hex(8) for _ in range(1000)]
    results = await asyncio.gather(*(verifier.verify(token, kid) for kid in kids), return_exceptions=True)
    assert all(isinstance(r, ApiError) and r.code == "invalid_token" for r in results)
    for kid in kids[:100]:  # sequential attempts after the burst: still inside the cooldown
        await rejected(verifier, token, kid)
    assert idp.fetches == 1  # one coalesced fetch, then the cooldown holds


async def test_concurrent_first_requests_share_one_fetch(idp, verifier):
    tokens = [KEY.sign(clerk_claims(idp.issuer, sub=f"user_{i}")) for i in range(20)]
    principals = await asyncio.gather(*(verifier.verify(t, KEY.kid) for t in tokens))
    assert [p.account for p in principals] == [f"clerk:user_{i}" for i in range(20)] and idp.fetches == 1


async def test_key_rotated_at_the_issuer_works_on_first_use(idp):
    v = IssuerVerifier(settings_for(idp, unknown_kid_cooldown_s=0.1))
    try:
        await v.verify(KEY.sign(clerk_claims(idp.issuer)), KEY.kid)
        idp.keys = [KEY, ROTATED]
        await asyncio.sleep(0.15)  # a real rotation comes long after the last fetch; the cooldown is past
        principal = await v.verify(ROTATED.sign(clerk_claims(idp.issuer, sub="user_rotated")), ROTATED.kid)
        assert principal.subject == "user_rotated" and idp.fetches == 2
    finally:
        await v.aclose()


async def test_cached_keys_keep_working_while_the_jwks_endpoint_is_down(idp):
    v = IssuerVerifier(settings_for(idp, jwks_cache_ttl_s=0.05, unknown_kid_cooldown_s=0))
    try:
        await v.verify(KEY.sign(clerk_claims(idp.issuer)), KEY.kid)
        idp.mode = "error"
        await asyncio.sleep(0.1)  # the cache is now stale: refreshes are tried and fail
        for _ in range(3):
            assert (await v.verify(KEY.sign(clerk_claims(idp.issuer)), KEY.kid)).kind == "issuer"
            await asyncio.sleep(0.01)
        assert idp.fetches >= 2  # the refresh was really attempted
        assert (await rejected(v, ROTATED.sign(clerk_claims(idp.issuer)), ROTATED.kid)).code == "invalid_token"
    finally:
        await v.aclose()


async def test_stale_cache_refreshes_at_most_once_per_cooldown_while_the_endpoint_is_down(idp):
    v = IssuerVerifier(settings_for(idp, jwks_cache_ttl_s=0.01, unknown_kid_cooldown_s=10))
    try:
        await v.verify(KEY.sign(clerk_claims(idp.issuer)), KEY.kid)
        idp.mode = "error"
        for _ in range(20):
            await asyncio.sleep(0.02)  # stale on every request
            assert (await v.verify(KEY.sign(clerk_claims(idp.issuer)), KEY.kid)).kind == "issuer"
        assert idp.fetches == 1  # the first fetch was less than a cooldown ago: no hammering of a sick IdP
    finally:
        await v.aclose()


async def test_stale_cache_is_refreshed_in_the_background(idp):
    v = IssuerVerifier(settings_for(idp, jwks_cache_ttl_s=0.05, unknown_kid_cooldown_s=0.05))
    try:
        await v.verify(KEY.sign(clerk_claims(idp.issuer)), KEY.kid)
        await asyncio.sleep(0.1)
        await v.verify(KEY.sign(clerk_claims(idp.issuer)), KEY.kid)  # served from cache, starts a refresh
        for _ in range(50):
            if idp.fetches == 2:
                break
            await asyncio.sleep(0.01)
        assert idp.fetches == 2
    finally:
        await v.aclose()


async def test_never_fetched_and_endpoint_erroring_is_a_prompt_503(idp, verifier):
    idp.mode = "error"
    started = time.monotonic()
    err = await rejected(verifier, KEY.sign(clerk_claims(idp.issuer)))
    assert (err.status, err.code) == (503, "auth_unavailable") and "clerk" in err.message
    assert time.monotonic() - started < 1.0  # an immediate answer, not a hang


async def test_never_fetched_and_endpoint_gone_is_a_prompt_503(idp, verifier):
    await idp.stop()
    started = time.monotonic()
    assert (await rejected(verifier, KEY.sign(clerk_claims(idp.issuer)))).code == "auth_unavailable"
    assert time.monotonic() - started < 1.0  # an immediate answer, not a hang


async def test_hanging_endpoint_is_cut_off_by_the_fetch_timeout(idp, verifier):
    idp.mode = "hang"
    started = time.monotonic()
    err = await asyncio.wait_for(rejected(verifier, KEY.sign(clerk_claims(idp.issuer))), timeout=2)
    elapsed = time.monotonic() - started
    assert err.code == "auth_unavailable" and 0.25 <= elapsed < 1.5  # fetch_timeout_s is 0.3


async def test_after_a_failed_first_fetch_requests_fail_fast_within_the_cooldown(idp, verifier):
    idp.mode = "hang"
    await rejected(verifier, KEY.sign(clerk_claims(idp.issuer)))
    started = time.monotonic()
    assert (await rejected(verifier, KEY.sign(clerk_claims(idp.issuer)))).code == "auth_unavailable"
    assert time.monotonic() - started < 0.25 and idp.fetches == 1


async def test_plan_is_mapped_from_a_nested_claim(idp):
    v = IssuerVerifier(settings_for(idp, plan_claim="metadata.plan", plan_map={"pro": "pro-plan"}))
    try:
        pro = await v.verify(KEY.sign(clerk_claims(idp.issuer, metadata={"plan": "pro"})), KEY.kid)
        unmapped = await v.verify(KEY.sign(clerk_claims(idp.issuer, metadata={"plan": "gold"})), KEY.kid)
        absent = await v.verify(KEY.sign(clerk_claims(idp.issuer)), KEY.kid)
        assert (pro.plan, unmapped.plan, absent.plan) == ("pro-plan", "members", "members")
    finally:
        await v.aclose()


async def test_account_claim_bills_the_organisation_and_is_required(idp):
    v = IssuerVerifier(settings_for(idp, account_claim="org_id"))
    try:
        principal = await v.verify(KEY.sign(clerk_claims(idp.issuer, sub="user_1", org_id="org_9")), KEY.kid)
        assert (principal.account, principal.subject) == ("clerk:org_9", "user_1")
        err = await rejected(v, KEY.sign(clerk_claims(idp.issuer, sub="user_1")))
        assert err.code == "invalid_token" and "org_id" in err.message
    finally:
        await v.aclose()


@pytest.mark.parametrize("algorithms", [("none",), ("HS256",), ("RS256", "HS512"), ()])
def test_symmetric_or_none_algorithms_are_refused_in_settings(algorithms):
    with pytest.raises(ValueError, match="issuers.clerk.algorithms"):
        IssuerSettings(name="clerk", issuer="https://clerk.example.com", plan="members",
                       jwks_url="https://clerk.example.com/.well-known/jwks.json", algorithms=algorithms)


def test_plain_http_jwks_url_is_refused_except_on_loopback():
    with pytest.raises(ValueError, match="issuers.clerk.jwks_url"):
        IssuerSettings(name="clerk", issuer="https://clerk.example.com", plan="members",
                       jwks_url="http://clerk.example.com/.well-known/jwks.json")
    assert IssuerSettings(name="clerk", issuer="x", plan="m", jwks_url="http://127.0.0.1:1/jwks").issuer == "x"


async def test_every_fetch_attempt_is_reported_with_its_outcome(idp):
    reports: list[tuple[str, bool]] = []
    verifier = IssuerVerifier(settings_for(idp, unknown_kid_cooldown_s=0), on_fetch=lambda *r: reports.append(r))
    try:
        idp.mode = "error"
        assert (await rejected(verifier, KEY.sign(clerk_claims(idp.issuer)))).code == "auth_unavailable"
        assert reports == [("clerk", False)]  # told before the request's answer
        idp.mode = "ok"
        await verifier.verify(KEY.sign(clerk_claims(idp.issuer)), KEY.kid)
        assert reports == [("clerk", False), ("clerk", True)]
    finally:
        await verifier.aclose()
