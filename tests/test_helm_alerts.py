"""The chart's alert rules: rendered by helm with tunable thresholds, checked and unit-tested with promtool."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helm_tool import CHART, Helm, find, helm_binary

ROOT = Path(__file__).resolve().parents[1]
RULES_FILE = CHART / "alerts" / "rules.yaml"
RULES_HEADER = """\
# Prometheus alerting rules for edge-proxy, for Prometheus setups without the operator (`rule_files`).
# Generated from the chart's templates/_alerts.tpl with its default thresholds and job="edge-proxy"; the chart's
# PrometheusRule (metrics.prometheusRule.enabled) renders the same rules with metrics.alerts from values.
# Regenerate: EDGE_PROXY_WRITE_RULES=1 python -m pytest tests/test_helm_alerts.py
"""


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edge-proxy-tests" / "prometheus"


def promtool_binary() -> Path:
    """promtool from Debian's prometheus package, unpacked (never installed, the service never started), cached."""
    target = _cache_dir() / "promtool"
    if target.is_file():
        return target
    apt_get, dpkg_deb = shutil.which("apt-get"), shutil.which("dpkg-deb")
    if not (apt_get and dpkg_deb):
        pytest.fail("promtool comes from Debian's prometheus package: apt-get and dpkg-deb are needed", pytrace=False)
    with tempfile.TemporaryDirectory() as work:
        os.chmod(work, 0o755)  # apt's sandbox user must be able to write the download there
        download = subprocess.run([apt_get, "download", "-qq", "prometheus"], cwd=work, capture_output=True, text=True,
                                  timeout=300)
        packages = list(Path(work).glob("prometheus_*.deb"))
        if download.returncode != 0 or not packages:
            pytest.fail(f"cannot download Debian's prometheus package for promtool (run apt-get update?): "
                        f"{download.stderr.strip()}", pytrace=False)
        subprocess.run([dpkg_deb, "-x", str(packages[0]), f"{work}/root"], check=True, timeout=120)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"promtool.{os.getpid()}.partial")
        shutil.copy2(f"{work}/root/usr/bin/promtool", partial)
        partial.replace(target)
    return target


@pytest.fixture(scope="module")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    return Helm(helm_binary(), tmp_path_factory.mktemp("helm"))


@pytest.fixture(scope="module")
def promtool() -> Path:
    return promtool_binary()


def rendered_rules(helm: Helm, alerts: dict[str, Any] | None = None) -> dict[str, Any]:
    values = {"metrics": {"prometheusRule": {"enabled": True}, "alerts": {"job": "edge-proxy", **(alerts or {})}}}
    return find(helm.template(values), "PrometheusRule")["spec"]


def test_the_plain_rules_file_is_the_rendered_defaults(helm: Helm) -> None:
    spec = rendered_rules(helm)
    if os.environ.get("EDGE_PROXY_WRITE_RULES"):
        RULES_FILE.write_text(RULES_HEADER + yaml.safe_dump(spec, sort_keys=False, width=120, allow_unicode=True))
    assert yaml.safe_load(RULES_FILE.read_text()) == spec, (
        "alerts/rules.yaml is stale: EDGE_PROXY_WRITE_RULES=1 python -m pytest tests/test_helm_alerts.py")
    assert RULES_FILE.read_text().startswith(RULES_HEADER)


@pytest.mark.parametrize("alerts", [{}, {"errorRate": {"threshold": 0.2, "for": "30m", "severity": "warning"}}],
                         ids=["defaults", "tuned"])
def test_promtool_checks_the_rendered_rules(helm: Helm, promtool: Path, alerts: dict[str, Any],
                                            tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rendered_rules(helm, alerts)))
    result = subprocess.run([str(promtool), "check", "rules", str(tmp_path / "rules.yaml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "SUCCESS: 13 rules found" in result.stdout, result.stdout + result.stderr


def test_thresholds_and_durations_come_from_values(helm: Helm) -> None:
    tuned = {"errorRate": {"threshold": 0.2, "for": "30m", "severity": "warning"}}
    rule = next(r for r in rendered_rules(helm, tuned)["groups"][0]["rules"] if r["alert"] == "EdgeProxyHighErrorRate")
    assert "> 0.2\n" in rule["expr"] and rule["for"] == "30m" and rule["labels"]["severity"] == "warning"


def test_promtool_unit_tests_pass(helm: Helm, promtool: Path, tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rendered_rules(helm)))
    shutil.copy(ROOT / "tests" / "promtool" / "rules_test.yaml", tmp_path / "rules_test.yaml")
    result = subprocess.run([str(promtool), "test", "rules", "rules_test.yaml"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr


def test_target_down_watches_the_service_job_by_default(helm: Helm) -> None:
    spec = find(helm.template({"metrics": {"prometheusRule": {"enabled": True}}}), "PrometheusRule")["spec"]
    target_down = next(r for r in spec["groups"][0]["rules"] if r["alert"] == "EdgeProxyTargetDown")
    assert target_down["expr"] == 'up{job="gw-edge-proxy"} == 0'  # the Service's name: a ServiceMonitor's job
