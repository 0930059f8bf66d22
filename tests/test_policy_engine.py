"""decide(), allows(), visible_models(), plan_info(): table-driven over every rule kind."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.policy_support import HASHES, MODELS, CATALOG, load_text
from proxy.auth.api_keys import ApiKey, hash_key
from proxy.auth.principal import Principal
from proxy.policy import MODEL_NOT_FOUND_MESSAGE, PolicyError
from proxy.policy.pricing import cost, estimate
from proxy.policy.types import Budget, Price, RateLimit, RequestFacts, Usage

POLICY = f"""
plans:
  members:
    models: ["openai/*", "bfl/flux-2"]
    rate_limits:
      - {{per: user, requests: 30, window: 1m}}
      - {{per: [account, model], tokens: 200000, window: 1h}}
    concurrency: 4
    budget: {{credits: 1000, period: month, scope: account}}
  speech:
    capabilities: [text2speech]
    budget: {{credits: 10, period: day, scope: user}}
    max_seconds: 2m
  nobudget:
    models: ["openai/gpt-mini"]
    rate_limits: [{{per: key, requests: 5, window: 30s}}]
  unpriced:
    models: ["misc/*"]
    budget: {{credits: 5}}
prices:
  openai/gpt-mini: {{input_per_1k_tokens: 0.15, output_per_1k_tokens: 0.6}}
  "openai/*": {{per_request: 2}}
  "*": {{per_request: 1000}}
  bfl/flux-2: {{per_request: 10, per_image: 5}}
  eleven/tts: {{per_second: 0.5}}
keys:
  - {{id: backend, hash: "{HASHES['backend']}", plan: members, account: acme}}
  - id: narrow
    hash: "{HASHES['narrow']}"
    plan: members
    overrides:
      models: ["bfl/*"]
      budget: {{credits: 50}}
      concurrency: 1
      rate_limits: [{{per: key, tokens: 100, window: 1d}}]
  - {{id: mintonly, hash: "{HASHES['mintonly']}", plan: members, allow_direct: false}}
  - {{id: paused, hash: "{HASHES['paused']}", plan: members, disabled: true}}
"""
# Without the catch-all price, so that misc/thing is unpriced.
POLICY_NO_FALLBACK = POLICY.replace('"*": {per_request: 1000}', "")
MEMBER_LIMITS = (
    RateLimit(per=("user",), unit="requests", limit=30, window_s=60.0),
    RateLimit(per=("account", "model"), unit="tokens", limit=200000, window_s=3600.0),
)


def user(plan: str = "members", **kw: Any) -> Principal:
    return Principal(kind="issuer", account="u1", plan=plan, subject="u1", issuer="clerk", **kw)


def key(key_id: str, kind: str = "api_key", plan: str = "members", **kw: Any) -> Principal:
    return Principal(kind=kind, account="acme", plan=plan, key_id=key_id, **kw)  # type: ignore[arg-type]


@dataclass
class Case:
    name: str
    principal: Principal
    model: str
    facts: RequestFacts = RequestFacts()
    expect: dict[str, Any] = field(default_factory=dict)


CASES = [
    # --- scopes
    Case("exact id in plan", user(), "openai/gpt-mini", expect={"allowed": True, "plan": "members"}),
    Case("glob in plan", user(), "openai/gpt-big", expect={"allowed": True}),
    Case("outside plan", user(), "eleven/tts", expect={"error_code": "provider_not_authorized", "plan": "members"}),
    Case("capability plan", user("speech"), "eleven/tts", expect={"allowed": True, "plan": "speech"}),
    Case("capability plan, other capability", user("speech"), "openai/gpt-mini",
         expect={"error_code": "provider_not_authorized"}),
    Case("token narrowed to an id", key("backend", "gateway_token", scopes=("openai/gpt-mini",)), "openai/gpt-mini",
         expect={"allowed": True}),
    Case("token narrowed, other model", key("backend", "gateway_token", scopes=("openai/gpt-mini",)), "openai/gpt-big",
         expect={"error_code": "provider_not_authorized", "error_message": "model 'openai/gpt-big' is not within this token's scopes"}),
    Case("token scope by capability", key("backend", "gateway_token", scopes=("text2image",)), "bfl/flux-2",
         expect={"allowed": True}),
    Case("token scope by capability, other", key("backend", "gateway_token", scopes=("text2image",)), "openai/gpt-mini",
         expect={"error_code": "provider_not_authorized"}),
    Case("token scope wider than plan grants nothing more", key("backend", "gateway_token", scopes=("eleven/*",)),
         "eleven/tts", expect={"error_code": "provider_not_authorized",
                               "error_message": "model 'eleven/tts' is not within plan 'members'"}),
    Case("empty token scopes allow nothing", key("backend", "gateway_token", scopes=()), "openai/gpt-mini",
         expect={"error_code": "provider_not_authorized"}),
    # --- per-key overrides
    Case("override replaces models", key("narrow"), "bfl/flux-2",
         expect={"allowed": True, "concurrency": 1, "budget": Budget(50, "month", "account"),
                 "rate_limits": (RateLimit(("key",), "tokens", 100, 86400.0),)}),
    Case("override drops plan models", key("narrow"), "openai/gpt-mini", expect={"error_code": "provider_not_authorized"}),
    Case("key's plan wins over the credential's", key("backend", plan="speech"), "openai/gpt-mini",
         expect={"allowed": True, "plan": "members"}),
    # --- key state
    Case("mint-only key used directly", key("mintonly"), "openai/gpt-mini", expect={"error_code": "forbidden"}),
    Case("token minted from a mint-only key", key("mintonly", "gateway_token"), "openai/gpt-mini", expect={"allowed": True}),
    Case("disabled key", key("paused"), "openai/gpt-mini", expect={"error_code": "invalid_api_key"}),
    Case("token of a disabled key", key("paused", "gateway_token"), "openai/gpt-mini", expect={"error_code": "invalid_token"}),
    Case("token of a removed key", key("ghost", "gateway_token"), "openai/gpt-mini", expect={"error_code": "invalid_token"}),
    # --- plans
    Case("unknown plan", user("gold"), "openai/gpt-mini",
         expect={"allowed": False, "plan": "gold", "error_code": "forbidden"}),
    Case("limits and budget of the plan", user(), "openai/gpt-mini",
         expect={"rate_limits": MEMBER_LIMITS, "concurrency": 4, "budget": Budget(1000, "month", "account")}),
    Case("plan without budget or concurrency", user("nobudget"), "openai/gpt-mini",
         expect={"budget": None, "concurrency": None,
                 "rate_limits": (RateLimit(("key",), "requests", 5, 30.0),)}),
    Case("budget per user per day", user("speech"), "eleven/tts", expect={"budget": Budget(10, "day", "user")}),
    # --- prices and reservations
    Case("tokens: input from bytes, output from max_tokens", user(), "openai/gpt-mini",
         RequestFacts(input_bytes=2000, max_output_tokens=500),
         expect={"reserve_credits": pytest.approx(0.3 + 0.3), "estimated_tokens": 2500,
                 "price": Price(input_per_1k_tokens=0.15, output_per_1k_tokens=0.6)}),
    Case("output clamped to the model's cap", user(), "openai/gpt-mini",
         RequestFacts(input_bytes=0, max_output_tokens=50_000),
         expect={"reserve_credits": pytest.approx(0.6), "estimated_tokens": 1000}),
    Case("output from the model's cap when the request sets none", user(), "openai/gpt-mini",
         RequestFacts(input_bytes=100), expect={"estimated_tokens": 1100}),
    Case("output from the default cap, glob price", user(), "openai/gpt-big", RequestFacts(input_bytes=10),
         expect={"reserve_credits": 2.0, "estimated_tokens": 4106, "price": Price(per_request=2)}),
    Case("per request plus per image", user(), "bfl/flux-2", RequestFacts(input_bytes=300, images=3),
         expect={"reserve_credits": 25.0, "estimated_tokens": 300}),
    Case("per second with a length", user("speech"), "eleven/tts", RequestFacts(seconds=10),
         expect={"reserve_credits": 5.0}),
    Case("per second bounded by the plan's max_seconds", user("speech"), "eleven/tts", RequestFacts(),
         expect={"reserve_credits": 60.0}),
    Case("no budget: price still reported", user("nobudget"), "openai/gpt-mini", RequestFacts(max_output_tokens=1000),
         expect={"allowed": True, "reserve_credits": pytest.approx(0.6)}),
    Case("unpriced model under a budget is denied by default", user("unpriced"), "misc/thing",
         expect={"error_code": "forbidden"}),
]


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    return load_text(tmp_path_factory.mktemp("engine"), POLICY_NO_FALLBACK)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_decide(policy, case: Case) -> None:
    decision = policy.decide(case.principal, MODELS[case.model], case.facts)
    for attr, want in case.expect.items():
        assert getattr(decision, attr) == want, attr
    assert decision.allowed == (decision.error_code is None)
    if not decision.allowed:
        assert decision.error_message and decision.reserve_credits == 0


def test_most_specific_price_wins(tmp_path) -> None:
    """An exact id beats every glob; a longer literal glob beats `*`; `*` catches the rest."""
    policy = load_text(tmp_path, POLICY)
    assert policy.price_for(MODELS["openai/gpt-mini"]) == Price(input_per_1k_tokens=0.15, output_per_1k_tokens=0.6)
    assert policy.price_for(MODELS["openai/gpt-big"]) == Price(per_request=2)
    assert policy.price_for(MODELS["misc/thing"]) == Price(per_request=1000)


def test_unpriced_free_and_hidden_models(tmp_path) -> None:
    policy = load_text(tmp_path, POLICY_NO_FALLBACK + "defaults: {unpriced: free, hide_unauthorized_models: true}\n")
    free = policy.decide(user("unpriced"), MODELS["misc/thing"], RequestFacts(input_bytes=100))
    assert free.allowed and free.price == Price() and free.reserve_credits == 0 and free.estimated_tokens == 4196
    hidden = policy.decide(user(), MODELS["eleven/tts"])
    assert hidden.error_code == "model_not_found"
    assert hidden.error_message == MODEL_NOT_FOUND_MESSAGE.format(model="eleven/tts")


@pytest.mark.parametrize(
    "price, usage, want",
    [
        (Price(per_request=3), Usage(input_tokens=10), 3.0),
        (Price(input_per_1k_tokens=2), Usage(input_tokens=1500), 3.0),
        (Price(output_per_1k_tokens=4), Usage(output_tokens=250), 1.0),
        (Price(per_image=7), Usage(images=2), 14.0),
        (Price(per_second=0.5), Usage(seconds=9), 4.5),
        (Price(1, 1, 1, 1, 1), Usage(1000, 2000, 3, 4), 1 + 1 + 2 + 3 + 4),
    ],
)
def test_cost_per_price_kind(price: Price, usage: Usage, want: float) -> None:
    assert cost(price, usage) == pytest.approx(want)


def test_estimate_matches_the_decision(policy) -> None:
    facts = RequestFacts(input_bytes=4000, max_output_tokens=200)
    model = MODELS["openai/gpt-mini"]
    decision = policy.decide(user(), model, facts)
    assert decision.reserve_credits == estimate(decision.price, facts, model)


def test_visible_models_follow_scopes(policy) -> None:
    ids = lambda p: [m.id for m in policy.visible_models(p, CATALOG)]  # noqa: E731
    assert ids(user()) == ["openai/gpt-mini", "openai/gpt-big", "bfl/flux-2"]
    assert ids(user("speech")) == ["eleven/tts"]
    assert ids(key("narrow")) == ["bfl/flux-2"]
    assert ids(key("backend", "gateway_token", scopes=("openai/gpt-*",))) == ["openai/gpt-mini", "openai/gpt-big"]
    assert ids(user("gold")) == [] and ids(key("paused")) == []
    assert policy.allows(user(), MODELS["bfl/flux-2"]) and not policy.allows(user(), MODELS["eleven/tts"])


def test_unmatched_scopes_are_reported(policy) -> None:
    bad = policy.unmatched_scopes(user(), ["openai/gpt-mini", "eleven/*", "text2image", "text2video"], CATALOG)
    assert bad == ["eleven/*", "text2video"]


def test_plan_info(policy) -> None:
    info = policy.plan_info(key("narrow", "gateway_token", scopes=("bfl/flux-2",)))
    assert info == {
        "plan": "members",
        "scopes": {"models": ["bfl/*"], "capabilities": []},
        "token_scopes": ["bfl/flux-2"],
        "rate_limits": [{"name": "key.tokens.86400s", "per": ["key"], "unit": "tokens", "limit": 100, "window_s": 86400.0}],
        "concurrency": 1,
        "budget": {"credits": 50, "period": "month", "scope": "account"},
    }
    assert policy.plan_info(user("gold"))["error"]["code"] == "forbidden"


def test_extra_keys_are_added_and_checked(policy) -> None:
    demo = ApiKey(id="demo", hash=hash_key("sk_demo"), plan="members")
    extended = policy.with_extra_keys([demo])
    assert extended.keys.find("sk_demo") == demo and policy.keys.find("sk_demo") is None
    assert extended.decide(key("demo"), MODELS["openai/gpt-mini"]).allowed
    with pytest.raises(PolicyError, match="already exists"):
        extended.with_extra_keys([demo])
    with pytest.raises(PolicyError, match="plan 'gold' is not defined"):
        policy.with_extra_keys([ApiKey(id="x", hash=hash_key("sk_x"), plan="gold")])
    with pytest.raises(PolicyError, match="same hash as key 'backend'"):
        policy.with_extra_keys([ApiKey(id="x", hash=HASHES["backend"], plan="members")])


def test_keys_from_files_are_indexed(policy) -> None:
    found = policy.keys.find("sk_test_backend")
    assert found is not None and found.billing_account == "acme" and found.plan == "members"
    assert policy.keys.find("sk_test_nope") is None and len(policy.keys) == 4
