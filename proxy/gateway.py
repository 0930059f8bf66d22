"""The gateway's parts, built once at start-up from the config and shared by every request."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Mapping, TypeVar

from aiohttp import web
from prometheus_client import CollectorRegistry

from .alerts import AlertDelivery, load_secret
from .assets import Assets, build_assets
from .auth.admin import AdminConfigError, AdminCredential
from .auth.api_keys import ApiKey, generate_key, hash_key
from .auth.authenticator import Authenticator
from .auth.oidc import IssuerVerifier
from .auth.tokens import GatewayTokens, KeyConfigError, KeyRing, SigningKeySettings
from .catalog import Model
from .config import Config, ConfigError
from .errors import ApiError
from .jobs.kinds import JOB_KINDS, runs_as_job
from .jobs.registry import build_adapter
from .jobs.runner import JobService
from .jobs.store import MemoryJobStore, RedisJobStore
from .jobs.webhooks import Verifier, webhook_verifiers
from .meter import Meter
from .metrics import Metrics
from .policy import MODEL_NOT_FOUND_MESSAGE, PolicyError, PolicyHolder
from .policy.managed import ManagedKeys
from .store import Store, StoreSettings, build_store
from .store.keys import MemoryKeyDirectory, RedisKeyDirectory
from .upstream.demo import start_demo_upstream
from .upstream.formats import adapter, canonical_kind
from .upstream.providers import (
    Provider, RedirectPolicy, aws_signer, credentials, new_session, pool_shares, url_query,
)
from .tracing import NO_TRACING, Tracing, build_tracing
from .upstream.relay import RelaySettings
from .upstream.routing import Router

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

log = logging.getLogger("edge_proxy")
T = TypeVar("T")

# Where each wire format's models are called natively (named in the error for a model called on another route).
NATIVE_ROUTES = {
    "openai": "/v1/chat/completions and the other /v1 generation routes",
    "anthropic": "/anthropic/v1/messages",
    "gemini": "/gemini/v1beta/models/<model id>:generateContent",
    **{kind: "/v1/responses" for kind in JOB_KINDS},
    "elevenlabs": "/elevenlabs/v1/text-to-speech/<voice id>/stream, or POST /v1/responses",
}


@dataclass
class MetricsStoreObserver:
    """Store events to Prometheus: operation latency and errors, and whether the store is up."""

    metrics: Metrics

    def on_op(self, op: str, seconds: float, outcome: str) -> None:
        self.metrics.store_op(op, seconds, outcome)

    def on_breaker(self, state: str) -> None:
        self.metrics.store_up(state != "open")


@dataclass
class Gateway:
    """Everything a request needs: catalogue, policy, identity, meter, providers, assets and metrics."""

    config: Config
    models: Mapping[str, Model]
    policy: PolicyHolder
    auth: Authenticator
    tokens: GatewayTokens
    store: Store
    meter: Meter
    metrics: Metrics
    relay: RelaySettings
    router: Router
    assets: Assets
    managed_keys: ManagedKeys
    jobs: JobService
    admin: AdminCredential = AdminCredential()
    alerts: AlertDelivery | None = None  # budget alerts' webhook delivery, when alerts.webhook_url is configured
    tracing: Tracing = NO_TRACING
    providers: dict[str, Provider] = field(default_factory=dict)
    provider_kinds: Mapping[str, str] = field(default_factory=dict)  # provider name -> its kind (canonical name)
    webhooks: Mapping[str, Verifier] = field(default_factory=dict)  # provider name -> its webhooks' verifier
    draining: bool = False
    _runners: list[web.AppRunner] = field(default_factory=list)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def runs_as_job(self, model: Model) -> bool:
        """Whether the model's calls are jobs (submitted to a provider's queue, then polled: proxy/jobs/)."""
        return runs_as_job(self.provider_kinds[model.served_by()[0].provider], model.capability)

    def model(self, model_id: object, wire_format: str | None = None, translated: tuple[str, ...] = ()) -> Model:
        """A catalogue model; `wire_format`: the body format the route takes, which the model must speak unless
        the route translates its dialect (`translated`, formats.TRANSLATED)."""
        if not isinstance(model_id, str) or not model_id:
            raise ApiError("invalid_request", "the body needs a `model` string, e.g. one id from GET /v1/models")
        model = self.models.get(model_id)
        if model is None:
            raise ApiError("model_not_found", MODEL_NOT_FOUND_MESSAGE.format(model=model_id))
        if wire_format is not None and model.wire_format != wire_format and model.wire_format not in translated:
            raise ApiError(
                "invalid_request",
                f"model {model_id} speaks the {model.wire_format} wire format, not {wire_format}: call it on its "
                f"native route ({NATIVE_ROUTES.get(model.wire_format, 'see docs/api.md')})",
                param="model",
            )
        return model

    async def start(self) -> None:
        """Open provider pools, start the demo upstream if configured, watch policies, reload on SIGHUP, and
        retry settles that could not reach the store."""
        self.meter.start()
        await self.managed_keys.refresh()  # before the first request: stored keys work from the start
        self._tasks.append(asyncio.create_task(self.managed_keys.run()))
        if self.alerts is not None:
            self._tasks.append(asyncio.create_task(self.alerts.run()))
        for name, settings in self.config.providers.items():
            base_url = settings.endpoint
            if settings.kind == "demo":
                runner, base_url = await start_demo_upstream()
                self._runners.append(runner)
            job_adapter = build_adapter(name, settings, base_url or "", self.config.path("."))
            if job_adapter is not None:
                self.jobs.add_adapter(name, job_adapter, settings.jobs)
            if settings.kind in JOB_KINDS:
                continue  # serves jobs only
            keys = credentials(name, settings, self.config.path("."))
            self.providers[name] = Provider(
                name=name,
                kind=self.provider_kinds[name],
                format=adapter(settings.kind),
                base_url=(base_url or "").rstrip("/"),
                timeouts=settings.timeouts,
                keys=keys,
                signer=await aws_signer(name, settings) if keys is None else None,
                session=new_session(settings),
                pool=pool_shares(name, settings),
                redirects=RedirectPolicy.from_settings(settings),
                url_query=url_query(settings),
                inject_trace=self.tracing.inject,
            )
        self.jobs.start()
        if self.config.policies.watch_interval_s:
            self._tasks.append(asyncio.create_task(self.policy.watch(self.config.policies.watch_interval_s)))
        try:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.policy.reload)
        except (NotImplementedError, RuntimeError):  # not the main thread (embedded) or no signals here
            log.debug("SIGHUP policy reload not available in this thread")

    async def close(self) -> None:
        try:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        except (NotImplementedError, RuntimeError):
            pass
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.jobs.close()  # gives the leases of its jobs up: another replica resumes them at once
        for provider in self.providers.values():
            await provider.session.close()
            if provider.signer is not None:
                await provider.signer.close()
        for runner in self._runners:
            await runner.cleanup()
        await self.auth.aclose()
        await self.meter.close()  # after the last request settled, before the store goes away
        await self.store.close()
        await self.assets.close()
        await self.managed_keys.directory.close()
        await asyncio.to_thread(self.tracing.shutdown)  # flushes spans; the exporter blocks


def demo_key(config: Config) -> tuple[ApiKey, str | None]:
    """The quick-start key: from the environment, else generated. Returns the record and the new key, if any."""
    given = os.environ.get(config.demo.key_env, "").strip()
    key = given or generate_key()
    record = ApiKey(id="demo", hash=hash_key(key), plan=config.demo.plan)
    return record, (None if given else key)


def signing_keys(config: Config) -> KeyRing:
    """The configured signing keys, or an ephemeral key (with a warning) when none is configured."""
    settings = [
        SigningKeySettings(file=str(config.path(k.file)) if k.file else None, env=k.env, active=k.active)
        for k in config.auth.signing_keys
    ]
    try:
        return KeyRing.from_settings(settings, where="auth.signing_keys")
    except KeyConfigError as exc:
        raise ConfigError(f"{config.source}: {exc}") from None


def _admin_credential(config: Config) -> AdminCredential:
    admin = config.admin
    try:
        return AdminCredential.load(
            token_env=admin.token_env, token_file=config.path(admin.token_file) if admin.token_file else None,
            token_sha256=admin.token_sha256,
        )
    except AdminConfigError as exc:
        raise ConfigError(f"{config.source}: {exc}") from None


def _beside_the_store(settings: StoreSettings, memory: Callable[[], T], redis: Callable[..., T]) -> T:
    """A part kept where the store is: in memory, or in the store's Redis on a small pool of its own."""
    if settings.kind == "memory":
        return memory()
    assert settings.redis_url is not None  # checked with the store settings
    return redis(
        settings.redis_url, timeout_s=settings.connect_timeout_s + settings.op_timeout_s,
        mode=settings.redis_mode, credentials=settings.credentials(),
    )


def _issuer_plans(config: Config) -> set[str]:
    return {plan for issuer in config.issuers.values() for plan in (issuer.plan, *issuer.plan_map.values())}


def announce_demo_key(config: Config, key: str) -> None:
    """Print a generated demo key once, to the console only: the quick start needs it and it is never stored.
    One write call, so the background log writer cannot interleave with the line."""
    sys.stdout.write(f"edge-proxy: demo API key (set {config.demo.key_env} to choose your own): {key}\n")
    sys.stdout.flush()


def build_gateway(
    config: Config, announce: bool = True, span_exporter: SpanExporter | None = None,
    signing_ring: KeyRing | None = None,
) -> Gateway:
    """Build every part; configuration or policy errors stop start-up with a message naming file and key.

    `span_exporter` (tests, embedders) receives the spans instead of the configured tracing exporter;
    `signing_ring` replaces the configured signing keys (the one the worker supervisor made for its workers)."""
    catalog = config.catalog()
    tracing = build_tracing(config.tracing, config.source, span_exporter)  # first: a missing extra stops start-up
    extra_keys: list[ApiKey] = []
    new_demo_key = None
    if config.demo.enabled:
        record, new_demo_key = demo_key(config)
        extra_keys.append(record)
    provider_kinds = {name: canonical_kind(p.kind) for name, p in config.providers.items()}
    metrics = Metrics(
        CollectorRegistry(),
        models=[m.id for m in catalog],
        providers=provider_kinds,
        deployments=[(m.id, d.name) for m in catalog for d in m.served_by()],
        issuers=config.issuers.keys(),
        per_principal_labels=config.metrics.per_principal_labels,
    )
    try:
        policy = PolicyHolder(
            config.path(config.policies.dir), catalog,
            issuer_plans=_issuer_plans(config), extra_keys=extra_keys, on_reload=metrics.policy_reload,
        )
    except PolicyError as exc:
        raise ConfigError(str(exc)) from None
    tokens = GatewayTokens(config.auth.token_settings(), signing_ring or signing_keys(config))
    issuers = [
        IssuerVerifier(issuer.settings(name), on_fetch=metrics.jwks_fetch) for name, issuer in config.issuers.items()
    ]
    store_settings = config.store_settings()
    secret = load_secret(config) if config.alerts.webhook_url else None  # before the store: fail fast
    webhooks = webhook_verifiers(config)
    store = build_store(store_settings, observer=MetricsStoreObserver(metrics))
    metrics.store_up(True)
    if new_demo_key and announce:
        announce_demo_key(config, new_demo_key)
    assets = build_assets(config)
    meter = Meter(
        store, reservation_ttl_s=store_settings.reservation_ttl_s, on_pending_settles=metrics.pending_settles,
        usage_retention_s=store_settings.usage_retention_days * 86_400,
        usage_max_records=store_settings.usage_max_records,
        alert_keep_s=config.alerts.retry_for_s if secret else 0.0, on_budget_used=metrics.budget_used,
    )
    return Gateway(
        config=config,
        models={m.id: m for m in catalog},
        policy=policy,
        auth=Authenticator(lambda: policy.current.keys, tokens, issuers),
        tokens=tokens,
        store=store,
        meter=meter,
        metrics=metrics,
        relay=RelaySettings(keepalive_s=config.server.sse_keepalive_s),
        router=Router({m.id: m for m in catalog}, config.routing, on_breaker=metrics.breaker),
        assets=assets,
        managed_keys=ManagedKeys(
            _beside_the_store(store_settings, MemoryKeyDirectory, RedisKeyDirectory), policy,
            config.admin.keys_refresh_s,
        ),
        jobs=JobService(
            _beside_the_store(store_settings, MemoryJobStore, RedisJobStore), meter, assets,
            lease_s=config.jobs.lease_s, record_ttl_s=config.jobs.record_ttl_s,
            idempotency_ttl_s=config.jobs.idempotency_ttl_s, on_settled=metrics.settled,
        ),
        admin=_admin_credential(config),
        # every store is an AlertOutbox (the Store protocol does not say so)
        alerts=AlertDelivery(store, config.alerts, secret, metrics) if secret else None,  # type: ignore[arg-type]
        tracing=tracing,
        provider_kinds=provider_kinds,
        webhooks=webhooks,
    )
