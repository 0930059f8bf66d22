"""Optional OpenTelemetry tracing behind `tracing.enabled`.

Off (the default), the gateway gets `NO_TRACING`: no middleware, no-op hooks, and OpenTelemetry is never
imported, so it runs without the `tracing` extra installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, MutableMapping, Protocol

from .config import ConfigError, TracingSettings

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

Middleware = Callable[..., Any]


class UpstreamSpan(Protocol):
    """The span around one upstream call, ended once the call is over."""

    def end(self, status: int, outcome: str, error_code: str | None, failure: BaseException | None) -> None: ...


class _NoUpstreamSpan:
    def end(self, status: int, outcome: str, error_code: str | None, failure: BaseException | None) -> None:
        pass


_NO_UPSTREAM_SPAN = _NoUpstreamSpan()


class Tracing:
    """Tracing switched off. The enabled implementation (proxy/otel_tracing.py) overrides every hook."""

    def middlewares(self) -> tuple[Middleware, ...]:
        """The aiohttp middlewares to put outermost: none when off, so requests pay nothing."""
        return ()

    def upstream_span(self, provider: str) -> UpstreamSpan:
        """Start the CLIENT span for an upstream call and make it current until `end`."""
        return _NO_UPSTREAM_SPAN

    def inject(self, headers: MutableMapping[str, str]) -> None:
        """Add the W3C `traceparent` of the current span to upstream request headers."""

    def shutdown(self) -> None:
        """Flush spans not exported yet (blocking: call it off the event loop)."""


NO_TRACING = Tracing()

INSTALL_HINT = 'pip install "edge-proxy[tracing]"'


def build_tracing(settings: TracingSettings, source: str, exporter: SpanExporter | None = None) -> Tracing:
    """The tracer for `settings`; `exporter` (tests, embedders) replaces the configured one."""
    if not settings.enabled:
        return NO_TRACING
    try:
        from .otel_tracing import OtelTracing

        return OtelTracing(settings, exporter)  # the OTLP exporter is imported here, only if chosen
    except ImportError as exc:
        raise ConfigError(
            f"{source}: tracing.enabled: the OpenTelemetry packages are not installed ({exc.name} is missing). "
            f"Fix: {INSTALL_HINT}, or set tracing.enabled: false"
        ) from None
