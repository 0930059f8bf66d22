"""Gateway-minted tokens: key loading and rotation, minting rules, scope narrowing, strict verification."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.auth.api_keys import ApiKey, hash_key
from proxy.auth.tokens import (
    GatewayTokens,
    KeyConfigError,
    KeyRing,
    SigningKey,
    SigningKeySettings,
    TokenSettings,
    jwk_thumbprint,
    narrow_scopes,
    scope_matches,
)
from proxy.errors import ApiError

SETTINGS = TokenSettings(issuer="https://gateway.example.com", audience="edge-proxy", leeway_s=0)
OLD = SigningKey.generate()
NEW = SigningKey.generate()
KEY = ApiKey(id="backend", hash=hash_key("sk_backend"), plan="members", account="acme")
KEY_SCOPES = ["openai/*", "bfl/flux-2"]


def pem(private_key) -> bytes:
    return private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def tokens(ring: KeyRing | None = None, **overrides) -> GatewayTokens:
    return GatewayTokens(TokenSettings(**{**SETTINGS.__dict__, **overrides}), ring or KeyRing(NEW))


def invalid_request(call) -> ApiError:
    with pytest.raises(ApiError) as info:
        call()
    assert info.value.code == "invalid_request"
    return info.value


def test_kid_is_the_rfc7638_thumbprint():
    # The example key and thumbprint of RFC 7638, section 3.1.
    rfc_key = {
        "kty": "RSA", "e": "AQAB", "alg": "RS256", "kid": "2011-04-29",
        "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMs"
             "tn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n9"
             "1CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
    }
    assert jwk_thumbprint(rfc_key) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
    jwk = NEW.public_jwk()
    assert NEW.kid == jwk_thumbprint(jwk) and jwk["kid"] == NEW.kid and jwk["alg"] == "ES256"


def test_keys_load_from_file_and_from_env(tmp_path, monkeypatch):
    private = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "signing.pem").write_bytes(pem(private))
    monkeypatch.setenv("GATEWAY_SIGNING_KEY", pem(ed25519.Ed25519PrivateKey.generate()).decode())
    ring = KeyRing.from_settings([
        SigningKeySettings(file=str(tmp_path / "signing.pem"), active=True),
        SigningKeySettings(env="GATEWAY_SIGNING_KEY"),
    ])
    assert ring.active.algorithm == "ES256" and ring.active.kid == SigningKey.from_key(private).kid
    assert [k["alg"] for k in ring.jwks()["keys"]] == ["ES256", "EdDSA"]


def test_an_eddsa_key_signs_verifiable_tokens():
    minted = tokens(KeyRing(SigningKey.from_key(ed25519.Ed25519PrivateKey.generate()))).mint(KEY, key_scopes=KEY_SCOPES)
    assert jwt.get_unverified_header(minted.token)["alg"] == "EdDSA"


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([SigningKeySettings(env="NO_SUCH_SIGNING_KEY_VAR")], r"auth.signing_keys\[0\]: env var NO_SUCH_SIGNING_KEY_VAR is not set"),
        ([SigningKeySettings(file="/nonexistent/key.pem")], r"auth.signing_keys\[0\]: cannot read key file"),
        ([SigningKeySettings(file="a.pem", env="B")], r"auth.signing_keys\[0\]: set exactly one of 'file'"),
        ([SigningKeySettings()], r"set exactly one of 'file'"),
    ],
)
def test_key_settings_errors_name_the_setting_and_the_fix(entries, message):
    with pytest.raises(KeyConfigError, match=message):
        KeyRing.from_settings(entries)


def test_non_pem_rsa_and_ambiguous_active_keys_are_config_errors(tmp_path):
    (tmp_path / "junk.pem").write_text("not a key")
    (tmp_path / "rsa.pem").write_bytes(pem(rsa.generate_private_key(public_exponent=65537, key_size=2048)))
    (tmp_path / "a.pem").write_bytes(pem(ec.generate_private_key(ec.SECP256R1())))
    (tmp_path / "b.pem").write_bytes(pem(ec.generate_private_key(ec.SECP256R1())))
    with pytest.raises(KeyConfigError, match="not a PEM key; create one with `openssl genpkey"):
        KeyRing.from_settings([SigningKeySettings(file=str(tmp_path / "junk.pem"))])
    with pytest.raises(KeyConfigError, match="use an EC P-256 key"):
        KeyRing.from_settings([SigningKeySettings(file=str(tmp_path / "rsa.pem"))])
    with pytest.raises(KeyConfigError, match="exactly one key with 'active: true' \\(found 0\\)"):
        KeyRing.from_settings([SigningKeySettings(file=str(tmp_path / n)) for n in ("a.pem", "b.pem")])


def test_no_configured_key_means_an_ephemeral_key_and_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="proxy.auth.tokens"):
        first, second = KeyRing.from_settings([]), KeyRing.from_settings([])
    assert first.active.kid != second.active.kid
    assert "multi-replica deployments MUST configure" in caplog.text


def test_minted_token_carries_the_documented_claims():
    gateway = GatewayTokens(SETTINGS, KeyRing(NEW), clock=lambda: 2_000_000_000.0)
    minted = gateway.mint(KEY, key_scopes=KEY_SCOPES, sub="user-7", ttl=120, scopes=["openai/gpt-5.4-mini"])
    header = jwt.get_unverified_header(minted.token)
    claims = jwt.decode(minted.token, options={"verify_signature": False})
    assert (header["alg"], header["kid"]) == ("ES256", NEW.kid)
    assert {k: claims[k] for k in ("iss", "aud", "sub", "iat", "exp", "key_id", "plan", "scopes")} == {
        "iss": SETTINGS.issuer, "aud": "edge-proxy", "sub": "user-7", "iat": 2_000_000_000, "exp": 2_000_000_120,
        "key_id": "backend", "plan": "members", "scopes": ["openai/gpt-5.4-mini"],
    }
    assert (minted.expires_at, minted.expires_in) == (2_000_000_120, 120) and len(claims["jti"]) >= 16


def test_mint_then_verify_round_trips():
    gateway = tokens()
    minted = gateway.mint(KEY, key_scopes=KEY_SCOPES, sub="user-7")
    claims = gateway.verify(minted.token)
    assert (claims.key_id, claims.subject, claims.scopes, claims.plan) == ("backend", "user-7", tuple(KEY_SCOPES), "members")


def test_ttl_defaults_and_is_capped():
    gateway = tokens(default_ttl_s=300, max_ttl_s=3600)
    assert gateway.mint(KEY, key_scopes=KEY_SCOPES).expires_in == 300
    assert gateway.mint(KEY, key_scopes=KEY_SCOPES, ttl=86_400).expires_in == 3600


@pytest.mark.parametrize("ttl", [0, -5, "60", 1.5, True, [60]])
def test_bad_ttl_is_invalid_request(ttl):
    assert invalid_request(lambda: tokens().mint(KEY, key_scopes=KEY_SCOPES, ttl=ttl)).details["param"] == "ttl"


@pytest.mark.parametrize("sub", ["", 7, "x" * 257, "line\nbreak"])
def test_bad_sub_is_invalid_request(sub):
    assert invalid_request(lambda: tokens().mint(KEY, key_scopes=KEY_SCOPES, sub=sub)).details["param"] == "sub"


@pytest.mark.parametrize(
    ("requested", "granted"),
    [
        (["openai/gpt-5.4-mini"], ("openai/gpt-5.4-mini",)),  # a model inside a key glob
        (["openai/*"], ("openai/*",)),  # a glob equal to a key glob
        (["bfl/flux-2", "bfl/flux-2"], ("bfl/flux-2",)),
    ],
)
def test_scopes_can_narrow(requested, granted):
    assert narrow_scopes(requested, KEY_SCOPES) == granted


@pytest.mark.parametrize(
    "requested",
    [["*"], ["bfl/*"], ["anthropic/claude"], ["openai/gpt-*"], ["bfl/flux-?"], ["openai/x", "google/gemini"], [], "openai/*", [""], [3]],
)
def test_scopes_cannot_widen_or_be_malformed(requested):
    assert invalid_request(lambda: narrow_scopes(requested, KEY_SCOPES)).details["param"] == "scopes"


MODEL_IDS = st.text(alphabet="ab/-", min_size=1, max_size=5)
SCOPES = st.text(alphabet="ab/-*?", min_size=1, max_size=5)


@settings(max_examples=300, deadline=None)
@given(key_scopes=st.lists(SCOPES, min_size=1, max_size=4), requested=st.lists(SCOPES, min_size=1, max_size=4),
       probes=st.lists(MODEL_IDS, min_size=1, max_size=20))
def test_granted_scopes_never_reach_a_model_the_key_cannot(key_scopes, requested, probes):
    try:
        granted = narrow_scopes(requested, key_scopes)
    except ApiError:
        return
    for model in probes + [s for s in requested if "*" not in s and "?" not in s]:
        if any(scope_matches(g, model) for g in granted):
            assert any(scope_matches(k, model) for k in key_scopes), (model, granted, key_scopes)


def test_token_used_after_its_ttl_is_token_expired():
    minted = GatewayTokens(SETTINGS, KeyRing(NEW), clock=lambda: time.time() - 600).mint(KEY, key_scopes=KEY_SCOPES, ttl=60)
    with pytest.raises(ApiError) as info:
        tokens().verify(minted.token)
    assert info.value.code == "token_expired"


def test_signing_key_rotation_keeps_old_tokens_valid_and_lists_both_keys():
    old_token = tokens(KeyRing(OLD)).mint(KEY, key_scopes=KEY_SCOPES).token
    rotated = tokens(KeyRing(NEW, [OLD]))
    new_token = rotated.mint(KEY, key_scopes=KEY_SCOPES).token
    assert rotated.verify(old_token).key_id == rotated.verify(new_token).key_id == "backend"
    assert jwt.get_unverified_header(new_token)["kid"] == NEW.kid
    assert [k["kid"] for k in rotated.ring.jwks()["keys"]] == [NEW.kid, OLD.kid]
    assert all("d" not in k for k in rotated.ring.jwks()["keys"])  # public halves only
    with pytest.raises(ApiError, match="not signed by a current gateway key"):
        tokens(KeyRing(NEW)).verify(old_token)  # once the old key is dropped, its tokens die


def rejected(token: str, gateway: GatewayTokens | None = None) -> ApiError:
    with pytest.raises(ApiError) as info:
        (gateway or tokens()).verify(token)
    assert info.value.code == "invalid_token"
    return info.value


def test_wrong_audience_is_rejected():
    assert "audience" in rejected(tokens(audience="someone-else").mint(KEY, key_scopes=KEY_SCOPES).token).message.lower()


def test_wrong_issuer_with_our_key_is_rejected():
    assert "issuer" in rejected(tokens(issuer="https://other.example.com").mint(KEY, key_scopes=KEY_SCOPES).token).message.lower()


def test_token_from_our_issuer_signed_by_a_foreign_key_is_rejected():
    foreign = ec.generate_private_key(ec.SECP256R1())
    claims = jwt.decode(tokens().mint(KEY, key_scopes=["*"]).token, options={"verify_signature": False})
    forged = jwt.encode({**claims, "scopes": ["*"]}, foreign, algorithm="ES256", headers={"kid": NEW.kid})
    assert "Signature" in rejected(forged).message


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_alg_none_and_hs256_with_the_public_key_are_rejected():
    claims = jwt.decode(tokens().mint(KEY, key_scopes=KEY_SCOPES).token, options={"verify_signature": False})
    body = b64(json.dumps(claims).encode())
    none_token = f"{b64(json.dumps({'alg': 'none', 'kid': NEW.kid}).encode())}.{body}."
    public_pem = NEW.public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    signing_input = f"{b64(json.dumps({'alg': 'HS256', 'kid': NEW.kid}).encode())}.{body}"
    hs_token = f"{signing_input}.{b64(hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest())}"
    assert "alg" in rejected(none_token).message and "alg" in rejected(hs_token).message


def test_missing_required_claims_are_rejected():
    claims = jwt.decode(tokens().mint(KEY, key_scopes=KEY_SCOPES).token, options={"verify_signature": False})
    del claims["key_id"]
    forged = jwt.encode(claims, NEW.private_key, algorithm="ES256", headers={"kid": NEW.kid})
    assert "key_id" in rejected(forged).message


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def test_a_verified_token_is_remembered_until_it_expires_and_not_a_moment_longer():
    clock = Clock()
    gateway = GatewayTokens(SETTINGS, KeyRing(NEW), clock=clock)
    minted = gateway.mint(KEY, key_scopes=KEY_SCOPES, ttl=60)
    assert gateway.cached(minted.token) is None  # minting is not verifying
    claims = gateway.verify(minted.token)
    assert gateway.cached(minted.token) == claims
    clock.now = minted.expires_at - 0.001
    assert gateway.cached(minted.token) == claims
    clock.now = minted.expires_at
    assert gateway.cached(minted.token) is None
    with pytest.raises(ApiError) as info:
        gateway.verify(minted.token)
    assert info.value.code == "token_expired"


def test_an_expired_token_is_refused_as_expired_before_its_signature_is_checked():
    clock = Clock()
    gateway = GatewayTokens(SETTINGS, KeyRing(NEW), clock=clock)
    token = gateway.mint(KEY, key_scopes=KEY_SCOPES, ttl=60).token
    head, payload, _ = token.split(".")
    garbage = head + "." + payload + "." + base64.urlsafe_b64encode(b"\0" * 64).decode().rstrip("=")
    clock.now += 61
    with pytest.raises(ApiError) as info:
        gateway.verify(garbage)
    assert info.value.code == "token_expired"
    assert gateway.cached(garbage) is None


def test_the_cache_matches_exact_tokens_only():
    gateway = tokens()
    token = gateway.mint(KEY, key_scopes=KEY_SCOPES).token
    gateway.verify(token)
    head, payload, signature = token.split(".")
    tampered = f"{head}.{payload}.{signature[:-2]}{'AA' if signature[-2:] != 'AA' else 'BB'}"
    assert gateway.cached(tampered) is None
    rejected(tampered, gateway)
    assert gateway.cached(tampered) is None and gateway.cached(token) is not None


def test_the_cache_is_bounded_least_recently_used_first_out():
    gateway = GatewayTokens(SETTINGS, KeyRing(NEW), cache_size=3)
    minted = [gateway.mint(KEY, key_scopes=KEY_SCOPES).token for _ in range(5)]
    for token in minted:
        gateway.verify(token)
    assert [gateway.cached(t) is not None for t in minted] == [False, False, True, True, True]
    gateway.cached(minted[2])  # used: now the most recent
    gateway.verify(minted[0])  # evicts minted[3], the least recently used
    assert [gateway.cached(t) is not None for t in minted] == [True, False, True, False, True]
    assert gateway.verify(minted[1]).key_id == "backend"  # evicted tokens still verify, the slow way


def test_a_cached_token_dies_with_its_signing_key():
    gateway = tokens(KeyRing(NEW, [OLD]))
    old_token = tokens(KeyRing(OLD)).mint(KEY, key_scopes=KEY_SCOPES).token
    gateway.verify(old_token)
    gateway.ring = KeyRing(NEW)  # the old key retired
    assert gateway.cached(old_token) is None
    with pytest.raises(ApiError, match="not signed by a current gateway key"):
        gateway.verify(old_token)


def test_the_cache_is_bounded_by_size_too():
    """A key with many long scopes mints long tokens: the cache holds tokens up to a total length, not a count."""
    long_scopes = [f"provider-{i}/" + "m" * 150 for i in range(40)]
    gateway = GatewayTokens(SETTINGS, KeyRing(NEW), cache_chars=20_000)
    minted = [gateway.mint(KEY, key_scopes=long_scopes).token for _ in range(6)]
    assert all(7_000 < len(t) < 10_000 for t in minted)
    for token in minted:
        gateway.verify(token)
    assert [gateway.cached(t) is not None for t in minted] == [False] * 4 + [True] * 2
    assert gateway.verify(minted[0]).key_id == "backend"
