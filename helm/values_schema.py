"""Write helm/edge-proxy/values.schema.json: the chart's own keys, and `config` from the gateway's config model.

Run after changing proxy/config.py, the store settings or values.yaml:  python helm/values_schema.py
tests/test_helm_render.py fails when the committed file differs from what this prints.
"""

from __future__ import annotations

import json
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from proxy.config import Config  # noqa: E402
from proxy.store.settings import StoreSettings  # noqa: E402

SCHEMA_FILE = ROOT / "helm" / "edge-proxy" / "values.schema.json"
# Set by the gateway's loader, never by a config file.
LOADER_KEYS = ("base_dir", "source")

STRING = {"type": "string"}
BOOLEAN = {"type": "boolean"}
OBJECT = {"type": "object"}  # a Kubernetes object passed through as is (the API server validates it)
LIST = {"type": "array"}
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
SECRET_KEY = {"type": "string", "pattern": "^[-._a-zA-Z0-9]+$"}  # what Kubernetes allows as a key of a Secret


def integer(minimum: int = 0) -> dict[str, Any]:
    return {"type": "integer", "minimum": minimum}


ALERTS = ("targetDown", "errorRate", "latencyP95", "upstreamErrors", "deploymentEjected", "highFallbackRate",
          "storeDown", "pendingSettles", "storeErrors", "jwksFetchFailing", "creditsExhaustion", "policyReloadFailed",
          "authFailureSpike")
THRESHOLDED_ALERTS = frozenset(ALERTS) - {"targetDown", "deploymentEjected", "storeDown", "policyReloadFailed"}


def alert(threshold: bool) -> dict[str, Any]:
    properties = {"for": {"type": "string", "pattern": "^([0-9]+(ms|s|m|h|d|w|y))+$"},
                  "severity": {"enum": ["critical", "warning", "info"]}}
    if threshold:
        properties["threshold"] = {"type": "number", "minimum": 0}
    return section(properties, required=list(properties))


def section(properties: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """An object of the chart's own keys: a misspelt key fails `helm lint` and `helm install`."""
    return {"type": "object", "additionalProperties": False, "properties": properties, **extra}


def _strip_titles(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip_titles(v) for k, v in node.items() if k != "title" or not isinstance(v, str)}
    if isinstance(node, list):
        return [_strip_titles(item) for item in node]
    return node


def store_schema() -> dict[str, Any]:
    """`config.store` as StoreSettings.from_mapping reads it: fail_mode nested, redis_url_env beside redis_url."""
    generated = TypeAdapter(StoreSettings).json_schema()["properties"]
    fail_modes = {f.name for f in fields(StoreSettings) if f.name.startswith("fail_")}
    properties = {name: schema for name, schema in generated.items() if name not in fail_modes}
    properties["redis_url_env"] = STRING
    properties["fail_mode"] = section({name.removeprefix("fail_"): generated[name] for name in sorted(fail_modes)})
    return section(properties)


def config_schema() -> tuple[dict[str, Any], dict[str, Any]]:
    """(schema of `config`, its definitions), from the pydantic model the gateway validates config.yaml with."""
    schema = Config.model_json_schema(ref_template="#/definitions/{model}")
    for key in LOADER_KEYS:
        del schema["properties"][key]
    schema["properties"]["store"] = store_schema()
    definitions = schema.pop("$defs")
    return schema, definitions


def values_schema() -> dict[str, Any]:
    config, definitions = config_schema()
    probe = section({"initialDelaySeconds": integer(), "periodSeconds": integer(1), "timeoutSeconds": integer(1),
                     "failureThreshold": integer(1), "successThreshold": integer(1)})
    schema = section({
        "replicaCount": integer(),
        "image": section({"repository": STRING, "tag": STRING,
                          "pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]}}),
        "imagePullSecrets": LIST,
        "nameOverride": STRING,
        "fullnameOverride": STRING,
        "serviceAccount": section({"create": BOOLEAN, "name": STRING, "annotations": STRING_MAP}),
        "podAnnotations": STRING_MAP,
        "podLabels": STRING_MAP,
        "containerPort": integer(1) | {"maximum": 65535},
        "service": section({"type": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                            "port": integer(1) | {"maximum": 65535}, "annotations": STRING_MAP}),
        "ingress": section({"enabled": BOOLEAN, "className": STRING, "annotations": STRING_MAP,
                            "nginxStreaming": BOOLEAN, "streamTimeoutSeconds": integer(1),
                            "maxBodySize": {"type": ["string", "integer"]}, "hosts": LIST, "tls": LIST}),
        "httpRoute": section({"enabled": BOOLEAN, "annotations": STRING_MAP, "parentRefs": LIST, "hostnames": LIST,
                              "requestTimeout": STRING}),
        "networkPolicy": section({"enabled": BOOLEAN, "from": LIST, "metricsFrom": LIST}),
        "topologySpread": section({"enabled": BOOLEAN}),
        "test": section({"apiKeySecret": section({"name": STRING, "key": SECRET_KEY})}),
        "config": config,
        "policies": {"type": "object", "additionalProperties": {"type": ["string", "object"]}},
        "demo": section({"enabled": BOOLEAN}),
        "policiesExistingConfigMap": STRING,
        "signingKey": section({"existingSecret": STRING, "secretKey": SECRET_KEY,
                               "verifyOnlyKeys": {"type": "array", "items": SECRET_KEY, "uniqueItems": True},
                               "algorithm": {"enum": ["ecdsa", "ed25519"]}}),
        "providerSecrets": section({"existingSecret": STRING}),
        "redis": section({"existingSecret": STRING, "secretKey": STRING}),
        "exporter": section({"enabled": BOOLEAN, "replicas": integer(), "sink": {"enum": ["http", "jsonl"]},
                             "existingSecret": STRING, "urlKey": SECRET_KEY, "signingSecretKey": SECRET_KEY,
                             "args": {"type": "array", "items": STRING}, "resources": OBJECT}),
        "env": LIST,
        "shutdown": section({"drainSeconds": integer(), "preStopSleepSeconds": integer(),
                             "marginSeconds": integer(1)}),
        "probes": section({"liveness": probe, "readiness": probe}),
        "resources": OBJECT,
        "podSecurityContext": OBJECT,
        "securityContext": OBJECT,
        "autoscaling": section({"enabled": BOOLEAN, "minReplicas": integer(1), "maxReplicas": integer(1),
                                "targetCPUUtilizationPercentage": integer(1),
                                "streamsInFlightPerPod": integer()}),
        "podDisruptionBudget": section({"enabled": BOOLEAN, "minAvailable": {"type": ["integer", "string"]}}),
        "metrics": section({
            "port": integer() | {"maximum": 65535},
            "scrapeAnnotations": BOOLEAN,
            "serviceMonitor": section({"enabled": BOOLEAN, "interval": STRING, "scrapeTimeout": STRING,
                                       "labels": STRING_MAP}),
            "prometheusRule": section({"enabled": BOOLEAN, "labels": STRING_MAP}),
            "alerts": section({"job": STRING, **{name: alert(threshold=name in THRESHOLDED_ALERTS)
                                                  for name in ALERTS}}),
            "dashboard": section({"enabled": BOOLEAN, "labels": STRING_MAP, "annotations": STRING_MAP,
                                  "namespace": STRING}),
        }),
        "extraVolumes": LIST,
        "extraVolumeMounts": LIST,
        "nodeSelector": STRING_MAP,
        "tolerations": LIST,
        "affinity": OBJECT,
        "topologySpreadConstraints": LIST,
    })
    # Helm accepts a `global` key in every chart's values (parent charts pass it down).
    schema["properties"]["global"] = OBJECT
    return _strip_titles({"$schema": "http://json-schema.org/draft-07/schema#", **schema, "definitions": definitions})


def render() -> str:
    return json.dumps(values_schema(), indent=2, sort_keys=False) + "\n"


if __name__ == "__main__":
    SCHEMA_FILE.write_text(render())
    print(f"wrote {SCHEMA_FILE.relative_to(ROOT)}")
