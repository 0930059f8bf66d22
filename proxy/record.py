"""Record: one place that turns a finished request into metrics and one access-log line."""

from __future__ import annotations

import time

from aiohttp import web

from .accesslog import end_user_log_id, log_access, principal_log_id
from .context import RequestContext
from .errors import ApiError
from .metrics import Metrics

CLIENT_CLOSED = 499  # nginx's convention for "the client hung up before the answer was complete"

# error code -> (denial kind, rule name when the error does not carry one)
_DENIALS = {
    "rate_limit": ("rate_limit", None),
    "concurrency_limit": ("concurrency", None),  # the plan's `concurrency`, or `provider_connections`
    "insufficient_credits": ("budget", "budget"),
    "provider_not_authorized": ("scope", "scope"),
}


def record(metrics: Metrics, request: web.Request, ctx: RequestContext, status: int, access_log: bool) -> None:
    duration = time.monotonic() - ctx.started
    if status == CLIENT_CLOSED and ctx.outcome is not None and ctx.outcome.delivered:
        status = ctx.outcome.status  # the client left after it had the whole answer: that answer is the status
    model = ctx.model.id if ctx.model else None
    provider = ctx.provider or (ctx.model.provider if ctx.model else None)
    principal_type = ctx.principal.label if ctx.principal else None
    error_code = ctx.error_code
    metrics.request_done(
        ctx.route, model, provider, principal_type, status, duration,
        error_code=error_code, principal=principal_log_id(ctx.principal),
    )
    if ctx.error is not None:
        _count_refusal(metrics, ctx.error)
    outcome = ctx.outcome
    if outcome is not None and outcome.first_byte_s is not None:
        metrics.first_byte(ctx.route, model, outcome.first_byte_s)
    if ctx.usage is not None:
        metrics.tokens(model, ctx.usage.input_tokens, ctx.usage.output_tokens)
    if access_log:
        log_access({
            "request_id": ctx.request_id, "method": request.method, "path": request.path, "route": ctx.route,
            "status": status, "principal_type": principal_type, "principal_id": principal_log_id(ctx.principal),
            "end_user": end_user_log_id(ctx.principal), "model": model, "provider": provider, "upstream_status": outcome.status if outcome else None,
            "duration_ms": round(duration * 1000, 2),
            "ttfb_ms": round(outcome.first_byte_s * 1000, 2) if outcome and outcome.first_byte_s is not None else None,
            "tokens_in": ctx.usage.input_tokens if ctx.usage else None,
            "tokens_out": ctx.usage.output_tokens if ctx.usage else None,
            "credits": ctx.credits_charged, "error": error_code,
            "deployment": ctx.deployment, "attempts": ctx.attempts or None,
            "admin_action": ctx.admin.action if ctx.admin else None,
            "admin_target": ctx.admin.target if ctx.admin else None,
            "admin_reason": ctx.admin.reason if ctx.admin else None,
            "admin_actor": ctx.admin.actor if ctx.admin else None,
        })


def record_protocol_refusal(metrics: Metrics, error: ApiError) -> None:
    """A request aiohttp's parser refused before routing: counted under route "none" with its error code.
    It gets no access-log line: the caller is unauthenticated and the server logs refusals rate-limited."""
    metrics.request_done(None, None, None, None, error.status, 0.0, error_code=error.code)


def _count_refusal(metrics: Metrics, error: ApiError) -> None:
    if error.status == 401:
        metrics.auth_failure(error.code)
    elif error.code in _DENIALS:
        kind, rule = _DENIALS[error.code]
        metrics.denied(kind, rule or str(error.details.get("rule", "other")))  # type: ignore[arg-type]
