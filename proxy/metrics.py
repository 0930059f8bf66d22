"""Prometheus instruments: every metric the gateway exports, behind typed helpers the pipeline calls.

Label values are capped to sets known at start-up (routes, catalogue models, providers and their kinds,
issuers, error codes), so no caller input can create new time series. Anything unknown becomes "other".
"""

from __future__ import annotations

import functools
import os
import re
from typing import Generic, Iterable, Literal, Mapping, TypeVar

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from proxy import __version__
from proxy.errors import CATALOGUE

PREFIX = "edge_proxy"
OTHER = "other"
NONE = "none"

# The fixed route set (aiohttp canonical paths); pass `request.match_info.route.resource.canonical`.
ROUTES: frozenset[str] = frozenset({
    "/v1/tokens",
    "/.well-known/jwks.json",
    "/v1/models",
    "/v1/models/{id}/schema",
    "/v1/responses",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/images/generations",
    "/v1/audio/speech",
    "/v1/uploads",
    "/v1/me",
    "/anthropic/v1/messages",
    "/anthropic/v1/messages/count_tokens",
    "/anthropic/v1/models",
    "/anthropic/v1/models/{model_id}",
    "/gemini/{version}/models/{model}:generateContent",
    "/gemini/{version}/models/{model}:streamGenerateContent",
    "/gemini/{version}/models/{model}:countTokens",
    "/metrics",
    "/healthz",
    "/readyz",
})
BUILTIN_PRINCIPAL_TYPES: frozenset[str] = frozenset({"api_key", "gateway_token", "anonymous"})
UPSTREAM_OUTCOMES: frozenset[str] = frozenset({"ok", "error", "timeout", "cancelled"})
DENIAL_KINDS: frozenset[str] = frozenset({"rate_limit", "budget", "concurrency", "scope"})
CREDIT_ACTIONS: frozenset[str] = frozenset({"reserved", "settled", "released"})
STORE_ERROR_KINDS: frozenset[str] = frozenset({"error", "script_error", "overloaded", "fallback", "refused"})
ATTEMPT_RESULTS: frozenset[str] = frozenset({"ok", "error", "timeout", "throttled", "cancelled"})
RETRY_KINDS: frozenset[str] = frozenset({"retry", "fallback"})
ALERT_OUTCOMES: frozenset[str] = frozenset({"fired", "delivered", "retried", "failed"})
BREAKER_STATES: dict[str, int] = {"closed": 0, "half_open": 1, "open": 2}
ERROR_CODES: frozenset[str] = frozenset(CATALOGUE)

# Latency buckets span a 5 ms JSON answer up to a 5 min generation stream.
REQUEST_BUCKETS = (.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120, 300)
FIRST_BYTE_BUCKETS = (.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60)
STORE_BUCKETS = (.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1)

# Code-chosen label values (reasons, ops, rules) must look like identifiers: this keeps an
# exception message or a user string from ever becoming a label value by mistake.
_IDENTIFIER = re.compile(r"[A-Za-z0-9_.:/*-]{1,64}")

CreditAction = Literal["reserved", "settled", "released"]
DenialKind = Literal["rate_limit", "budget", "concurrency", "scope"]
UpstreamOutcome = Literal["ok", "error", "timeout", "cancelled"]
AttemptResult = Literal["ok", "error", "timeout", "throttled", "cancelled"]
RetryKind = Literal["retry", "fallback"]
AlertOutcome = Literal["fired", "delivered", "retried", "failed"]


def _capped(value: str | None, allowed: frozenset[str]) -> str:
    """`value` if it is in the known set, "none" if absent, else "other"."""
    if not value:
        return NONE
    return value if value in allowed else OTHER


def _identifier(value: str | None) -> str:
    """A code-chosen label value, or "other" if it does not look like one."""
    if not value:
        return NONE
    return value if _IDENTIFIER.fullmatch(value) else OTHER


def status_class(status: int) -> str:
    """200 -> "2xx"; anything outside 100..599 -> "other"."""
    return f"{status // 100}xx" if 100 <= status <= 599 else OTHER


M = TypeVar("M", Counter, Histogram)


class _Children(Generic[M]):
    """A labelled metric's children by label values, each resolved once: prometheus-client's `labels()` checks
    the values and takes the metric's lock on every call, about ten times a request. The cache holds only
    children the metric keeps anyway (their values are capped: `_capped`, `_identifier`)."""

    __slots__ = ("_metric", "_children")

    def __init__(self, metric: M) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], M] = {}

    def __call__(self, *values: str) -> M:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


def multiprocess_dir() -> str | None:
    """The directory prometheus-client shares between worker processes, if that mode is on."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Metrics:
    """All gateway instruments, registered on one registry (one per process; tests use their own)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        models: Iterable[str] = (),
        providers: Iterable[str] | Mapping[str, str] = (),
        deployments: Iterable[tuple[str, str]] = (),
        issuers: Iterable[str] = (),
        routes: Iterable[str] = ROUTES,
        per_principal_labels: bool = False,
        version: str = __version__,
    ) -> None:
        self._registry = registry
        self._models = frozenset(models)
        # provider name -> its kind (a label beside `provider`: one value per provider, no new cardinality)
        self._provider_kinds = dict(providers) if isinstance(providers, Mapping) else {}
        self._providers = frozenset(providers)
        deployments = tuple(deployments)  # (model id, deployment name)
        self._deployments = frozenset(name for _, name in deployments)
        self._issuers = frozenset(issuers)
        self._routes = frozenset(routes)
        self._principal_types = BUILTIN_PRINCIPAL_TYPES | self._issuers
        self._render_registry = self._registry_to_render(registry)
        self._register(registry, per_principal_labels)
        self._build_info.labels(version=version).set(1)
        for model, name in deployments:
            self.breaker(model, name, "closed")

    def _register(self, r: CollectorRegistry, per_principal_labels: bool) -> None:
        p = PREFIX
        self._requests = _Children(Counter(
            f"{p}_requests_total",
            "Requests answered, by route, model, provider (and its kind), caller type and status class.",
            ["route", "model", "provider", "provider_kind", "principal_type", "status_class"], registry=r))
        self._request_duration = _Children(Histogram(
            f"{p}_request_duration_seconds", "Time from request start to the last byte sent.",
            ["route", "model", "status_class"], buckets=REQUEST_BUCKETS, registry=r))
        self._errors = _Children(Counter(
            f"{p}_errors_total", "Error responses, by route and error code.", ["route", "code"], registry=r))
        self._first_byte = _Children(Histogram(
            f"{p}_time_to_first_byte_seconds", "Time from request start to the first response byte.",
            ["route", "model"], buckets=FIRST_BYTE_BUCKETS, registry=r))
        self._upstream_duration = _Children(Histogram(
            f"{p}_upstream_request_duration_seconds", "Upstream call time, from connect to the end of its body.",
            ["provider", "provider_kind", "outcome"], buckets=REQUEST_BUCKETS, registry=r))
        self._upstream_errors = _Children(Counter(
            f"{p}_upstream_errors_total", "Failed upstream calls, by provider (and its kind) and reason.",
            ["provider", "provider_kind", "reason"], registry=r))
        self._deployment_attempts = _Children(Counter(
            f"{p}_deployment_attempts_total",
            "Upstream calls per model deployment, by result (ok|error|timeout|throttled|cancelled); a request "
            "retried on another deployment counts one attempt at each.",
            ["model", "deployment", "result"], registry=r))
        self._route_retries = Counter(
            f"{p}_route_retries_total",
            "Attempts after a request's first, by requested model and kind (retry: another deployment of the "
            "model; fallback: a deployment of a fallback model).", ["model", "kind"], registry=r)
        self._breaker_state = Gauge(
            f"{p}_deployment_breaker_state",
            "A deployment's circuit breaker on this replica: 0 closed, 1 half-open (probing), 2 open (ejected).",
            ["model", "deployment"], multiprocess_mode="livemax", registry=r)
        self._quota = Gauge(
            f"{p}_deployment_quota_remaining",
            "Requests left in a deployment's provider quota, as its last answer on this replica said "
            "(x-ratelimit-remaining-requests).", ["model", "deployment"], multiprocess_mode="livemin", registry=r)
        self._ejections = Counter(
            f"{p}_deployment_ejections_total", "Times a deployment's breaker opened, by model and deployment.",
            ["model", "deployment"], registry=r)
        self._streams = Gauge(
            f"{p}_streams_in_flight", "Streaming responses currently being relayed.",
            multiprocess_mode="livesum", registry=r)
        self._relayed_bytes = Counter(
            f"{p}_relayed_bytes_total", "Response body bytes relayed from upstreams to clients.", registry=r)
        self._sse_events = Counter(
            f"{p}_sse_events_total", "Server-sent events relayed to clients.", registry=r)
        self._tokens = _Children(Counter(
            f"{p}_tokens_total", "Tokens reported by upstreams, by model and direction (input|output).",
            ["model", "direction"], registry=r))
        self._credits = _Children(Counter(
            f"{p}_credits_total", "Credits moved, by action (reserved|settled|released).", ["action"], registry=r))
        self._credit_overruns = Counter(
            f"{p}_credit_overrun_total", "Calls whose reported usage cost more than their reservation.", registry=r)
        self._denials = Counter(
            f"{p}_denials_total", "Requests refused by policy, by kind and rule.", ["kind", "rule"], registry=r)
        self._auth_failures = Counter(
            f"{p}_auth_failures_total", "Failed authentications, by reason.", ["reason"], registry=r)
        self._store_duration = _Children(Histogram(
            f"{p}_store_operation_duration_seconds", "Metering store round trips, by operation.",
            ["op"], buckets=STORE_BUCKETS, registry=r))
        self._store_errors = _Children(Counter(
            f"{p}_store_errors_total",
            "Failed metering store operations, by operation and kind (error: unreachable or timed out; "
            "script_error: a script refused, a bug; fallback/refused: skipped while the store is down).",
            ["op", "kind"], registry=r))
        # livemin: one worker that cannot reach the store is enough to show it down.
        self._store_up = Gauge(
            f"{p}_store_up", "1 if the metering store answered its last operation, else 0.",
            multiprocess_mode="livemin", registry=r)
        self._pending_settles = Gauge(
            f"{p}_pending_settles", "Settles waiting for the metering store to come back (retried in the background).",
            multiprocess_mode="livesum", registry=r)
        self._jwks_fetches = Counter(
            f"{p}_jwks_fetches_total", "JWKS fetches from identity providers, by issuer and outcome.",
            ["issuer", "outcome"], registry=r)
        self._policy_reloads = Counter(
            f"{p}_policy_reloads_total", "Policy reloads, by outcome.", ["outcome"], registry=r)
        # A gauge, not just the counter: an alert must keep firing for as long as the bad files stay in place.
        self._policy_reload_failing = Gauge(
            f"{p}_policy_reload_failing",
            "1 from a rejected policy reload until the next one succeeds (the previous policy serves meanwhile).",
            multiprocess_mode="livemax", registry=r)
        self._build_info = Gauge(
            f"{p}_build_info", "Always 1; the gateway version as a label.", ["version"],
            multiprocess_mode="max", registry=r)
        self._budget_alerts = Counter(
            f"{p}_budget_alerts_total",
            "Budget alerts, by outcome: fired (a threshold claimed, counted by the replica whose settle claimed it), "
            "delivered (the webhook answered 2xx), retried (an attempt failed; retried with backoff), failed "
            "(given up after alerts.retry_for_s).", ["outcome"], registry=r)
        self._budget_used = Gauge(
            f"{p}_budget_used_ratio",
            "Share of a budget spent in its current period, as the last admission on this replica saw it "
            "(operator opt-in: per_principal_labels).",
            ["account", "scope", "owner"], multiprocess_mode="livemax", registry=r) if per_principal_labels else None
        self._principal_requests = Counter(
            f"{p}_principal_requests_total", "Requests per caller (operator opt-in: per_principal_labels).",
            ["principal", "status_class"], registry=r) if per_principal_labels else None

    @staticmethod
    def _registry_to_render(registry: CollectorRegistry) -> CollectorRegistry:
        """In multiprocess mode, scrape the files all workers write, not this process's memory."""
        directory = multiprocess_dir()
        if directory is None:
            return registry
        merged = CollectorRegistry()
        MultiProcessCollector(merged, path=directory)
        return merged

    # -- request ---------------------------------------------------------------------------------

    def request_done(
        self,
        route: str | None,
        model: str | None,
        provider: str | None,
        principal_type: str | None,
        status: int,
        duration_s: float,
        *,
        error_code: str | None = None,
        principal: str | None = None,
    ) -> None:
        """Once per request, after the last byte (or the error response) was sent."""
        route_l = _capped(route, self._routes)
        model_l = _capped(model, self._models)
        klass = status_class(status)
        self._requests(
            route_l, model_l, *self._provider_labels(provider),
            _capped(principal_type or "anonymous", self._principal_types), klass,
        ).inc()
        self._request_duration(route_l, model_l, klass).observe(duration_s)
        if error_code:
            self._errors(route_l, _capped(error_code, ERROR_CODES)).inc()
        if self._principal_requests is not None and principal:
            self._principal_requests.labels(principal, klass).inc()

    def first_byte(self, route: str | None, model: str | None, seconds: float) -> None:
        """When the first response byte (status line and headers) goes to the client."""
        self._first_byte(_capped(route, self._routes), _capped(model, self._models)).observe(seconds)

    def _provider_labels(self, provider: str | None) -> tuple[str, str]:
        """(provider, provider_kind) label values; a provider unknown here is "other" of kind "other"."""
        name = _capped(provider, self._providers)
        return name, self._provider_kinds.get(name, NONE if name == NONE else OTHER)

    # -- upstream and relay ----------------------------------------------------------------------

    def upstream_done(self, provider: str | None, outcome: UpstreamOutcome, seconds: float) -> None:
        """When an upstream call ends: ok, error, timeout, or cancelled (the client went away)."""
        self._upstream_duration(
            *self._provider_labels(provider), _capped(outcome, UPSTREAM_OUTCOMES)).observe(seconds)

    def upstream_error(self, provider: str | None, reason: str) -> None:
        """A failed upstream call; reason e.g. connect, timeout, status_5xx, status_4xx, stream_interrupted."""
        self._upstream_errors(*self._provider_labels(provider), _identifier(reason)).inc()

    def deployment_attempt(self, model: str | None, deployment: str | None, result: AttemptResult) -> None:
        """One upstream call to a model's deployment ended (or was given up before its answer was relayed)."""
        self._deployment_attempts(
            _capped(model, self._models), _capped(deployment, self._deployments), _capped(result, ATTEMPT_RESULTS),
        ).inc()

    def route_retry(self, model: str | None, kind: RetryKind) -> None:
        """A request's attempt after its first: another deployment (retry) or a fallback model (fallback)."""
        self._route_retries.labels(_capped(model, self._models), _capped(kind, RETRY_KINDS)).inc()

    def breaker(self, model: str, deployment: str, state: str) -> None:
        """A deployment's breaker changed state (closed, half_open, open); opening counts an ejection."""
        labels = (_capped(model, self._models), _capped(deployment, self._deployments))
        self._breaker_state.labels(*labels).set(BREAKER_STATES.get(state, 0))
        if state == "open":
            self._ejections.labels(*labels).inc()

    def deployment_quota(self, model: str, deployment: str, remaining: int) -> None:
        """The provider's own count of requests left for this deployment (its rate-limit headers)."""
        self._quota.labels(_capped(model, self._models), _capped(deployment, self._deployments)).set(remaining)

    def stream_started(self) -> None:
        """A streaming response began relaying; pair with `stream_ended` in a finally block."""
        self._streams.inc()

    def stream_ended(self) -> None:
        """A streaming response finished, failed or was cancelled."""
        self._streams.dec()

    def relayed(self, nbytes: int, sse_events: int = 0) -> None:
        """Bytes (and SSE events) relayed to the client; cheap enough to call per chunk."""
        self._relayed_bytes.inc(nbytes)
        if sse_events:
            self._sse_events.inc(sse_events)

    def tokens(self, model: str | None, input_tokens: int, output_tokens: int) -> None:
        """Usage reported by the upstream for one request."""
        model_l = _capped(model, self._models)
        self._tokens(model_l, "input").inc(input_tokens)
        self._tokens(model_l, "output").inc(output_tokens)

    # -- policy and metering ---------------------------------------------------------------------

    def credits(self, action: CreditAction, amount: float) -> None:
        """Credits reserved before forwarding, settled to the real cost, or released on failure."""
        self._credits(_capped(action, CREDIT_ACTIONS)).inc(amount)

    def settled(self, reserved: float, charged: float) -> None:
        """A hold of `reserved` settled at `charged` (a call's, or a job's; 0: released): what is not charged is
        released."""
        self.credits("settled", charged)
        self.credits("released", max(0.0, reserved - charged))

    def credit_overrun(self) -> None:
        """A call whose usage cost more than its reserve: the provider ignored the bound it was sent."""
        self._credit_overruns.inc()

    def denied(self, kind: DenialKind, rule: str | None) -> None:
        """A request refused by policy; rule is the policy's limit name (bounded by the policy files)."""
        self._denials.labels(_capped(kind, DENIAL_KINDS), _identifier(rule)).inc()

    def auth_failure(self, reason: str) -> None:
        """A failed authentication; reason is the error code (invalid_api_key, token_expired, ...)."""
        self._auth_failures.labels(_identifier(reason)).inc()

    def store_op(self, op: str, seconds: float, outcome: str = "ok") -> None:
        """One metering store round trip (admit, settle, renew, ping, ...); outcome ok or the error kind."""
        op_l = _identifier(op)
        self._store_duration(op_l).observe(seconds)
        if outcome != "ok":
            self._store_errors(op_l, _capped(outcome, STORE_ERROR_KINDS)).inc()

    def store_up(self, up: bool) -> None:
        """Whether the store answered; set after each operation or health probe."""
        self._store_up.set(1 if up else 0)

    def pending_settles(self, length: int) -> None:
        """The length of the meter's queue of settles to retry; set whenever it changes."""
        self._pending_settles.set(length)

    def budget_alert(self, outcome: AlertOutcome, count: int = 1) -> None:
        """Budget alerts fired, delivered, retried or given up (proxy/alerts.py)."""
        self._budget_alerts.labels(_capped(outcome, ALERT_OUTCOMES)).inc(count)

    def budget_used(self, account: str, scope: str, owner: str, ratio: float) -> None:
        """The share of a budget spent; recorded only with per_principal_labels (one series per budget owner)."""
        if self._budget_used is not None:
            self._budget_used.labels(account, scope, owner).set(ratio)

    def jwks_fetch(self, issuer: str | None, ok: bool) -> None:
        """A JWKS (re)fetch for a configured issuer."""
        self._jwks_fetches.labels(_capped(issuer, self._issuers), "success" if ok else "failure").inc()

    def policy_reload(self, ok: bool) -> None:
        """A policy hot reload attempt (a failed one keeps the previous policy)."""
        self._policy_reloads.labels("success" if ok else "failure").inc()
        self._policy_reload_failing.set(0 if ok else 1)

    # -- exposition ------------------------------------------------------------------------------

    def render(self) -> tuple[bytes, str]:
        """The body and content type for GET /metrics."""
        return generate_latest(self._render_registry), CONTENT_TYPE_LATEST


def _sample_names(registry: CollectorRegistry) -> frozenset[str]:
    """Every sample name a registry can export (a query's vocabulary), from its metric families."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    return frozenset(
        family.name + suffix for family in registry.collect() for suffix in suffixes[family.type]
    )


@functools.cache
def _all_metric_names() -> frozenset[str]:
    """Build a throwaway Metrics with every optional metric on and list what it can export."""
    registry = CollectorRegistry()
    Metrics(registry, per_principal_labels=True)
    return _sample_names(registry)


def __getattr__(name: str) -> frozenset[str]:
    """`METRIC_NAMES`: names dashboards and alerts may use (built on first use, not at import,
    so importing this module never writes multiprocess files)."""
    if name == "METRIC_NAMES":
        return _all_metric_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
