"""Loading and validation: every error names the file, the key path and the fix."""

from __future__ import annotations

import pytest

from tests.policy_support import CATALOG, HASHES, load_text, write_policies
from proxy.policy import PolicyError, load_policy
from proxy.policy.types import Budget, RateLimit

PLAN = """
plans:
  members:
    models: ["openai/*"]
    rate_limits:
      - {per: user, requests: 30, window: 1m}
      - {per: [account, model], tokens: 200000, window: 1h}
"""
KEY = f'keys:\n  - {{id: backend, hash: "{HASHES["backend"]}", plan: members}}\n'


def problems(tmp_path, files: dict[str, str], **kwargs) -> str:
    with pytest.raises(PolicyError) as caught:
        load_policy(write_policies(tmp_path / "policies", files), CATALOG, **kwargs)
    assert isinstance(caught.value, ValueError)
    return str(caught.value)


@pytest.mark.parametrize(
    "files, expected",
    [
        pytest.param(
            {"a.yaml": PLAN.replace("rate_limits:", "rate_limit:")},
            ["policies/a.yaml: plans.members.rate_limit: unknown key", "did you mean 'rate_limits'"],
            id="unknown key",
        ),
        pytest.param(
            {"a.yaml": "plan: {}\n"}, ["policies/a.yaml: plan: unknown key", "did you mean 'plans'"], id="unknown top key"
        ),
        pytest.param(
            {"a.yaml": PLAN.replace("window: 1h", "window: 5 minutes")},
            ["policies/a.yaml: plans.members.rate_limits[1].window: '5 minutes' is not a positive duration", "1m"],
            id="bad duration",
        ),
        pytest.param(
            {"a.yaml": PLAN.replace("window: 1m", "window: 0")},
            ["plans.members.rate_limits[0].window: 0 is not a positive duration"],
            id="zero duration",
        ),
        pytest.param(
            {"a.yaml": PLAN.replace("window: 1m", "window: 0.0001")},
            ["policies/a.yaml: plans.members.rate_limits[0].window: 0.0001 is outside 1ms..1e+09s", "e.g. 30s"],
            id="window under a millisecond",
        ),
        pytest.param(
            {"a.yaml": PLAN.replace("window: 1m", "window: .inf")},
            ["plans.members.rate_limits[0].window: inf is outside 1ms..1e+09s"],
            id="infinite window",
        ),
        pytest.param(
            {"a.yaml": PLAN.replace("requests: 30", "requests: 1000000000000000")},
            ["plans.members.rate_limits[0].requests: 1000000000000000 is more than the store counts"],
            id="limit beyond the store's bound",
        ),
        pytest.param(
            {"a.yaml": PLAN.replace("rate_limits:", "concurrency: 10000000000\n    rate_limits:")},
            ["plans.members.concurrency: 10000000000 is more than the store counts (1000000000)", "at most"],
            id="concurrency beyond the store's bound",
        ),
        pytest.param(
            {"a.yaml": PLAN.replace("rate_limits:", "budget: {credits: 2000000000}\n    rate_limits:")},
            ["plans.members.budget.credits: 2000000000 is more than the store counts (1000000000)"],
            id="budget beyond the store's bound",
        ),
        pytest.param(
            {"a.yaml": PLAN.replace("rate_limits:", "fallbacks: {allow_pricier: maybe}\n    rate_limits:")},
            ["policies/a.yaml: plans.members.fallbacks.allow_pricier: "],
            id="allow_pricier not a boolean",
        ),
        pytest.param(
            {"a.yaml": PLAN.replace("rate_limits:", "fallbacks: {pricier: true}\n    rate_limits:")},
            ["policies/a.yaml: plans.members.fallbacks.pricier: unknown key", "allow_pricier"],
            id="fallbacks unknown key",
        ),
        pytest.param(
            {"a.yaml": PLAN.replace("requests: 30", "requests: 30, tokens: 5")},
            ["plans.members.rate_limits[0]: needs exactly one of requests: or tokens:"],
            id="requests and tokens",
        ),
        pytest.param(
            {"a.yaml": PLAN.replace("[account, model]", "[account, team]")},
            ["plans.members.rate_limits[1].per[1]: 'team' is not allowed; use one of: key, user, account, model"],
            id="bad dimension",
        ),
        pytest.param(
            {"a.yaml": PLAN + "    capabilities: [text2txt]\n"},
            ["plans.members.capabilities[0]: 'text2txt' is not allowed", "text2text"],
            id="bad capability",
        ),
        pytest.param(
            {"a.yaml": PLAN + "    budget: {credits: 10, period: week}\n"},
            ["plans.members.budget.period: 'week' is not allowed; use one of: none, day, month"],
            id="bad budget period",
        ),
        pytest.param(
            {"a.yaml": PLAN + "    budget: {period: day}\n"},
            ["plans.members.budget.credits: missing; add credits:"],
            id="budget without credits",
        ),
        pytest.param(
            {"a.yaml": PLAN + '  empty:\n    rate_limits: []\n'},
            ["plans.empty: allows no model; add models:"],
            id="plan allows nothing",
        ),
        pytest.param(
            {"a.yaml": PLAN + 'keys:\n  - {id: k, hash: "sha256:ABCDEF", plan: members}\n'},
            ["policies/a.yaml: keys[0].hash: is not sha256: followed by 64 lowercase hex digits", "sha256sum"],
            id="bad hash",
        ),
        pytest.param(
            {"a.yaml": PLAN + f'keys:\n  - {{id: k, hash: "{HASHES["backend"]}", plan: gold}}\n'},
            ["policies/a.yaml: keys[0].plan: plan 'gold' is not defined; define plans.gold or use one of: members"],
            id="missing plan",
        ),
        pytest.param(
            {"a.yaml": PLAN.replace('"openai/*"', '"openai/*", "anthropic/*"')},
            ["policies/a.yaml: plans.members.models[1]: 'anthropic/*' matches no model in the catalogue", "config.yaml"],
            id="glob matches nothing",
        ),
        pytest.param(
            {"a.yaml": PLAN + f'keys:\n  - {{id: k, hash: "{HASHES["backend"]}", plan: members, '
                              'overrides: {models: [openai/gpt-nano]}}\n'},
            ["policies/a.yaml: keys[0].overrides.models[0]: 'openai/gpt-nano' matches no model"],
            id="override id unknown",
        ),
        pytest.param(
            {"a.yaml": PLAN + f'keys:\n  - {{id: k, hash: "{HASHES["backend"]}", plan: members, '
                              'overrides: {budget: {period: day}}}\n'},
            ["policies/a.yaml: keys[0].overrides.budget.credits: missing, and plan 'members' has no budget"],
            id="partial budget override without a plan budget",
        ),
        pytest.param(
            {"a.yaml": PLAN + "prices:\n  nope/x: {per_request: 1}\n"},
            ['policies/a.yaml: prices["nope/x"]: prices a model that is not in the catalogue'],
            id="priced model unknown",
        ),
        pytest.param(
            {"a.yaml": PLAN + "prices:\n  openai/gpt-mini: {per_request: -1}\n"},
            ['prices["openai/gpt-mini"].per_request: -1 is not a number >= 0'],
            id="negative price",
        ),
        pytest.param(
            {"a.yaml": PLAN, "b.yaml": PLAN},
            ["policies/b.yaml: plans.members: 'members' is already defined in policies/a.yaml; rename one"],
            id="duplicate plan across files",
        ),
        pytest.param(
            {"a.yaml": PLAN + KEY, "b.yaml": KEY.replace(HASHES["backend"], HASHES["narrow"])},
            ["policies/b.yaml: keys[0].id: 'backend' is already defined in policies/a.yaml"],
            id="duplicate key id across files",
        ),
        pytest.param(
            {"a.yaml": PLAN + KEY, "b.yaml": KEY.replace("id: backend", "id: other")},
            ["policies/b.yaml: keys[0].hash: same hash as key 'backend'; give each key its own secret"],
            id="duplicate hash",
        ),
        pytest.param(
            {"a.yaml": PLAN + "  members:\n    models: [bfl/flux-2]\n"},
            ["policies/a.yaml: line 8: invalid YAML", "appears twice"],
            id="duplicate key in one file",
        ),
        pytest.param(
            {"a.yaml": PLAN + "defaults: {unpriced: maybe}\n"},
            ["defaults.unpriced: 'maybe' is not allowed; use one of: free, deny"],
            id="bad default",
        ),
        pytest.param(
            {"a.yaml": PLAN + "defaults: {hide_unauthorised_models: true}\n"},
            ["defaults.hide_unauthorised_models: unknown key; did you mean 'hide_unauthorized_models'?"],
            id="misspelt default",
        ),
        pytest.param(
            {"a.yaml": PLAN + "defaults: {unpriced: free}\n", "b.yaml": "defaults: {unpriced: deny}\n"},
            ["policies/b.yaml: defaults.unpriced: 'unpriced' is already defined in policies/a.yaml"],
            id="default set twice",
        ),
        pytest.param({"a.yaml": "- just\n- a list\n"}, ["policies/a.yaml: expected a mapping, got list"], id="not a map"),
        pytest.param({"a.yaml": "plans: [members]\n"}, ["policies/a.yaml: plans: expected a mapping"], id="plans list"),
        pytest.param({"a.yaml": "", "b.yaml": "defaults: {}\n"}, ["policies/: no plans defined"], id="no plans"),
    ],
)
def test_invalid_policies_name_file_key_and_fix(tmp_path, files: dict[str, str], expected: list[str]) -> None:
    message = problems(tmp_path, files)
    for fragment in expected:
        assert fragment in message


def test_every_problem_is_reported_at_once(tmp_path) -> None:
    text = PLAN.replace("window: 1h", "window: soon") + "prices:\n  nope/x: {per_request: 1}\n"
    with pytest.raises(PolicyError) as caught:
        load_text(tmp_path, text)
    assert len(caught.value.problems) == 2


def test_issuer_plans_must_exist(tmp_path) -> None:
    message = problems(tmp_path, {"a.yaml": PLAN}, issuer_plans={"members", "staff"})
    assert message == (
        "config.yaml: issuers: plan 'staff' is not defined in any policy file; "
        "add plans.staff to a policies/*.yaml or change the issuer's plan"
    )


def test_empty_directory_is_an_error(tmp_path) -> None:
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "notes.txt").write_text("not a policy")
    with pytest.raises(PolicyError, match="no \\*.yaml policy files"):
        load_policy(tmp_path / "policies", CATALOG)


def test_files_merge_and_values_parse(tmp_path) -> None:
    policy = load_policy(
        write_policies(
            tmp_path / "policies",
            {
                "plans.yaml": PLAN + "    budget: {credits: 7}\n    concurrency: 3\n",
                "keys.yaml": KEY,
                "prices.yaml": "prices:\n  openai/gpt-mini: {per_request: 1.5}\n",
                "empty.yaml": "",
                "ignored.yml": "this: is not loaded\n",
            },
        ),
        CATALOG,
    )
    plan = policy.plans["members"]
    assert plan.rate_limits == (
        RateLimit(("user",), "requests", 30, 60.0),
        RateLimit(("account", "model"), "tokens", 200000, 3600.0),
    )
    assert plan.budget == Budget(7, "none", "account") and plan.concurrency == 3
    assert plan.max_output_tokens == 4096 and plan.max_seconds == 60.0  # from the built-in defaults
    assert policy.prices["openai/gpt-mini"].per_request == 1.5 and len(policy.keys) == 1


@pytest.mark.parametrize("window, seconds", [(30, 30.0), (1.5, 1.5), ("250ms", 0.25), ("30s", 30.0), ("1m", 60.0),
                                             ("1h", 3600.0), ("1d", 86400.0), ("2.5m", 150.0)])
def test_durations(tmp_path, window, seconds: float) -> None:
    policy = load_text(tmp_path, PLAN.replace("window: 1m", f"window: {window}"))
    assert policy.plans["members"].rate_limits[0].window_s == seconds


def test_version_follows_content(tmp_path) -> None:
    first = load_text(tmp_path / "a", PLAN)
    same = load_text(tmp_path / "b", PLAN)
    changed = load_text(tmp_path / "c", PLAN.replace("30", "31"))
    assert first.version == same.version != changed.version


def test_shipped_demo_policy_loads() -> None:
    from pathlib import Path

    from proxy.config import load_config

    root = Path(__file__).parent.parent
    demo = load_config(root / "config.yaml").catalog()  # the shipped catalogue: every demo model priced
    policy = load_policy(root / "policies", demo, issuer_plans={"members"})
    assert set(policy.plans) == {"demo", "members"} and len(policy.keys) == 0
    assert set(policy.price_by_model) == {m.id for m in demo}


def test_pricier_fallbacks_are_a_plan_setting_a_key_may_override(tmp_path) -> None:
    text = PLAN + "    fallbacks: {allow_pricier: true}\n" + KEY.replace("plan: members}", "plan: members,"
                                                                        " overrides: {fallbacks: {allow_pricier: false}}}")
    policy = load_text(tmp_path, text)
    assert policy.plans["members"].allow_pricier_fallbacks is True
    assert policy.key_plans["backend"].allow_pricier_fallbacks is False
    assert load_text(tmp_path, PLAN).plans["members"].allow_pricier_fallbacks is False  # the default: today's
