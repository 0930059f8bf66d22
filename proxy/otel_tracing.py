"""Tracing switched on: a SERVER span per request, a CLIENT span per upstream call, W3C trace context both ways.

Imported only by `tracing.build_tracing` when `tracing.enabled` is true. Spans carry no secrets and no user
ids: the request id, the caller type, the model and the error code are what ties them to logs and metrics.
"""

from __future__ import annotations

from typing import Any, MutableMapping

from aiohttp import web
from opentelemetry import context as otel_context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from .config import TracingSettings
from .context import CONTEXT, route_name
from .record import CLIENT_CLOSED
from .tracing import Middleware, Tracing

Handler = Any  # aiohttp's middleware handler: request -> awaitable response


class OtelTracing(Tracing):
    """Spans through a private TracerProvider (the process-wide global is left alone for embedders)."""

    def __init__(self, settings: TracingSettings, exporter: SpanExporter | None = None) -> None:
        self._provider = TracerProvider(
            resource=Resource.create({"service.name": settings.service_name}),
            # A caller's sampling decision (the traceparent flag) wins; new traces are sampled at the ratio.
            sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio)),
        )
        if exporter is not None:
            self._provider.add_span_processor(SimpleSpanProcessor(exporter))  # given exporters see spans at once
        elif (configured := _configured_exporter(settings)) is not None:
            self._provider.add_span_processor(BatchSpanProcessor(configured))
        self._tracer = self._provider.get_tracer("edge_proxy")
        self._propagator = TraceContextTextMapPropagator()

    def middlewares(self) -> tuple[Middleware, ...]:
        return (self._server_span_middleware(),)

    def upstream_span(self, provider: str) -> _OtelUpstreamSpan:
        span = self._tracer.start_span(
            f"POST {provider}", kind=SpanKind.CLIENT,
            attributes={"http.request.method": "POST", "edge_proxy.provider": provider},
        )
        return _OtelUpstreamSpan(span, otel_context.attach(set_span_in_context(span)))

    def inject(self, headers: MutableMapping[str, str]) -> None:
        self._propagator.inject(headers)

    def shutdown(self) -> None:
        self._provider.shutdown()

    def _server_span_middleware(self) -> Middleware:
        tracer, propagator = self._tracer, self._propagator

        @web.middleware
        async def server_span(request: web.Request, handler: Handler) -> web.StreamResponse:
            """Outermost: continue the caller's trace; the inner middleware turns failures into responses."""
            route = route_name(request)
            matched = route != "unmatched"
            with tracer.start_as_current_span(
                f"{request.method} {route}" if matched else request.method,
                context=propagator.extract(request.headers),
                kind=SpanKind.SERVER,
                attributes={"http.request.method": request.method, **({"http.route": route} if matched else {})},
                record_exception=False, set_status_on_exception=False,  # statuses are set from the answer below
            ) as span:
                status = CLIENT_CLOSED  # unless an answer comes back: a cancelled handler means the client left
                try:
                    response = await handler(request)
                    status = response.status
                    return response
                finally:
                    _finish_server_span(span, request, status)

        return server_span


class _OtelUpstreamSpan:
    def __init__(self, span: Span, token: object) -> None:
        self._span, self._token = span, token

    def end(self, status: int, outcome: str, error_code: str | None, failure: BaseException | None) -> None:
        span = self._span
        span.set_attribute("edge_proxy.upstream_outcome", outcome)
        if status:
            span.set_attribute("http.response.status_code", status)
        if failure is not None:
            span.record_exception(failure)
        if error_code is not None:
            span.set_attribute("error.type", error_code)
            span.set_status(Status(StatusCode.ERROR, error_code))
        span.end()
        otel_context.detach(self._token)  # type: ignore[arg-type]


def _finish_server_span(span: Span, request: web.Request, status: int) -> None:
    """What the request turned into: status, caller type, model and error code; ERROR for 5xx (OTel HTTP rules)."""
    span.set_attribute("http.response.status_code", status)
    ctx = request.get(CONTEXT)
    if ctx is None:
        return
    span.set_attribute("edge_proxy.request_id", ctx.request_id)
    if ctx.principal is not None:
        span.set_attribute("edge_proxy.principal_type", ctx.principal.label)
    if ctx.model is not None:
        span.set_attribute("edge_proxy.model", ctx.model.id)
    error_code = ctx.error_code
    if error_code is not None:
        span.set_attribute("edge_proxy.error_code", error_code)
        span.set_attribute("error.type", error_code)
    if status >= 500:
        if ctx.error is not None:
            span.record_exception(ctx.error)
        span.set_status(Status(StatusCode.ERROR, error_code or str(status)))


def _configured_exporter(settings: TracingSettings) -> SpanExporter | None:
    if settings.exporter == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if settings.exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter,
        )

        # No endpoint: the exporter reads OTEL_EXPORTER_OTLP_TRACES_ENDPOINT / OTEL_EXPORTER_OTLP_ENDPOINT.
        return OTLPSpanExporter(endpoint=settings.endpoint) if settings.endpoint else OTLPSpanExporter()
    return None  # "none": spans still propagate upstream, nothing is exported
