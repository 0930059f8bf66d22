"""The Helm chart's static parts: its files parse, its queries name real metrics, its templates use real values."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from proxy import __version__
from proxy.metrics import METRIC_NAMES

CHART = Path(__file__).resolve().parents[1] / "helm" / "edge-proxy"
TEMPLATES = sorted((CHART / "templates").rglob("*.yaml")) + sorted((CHART / "templates").glob("_*.tpl"))

# Series Prometheus itself writes for every scrape target.
PROMETHEUS_SERIES = frozenset({"up"})
# Words in PromQL that look like identifiers but are not metric names.
PROMQL_KEYWORDS = frozenset({
    "and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
    "group_left", "group_right", "inf", "nan", "Inf", "NaN",
})
_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def promql_metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, keywords, labels or numbers."""
    for pattern in (_STRING, _MATCHERS, _RANGE, _LABEL_LIST):
        expr = pattern.sub(" ", expr)
    names = set()
    for match in _IDENT.finditer(expr):
        before = expr[match.start() - 1] if match.start() else " "
        after = expr[match.end():].lstrip()[:1]
        if before.isdigit() or before == "." or after == "(" or match.group() in PROMQL_KEYWORDS:
            continue  # exponent/duration suffix, function or aggregation, keyword
        names.add(match.group())
    return names


def load_dashboard() -> dict[str, Any]:
    return json.loads((CHART / "dashboards" / "edge-proxy.json").read_text())


def load_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load((CHART / "alerts" / "rules.yaml").read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def dashboard_exprs(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(panel title, expr) for every query target, rows' nested panels included."""
    def walk(panels: list[dict[str, Any]]) -> Iterator[tuple[str, str]]:
        for panel in panels:
            for target in panel.get("targets", []):
                yield panel["title"], target["expr"]
            yield from walk(panel.get("panels", []))
    yield from walk(dashboard["panels"])
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            yield f"variable {variable['name']}", variable["definition"]


@pytest.mark.parametrize("expr,expected", [
    ('sum by (le, route) (rate(edge_proxy_x_bucket{route=~"a|b", le!="1"}[$__rate_interval]))', {"edge_proxy_x_bucket"}),
    ("histogram_quantile(0.95, sum without (pod) (rate(a_bucket[5m] offset 1h))) > 1e3", {"a_bucket"}),
    ("foo / on (ns) group_left (version) bar and baz unless qux", {"foo", "bar", "baz", "qux"}),
    ('label_values(edge_proxy_build_info, namespace)', {"edge_proxy_build_info", "namespace"}),
    ("min(x) == 0 or vector(0)", {"x"}),
])
def test_promql_name_extraction(expr: str, expected: set[str]) -> None:
    assert promql_metric_names(expr) == expected


def test_every_dashboard_query_uses_exported_metrics() -> None:
    for title, expr in dashboard_exprs(load_dashboard()):
        # label_values(metric, label): the second argument is a label name, not a metric.
        names = promql_metric_names(re.sub(r",\s*\w+\)\s*$", ")", expr) if expr.startswith("label_values") else expr)
        assert names, f"panel {title!r}: no metric in {expr!r}"
        assert names <= METRIC_NAMES, f"panel {title!r} uses unknown metrics {sorted(names - METRIC_NAMES)}"


def test_dashboard_covers_the_operator_questions() -> None:
    used = {name for _, expr in dashboard_exprs(load_dashboard()) for name in promql_metric_names(expr)}
    required = {
        "edge_proxy_requests_total", "edge_proxy_request_duration_seconds_bucket",
        "edge_proxy_time_to_first_byte_seconds_bucket", "edge_proxy_errors_total", "edge_proxy_streams_in_flight",
        "edge_proxy_credits_total", "edge_proxy_denials_total", "edge_proxy_store_up",
        "edge_proxy_auth_failures_total", "edge_proxy_jwks_fetches_total", "edge_proxy_policy_reloads_total",
        "edge_proxy_pending_settles", "edge_proxy_policy_reload_failing",
    }
    assert required <= used, f"dashboard lacks {sorted(required - used)}"
    dashboard = load_dashboard()
    assert dashboard["uid"] and {v["name"] for v in dashboard["templating"]["list"]} >= {"datasource"}
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_every_alert_uses_exported_metrics_and_is_complete() -> None:
    rules = load_rules()
    names = {rule["alert"] for rule in rules}
    assert {"EdgeProxyHighErrorRate", "EdgeProxyHighLatencyP95", "EdgeProxyStoreDown", "EdgeProxyJwksFetchFailing",
            "EdgeProxyCreditsExhaustion", "EdgeProxyPolicyReloadFailed", "EdgeProxyTargetDown",
            "EdgeProxyPendingSettles"} <= names
    known = METRIC_NAMES | PROMETHEUS_SERIES
    for rule in rules:
        used = promql_metric_names(rule["expr"])
        assert used and used <= known, f"alert {rule['alert']} uses unknown {sorted(used - known)}"
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_static_chart_files_parse() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == "edge-proxy"
    assert chart["appVersion"] == __version__
    assert isinstance(yaml.safe_load((CHART / "values.yaml").read_text()), dict)
    assert (CHART / "templates" / "NOTES.txt").read_text().strip()


def _values_paths() -> Iterator[tuple[Path, str]]:
    for template in TEMPLATES + [CHART / "templates" / "NOTES.txt"]:
        for match in re.finditer(r"\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)", template.read_text()):
            yield template, match.group(1)[1:]


def test_templates_only_reference_values_that_exist() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    paths = list(_values_paths())
    assert paths
    for template, path in paths:
        node: Any = values
        for part in path.split("."):
            assert isinstance(node, dict) and part in node, f"{template.name}: .Values.{path} is not in values.yaml"
            node = node[part]


def test_every_top_level_value_is_used() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    used = {path.split(".")[0] for _, path in _values_paths()}
    assert set(values) - used == set(), "values.yaml keys no template reads"


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.name)
def test_template_blocks_balance(template: Path) -> None:
    text = template.read_text()
    assert text.count("{{") == text.count("}}")
    opened = len(re.findall(r"\{\{-?\s*(?:if|range|with|define|block)\b", text))
    closed = len(re.findall(r"\{\{-?\s*end\b", text))
    assert opened == closed, f"{template.name}: {opened} blocks opened, {closed} closed"


def test_files_the_templates_embed_exist() -> None:
    embedded = {m for t in TEMPLATES for m in re.findall(r'\.Files\.Get "([^"]+)"', t.read_text())}
    assert embedded == {"dashboards/edge-proxy.json", "files/helm-test.py"}  # the alerts are templates/_alerts.tpl
    assert all((CHART / path).is_file() for path in embedded)


def test_deployment_runs_the_contracted_command_and_probes() -> None:
    deployment = (CHART / "templates" / "deployment.yaml").read_text()
    assert 'args: ["serve", "--config", "/etc/edge-proxy/config.yaml"]' in deployment
    assert "path: /healthz" in deployment and "path: /readyz" in deployment
    assert "terminationGracePeriodSeconds: {{ include \"edge-proxy.terminationGracePeriod\" . }}" in deployment
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    # Grace must exceed the drain deadline: it is the sum of preStop, drain and a positive margin.
    assert "add .Values.shutdown.preStopSleepSeconds .Values.shutdown.drainSeconds .Values.shutdown.marginSeconds" in helpers
    shutdown = yaml.safe_load((CHART / "values.yaml").read_text())["shutdown"]
    assert shutdown["marginSeconds"] > 0 and shutdown["drainSeconds"] > 0


# -- what the pod mounts (tests/test_helm_render.py renders the chart with helm and checks the config itself)

SIGNING_KEY_MOUNT = "/var/run/secrets/edge-proxy/signing/signing-key.pem"
POLICIES_MOUNT = "/etc/edge-proxy/policies"


def chart_values() -> dict[str, Any]:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def test_deployment_mounts_what_the_config_names() -> None:
    deployment = (CHART / "templates" / "deployment.yaml").read_text()
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    mount_dir = SIGNING_KEY_MOUNT.rsplit("/", 1)[0]
    assert f"mountPath: {mount_dir}\n" in deployment and f'"{mount_dir}/%s"' in helpers
    assert f"mountPath: {POLICIES_MOUNT}\n" in deployment
    assert "name: REDIS_URL" in deployment
    assert chart_values()["config"]["policies"]["dir"] == POLICIES_MOUNT


def test_chart_only_offers_key_types_the_gateway_loads() -> None:
    template = (CHART / "templates" / "signing-key-secret.yaml").read_text()
    assert re.search(r'has \.Values\.signingKey\.algorithm \(list "ecdsa" "ed25519"\)', template)
    assert chart_values()["signingKey"]["algorithm"] in ("ecdsa", "ed25519")


def test_chart_readme_is_generated_from_values() -> None:
    """helm/edge-proxy/README.md lists every value with its default and comment: it cannot go stale."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("chart_readme", CHART.parent / "chart_readme.py")
    assert spec and spec.loader
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    readme = (CHART / "README.md").read_text()
    assert readme == generator.render(), "helm/edge-proxy/README.md is stale: run `python helm/chart_readme.py`"
    for key in ("`replicaCount`", "`signingKey.verifyOnlyKeys`", "`metrics.alerts.errorRate`", "`demo.enabled`"):
        assert key in readme


def _mebibytes(quantity: str) -> float:
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024}
    return float(quantity[:-2]) * units[quantity[-2:]]


def test_defaults_leave_room_for_what_the_gateway_may_hold() -> None:
    """The memory limit covers the process (docs/benchmarks.md: ~70 MiB) plus the asset store's bounds; the
    drain outlasts the longest stream the default provider timeouts allow."""
    from proxy.config import AssetSettings, Timeouts

    values = chart_values()
    assets = AssetSettings()
    needed_mib = 70 + (assets.max_total_bytes + assets.max_receiving_bytes) / 2**20
    assert _mebibytes(values["resources"]["limits"]["memory"]) >= needed_mib
    assert values["shutdown"]["drainSeconds"] >= Timeouts().total_s
