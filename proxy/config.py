"""config.yaml -> typed, validated settings. Unknown keys are errors; every error names file, key and fix."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .auth.oidc import IssuerSettings
from .api.schema import INPUTS
from .auth.tokens import TokenSettings
from .catalog import CAPABILITIES, Deployment, Model
from .jobs.kinds import FAL_JWKS_URL, JOB_CAPABILITIES, JOB_KINDS, WEBHOOK_KINDS
from .store.settings import StoreConfigError, StoreSettings
from .upstream.formats import ADAPTERS, adapter


class ConfigError(ValueError):
    """A configuration problem, phrased as `file: key: problem. Fix: ...`."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Timeouts(_Strict):
    """Upstream timeouts. `first_byte_s` bounds the wait for response headers, `idle_s` the gap between chunks."""

    connect_s: float = Field(5.0, gt=0)
    first_byte_s: float = Field(60.0, gt=0)
    idle_s: float = Field(60.0, gt=0)
    total_s: float = Field(600.0, gt=0)


class ServerSettings(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    max_body_bytes: int = Field(10 * 1024 * 1024, gt=0)
    cors_allow_origins: tuple[str, ...] = ()
    sse_keepalive_s: float = Field(15.0, ge=0)  # 0 disables `: ping` comments
    shutdown_grace_s: float = Field(30.0, ge=0)
    # A connection is closed when no complete request head arrives this long after it opened or after the
    # previous answer: bounds idle keep-alive connections and headers sent slowly (slowloris).
    idle_timeout_s: float = Field(75.0, gt=0)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_json: bool = True  # one JSON object per line (access log included); false for human-readable text
    access_log: bool = True
    # Serve GET /metrics on this port (same host) and not on `port`, which the public may reach; None: on `port`.
    metrics_port: int | None = Field(None, ge=0, le=65535)
    # Exact paths that get no access-log line (still counted in metrics): e.g. the kubelet's probes and scrapes.
    access_log_skip_paths: tuple[str, ...] = ()
    max_upload_bytes: int = Field(25 * 1024 * 1024, gt=0)  # POST /v1/uploads; larger files get 413
    public_url: str | None = None  # base of asset URLs (e.g. https://ai.example.com); default: the request's host
    # Worker processes sharing the port (proxy/workers.py); None: the cores this process may use with a Redis
    # store, 1 with the memory store (whose counters each process would keep for itself).
    workers: int | None = Field(None, ge=1)


class SecretSource(_Strict):
    """A secret read from an environment variable or a file (never written in config.yaml)."""

    env: str | None = None
    file: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> "SecretSource":
        if bool(self.file) == bool(self.env):
            raise ValueError("give exactly one of file or env")
        return self


class S3Settings(_Strict):
    """S3-compatible object storage for `assets.backend: s3`; credentials from the standard AWS chain
    (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile, a web identity or the instance's role)."""

    bucket: str = Field(min_length=3)
    prefix: str = "assets/"  # object keys: <prefix><asset id>; match a lifecycle rule to it (docs/configuration.md)
    endpoint_url: str | None = None  # e.g. https://minio.example.com; none: AWS S3 of `region`
    region: str | None = None  # none: from the AWS chain (AWS_REGION, the profile)
    addressing_style: Literal["auto", "path", "virtual"] = "auto"


class RehostSettings(_Strict):
    """Copy providers' output URLs into the asset store (`/v1/responses` image answers given as URLs)."""

    enabled: bool = False
    timeout_s: float = Field(30.0, gt=0)  # the whole fetch
    max_redirects: int = Field(3, ge=0)
    # Hosts exempt from the https and public-address checks, e.g. an in-cluster provider's asset host.
    private_hosts: tuple[str, ...] = ()


class AssetSettings(_Strict):
    """The store behind uploads and generated outputs: short-lived, bounded per account (an account over its
    share loses its own oldest assets, never another account's) and, in memory, in total."""

    backend: Literal["memory", "redis", "s3"] = "memory"
    ttl_s: float = Field(3600.0, gt=0)  # how long an object is kept
    url_ttl_s: float | None = Field(None, gt=0)  # how long an asset URL works (at most ttl_s); none: as the object
    url_signing_keys: tuple[SecretSource, ...] = ()  # HMAC keys for asset URLs: the first signs, all verify
    upload_url_ttl_s: float = Field(900.0, gt=0)  # how long a presigned upload URL (POST /v1/uploads, JSON) works
    max_total_bytes: int = Field(256 * 1024 * 1024, gt=0)
    max_count: int = Field(1000, gt=0)
    max_bytes_per_account: int = Field(64 * 1024 * 1024, gt=0)
    max_count_per_account: int = Field(250, gt=0)
    max_receiving_bytes: int = Field(100 * 1024 * 1024, gt=0)  # upload bodies being read at once, all accounts
    s3: S3Settings | None = None
    rehost: RehostSettings = RehostSettings()

    @model_validator(mode="after")
    def _shares_fit_the_total(self) -> "AssetSettings":
        if self.max_bytes_per_account > self.max_total_bytes:
            raise ValueError(
                f"max_bytes_per_account ({self.max_bytes_per_account}) exceeds max_total_bytes "
                f"({self.max_total_bytes}); an account's share must fit in the store: lower it or raise the total"
            )
        if self.max_count_per_account > self.max_count:
            raise ValueError(
                f"max_count_per_account ({self.max_count_per_account}) exceeds max_count ({self.max_count}); "
                "an account's share must fit in the store: lower it or raise the total"
            )
        if self.url_ttl_s is not None and self.url_ttl_s > self.ttl_s:
            raise ValueError(f"url_ttl_s ({self.url_ttl_s}) exceeds ttl_s ({self.ttl_s}); a URL cannot outlive its "
                             "object: lower url_ttl_s or raise ttl_s")
        return self

    @model_validator(mode="after")
    def _shared_backends_are_complete(self) -> "AssetSettings":
        if self.backend == "s3" and self.s3 is None:
            raise ValueError("backend s3 needs an s3 section (bucket, prefix, endpoint_url, region)")
        if self.backend != "memory" and not self.url_signing_keys:
            raise ValueError(
                f"backend {self.backend} is shared by replicas, which must sign asset URLs with the same key: "
                "add url_signing_keys: [{env: ASSET_URL_KEY}] (32 or more random bytes)"
            )
        return self


def store_settings(raw: Mapping[str, Any], source: str) -> StoreSettings:
    """The `store:` section, validated by the store package; REDIS_URL in the environment fills a missing URL."""
    data = dict(raw)
    if "redis_url" not in data and "redis_url_env" not in data and os.environ.get("REDIS_URL"):
        data["redis_url_env"] = "REDIS_URL"
    try:
        return StoreSettings.from_mapping(data, source)
    except StoreConfigError as exc:
        raise ConfigError(str(exc)) from None


class JobSettings(_Strict):
    """How a job provider's jobs are driven (proxy/jobs/): the pause between status polls, how long a job may take
    in all before it is cancelled and failed, and how many provider calls in a row may fail (5xx, connection errors)
    before the job fails."""

    poll_interval_s: float = Field(1.0, gt=0, le=60)
    timeout_s: float = Field(900.0, gt=0, le=86_400)
    retries: int = Field(3, ge=0, le=10)
    # Providers that call back (kind replicate): their webhook signing secret (`whsec_...`), from env or a file.
    # Set, jobs ask the provider for webhooks (polling stays the fallback); unset, jobs are polled only.
    webhook_secret: SecretSource | None = None
    webhook_tolerance_s: float = Field(300.0, ge=10, le=3600)  # a webhook's timestamp this far off is refused
    # Providers that sign with a published key (kind fal): true, jobs ask for webhooks, verified against the keys
    # of `webhook_jwks_url` (fetched and cached; fal's own by default).
    webhooks: bool = False
    webhook_jwks_url: str = Field(FAL_JWKS_URL, pattern=r"^https?://[^\s/]+")

    def takes_webhooks(self) -> bool:
        """True when this provider's jobs ask to be called back."""
        return self.webhooks or self.webhook_secret is not None


class JobsSettings(_Strict):
    """Jobs that outlive the connection (docs/api.md#jobs): when a stream detaches, what it tells the client, how
    long a replica's lease on a job lasts without renewal, and how long job records and idempotency keys live."""

    detach_after_s: float = Field(60.0, gt=0, le=3600)  # a job's event stream ends with generation.detached then
    poll_after_ms: int = Field(2000, ge=100, le=600_000)  # the client's hint in generation.detached and 202s
    lease_s: float = Field(15.0, ge=1, le=600)  # another replica resumes a job this long after its poller died
    record_ttl_s: float = Field(86_400.0, ge=60, le=30 * 86_400)  # GET /v1/responses/{id} answers this long
    idempotency_ttl_s: float = Field(86_400.0, ge=60, le=30 * 86_400)

    @model_validator(mode="after")
    def _keys_name_kept_jobs(self) -> "JobsSettings":
        # Both expire counted from the submit: a key outliving its job answers a retry with a job that is gone.
        if self.idempotency_ttl_s > self.record_ttl_s:
            raise ValueError(f"idempotency_ttl_s ({self.idempotency_ttl_s:g}) exceeds record_ttl_s "
                             f"({self.record_ttl_s:g}); a retried submit would name a job no longer kept: lower "
                             "idempotency_ttl_s or raise record_ttl_s")
        return self


class SigningKeyConfig(SecretSource):
    """A PEM private key for gateway tokens, read from a file or an environment variable."""

    active: bool = False


class AuthSettings(_Strict):
    """Gateway-minted tokens (`POST /v1/tokens`)."""

    issuer: str = "edge-proxy"
    audience: str = "edge-proxy"
    token_ttl_s: int = Field(300, gt=0)
    max_token_ttl_s: int = Field(3600, gt=0)
    leeway_s: int = Field(5, ge=0)
    signing_keys: tuple[SigningKeyConfig, ...] = ()

    def token_settings(self) -> TokenSettings:
        return TokenSettings(self.issuer, self.audience, self.token_ttl_s, self.max_token_ttl_s, self.leeway_s)


class IssuerConfig(_Strict):
    """An external identity provider (Clerk or any OIDC issuer) whose JWTs are verified through its JWKS."""

    issuer: str
    jwks_url: str
    plan: str
    audience: str | None = None
    authorized_parties: tuple[str, ...] = ()
    algorithms: tuple[str, ...] = ("RS256",)
    plan_claim: str | None = None
    plan_map: dict[str, str] = {}
    account_claim: str = "sub"
    leeway_s: int = Field(30, ge=0)
    jwks_cache_ttl_s: float = Field(300.0, gt=0)
    unknown_kid_cooldown_s: float = Field(10.0, ge=0)
    fetch_timeout_s: float = Field(3.0, gt=0)

    def settings(self, name: str) -> IssuerSettings:
        return IssuerSettings(name=name, **self.model_dump())


class AdminSettings(_Strict):
    """The admin API (`/v1/admin/*`, docs/usage.md) and the keys it manages. The admin token comes from an env
    var, a file, or is given as SHA-256 hashes (several during a rotation); none configured: the admin API is off.
    `keys_refresh_s` bounds how long a change made on one replica takes to reach the others."""

    token_env: str | None = Field(None, min_length=1)
    token_file: str | None = Field(None, min_length=1)
    token_sha256: tuple[str, ...] = ()
    keys_refresh_s: float = Field(1.0, gt=0, le=60)


class AlertSettings(_Strict):
    """Budget alerts (docs/usage.md, "Budget alerts"): the webhook every claimed threshold is POSTed to, signed with
    HMAC-SHA256 under a secret from an env var or a file; without `webhook_url`, thresholds are not claimed."""

    webhook_url: str | None = Field(None, pattern=r"^https?://[^\s/]+")
    secret_env: str | None = Field(None, min_length=1)
    secret_file: str | None = Field(None, min_length=1)
    timeout_s: float = Field(5.0, gt=0, le=60)  # one delivery attempt
    max_backoff_s: float = Field(30.0, gt=0, le=600)  # retries wait 1 s, 2 s, 4 s ... up to this
    retry_for_s: float = Field(86_400.0, gt=0)  # an alert not delivered this long after it fired is given up
    # An alert read by a replica that has not acknowledged it for this long is taken over by another (its reader
    # died); above max_backoff_s + timeout_s, so a live reader's retries are never taken away.
    claim_after_s: float = Field(60.0, gt=0)
    sweep_interval_s: float = Field(10.0, gt=0, le=3600)  # how often a replica looks for alerts of every account

    @model_validator(mode="after")
    def _webhook_is_complete(self) -> "AlertSettings":
        if self.webhook_url is None:
            return self
        if bool(self.secret_env) == bool(self.secret_file):
            raise ValueError("webhook_url needs its signing secret: give exactly one of secret_env or secret_file")
        if self.claim_after_s <= self.max_backoff_s + self.timeout_s:
            raise ValueError(
                f"claim_after_s ({self.claim_after_s:g}) must exceed max_backoff_s + timeout_s "
                f"({self.max_backoff_s + self.timeout_s:g}), else replicas take retried alerts from each other: "
                "raise claim_after_s or lower the others"
            )
        return self


class DemoSettings(_Strict):
    """The quick-start development key: from `key_env` if set there, else generated and printed once."""

    enabled: bool = False
    key_env: str = "EDGE_PROXY_DEMO_KEY"
    plan: str = "demo"


class PoliciesSettings(_Strict):
    dir: str = "policies"
    watch_interval_s: float = Field(2.0, ge=0)  # 0 disables the file watch (SIGHUP still reloads)


_HOST_AND_PORT = re.compile(r"(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")


class ProviderSettings(_Strict):
    """An upstream and its wire format (`kind`). `kind: demo` starts the built-in demo upstream in-process instead
    of calling out."""

    kind: str = Field("openai", json_schema_extra={"enum": [*ADAPTERS, *JOB_KINDS]})
    base_url: str | None = None
    api_key_env: str | None = None
    api_key_file: str | None = None
    # Several keys (with the single ones above, if given): spread over calls; a key refused (401) or throttled (429)
    # rests for `key_rest_s` (a 429's Retry-After when given) and the call is sent with another (credentials.py).
    api_keys_env: tuple[str, ...] = ()
    api_key_files: tuple[str, ...] = ()  # re-read when they change (rotated keys, bearer tokens)
    key_selection: Literal["round_robin", "least_recently_throttled"] = "round_robin"
    key_rest_s: float = Field(60.0, gt=0, le=3600)
    # azure_openai: the `api-version` query parameter of every call (default: formats/azure_openai.py API_VERSION).
    api_version: str | None = Field(None, pattern=r"^[0-9A-Za-z.-]{1,40}$")
    # bedrock: the AWS region (base_url defaults to its bedrock-runtime endpoint) and an optional named profile of
    # the shared config; credentials come from AWS's standard chain unless a Bedrock API key is given.
    region: str | None = Field(None, pattern=r"^[a-z]{2}(-[a-z]+)+-[0-9]$")
    aws_profile: str | None = None
    # How the credential is sent; None: the kind's own way (openai: `Authorization: Bearer <key>`).
    auth_header: str | None = None
    auth_scheme: str | None = None  # prefix before the key; "" sends the bare key (e.g. `xi-api-key`)
    timeouts: Timeouts = Timeouts()
    max_connections: int = Field(100, gt=0)
    # The most of the pool one account may hold (default: half of it), and how long a call waits for a free
    # connection when the pool is busy (proxy/upstream/shares.py).
    max_connections_per_account: int | None = Field(None, gt=0)
    pool_wait_s: float = Field(5.0, gt=0)
    # Hosts (`host` or `host:port`) a 307/308 from this provider may lead to, credential included; none by default.
    follow_redirects_to: tuple[str, ...] = ()
    jobs: JobSettings = JobSettings()  # job providers (fal, demo): polling, timeout, retries

    @field_validator("follow_redirects_to")
    @classmethod
    def _redirect_hosts_are_hosts(cls, hosts: tuple[str, ...]) -> tuple[str, ...]:
        for host in hosts:
            if not _HOST_AND_PORT.fullmatch(host):
                raise ValueError(
                    f"entry {host!r} is not a host or host:port (no scheme, no path), "
                    "e.g. eu.api.example.com or eu.api.example.com:8443"
                )
        return hosts

    @property
    def connections_per_account(self) -> int:
        return self.max_connections_per_account or max(1, self.max_connections // 2)

    @model_validator(mode="after")
    def _account_share_fits_the_pool(self) -> "ProviderSettings":
        if self.connections_per_account > self.max_connections:
            raise ValueError(
                f"max_connections_per_account ({self.max_connections_per_account}) exceeds max_connections "
                f"({self.max_connections}); an account's share must fit in the pool: lower it or raise the pool"
            )
        return self

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, kind: str) -> str:
        if kind not in ADAPTERS and kind not in JOB_KINDS:
            raise ValueError(f"kind {kind!r} is not a provider kind; use one of: {', '.join([*ADAPTERS, *JOB_KINDS])}")
        return kind

    @property
    def dialect(self) -> str:
        """The body format its answers come in: models served by several providers need one. A job-only kind
        (fal) is its own: its models are served on /v1/responses only."""
        return self.kind if self.kind in JOB_KINDS else adapter(self.kind).dialect

    @model_validator(mode="after")
    def _webhooks_are_supported(self) -> "ProviderSettings":
        if self.jobs.webhook_secret is not None and WEBHOOK_KINDS.get(self.kind) != "secret":
            raise ValueError(f"jobs.webhook_secret applies to kind replicate only (providers that sign webhooks with "
                             f"a shared secret); remove it from this {self.kind} provider")
        if self.jobs.webhooks and WEBHOOK_KINDS.get(self.kind) != "jwks":
            raise ValueError(f"jobs.webhooks applies to kind fal only (providers that sign webhooks with a published "
                             f"key); remove it from this {self.kind} provider"
                             + (" and set jobs.webhook_secret instead" if self.kind in WEBHOOK_KINDS else ""))
        return self

    @model_validator(mode="after")
    def _api_version_is_azure(self) -> "ProviderSettings":
        if self.api_version is not None and self.kind != "azure_openai":
            raise ValueError(f"api_version applies to kind azure_openai only; remove it from this {self.kind} provider")
        return self

    @model_validator(mode="after")
    def _aws_settings_are_bedrock(self) -> "ProviderSettings":
        if self.kind == "bedrock" and self.region is None:
            raise ValueError("kind bedrock needs region, e.g. region: us-east-1")
        if self.kind != "bedrock" and (self.region is not None or self.aws_profile is not None):
            raise ValueError(f"region and aws_profile apply to kind bedrock only; remove them from this {self.kind} provider")
        return self

    @property
    def endpoint(self) -> str | None:
        """Where calls go: base_url, or a Bedrock region's runtime endpoint."""
        if self.base_url is None and self.kind == "bedrock":
            return f"https://bedrock-runtime.{self.region}.amazonaws.com"
        return self.base_url

    @model_validator(mode="after")
    def _http_needs_url(self) -> "ProviderSettings":
        if self.kind not in ("demo", "bedrock") and not self.base_url:
            example = JOB_KINDS.get(self.kind) or adapter(self.kind).example_base_url
            raise ValueError(f"kind {self.kind} needs base_url, e.g. {example}")
        if self.base_url and not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url {self.base_url!r} must start with http:// or https://")
        return self


class DeploymentSettings(_Strict):
    """One place a model is served. `tag` names it (metrics, access log) when a model has several at one provider."""

    provider: str
    upstream_model: str = Field(min_length=1)
    weight: float = Field(1.0, gt=0)  # share of the traffic, relative to the model's other deployments
    tag: str | None = Field(None, pattern=r"^[A-Za-z0-9_.:-]{1,64}$")

    @property
    def name(self) -> str:
        return self.tag or self.provider

    def to_deployment(self) -> Deployment:
        return Deployment(self.name, self.provider, self.upstream_model, self.weight)


class PropertyHints(_Strict):
    """How a client renders one input (the IMG.LY plugins' schema extensions); none changes what is accepted."""

    title: str | None = Field(None, min_length=1, max_length=200)
    description: str | None = Field(None, min_length=1, max_length=2000)
    enum_labels: dict[str, str] = {}  # x-imgly-enum-labels: enum value -> label
    enum_icons: dict[str, str] = {}  # x-imgly-enum-icons: enum value -> icon id (e.g. ratio16by9)
    builder: dict[str, Any] | None = None  # x-imgly-builder, e.g. {component: TextArea}


class SchemaHints(_Strict):
    """A model's form hints, served in its input schema. `property_order` (x-property-order) lists the inputs a
    form shows, in order; default: every input in the schema's order."""

    property_order: tuple[str, ...] | None = None
    properties: dict[str, PropertyHints] = {}

    def check(self, capability: str) -> None:
        """Every hint names an input of the capability (and an enum hint a value of it); the order lists each
        input once and every required one, so a form built from it can always be submitted."""
        inputs = INPUTS[capability]
        known = inputs["properties"]
        for name in (*(self.property_order or ()), *self.properties):
            if name not in known:
                raise ValueError(f"schema_hints names {name!r}, which is not an input of {capability} models; "
                                 f"use one of: {', '.join(known)}")
        order = self.property_order
        if order is not None:
            if len(set(order)) != len(order):
                raise ValueError("schema_hints.property_order lists an input twice; list each once")
            if missing := [name for name in inputs.get("required", ()) if name not in order]:
                raise ValueError(f"schema_hints.property_order leaves out required input {missing[0]!r}; add it")
        for name, hints in self.properties.items():
            values = known[name].get("enum")
            for key in ("enum_labels", "enum_icons"):
                for value in getattr(hints, key):
                    if values is None or value not in values:
                        raise ValueError(f"schema_hints.properties.{name}.{key}: {value!r} is not a value of "
                                         f"{name}; use one of: {', '.join(map(str, values or ())) or '(no enum)'}")

    def extensions(self) -> dict[str, Any]:
        """The hints as schema keywords: `x-property-order` and, per input, its extension keywords."""
        out: dict[str, Any] = {}
        if self.property_order is not None:
            out["x-property-order"] = list(self.property_order)
        properties = {name: _property_keywords(hints) for name, hints in self.properties.items()}
        if properties := {name: keywords for name, keywords in properties.items() if keywords}:
            out["properties"] = properties
        return out


def _property_keywords(hints: PropertyHints) -> dict[str, Any]:
    keywords = {"title": hints.title, "description": hints.description, "x-imgly-enum-labels": hints.enum_labels,
                "x-imgly-enum-icons": hints.enum_icons, "x-imgly-builder": hints.builder}
    return {key: value for key, value in keywords.items() if value}


class ModelSettings(_Strict):
    id: str = Field(min_length=1)
    name: str
    creator: str
    capability: str
    provider: str | None = None  # with upstream_model: the single-deployment form
    upstream_model: str | None = Field(None, min_length=1)
    deployments: tuple[DeploymentSettings, ...] = ()
    fallbacks: tuple[str, ...] = ()  # other model ids (same capability) tried once every deployment failed
    # weighted: random by weight; least_in_flight: fewest calls under way per unit of weight on this replica;
    # sticky: the same end user to the same deployment while it is available (weighted rendezvous hashing);
    # latency: the lowest smoothed time to response headers first, by weight for routing.latency_explore of calls.
    selection: Literal["weighted", "least_in_flight", "sticky", "latency"] = "weighted"
    max_output_tokens: int | None = Field(None, gt=0)
    schema_hints: SchemaHints = SchemaHints()

    @model_validator(mode="after")
    def _known_capability(self) -> "ModelSettings":
        if self.capability not in CAPABILITIES:
            raise ValueError(f"capability {self.capability!r} is not one of {', '.join(CAPABILITIES)}")
        self.schema_hints.check(self.capability)
        return self

    @model_validator(mode="after")
    def _served_one_way(self) -> "ModelSettings":
        single = self.provider is not None or self.upstream_model is not None
        if self.deployments and single:
            raise ValueError("give either provider and upstream_model, or a deployments list, not both")
        if not self.deployments and (self.provider is None or self.upstream_model is None):
            raise ValueError("needs provider and upstream_model, or a deployments list")
        names = [d.name for d in self.deployments]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ValueError(
                    f"deployments[{i}] is named {name!r} like an earlier one; give each deployment at the same "
                    "provider a distinct tag"
                )
        return self

    def served_by(self) -> tuple[DeploymentSettings, ...]:
        if self.deployments:
            return self.deployments
        return (DeploymentSettings(provider=self.provider or "", upstream_model=self.upstream_model or ""),)

    def to_model(self, wire_format: str) -> Model:
        deployments = tuple(d.to_deployment() for d in self.served_by())
        return Model(
            id=self.id, name=self.name, creator=self.creator, capability=self.capability,
            provider=deployments[0].provider, upstream_model=deployments[0].upstream_model,
            max_output_tokens=self.max_output_tokens, deployments=deployments, fallbacks=self.fallbacks,
            selection=self.selection, wire_format=wire_format, schema_hints=self.schema_hints.extensions(),
        )


class BreakerSettings(_Strict):
    """A deployment's circuit breaker (local to each replica): `failures` in a row, a share of failures of at
    least `error_rate` among its last `window` calls (a flapping upstream), or a smoothed latency above
    `max_latency_s` open it; after `cooldown_s` one call probes it; the probe's success (within
    `max_latency_s`) closes it, its failure opens it again."""

    failures: int = Field(5, ge=1)
    error_rate: float | None = Field(0.5, gt=0, le=1)  # null: only failures in a row count
    window: int = Field(20, ge=2)
    cooldown_s: float = Field(30.0, gt=0)
    # Latency outliers: a smoothed time to response headers above this (once `latency_samples` answers were
    # measured) opens the breaker too. Off by default: a non-streamed answer's headers wait for the whole
    # generation, so the right bound depends on the models and their callers.
    max_latency_s: float | None = Field(None, gt=0)
    latency_samples: int = Field(10, ge=1)


class RoutingSettings(_Strict):
    """Retries and fallbacks, only before anything of an answer reached the client (docs/routing.md)."""

    max_attempts: int = Field(3, ge=1, le=10)  # upstream calls per request, the first one included
    # No further attempt starts this long after the request's first one; above the default first_byte_s, so a
    # deployment that stalls before its headers is retried with the shipped defaults.
    deadline_s: float = Field(90.0, gt=0)
    throttle_cooldown_s: float = Field(5.0, ge=0)  # a deployment's rest after a 429 without Retry-After
    max_cooldown_s: float = Field(300.0, gt=0)  # a longer Retry-After is capped to this
    # A deployment's latency: each answer's time to its headers, smoothed (the newest sample's weight).
    latency_smoothing: float = Field(0.3, gt=0, le=1)
    # Share of `selection: latency` calls ordered by weight instead, so a slow deployment that recovered is
    # measured again.
    latency_explore: float = Field(0.1, ge=0, le=1)
    breaker: BreakerSettings = BreakerSettings()


class MetricsSettings(_Strict):
    per_principal_labels: bool = False  # opt-in: a counter labelled by key id / hashed user (unbounded cardinality)


class TracingSettings(_Strict):
    """Optional OpenTelemetry tracing (needs the `tracing` extra). Off by default."""

    enabled: bool = False
    service_name: str = Field("edge-proxy", min_length=1)
    exporter: Literal["otlp", "console", "none"] = "otlp"
    endpoint: str | None = None  # OTLP/HTTP traces URL; unset: the exporter reads OTEL_EXPORTER_OTLP_* variables
    sample_ratio: float = Field(1.0, ge=0.0, le=1.0)  # for new traces; an incoming traceparent's decision is kept


class Config(_Strict):
    server: ServerSettings = ServerSettings()
    store: dict[str, Any] = {}
    auth: AuthSettings = AuthSettings()
    issuers: dict[str, IssuerConfig] = {}
    metrics: MetricsSettings = MetricsSettings()
    tracing: TracingSettings = TracingSettings()
    assets: AssetSettings = AssetSettings()
    demo: DemoSettings = DemoSettings()
    admin: AdminSettings = AdminSettings()
    alerts: AlertSettings = AlertSettings()
    policies: PoliciesSettings = PoliciesSettings()
    providers: dict[str, ProviderSettings] = {}
    models: tuple[ModelSettings, ...] = ()
    routing: RoutingSettings = RoutingSettings()
    jobs: JobsSettings = JobsSettings()
    base_dir: str = "."  # set by the loader: relative paths resolve against the config file's folder
    source: str = "config.yaml"  # set by the loader: the file named in errors

    @model_validator(mode="after")
    def _issuers_are_valid(self) -> "Config":
        for name, issuer in self.issuers.items():
            issuer.settings(name)  # its own checks: algorithms, https JWKS URL, timeouts
        return self

    @model_validator(mode="after")
    def _models_reference_providers(self) -> "Config":
        seen: set[str] = set()
        for i, m in enumerate(self.models):
            for j, d in enumerate(m.served_by()):
                if d.provider not in self.providers:
                    where = f"models[{i}].deployments[{j}]" if m.deployments else f"models[{i}]"
                    raise ValueError(
                        f"{where} ({m.id}) names provider {d.provider!r}, which is not under providers; "
                        f"declare it or use one of: {', '.join(self.providers) or '(none declared)'}"
                    )
            if m.id in seen:
                raise ValueError(f"models[{i}]: id {m.id!r} is declared twice; model ids must be unique")
            seen.add(m.id)
            dialects = {self.providers[d.provider].dialect for d in m.served_by()}
            if len(dialects) > 1:
                raise ValueError(
                    f"models[{i}] ({m.id}) is served in several wire formats ({', '.join(sorted(dialects))}); "
                    "a model's deployments must all speak one: declare a model per format"
                )
        return self

    @model_validator(mode="after")
    def _job_models_fit_their_provider(self) -> "Config":
        for i, m in enumerate(self.models):
            kind = self.providers[m.served_by()[0].provider].kind
            if kind in JOB_KINDS and m.capability not in JOB_CAPABILITIES[kind]:
                raise ValueError(
                    f"models[{i}] ({m.id}) is {m.capability}, which {kind} providers do not serve; use one of "
                    f"{', '.join(sorted(JOB_CAPABILITIES[kind]))}"
                )
        return self

    @model_validator(mode="after")
    def _fallbacks_are_models(self) -> "Config":
        by_id = {m.id: m for m in self.models}
        for i, m in enumerate(self.models):
            for j, other in enumerate(m.fallbacks):
                target = by_id.get(other)
                if target is None or other == m.id:
                    raise ValueError(
                        f"models[{i}].fallbacks[{j}] ({m.id}): {other!r} is not another model in models; "
                        "name a declared model id"
                    )
                if self._wire_format(target) != self._wire_format(m):
                    raise ValueError(
                        f"models[{i}].fallbacks[{j}] ({m.id}): {other!r} speaks the {self._wire_format(target)} "
                        f"wire format, not {self._wire_format(m)}; a fallback must take the same request body"
                    )
                if target.capability != m.capability:
                    raise ValueError(
                        f"models[{i}].fallbacks[{j}] ({m.id}): {other!r} is {target.capability}, not {m.capability}; "
                        "a fallback must answer the same kind of call"
                    )
        return self

    @model_validator(mode="after")
    def _uploads_fit_the_asset_store(self) -> "Config":
        for key in ("max_bytes_per_account", "max_receiving_bytes"):  # else no upload that size could ever be kept
            if self.server.max_upload_bytes > getattr(self.assets, key):
                raise ValueError(
                    f"server.max_upload_bytes ({self.server.max_upload_bytes}) exceeds assets.{key} "
                    f"({getattr(self.assets, key)}); raise assets.{key} or lower server.max_upload_bytes"
                )
        return self

    def store_settings(self) -> StoreSettings:
        return store_settings(self.store, self.source)

    def _redis_assets_need_a_redis_store(self) -> None:
        if self.assets.backend == "redis" and self.store_settings().kind != "redis":
            raise ConfigError(f"{self.source}: assets.backend: redis keeps assets in the store's Redis, but store.kind is "
                              "memory. Fix: set store.kind: redis (with its redis_url) or use assets.backend: memory or s3")

    def _wire_format(self, model: ModelSettings) -> str:
        """The wire format a model's deployments speak (one, validated)."""
        return self.providers[model.served_by()[0].provider].dialect

    def catalog(self) -> tuple[Model, ...]:
        return tuple(m.to_model(self._wire_format(m)) for m in self.models)

    def path(self, relative: str) -> Path:
        return Path(self.base_dir) / relative


def _describe(error: dict[str, Any]) -> str:
    key = ".".join(str(part) for part in error["loc"]) or "(top level)"
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key. Fix: remove it or correct its spelling"
    if error["type"] == "missing":
        return f"{key}: required key is missing. Fix: add it"
    message = error["msg"].removeprefix("Value error, ")
    return f"{key}: {message}. Fix: correct this value"


def parse_config(data: Any, source: str) -> Config:
    """Validate already-parsed YAML; `source` names the file in error messages."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections (server, providers, models, ...)")
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        lines = "\n  ".join(_describe(e) for e in exc.errors())
        raise ConfigError(f"{source}: invalid configuration:\n  {lines}") from None
    config = config.model_copy(update={"source": source})
    config.store_settings()  # validated now, so a bad store section stops start-up and `check`
    config._redis_assets_need_a_redis_store()
    return config


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a config file."""
    file = Path(path)
    try:
        data = yaml.safe_load(file.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{file}: file not found. Fix: pass --config with the path of your config.yaml") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file}: not valid YAML: {exc}") from None
    config = parse_config(data, str(file))
    return config.model_copy(update={"base_dir": str(file.parent.resolve())})

