"""The chart rendered by a real Helm 3: lint-clean, valid Kubernetes objects, a config the gateway accepts."""

from __future__ import annotations

import asyncio
import base64
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterator

import kubernetes_validate
import pytest
import yaml

from proxy.__main__ import main as cli_main
from tests.export_sink import SECRET, ExportReceiver
from tests.helm_tool import CHART, Helm, crd_validator, find, helm_binary

ROOT = Path(__file__).resolve().parents[1]
# The supported range, as docs/helm.md states it: the oldest is Chart.yaml's kubeVersion floor.
NEWEST_KUBERNETES = "1.37.0"
# Schemas the Kubernetes API server does not know without the Prometheus Operator's CRDs.
CRD_GROUPS = ("monitoring.coreos.com/", "gateway.networking.k8s.io/")

# Every switch of values.yaml turned on, and every list filled: what an elaborate install renders.
ALL_ON: dict[str, Any] = {
    "autoscaling": {"enabled": True, "streamsInFlightPerPod": 20},
    "ingress": {"enabled": True, "className": "nginx", "tls": [{"secretName": "ai-tls", "hosts": ["ai.example.com"]}]},
    "httpRoute": {"enabled": True, "parentRefs": [{"name": "public", "namespace": "gateways"}],
                  "hostnames": ["ai.example.com"], "requestTimeout": "0s"},
    "networkPolicy": {"enabled": True, "from": [{"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "ingress-nginx"}}}]},
    "test": {"apiKeySecret": {"name": "edge-proxy-test-key", "key": "api-key"}},
    "podDisruptionBudget": {"enabled": True},
    "serviceAccount": {"create": True, "annotations": {"team": "gateway"}},
    "imagePullSecrets": [{"name": "regcred"}],
    "podAnnotations": {"example.com/owner": "gateway"},
    "podLabels": {"tier": "edge"},
    "service": {"annotations": {"example.com/lb": "internal"}},
    "redis": {"existingSecret": "edge-proxy-redis"},
    "providerSecrets": {"existingSecret": "edge-proxy-providers"},
    "signingKey": {"existingSecret": "edge-proxy-signing"},
    "policiesExistingConfigMap": "edge-proxy-policies",
    "env": [{"name": "EXTRA", "value": "1"}],
    "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
                "prometheusRule": {"enabled": True, "labels": {"release": "prom"}},
                "dashboard": {"enabled": True, "annotations": {"grafana_folder": "Gateways"}}},
    "extraVolumes": [{"name": "uploads", "emptyDir": {}}],
    "extraVolumeMounts": [{"name": "uploads", "mountPath": "/var/lib/edge-proxy/uploads"}],
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "gateway", "effect": "NoSchedule"}],
    "affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": 1, "preference": {"matchExpressions": [
            {"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64", "arm64"]}]}}]}},
    "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                                   "whenUnsatisfiable": "ScheduleAnyway",
                                   "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "edge-proxy"}}}],
}
EXPORTER: dict[str, Any] = {"redis": {"existingSecret": "edge-proxy-redis"},
                            "exporter": {"enabled": True, "replicas": 2, "existingSecret": "edge-proxy-export",
                                         "args": ["--batch-size", "1000"], "resources": {"limits": {"memory": "128Mi"}}}}
VALUE_SETS = {"defaults": {}, "all-on": ALL_ON, "exporter": EXPORTER}


@pytest.fixture(scope="module")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    return Helm(helm_binary(), tmp_path_factory.mktemp("helm"))


def oldest_kubernetes() -> str:
    floor = re.match(r">=\s*(\d+\.\d+\.\d+)", yaml.safe_load((CHART / "Chart.yaml").read_text())["kubeVersion"])
    assert floor, "Chart.yaml kubeVersion must state a lower bound"
    return floor.group(1)


def test_supported_range_is_documented() -> None:
    oldest, newest = oldest_kubernetes().rsplit(".", 1)[0], NEWEST_KUBERNETES.rsplit(".", 1)[0]
    assert f"Kubernetes {oldest} through {newest}" in (ROOT / "docs" / "helm.md").read_text()
    assert NEWEST_KUBERNETES.rsplit(".", 1)[0] <= kubernetes_validate.latest_version(), "schemas too old"


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_helm_lint_strict_is_clean(helm: Helm, values: dict[str, Any]) -> None:
    result = helm.run("lint", "--strict", str(CHART), values=values)
    assert result.returncode == 0 and "0 chart(s) failed" in result.stdout, result.stdout + result.stderr
    assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout, result.stdout


def _kubernetes_versions() -> list[str]:
    # The oldest and newest claimed, and both sides of the preStop sleep action's arrival (1.30).
    return sorted({oldest_kubernetes(), "1.29.0", "1.30.0", NEWEST_KUBERNETES}, key=lambda v: tuple(map(int, v.split("."))))


@pytest.mark.parametrize("kube_version", _kubernetes_versions())
@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_manifests_are_valid_kubernetes_objects(helm: Helm, values: dict[str, Any], kube_version: str) -> None:
    manifests = helm.template(values, kube_version=kube_version)
    checked = 0
    for manifest in manifests:
        if manifest["apiVersion"].startswith(CRD_GROUPS):
            continue
        try:
            kubernetes_validate.validate(manifest, kube_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{manifest['kind']} {manifest['metadata']['name']} invalid on Kubernetes {kube_version}: "
                        f"{exc.message} at {list(exc.path)}")
        checked += 1
    assert checked >= 5


@pytest.mark.parametrize("kube_version,action", [("1.29.0", "exec"), ("1.30.0", "sleep")])
def test_prestop_pause_uses_what_the_cluster_supports(helm: Helm, kube_version: str, action: str) -> None:
    container = find(helm.template(kube_version=kube_version), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    pre_stop = container["lifecycle"]["preStop"]
    assert list(pre_stop) == [action]
    assert pre_stop == ({"sleep": {"seconds": 5}} if action == "sleep" else {"exec": {"command": ["sleep", "5"]}})


def test_no_prestop_when_the_pause_is_off(helm: Helm) -> None:
    container = find(helm.template({"shutdown": {"preStopSleepSeconds": 0}}), "Deployment")[
        "spec"]["template"]["spec"]["containers"][0]
    assert "lifecycle" not in container


# -- the files the pod sees, and `edge-proxy check` on them ------------------------------------------------

def _volume_files(volume: dict[str, Any], manifests: list[dict[str, Any]],
                  external: dict[str, dict[str, str]]) -> dict[str, str]:
    """key -> content of the ConfigMap or Secret a volume projects: rendered by the chart, or `external`."""
    if "configMap" in volume:
        name, kind, field = volume["configMap"]["name"], "ConfigMap", "data"
    elif "secret" in volume:
        name, kind, field = volume["secret"]["secretName"], "Secret", "data"
    else:
        return {}
    rendered = [m for m in manifests if m["kind"] == kind and m["metadata"]["name"] == name]
    if not rendered:
        assert name in external, f"{kind} {name} is neither rendered by the chart nor supplied by the test"
        return external[name]
    data = rendered[0].get(field) or {}
    return {key: base64.b64decode(value).decode() if kind == "Secret" else value for key, value in data.items()}


def materialize_pod_files(manifests: list[dict[str, Any]], root: Path,
                          external: dict[str, dict[str, str]] | None = None) -> None:
    """Write what the kubelet would mount into the gateway container, under `root` instead of `/`."""
    pod = find(manifests, "Deployment")["spec"]["template"]["spec"]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    for mount in pod["containers"][0]["volumeMounts"]:
        volume = volumes[mount["name"]]
        files = _volume_files(volume, manifests, external or {})
        items = (volume.get("configMap") or volume.get("secret") or {}).get("items")
        if items:
            files = {item["path"]: files[item["key"]] for item in items}
        target = root / mount["mountPath"].lstrip("/")
        if "subPath" in mount:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(files[mount["subPath"]])
            continue
        target.mkdir(parents=True, exist_ok=True)
        for key, content in files.items():
            (target / key).write_text(content)


def rooted_config(root: Path) -> Path:
    """The pod's config.yaml with its absolute paths moved under `root`, next to the original."""
    config_path = root / "etc/edge-proxy/config.yaml"
    config = yaml.safe_load(config_path.read_text())
    config["policies"]["dir"] = str(root / config["policies"]["dir"].lstrip("/"))
    for key in config.get("auth", {}).get("signing_keys", []):
        key["file"] = str(root / key["file"].lstrip("/"))
    rooted = config_path.with_name("config.rooted.yaml")
    rooted.write_text(yaml.safe_dump(config))
    return rooted


def _pod_env(manifests: list[dict[str, Any]]) -> Iterator[str]:
    for env in find(manifests, "Deployment")["spec"]["template"]["spec"]["containers"][0].get("env", []):
        yield env["name"]


def _check(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["check", "--config", str(config)]) == 0, capsys.readouterr().err
    assert ": OK (" in capsys.readouterr().out


def test_default_install_config_passes_check(helm: Helm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Defaults: the chart's own ConfigMaps and generated key, mounted where the Deployment mounts them."""
    monkeypatch.delenv("REDIS_URL", raising=False)
    manifests = helm.template()
    materialize_pod_files(manifests, tmp_path)
    assert "REDIS_URL" not in set(_pod_env(manifests))
    _check(rooted_config(tmp_path), capsys)


def test_all_on_config_passes_check(helm: Helm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    """Every toggle on: the operator's Secrets and ConfigMap stand in for the chart's, Redis comes from env."""
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:6390/0")  # from the Secret, as the Deployment wires it
    manifests = helm.template(ALL_ON)
    defaults = helm.template()
    policies = find(defaults, "ConfigMap", "-policies")["data"]
    key = base64.b64decode(find(defaults, "Secret", "-signing-key")["data"]["signing-key.pem"]).decode()
    materialize_pod_files(manifests, tmp_path, {"edge-proxy-policies": policies,
                                                "edge-proxy-signing": {"signing-key.pem": key}})
    assert "REDIS_URL" in set(_pod_env(manifests))
    config = yaml.safe_load((tmp_path / "etc/edge-proxy/config.yaml").read_text())
    assert config["store"] == {**config["store"], "kind": "redis", "redis_url_env": "REDIS_URL"}
    _check(rooted_config(tmp_path), capsys)


# -- values that replace instead of merging; the docs' examples -------------------------------------------

DOCS_WITH_VALUES = ("helm.md", "deploy.md")


def docs_values_examples() -> list[tuple[str, dict[str, Any]]]:
    """Every ```yaml block of the deployment docs: each is a values file an operator may copy."""
    examples = []
    for doc in DOCS_WITH_VALUES:
        blocks = re.findall(r"^```yaml\n(.*?)^```", (ROOT / "docs" / doc).read_text(), re.MULTILINE | re.DOTALL)
        examples += [(f"{doc}#{i}", yaml.safe_load(block)) for i, block in enumerate(blocks, 1)]
    return examples


def _operator_objects(helm: Helm) -> dict[str, dict[str, str]]:
    """Stand-ins for the Secrets and ConfigMaps the docs tell the operator to create."""
    defaults = helm.template()
    key = base64.b64decode(find(defaults, "Secret", "-signing-key")["data"]["signing-key.pem"]).decode()
    return {"edge-proxy-signing": {"signing-key.pem": key},
            "edge-proxy-policies": find(defaults, "ConfigMap", "-policies")["data"]}


def _check_values(helm: Helm, values: dict[str, Any], root: Path, monkeypatch: pytest.MonkeyPatch,
                  capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    """Render, mount, export what the pod's Secrets would, run `edge-proxy check`; the pod's config."""
    manifests = helm.template(values)
    materialize_pod_files(manifests, root, _operator_objects(helm))
    config = yaml.safe_load((root / "etc/edge-proxy/config.yaml").read_text())
    for provider in config["providers"].values():  # from providerSecrets.existingSecret in the pod
        if provider.get("api_key_env"):
            monkeypatch.setenv(provider["api_key_env"], "sk-test")
    monkeypatch.setenv("REDIS_URL", "rediss://:secret@redis.example.internal:6380/0")
    _check(rooted_config(root), capsys)
    return config


@pytest.mark.parametrize("name,values", docs_values_examples(), ids=[n for n, _ in docs_values_examples()])
def test_docs_examples_render_configs_that_pass_check(helm: Helm, name: str, values: dict[str, Any], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert helm.run("lint", "--strict", str(CHART), values=values).returncode == 0
    _check_values(helm, values, tmp_path, monkeypatch, capsys)


def test_docs_have_values_examples() -> None:
    assert len(docs_values_examples()) >= 2


def test_own_providers_replace_the_demo(helm: Helm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """The issue's crash loop: overriding providers, models and policies must leave nothing of the demo."""
    values = dict(docs_values_examples()[0][1])
    assert values["demo"] == {"enabled": False}
    config = _check_values(helm, values, tmp_path, monkeypatch, capsys)
    assert list(config["providers"]) == ["openai"] and [m["provider"] for m in config["models"]] == ["openai"]
    assert sorted(p.name for p in (tmp_path / "etc/edge-proxy/policies").iterdir()) == ["production.yaml"]


@pytest.mark.parametrize("values,message", [
    ({"demo": {"enabled": False}}, "config.providers is empty"),
    ({"demo": {"enabled": False}, "config": {"providers": {"p": {"base_url": "https://p.example"}}}},
     "policies is empty"),
])
def test_nothing_to_serve_fails_at_render(helm: Helm, values: dict[str, Any], message: str) -> None:
    assert message in helm.template_error(values)


def test_chart_owned_config_keys_follow_values(helm: Helm) -> None:
    manifests = helm.template({"containerPort": 9090, "shutdown": {"drainSeconds": 45}, "metrics": {"port": 9100}})
    config = yaml.safe_load(find(manifests, "ConfigMap", "-config")["data"]["config.yaml"])
    assert config["server"]["port"] == 9090 and config["server"]["shutdown_grace_s"] == 45
    assert config["server"]["metrics_port"] == 9100
    pod = find(manifests, "Deployment")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 5 + 45 + 15  # preStop + drain + margin
    assert pod["containers"][0]["ports"][0]["containerPort"] == 9090


@pytest.mark.parametrize("algorithm,jwt_alg", [("ecdsa", "ES256"), ("ed25519", "EdDSA")])
def test_generated_signing_key_loads(helm: Helm, algorithm: str, jwt_alg: str, tmp_path: Path) -> None:
    """The key Helm's genPrivateKey writes is one the gateway signs with."""
    from proxy.auth.tokens import KeyRing, SigningKeySettings

    secret = find(helm.template({"signingKey": {"algorithm": algorithm}}), "Secret", "-signing-key")
    (tmp_path / "key.pem").write_bytes(base64.b64decode(secret["data"]["signing-key.pem"]))
    ring = KeyRing.from_settings([SigningKeySettings(file=str(tmp_path / "key.pem"), active=True)])
    assert ring.active.algorithm == jwt_alg and ring.active.private_key is not None


# -- values.schema.json ---------------------------------------------------------------------------------

def test_values_schema_is_generated_from_the_config_model() -> None:
    """The committed schema is what helm/values_schema.py makes now: it cannot drift from proxy/config.py."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("values_schema", ROOT / "helm" / "values_schema.py")
    assert spec and spec.loader
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    assert (CHART / "values.schema.json").read_text() == generator.render(), (
        "values.schema.json is stale: run `python helm/values_schema.py` and commit the result")


@pytest.mark.parametrize("values,complaint", [
    ({"replicaCount": "two"}, "replicaCount: Invalid type"),
    ({"image": {"tga": "1.0"}}, "Additional property tga is not allowed"),
    ({"config": {"server": {"prot": 8081}}}, "Additional property prot is not allowed"),
    ({"config": {"store": {"kind": "redsi"}}}, "config.store.kind"),
    ({"config": {"store": {"fail_mode": {"credits": "maybe"}}}}, "config.store.fail_mode.credits"),
    ({"config": {"models": [{"id": "x/y"}]}}, "name is required"),
    ({"signingKey": {"algorithm": "rsa"}}, "signingKey.algorithm"),
    ({"shutdown": {"drainSeconds": -1}}, "shutdown.drainSeconds"),
])
def test_schema_refuses_typos_and_wrong_types_at_lint(helm: Helm, values: dict[str, Any], complaint: str) -> None:
    result = helm.run("lint", "--strict", str(CHART), values=values)
    assert result.returncode != 0 and complaint in result.stdout + result.stderr, result.stdout + result.stderr


# -- signing keys from an existing Secret, rotation, rolling on change -------------------------------------

def _pem() -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()


ROTATION_STEPS = [  # docs/deploy.md, "Rotate the signing key"
    {"secretKey": "signing-key.pem", "verifyOnlyKeys": ["next.pem"]},
    {"secretKey": "next.pem", "verifyOnlyKeys": ["signing-key.pem"]},
    {"secretKey": "next.pem", "verifyOnlyKeys": []},
]


def test_rotation_with_two_keys_from_one_secret(helm: Helm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Each step of the documented rotation passes check, signs with one key, verifies the other, rolls pods."""
    from proxy.auth.tokens import KeyRing, SigningKeySettings

    monkeypatch.delenv("REDIS_URL", raising=False)
    secret = {"signing-key.pem": _pem(), "next.pem": _pem()}
    checksums = []
    for step, keys in enumerate(ROTATION_STEPS):
        manifests = helm.template({"signingKey": {"existingSecret": "edge-proxy-signing", **keys}})
        assert not [m for m in manifests if m["kind"] == "Secret"], "an existing Secret: the chart makes none"
        root = tmp_path / str(step)
        materialize_pod_files(manifests, root, {"edge-proxy-signing": secret})
        config = yaml.safe_load(rooted_config(root).read_text())
        ring = KeyRing.from_settings([SigningKeySettings(**key) for key in config["auth"]["signing_keys"]])
        signer = Path(next(k["file"] for k in config["auth"]["signing_keys"] if k["active"])).name
        assert signer == keys["secretKey"] and len(ring.jwks()["keys"]) == 1 + len(keys["verifyOnlyKeys"])
        _check(rooted_config(root), capsys)
        annotations = find(manifests, "Deployment")["spec"]["template"]["metadata"]["annotations"]
        assert "checksum/secrets" in annotations
        checksums.append(annotations["checksum/config"])
    assert len(set(checksums)) == len(ROTATION_STEPS), "every rotation step must roll the pods"


@pytest.mark.parametrize("signing_key,complaint", [
    ({"verifyOnlyKeys": ["old.pem"]}, "signingKey.verifyOnlyKeys needs signingKey.existingSecret"),
    ({"existingSecret": "s", "verifyOnlyKeys": ["signing-key.pem"]}, "cannot also be verify-only"),
])
def test_impossible_key_sets_fail_at_render(helm: Helm, signing_key: dict[str, Any], complaint: str) -> None:
    assert complaint in helm.template_error({"signingKey": signing_key})


# -- safe defaults, exposure, the helm test hook ------------------------------------------------------------

def test_defaults_agree_one_replica_no_pdb_spread_over_zones_and_nodes(helm: Helm) -> None:
    manifests = helm.template()
    deployment = find(manifests, "Deployment")
    assert deployment["spec"]["replicas"] == 1  # the in-memory store meters per pod
    assert not [m for m in manifests if m["kind"] == "PodDisruptionBudget"], "a PDB of 1 with 1 pod blocks drains"
    spread = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert [c["topologyKey"] for c in spread] == ["topology.kubernetes.io/zone", "kubernetes.io/hostname"]
    assert {c["whenUnsatisfiable"] for c in spread} == {"ScheduleAnyway"}
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert all(c["labelSelector"]["matchLabels"] == selector for c in spread)


@pytest.mark.parametrize("values", [{"replicaCount": 3, "redis": {"existingSecret": "r"}},
                                    {"autoscaling": {"enabled": True}}], ids=["replicas", "autoscaling"])
def test_several_replicas_get_a_pdb(helm: Helm, values: dict[str, Any]) -> None:
    assert find(helm.template(values), "PodDisruptionBudget")["spec"]["minAvailable"] == 1


def test_ingress_is_streaming_safe_and_hpa_can_scale_on_streams(helm: Helm) -> None:
    manifests = helm.template(ALL_ON)
    annotations = find(manifests, "Ingress")["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    assert int(annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 3600
    route = find(manifests, "HTTPRoute")["spec"]
    assert route["rules"][0]["timeouts"] == {"request": "0s"} and route["parentRefs"][0]["name"] == "public"
    assert find(manifests, "NetworkPolicy")["spec"]["ingress"][0]["ports"] == [{"port": "http", "protocol": "TCP"}]
    metrics = find(manifests, "HorizontalPodAutoscaler")["spec"]["metrics"]
    assert [m["type"] for m in metrics] == ["Resource", "Pods"]
    assert metrics[1]["pods"]["metric"]["name"] == "edge_proxy_streams_in_flight"


def test_helm_test_hook_runs_the_checked_script(helm: Helm) -> None:
    pod = find(helm.template(ALL_ON), "Pod", "-test")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    container = pod["spec"]["containers"][0]
    assert container["command"] == ["python", "-c"]
    assert container["args"][0].strip() == (CHART / "files" / "helm-test.py").read_text().strip()
    assert {e["name"] for e in container["env"]} == {"BASE_URL", "EDGE_PROXY_API_KEY"}
    assert pod["spec"]["securityContext"]["runAsUser"] == 10001


@pytest.mark.parametrize("with_key", [True, False], ids=["api-key", "made-up-key"])
async def test_helm_test_script_passes_against_a_real_gateway(provider: Any, gateway_env: None, policies_dir: Path,
                                                             with_key: bool) -> None:
    """The hook's script, run as the pod runs it, against a gateway on loopback."""
    import asyncio
    import os
    import sys

    from tests.gateway_harness import TEST_KEY, gateway_config, start_gateway

    server = await start_gateway(gateway_config(provider.url, policies_dir))
    try:
        env = {**os.environ, "BASE_URL": server.url}
        env.pop("EDGE_PROXY_API_KEY", None)
        if with_key:
            env["EDGE_PROXY_API_KEY"] = TEST_KEY
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", (CHART / "files" / "helm-test.py").read_text(), env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(process.communicate(), 30)
    finally:
        await server.stop()
    assert process.returncode == 0, out.decode() + err.decode()
    assert out.decode().splitlines()[-2:] == [f"GET /v1/models {200 if with_key else 401}", "ok"]


def test_metrics_have_their_own_port_which_no_route_exposes(helm: Helm) -> None:
    """Scrapes go to the metrics port; the Ingress and HTTPRoute reach only `http`, which serves no /metrics."""
    manifests = helm.template(ALL_ON)
    pod = find(manifests, "Deployment")["spec"]["template"]
    assert [(p["name"], p["containerPort"]) for p in pod["spec"]["containers"][0]["ports"]] == [
        ("http", 8080), ("metrics", 9090)]
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == "9090"
    assert find(manifests, "ServiceMonitor")["spec"]["endpoints"][0]["port"] == "metrics"
    assert {p["name"] for p in find(manifests, "Service")["spec"]["ports"]} == {"http", "metrics"}
    backends = [path["backend"]["service"]["port"] for rule in find(manifests, "Ingress")["spec"]["rules"]
                for path in rule["http"]["paths"]]
    assert backends == [{"name": "http"}]
    assert find(manifests, "HTTPRoute")["spec"]["rules"][0]["backendRefs"][0]["port"] == 80
    ingress_rules = find(manifests, "NetworkPolicy")["spec"]["ingress"]
    assert [rule["ports"][0]["port"] for rule in ingress_rules] == ["http", "metrics"]


def test_service_monitor_and_prometheus_rule_match_the_operator_crds(helm: Helm) -> None:
    """kubernetes-validate has no CRD schemas: the prometheus-operator's come from its npm models package."""
    import json
    import shutil
    import subprocess

    node = shutil.which("node")
    assert node, "node is needed to validate against the prometheus-operator CRD schemas (it comes with npm)"
    objects = [m for m in helm.template(ALL_ON) if m["apiVersion"].startswith("monitoring.coreos.com/")]
    assert sorted(m["kind"] for m in objects) == ["PrometheusRule", "ServiceMonitor"]
    monitor = next(m for m in objects if m["kind"] == "ServiceMonitor")
    broken = [{**monitor, "spec": {**monitor["spec"], "endpoints": [{"port": "metrics", "interval": "thirty"}]}}]
    validator = str(crd_validator())
    for manifests, expected in ((objects, 0), (broken, 1)):  # the validator also refuses a bad object
        result = subprocess.run([node, validator], input=json.dumps(manifests), capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == expected, result.stdout + result.stderr


# -- the ledger exporter's Deployment ------------------------------------------------------------------------

def test_no_exporter_unless_enabled(helm: Helm) -> None:
    assert [m["metadata"]["name"] for m in helm.template(ALL_ON) if m["kind"] == "Deployment"] == ["gw-edge-proxy"]


async def test_the_exporter_pod_runs_its_command_against_redis_and_a_signed_sink(
    helm: Helm, tmp_path: Path, redis_url: str
) -> None:
    """The rendered exporter: its own pod labels (no Service, PDB or HPA of the gateway selects it), the URL and
    signing secret from the operator's Secret, and its command, run as rendered, drains the ledger into the sink."""
    manifests = helm.template(EXPORTER)
    gateway, exporter = find(manifests, "Deployment", "-edge-proxy"), find(manifests, "Deployment", "-exporter")
    service_selector = find(manifests, "Service")["spec"]["selector"].items()
    assert not service_selector <= exporter["spec"]["template"]["metadata"]["labels"].items()
    assert not exporter["spec"]["selector"]["matchLabels"].items() <= gateway["spec"]["template"]["metadata"]["labels"].items()
    pod = exporter["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert exporter["spec"]["replicas"] == 2 and container["resources"] == {"limits": {"memory": "128Mi"}}
    refs = {env["name"]: env["valueFrom"]["secretKeyRef"] for env in container["env"]}
    assert refs == {"REDIS_URL": {"name": "edge-proxy-redis", "key": "url"},
                    "EXPORT_URL": {"name": "edge-proxy-export", "key": "url"},
                    "EXPORT_SIGNING_SECRET": {"name": "edge-proxy-export", "key": "signing-secret"}}
    materialize_pod_files([exporter, *(m for m in manifests if m["kind"] == "ConfigMap")], tmp_path)
    args = [str(tmp_path / "etc/edge-proxy/config.yaml") if a == "/etc/edge-proxy/config.yaml" else a
            for a in container["args"]]
    receiver = await ExportReceiver().start()
    try:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "REDIS_URL": redis_url, "EXPORT_URL": receiver.url,
               "EXPORT_SIGNING_SECRET": SECRET}
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", *args, "--once", env=env,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        _, stderr = await asyncio.wait_for(process.communicate(), 15)
    finally:
        await receiver.stop()
    assert process.returncode == 0 and b"ledger export: stopped" in stderr, stderr.decode()
    assert receiver.refused == 0


def test_a_jsonl_exporter_writes_to_stdout(helm: Helm) -> None:
    values = {**EXPORTER, "exporter": {"enabled": True, "sink": "jsonl"}}
    container = find(helm.template(values), "Deployment", "-exporter")["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][-4:] == ["--sink", "jsonl", "--out", "-"]
    assert [env["name"] for env in container["env"]] == ["REDIS_URL"]


@pytest.mark.parametrize("values, complaint", [
    ({"exporter": {"enabled": True, "existingSecret": "s"}}, "exporter.enabled needs the Redis store"),
    ({"redis": {"existingSecret": "r"}, "exporter": {"enabled": True}}, "exporter.sink http needs exporter.existingSecret"),
])
def test_an_exporter_that_cannot_work_fails_at_render(helm: Helm, values: dict[str, Any], complaint: str) -> None:
    assert complaint in helm.template_error(values)
