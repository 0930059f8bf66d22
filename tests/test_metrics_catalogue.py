"""Every Metrics helper moves exactly the series it names, with capped label values."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from proxy import __version__
from proxy.metrics import METRIC_NAMES, Metrics, status_class

MODELS = ("openai/gpt-5.4-mini", "bfl/flux-2")
ROOT = Path(__file__).resolve().parents[1]


def scrape(metrics: Metrics) -> dict[tuple[str, frozenset], float]:
    """Parse the /metrics body into {(sample name, labels): value}."""
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(
        CollectorRegistry(), models=MODELS, providers={"openai": "openai", "bfl": "openai"}, issuers=("clerk",),
        deployments=(("openai/gpt-5.4-mini", "openai"), ("openai/gpt-5.4-mini", "azure")),
        per_principal_labels=True,
    )


def exercise_every_helper(m: Metrics) -> None:
    m.request_done("/v1/chat/completions", "openai/gpt-5.4-mini", "openai", "api_key", 200, 0.03,
                   principal="backend")
    m.request_done("/v1/responses", "bfl/flux-2", "bfl", "clerk", 402, 0.004,
                   error_code="insufficient_credits", principal="sub_abc")
    m.first_byte("/v1/chat/completions", "openai/gpt-5.4-mini", 0.2)
    m.upstream_done("openai", "ok", 1.5)
    m.upstream_error("openai", "status_5xx")
    m.deployment_attempt("openai/gpt-5.4-mini", "azure", "throttled")
    m.route_retry("openai/gpt-5.4-mini", "fallback")
    m.breaker("openai/gpt-5.4-mini", "azure", "open")
    m.deployment_quota("openai/gpt-5.4-mini", "openai", 42)
    m.stream_started()
    m.stream_started()
    m.stream_ended()
    m.relayed(1000, sse_events=3)
    m.relayed(24)
    m.tokens("openai/gpt-5.4-mini", 12, 34)
    m.credits("reserved", 5.0)
    m.credits("settled", 1.25)
    m.credits("released", 3.75)
    m.credit_overrun()
    m.denied("rate_limit", "user:requests:1m")
    m.auth_failure("token_expired")
    m.store_op("reserve", 0.002, "ok")
    m.store_op("settle", 0.3, "error")
    m.store_op("admit", 0.001, "script_error")
    m.store_up(False)
    m.pending_settles(3)
    m.jwks_fetch("clerk", ok=False)
    m.policy_reload(ok=True)
    m.budget_alert("fired", 2)
    m.budget_alert("delivered")
    m.budget_used("acme", "account", "acme", 0.8)


def test_every_helper_moves_exactly_its_series(metrics: Metrics) -> None:
    exercise_every_helper(metrics)
    s = scrape(metrics)

    assert value(s, "edge_proxy_requests_total", route="/v1/chat/completions", model="openai/gpt-5.4-mini",
                 provider="openai", provider_kind="openai", principal_type="api_key", status_class="2xx") == 1
    assert value(s, "edge_proxy_requests_total", route="/v1/responses", model="bfl/flux-2",
                 provider="bfl", provider_kind="openai", principal_type="clerk", status_class="4xx") == 1
    assert value(s, "edge_proxy_errors_total", route="/v1/responses", code="insufficient_credits") == 1
    # Only the 402 was an error: no error series for the 200.
    assert [k for k in s if k[0] == "edge_proxy_errors_total"] == [
        ("edge_proxy_errors_total", frozenset({"route": "/v1/responses", "code": "insufficient_credits"}.items()))
    ]
    duration = dict(route="/v1/chat/completions", model="openai/gpt-5.4-mini", status_class="2xx")
    assert value(s, "edge_proxy_request_duration_seconds_bucket", le="0.025", **duration) == 0
    assert value(s, "edge_proxy_request_duration_seconds_bucket", le="0.05", **duration) == 1
    assert value(s, "edge_proxy_request_duration_seconds_sum", **duration) == pytest.approx(0.03)
    assert value(s, "edge_proxy_request_duration_seconds_bucket", le="300.0", **duration) == 1
    assert value(s, "edge_proxy_time_to_first_byte_seconds_count", route="/v1/chat/completions",
                 model="openai/gpt-5.4-mini") == 1
    assert value(s, "edge_proxy_upstream_request_duration_seconds_sum", provider="openai", provider_kind="openai",
                 outcome="ok") == 1.5
    assert value(s, "edge_proxy_upstream_errors_total", provider="openai", provider_kind="openai",
                 reason="status_5xx") == 1
    assert value(s, "edge_proxy_deployment_attempts_total", model="openai/gpt-5.4-mini", deployment="azure",
                 result="throttled") == 1
    assert value(s, "edge_proxy_route_retries_total", model="openai/gpt-5.4-mini", kind="fallback") == 1
    assert value(s, "edge_proxy_deployment_breaker_state", model="openai/gpt-5.4-mini", deployment="azure") == 2
    assert value(s, "edge_proxy_deployment_breaker_state", model="openai/gpt-5.4-mini", deployment="openai") == 0
    assert value(s, "edge_proxy_deployment_ejections_total", model="openai/gpt-5.4-mini", deployment="azure") == 1
    assert value(s, "edge_proxy_deployment_quota_remaining", model="openai/gpt-5.4-mini", deployment="openai") == 42
    assert value(s, "edge_proxy_streams_in_flight") == 1
    assert value(s, "edge_proxy_relayed_bytes_total") == 1024
    assert value(s, "edge_proxy_sse_events_total") == 3
    assert value(s, "edge_proxy_tokens_total", model="openai/gpt-5.4-mini", direction="input") == 12
    assert value(s, "edge_proxy_tokens_total", model="openai/gpt-5.4-mini", direction="output") == 34
    assert value(s, "edge_proxy_credits_total", action="reserved") == 5.0
    assert value(s, "edge_proxy_credits_total", action="settled") == 1.25
    assert value(s, "edge_proxy_credits_total", action="released") == 3.75
    assert value(s, "edge_proxy_credit_overrun_total") == 1
    assert value(s, "edge_proxy_denials_total", kind="rate_limit", rule="user:requests:1m") == 1
    assert value(s, "edge_proxy_auth_failures_total", reason="token_expired") == 1
    assert value(s, "edge_proxy_store_operation_duration_seconds_count", op="reserve") == 1
    assert value(s, "edge_proxy_store_operation_duration_seconds_count", op="settle") == 1
    assert value(s, "edge_proxy_store_errors_total", op="settle", kind="error") == 1
    assert value(s, "edge_proxy_store_errors_total", op="admit", kind="script_error") == 1
    assert value(s, "edge_proxy_store_errors_total", op="reserve", kind="error") is None
    assert value(s, "edge_proxy_store_up") == 0
    assert value(s, "edge_proxy_pending_settles") == 3
    assert value(s, "edge_proxy_jwks_fetches_total", issuer="clerk", outcome="failure") == 1
    assert value(s, "edge_proxy_policy_reloads_total", outcome="success") == 1
    assert value(s, "edge_proxy_policy_reload_failing") == 0
    assert value(s, "edge_proxy_build_info", version=__version__) == 1
    assert value(s, "edge_proxy_principal_requests_total", principal="backend", status_class="2xx") == 1
    assert value(s, "edge_proxy_budget_alerts_total", outcome="fired") == 2
    assert value(s, "edge_proxy_budget_alerts_total", outcome="delivered") == 1
    assert value(s, "edge_proxy_budget_used_ratio", account="acme", scope="account", owner="acme") == 0.8


def test_metric_names_are_exactly_what_a_scrape_exports(metrics: Metrics) -> None:
    exercise_every_helper(metrics)
    exported = {name for name, _ in scrape(metrics) if not name.endswith("_created")}
    assert exported == METRIC_NAMES
    assert all(name.startswith("edge_proxy_") for name in METRIC_NAMES)


def test_unknown_label_values_are_capped(metrics: Metrics) -> None:
    metrics.request_done("/v1/chat/completions/../../etc", "attacker/model-123", "evil", "someone", 200, 0.1,
                         error_code="made_up_code")
    metrics.request_done("/v1/me", None, None, None, 200, 0.1)
    metrics.tokens("attacker/model-456", 1, 2)
    metrics.jwks_fetch("https://unknown.example", ok=True)
    metrics.auth_failure("Traceback: something went wrong with user input")
    metrics.denied("invented", "a rule with spaces")
    metrics.deployment_attempt("attacker/model-789", "attacker-deployment", "made-up")
    s = scrape(metrics)

    assert value(s, "edge_proxy_requests_total", route="other", model="other", provider="other",
                 provider_kind="other", principal_type="other", status_class="2xx") == 1
    assert value(s, "edge_proxy_requests_total", route="/v1/me", model="none", provider="none",
                 provider_kind="none", principal_type="anonymous", status_class="2xx") == 1
    assert value(s, "edge_proxy_errors_total", route="other", code="other") == 1
    assert value(s, "edge_proxy_tokens_total", model="other", direction="output") == 2
    assert value(s, "edge_proxy_jwks_fetches_total", issuer="other", outcome="success") == 1
    assert value(s, "edge_proxy_auth_failures_total", reason="other") == 1
    assert value(s, "edge_proxy_denials_total", kind="other", rule="other") == 1
    assert value(s, "edge_proxy_deployment_attempts_total", model="other", deployment="other", result="other") == 1
    all_label_values = {v for _, labels in s for _, v in labels}
    assert not any("attacker" in v or "unknown.example" in v for v in all_label_values)


def test_per_principal_series_only_when_opted_in() -> None:
    metrics = Metrics(CollectorRegistry(), models=MODELS)
    metrics.request_done("/v1/me", None, None, "api_key", 200, 0.01, principal="backend")
    assert not any(name.startswith("edge_proxy_principal_") for name, _ in scrape(metrics))


@pytest.mark.parametrize("status,expected", [(200, "2xx"), (429, "4xx"), (504, "5xx"), (99, "other"), (600, "other")])
def test_status_class(status: int, expected: str) -> None:
    assert status_class(status) == expected


def test_multiprocess_mode_sums_workers(tmp_path: Path) -> None:
    """With PROMETHEUS_MULTIPROC_DIR set, any worker's scrape shows all workers' counts."""
    worker = textwrap.dedent("""
        import sys
        from prometheus_client import CollectorRegistry
        from proxy.metrics import Metrics
        m = Metrics(CollectorRegistry(), models=["bfl/flux-2"])
        for _ in range(int(sys.argv[1])):
            m.request_done("/v1/responses", "bfl/flux-2", None, "api_key", 200, 0.01)
        if sys.argv[2] == "render":
            sys.stdout.write(m.render()[0].decode())
    """)
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}

    def run(count: int, mode: str) -> str:
        return subprocess.run([sys.executable, "-c", worker, str(count), mode], env=env, check=True,
                              capture_output=True, text=True, timeout=20).stdout

    run(2, "quiet")
    body = run(3, "render")
    counts = [
        s.value for f in text_string_to_metric_families(body) for s in f.samples
        if s.name == "edge_proxy_requests_total" and s.labels.get("model") == "bfl/flux-2"
    ]
    assert counts == [5]


def test_policy_reload_failing_holds_until_a_reload_succeeds(metrics: Metrics) -> None:
    """The counter's increase fades out of any rate window while the bad files stay; this gauge does not."""
    metrics.policy_reload(ok=False)
    assert value(scrape(metrics), "edge_proxy_policy_reload_failing") == 1
    assert value(scrape(metrics), "edge_proxy_policy_reload_failing") == 1
    metrics.policy_reload(ok=True)
    assert value(scrape(metrics), "edge_proxy_policy_reload_failing") == 0
