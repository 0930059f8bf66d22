"""Properties: narrowing scopes never grants more; a reservation always covers the real cost."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.auth.principal import Principal
from proxy.catalog import CAPABILITIES, Model
from proxy.policy import Defaults, Plan, Policy
from proxy.policy.pricing import cost
from proxy.policy.scopes import ModelScope, split_scope_entries
from proxy.policy.types import Budget, Price, RequestFacts, Usage

PROVIDERS = ("a", "b", "ab")
NAMES = ("x", "y", "xy", "x-1")
IDS = tuple(f"{p}/{n}" for p in PROVIDERS for n in NAMES)
GLOBS = ("*", "a/*", "*/x", "?/y", "a*/x*", "[ab]/x", "b/x?1", "*y")
SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

models = st.builds(
    lambda i, cap: Model(i, i, "t", cap, "p", i), st.sampled_from(IDS), st.sampled_from(CAPABILITIES)
)
patterns = st.lists(st.sampled_from(IDS + GLOBS), max_size=4)
capability_sets = st.frozensets(st.sampled_from(CAPABILITIES), max_size=3)
token_scopes = st.one_of(st.none(), st.lists(st.sampled_from(IDS + GLOBS + CAPABILITIES), max_size=4).map(tuple))


def policy_with(scope: ModelScope, price: Price | None = None) -> Policy:
    plan = Plan(name="p", scope=scope, budget=Budget(10**9))
    prices = {"*": price} if price is not None else {}
    return Policy.build(plans=[plan], keys=[], prices=prices, defaults=Defaults(unpriced="free"), catalog=(), version="t")


@SETTINGS
@given(plan_patterns=patterns, plan_caps=capability_sets, scopes=token_scopes, catalog=st.lists(models, max_size=8))
def test_narrowing_never_grants_more(plan_patterns, plan_caps, scopes, catalog) -> None:
    policy = policy_with(ModelScope(tuple(plan_patterns), plan_caps))
    plain = Principal(kind="issuer", account="acc", plan="p")
    narrowed = Principal(kind="gateway_token", account="acc", plan="p", scopes=scopes)
    with_scopes = {m for m in catalog if policy.allows(narrowed, m)}
    assert with_scopes <= {m for m in catalog if policy.allows(plain, m)}
    if scopes is not None:
        assert with_scopes <= {m for m in catalog if split_scope_entries(scopes).allows(m)}
    else:
        assert with_scopes == {m for m in catalog if policy.allows(plain, m)}
    assert {m.id for m in policy.visible_models(narrowed, catalog)} == {m.id for m in with_scopes}


money = st.floats(min_value=0, max_value=1000, allow_nan=False, allow_infinity=False)
prices = st.builds(Price, money, money, money, money, money, money, money)
optional_cap = st.one_of(st.none(), st.integers(0, 200_000))


@st.composite
def call_within_bounds(draw):
    """A request, and any usage that respects what the request and the model declare."""
    facts = RequestFacts(
        input_bytes=draw(st.integers(0, 10**7)),
        max_output_tokens=draw(optional_cap),
        images=draw(st.integers(0, 10)),
        seconds=draw(st.one_of(st.none(), st.floats(0, 3600))),
        characters=draw(st.integers(0, 100_000)),
        megapixels=draw(st.floats(0, 64)),
    )
    model = Model("m/x", "x", "t", draw(st.sampled_from(("text2text", "speech2text"))), "p", "x", draw(optional_cap))
    caps = [c for c in (facts.max_output_tokens, model.max_output_tokens) if c is not None]
    output_cap = min(caps) if caps else Defaults().max_output_tokens
    usage = Usage(
        # Byte-level BPE never yields more tokens than bytes.
        input_tokens=draw(st.integers(0, facts.input_bytes)),
        output_tokens=draw(st.integers(0, output_cap)),
        images=draw(st.integers(0, facts.images)),
        seconds=draw(st.floats(0, facts.seconds if facts.seconds is not None else Defaults().max_seconds)),
        characters=draw(st.integers(0, facts.characters)),  # speech bills at most the text it was given
        megapixels=draw(st.floats(0, facts.megapixels)),  # settle caps a job's megapixels at the size asked for
    )
    return facts, model, usage


@SETTINGS
@given(price=prices, call=call_within_bounds())
def test_reservation_covers_any_usage_within_bounds(price: Price, call) -> None:
    facts, model, usage = call
    decision = policy_with(ModelScope(("*",)), price).decide(Principal(kind="issuer", account="a", plan="p"), model, facts)
    assert decision.allowed and decision.price == price
    assert decision.reserve_credits >= cost(price, usage)
    assert decision.estimated_tokens >= usage.input_tokens + usage.output_tokens
