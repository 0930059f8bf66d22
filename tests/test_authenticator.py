"""The authenticator end to end: header parsing, dispatch by form and issuer, revocation, RFC 6750 challenges."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from proxy.auth.api_keys import ApiKey, KeyIndex, hash_key
from proxy.auth.authenticator import Authenticator
from proxy.auth.oidc import IssuerSettings, IssuerVerifier
from proxy.auth.tokens import GatewayTokens, KeyRing, SigningKey, TokenSettings
from proxy.errors import ApiError
from tests.jwks_server import JwksServer, RsaKey, clerk_claims

IDP_KEY = RsaKey.generate()
GATEWAY_KEY = SigningKey.generate()
GATEWAY = TokenSettings(issuer="https://gateway.example.com", audience="edge-proxy", leeway_s=0)
SCOPES = ["openai/*"]

DIRECT = ApiKey(id="backend", hash=hash_key("sk_direct"), plan="members", account="acme")
MINT_ONLY = ApiKey(id="frontend", hash=hash_key("sk_mint_only"), plan="free", allow_direct=False)
DISABLED = ApiKey(id="old", hash=hash_key("sk_disabled"), plan="free", disabled=True)


class KeyHolder:
    """Stands in for the policy store: the current index, swapped on reload."""

    def __init__(self, *keys: ApiKey) -> None:
        self.index = KeyIndex(keys)

    def replace(self, *keys: ApiKey) -> None:
        self.index = KeyIndex(keys)


@pytest.fixture
async def idp() -> AsyncIterator[JwksServer]:
    async with JwksServer([IDP_KEY]) as server:
        yield server


@pytest.fixture
def keys() -> KeyHolder:
    return KeyHolder(DIRECT, MINT_ONLY, DISABLED)


@pytest.fixture
def tokens() -> GatewayTokens:
    return GatewayTokens(GATEWAY, KeyRing(GATEWAY_KEY))


@pytest.fixture
async def auth(idp: JwksServer, keys: KeyHolder, tokens: GatewayTokens) -> AsyncIterator[Authenticator]:
    clerk = IssuerSettings(name="clerk", issuer=idp.issuer, jwks_url=idp.jwks_url, plan="members", fetch_timeout_s=0.3)
    authenticator = Authenticator(lambda: keys.index, tokens, [IssuerVerifier(clerk)])
    yield authenticator
    await authenticator.aclose()


async def failure(auth: Authenticator, header: str | None) -> ApiError:
    with pytest.raises(ApiError) as info:
        await auth.authenticate(header)
    return info.value


def challenge_of(err: ApiError) -> str:
    return err.headers["WWW-Authenticate"]


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer ", "Basic dXNlcjpwYXNz", "Bearer two words", "sk_direct"])
async def test_missing_or_malformed_header_is_missing_credentials(auth, header):
    err = await failure(auth, header)
    assert (err.status, err.code, challenge_of(err)) == (401, "missing_credentials", 'Bearer realm="edge-proxy"')


async def test_direct_api_key_becomes_an_api_key_principal(auth):
    principal = await auth.authenticate("bearer sk_direct")  # the scheme is case-insensitive
    assert (principal.kind, principal.account, principal.plan, principal.key_id, principal.scopes) == (
        "api_key", "acme", "members", "backend", None)


async def test_unknown_api_key_is_invalid_api_key_with_a_challenge(auth):
    err = await failure(auth, "Bearer sk_nope")
    assert (err.status, err.code) == (401, "invalid_api_key")
    assert challenge_of(err) == 'Bearer realm="edge-proxy", error="invalid_token", error_description="unknown API key"'


async def test_disabled_api_key_is_rejected(auth):
    err = await failure(auth, "Bearer sk_disabled")
    assert err.code == "invalid_api_key" and "disabled" in err.message


async def test_mint_only_key_cannot_call_models_but_can_mint(auth):
    err = await failure(auth, "Bearer sk_mint_only")
    assert (err.status, err.code) == (403, "forbidden") and "only mint tokens" in err.message
    assert auth.authenticate_minting_key("Bearer sk_mint_only") is MINT_ONLY


async def test_minting_refuses_tokens_and_disabled_keys(auth, tokens):
    minted = tokens.mint(DIRECT, key_scopes=SCOPES).token
    with pytest.raises(ApiError) as info:
        auth.authenticate_minting_key(f"Bearer {minted}")
    assert info.value.code == "forbidden"
    with pytest.raises(ApiError) as info:
        auth.authenticate_minting_key("Bearer sk_disabled")
    assert info.value.code == "invalid_api_key" and "WWW-Authenticate" in info.value.headers


async def test_gateway_token_becomes_a_narrowed_principal_without_touching_the_idp(auth, tokens, idp):
    minted = tokens.mint(MINT_ONLY, key_scopes=SCOPES, sub="user-9", scopes=["openai/gpt-5.4-mini"])
    principal = await auth.authenticate(f"Bearer {minted.token}")
    assert (principal.kind, principal.account, principal.plan, principal.key_id, principal.subject, principal.scopes) == (
        "gateway_token", "frontend", "free", "frontend", "user-9", ("openai/gpt-5.4-mini",))
    assert principal.token_id and idp.fetches == 0  # chosen by iss, not by trying the IdP's keys


async def test_clerk_session_token_becomes_an_issuer_principal(auth, idp):
    principal = await auth.authenticate(f"Bearer {IDP_KEY.sign(clerk_claims(idp.issuer, sub='user_5'))}")
    assert (principal.kind, principal.issuer, principal.account, principal.subject) == ("issuer", "clerk", "clerk:user_5", "user_5")


async def test_revoked_key_kills_its_raw_use_and_its_minted_tokens(auth, tokens, keys):
    minted = tokens.mint(DIRECT, key_scopes=SCOPES).token
    assert (await auth.authenticate(f"Bearer {minted}")).key_id == "backend"
    assert tokens.cached(minted) is not None  # so the refusal below is the cached token's
    keys.replace(MINT_ONLY)  # policy reload without the key
    assert (await failure(auth, "Bearer sk_direct")).code == "invalid_api_key"
    err = await failure(auth, f"Bearer {minted}")
    assert err.code == "invalid_token" and "revoked" in err.message and 'error="invalid_token"' in challenge_of(err)


@pytest.mark.parametrize("used_before", [False, True])  # True: the token is in the verified-token cache
async def test_disabling_a_key_kills_its_minted_tokens(auth, tokens, keys, used_before):
    minted = tokens.mint(DIRECT, key_scopes=SCOPES).token
    if used_before:
        assert (await auth.authenticate(f"Bearer {minted}")).key_id == "backend"
    keys.replace(dataclasses.replace(DIRECT, disabled=True), MINT_ONLY)
    assert (await failure(auth, f"Bearer {minted}")).code == "invalid_token"


@pytest.mark.parametrize("used_before", [False, True])
async def test_rekeying_an_id_kills_tokens_minted_from_the_old_secret(auth, tokens, keys, used_before):
    minted = tokens.mint(DIRECT, key_scopes=SCOPES).token
    if used_before:
        assert (await auth.authenticate(f"Bearer {minted}")).key_id == "backend"
    keys.replace(dataclasses.replace(DIRECT, hash=hash_key("sk_new_secret")))
    assert (await failure(auth, f"Bearer {minted}")).code == "invalid_token"
    assert (await auth.authenticate("Bearer sk_new_secret")).key_id == "backend"


async def test_minted_token_after_its_ttl_is_token_expired(auth, keys):
    past = GatewayTokens(GATEWAY, KeyRing(GATEWAY_KEY), clock=lambda: time.time() - 3600)
    err = await failure(auth, f"Bearer {past.mint(DIRECT, key_scopes=SCOPES, ttl=60).token}")
    assert (err.status, err.code) == (401, "token_expired")
    assert challenge_of(err).startswith('Bearer realm="edge-proxy", error="invalid_token", error_description="the token has expired')


async def test_token_from_our_issuer_signed_by_a_foreign_key_is_rejected(auth, tokens):
    claims = jwt.decode(tokens.mint(DIRECT, key_scopes=SCOPES).token, options={"verify_signature": False})
    forged = jwt.encode(claims, ec.generate_private_key(ec.SECP256R1()), algorithm="ES256", headers={"kid": GATEWAY_KEY.kid})
    assert (await failure(auth, f"Bearer {forged}")).code == "invalid_token"


async def test_token_from_an_untrusted_issuer_is_rejected_without_any_fetch(auth, idp):
    err = await failure(auth, f"Bearer {IDP_KEY.sign(clerk_claims('https://evil.example.com'))}")
    assert err.code == "invalid_token" and "not trusted" in err.message and idp.fetches == 0


async def test_idp_token_without_kid_is_rejected(auth, idp):
    token = jwt.encode(clerk_claims(idp.issuer), IDP_KEY.private_key, algorithm="RS256")
    assert "kid" in (await failure(auth, f"Bearer {token}")).message


@pytest.mark.parametrize("credential", ["hello", "a.b", "eyJ.eyJ.sig.extra", "a.b.c"])
async def test_credentials_that_are_neither_keys_nor_jwts_are_invalid_token(auth, credential):
    err = await failure(auth, f"Bearer {credential}")
    assert (err.status, err.code) == (401, "invalid_token") and "error_description" in challenge_of(err)


async def test_idp_unreachable_is_503_not_401(auth, idp):
    idp.mode = "error"
    err = await failure(auth, f"Bearer {IDP_KEY.sign(clerk_claims(idp.issuer))}")
    assert (err.status, err.code) == (503, "auth_unavailable") and "WWW-Authenticate" not in err.headers


async def test_error_description_is_quoted_safely(auth, idp):
    claims = clerk_claims(idp.issuer)
    del claims["sub"]  # PyJWT's message quotes the claim name: Token is missing the "sub" claim
    description = challenge_of(await failure(auth, f"Bearer {IDP_KEY.sign(claims)}")).split('error_description="', 1)[1]
    assert description.endswith("missing the 'sub' claim\"")


def test_an_issuer_reusing_the_gateway_iss_is_a_config_error(tokens):
    clash = IssuerSettings(name="clerk", issuer=GATEWAY.issuer, plan="m", jwks_url="https://idp.example.com/jwks")
    with pytest.raises(ValueError, match="issuers.clerk.issuer"):
        Authenticator(lambda: KeyIndex([]), tokens, [IssuerVerifier(clash)])
