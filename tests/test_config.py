"""Config validation at start-up: errors name the file, the key and the fix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from proxy.config import ConfigError, load_config, parse_config
from proxy.jobs.webhooks import webhook_verifiers

ROOT = Path(__file__).resolve().parent.parent


def test_the_shipped_config_is_valid() -> None:
    config = load_config(ROOT / "config.yaml")
    assert config.store_settings().kind == "memory"
    assert config.providers["demo"].kind == "demo"
    assert {m.provider for m in config.models} == {"demo"}


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"server": {"prot": 1}}, "server.prot: unknown key. Fix: remove it"),
        ({"server": {"port": "eighty"}}, "server.port:"),
        ({"server": {"port": 70000}}, "server.port:"),
        ({"providers": {"x": {"kind": "http"}}}, "providers.x: kind http needs base_url"),
        ({"providers": {"x": {"kind": "cohere", "base_url": "https://c.example"}}},
         "providers.x.kind: kind 'cohere' is not a provider kind"),
        ({"providers": {"x": {"base_url": "https://a.example", "format": "openai"}}}, "providers.x.format: unknown key"),
        ({"providers": {"x": {"base_url": "ftp://a"}}}, "must start with http:// or https://"),
        ({"models": [{"id": "a", "name": "A", "creator": "c", "capability": "text2text", "provider": "nope",
                      "upstream_model": "a"}]}, "names provider 'nope'"),
        ({"models": [{"id": "a", "name": "A", "creator": "c", "capability": "mind-reading", "provider": "p",
                      "upstream_model": "a"}], "providers": {"p": {"kind": "demo"}}}, "capability 'mind-reading'"),
        ({"store": {"kind": "redis"}}, "store.redis_url is empty"),
        ({"store": {"knd": "redis"}}, "unknown key store.knd"),
        ({"auth": {"signing_keys": [{"file": "a.pem", "env": "B"}]}}, "give exactly one of file or env"),
        ({"issuers": {"clerk": {"issuer": "https://c.example", "jwks_url": "https://c.example/jwks",
                                "plan": "members", "algorithms": ["HS256"]}}}, "issuers.clerk.algorithms"),
        ([1, 2], "the top level must be a mapping"),
        ({"assets": {"max_total_bytes": 1000, "max_bytes_per_account": 1001}},
         "max_bytes_per_account (1001) exceeds max_total_bytes (1000)"),
        ({"assets": {"max_count": 10, "max_count_per_account": 11}}, "max_count_per_account (11) exceeds max_count (10)"),
        ({"assets": {"max_count_per_account": 0}}, "assets.max_count_per_account"),
        ({"server": {"max_upload_bytes": 2000}, "assets": {"max_bytes_per_account": 1000}},
         "server.max_upload_bytes (2000) exceeds assets.max_bytes_per_account (1000)"),
        ({"server": {"max_upload_bytes": 2000}, "assets": {"max_receiving_bytes": 1000}},
         "server.max_upload_bytes (2000) exceeds assets.max_receiving_bytes (1000)"),
        ({"providers": {"fal": {"kind": "fal"}}}, "kind fal needs base_url, e.g. https://queue.fal.run"),
        ({"providers": {"fal": {"kind": "fal", "base_url": "https://queue.fal.run"}},
          "models": [{"id": "f/tts", "name": "T", "creator": "C", "capability": "text2speech", "provider": "fal",
                      "upstream_model": "x/y"}]}, "is text2speech, which fal providers do not serve"),
        ({"providers": {"fal": {"kind": "fal", "base_url": "https://queue.fal.run", "jobs": {"retries": 11}}}},
         "providers.fal.jobs.retries"),
        ({"jobs": {"lease_s": 0.5}}, "jobs.lease_s"),
        ({"jobs": {"record_ttl_s": 3600, "idempotency_ttl_s": 7200}},
         "idempotency_ttl_s (7200) exceeds record_ttl_s (3600)"),
        ({"providers": {"fal": {"kind": "fal", "base_url": "https://queue.fal.run",
                                "jobs": {"webhook_secret": {"env": "FAL_HOOKS"}}}}},
         "jobs.webhook_secret applies to kind replicate only"),
        ({"providers": {"r": {"kind": "replicate", "base_url": "https://api.replicate.com/v1",
                              "jobs": {"webhooks": True}}}},
         "jobs.webhooks applies to kind fal only (providers that sign webhooks with a published key); remove it from "
         "this replicate provider and set jobs.webhook_secret instead"),
        ({"providers": {"fal": {"kind": "fal", "base_url": "https://queue.fal.run",
                                "jobs": {"webhooks": True, "webhook_jwks_url": "keys.json"}}}},
         "providers.fal.jobs.webhook_jwks_url"),
    ],
)
def test_invalid_config_names_file_key_and_fix(
    data: object, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    with pytest.raises(ConfigError) as error:
        parse_config(data, "conf/gateway.yaml")
    assert str(error.value).startswith("conf/gateway.yaml:")
    assert expected in str(error.value)


@pytest.mark.parametrize("secret, expected", [
    (None, "environment variable REPLICATE_HOOKS is not set"),
    ("whsec_not base64!", "not base64 after its whsec_ prefix"),
    ("whsec_c2hvcnQ=", "its key has 5 bytes"),
])
def test_a_webhook_secret_is_checked_at_start_up(
    secret: str | None, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if secret is not None:
        monkeypatch.setenv("REPLICATE_HOOKS", secret)
    config = parse_config({"providers": {"r": {"kind": "replicate", "base_url": "https://api.replicate.com/v1",
                                               "jobs": {"webhook_secret": {"env": "REPLICATE_HOOKS"}}}}}, "g.yaml")
    with pytest.raises(ConfigError) as error:
        webhook_verifiers(config)
    assert str(error.value).startswith("g.yaml: providers.r.jobs.webhook_secret: ") and expected in str(error.value)


def test_redis_url_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    assert parse_config({"store": {"kind": "redis"}}, "c.yaml").store_settings().redis_url == "redis://127.0.0.1:1/0"


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True, text=True, cwd=ROOT, timeout=60)


def test_check_command_accepts_the_default_config() -> None:
    result = run_cli("check", "--config", "config.yaml")
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


def test_check_command_fails_with_a_message(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("server:\n  hots: 0.0.0.0\n")
    result = run_cli("check", "--config", str(bad))
    assert result.returncode == 2
    assert f"{bad}:" in result.stderr and "server.hots: unknown key" in result.stderr
    missing = run_cli("check", "--config", str(tmp_path / "none.yaml"))
    assert missing.returncode == 2 and "file not found" in missing.stderr


def test_keys_new_prints_a_key_and_its_hash_line() -> None:
    result = run_cli("keys", "new", "--plan", "members", "--id", "backend")
    assert result.returncode == 0
    key = result.stdout.split("store it now): ")[1].split()[0]
    from proxy.auth.api_keys import hash_key

    assert key.startswith("sk_") and len(key) > 40
    assert f'{{id: backend, hash: "{hash_key(key)}", plan: members}}' in result.stdout


def test_keys_new_refuses_a_plan_the_policies_do_not_define() -> None:
    """Before, it printed a key for any plan; the policy line then failed the next policy load."""
    result = run_cli("keys", "new", "--plan", "premium", "--config", "config.yaml")
    assert result.returncode == 2 and "API key" not in result.stdout
    assert result.stderr.strip() == (
        "edge-proxy: config.yaml: plan 'premium' is not defined in policies/ (plans: demo, members). "
        "Fix: use one of them, or add plans.premium to a policy file first")


def test_http_is_the_openai_kind_under_its_former_name() -> None:
    providers = {"old": {"kind": "http", "base_url": "https://a.example/v1"}, "new": {"base_url": "https://a.example/v1"}}
    config = parse_config({"providers": providers}, "c.yaml")
    assert config.providers["new"].kind == "openai"
    assert config.providers["old"].dialect == config.providers["new"].dialect == "openai"
