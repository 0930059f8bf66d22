"""The metered part of a generation call, shared by every generation route: decide and admit before the
upstream call; afterwards record the upstream metrics and settle what was really used."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import replace
from typing import Any

from ..auth.principal import Principal
from ..catalog import Model
from ..context import RequestContext
from ..errors import ApiError
from ..gateway import Gateway
from ..meter import Admission
from ..metrics import UpstreamOutcome
from ..store.base import CallUsage
from ..policy.pricing import cost
from ..policy.types import Decision, RequestFacts, Usage
from ..upstream.formats.openai import RESPONSES_ROUTE
from ..upstream.relay import RelayOutcome

log = logging.getLogger(__name__)

_BYTES_PER_TOKEN = 4  # rough input estimate, used only when a stream is cut before the upstream reported usage
MAX_OUTPUT_TOKENS = 2**31 - 1  # max_tokens above this is no real limit, only a way to overflow the pricing
MAX_CHOICES = 128  # n and best_of (OpenAI allows at most 128 choices)


async def authorize_and_admit(
    gateway: Gateway, ctx: RequestContext, principal: Principal, model: Model, facts: RequestFacts
) -> tuple[Decision, Admission]:
    """The policy's decision, then one atomic store call taking limits, the lease and the credit hold."""
    decision = gateway.policy.current.decide(principal, model, facts)
    if not decision.allowed:
        raise ApiError(decision.error_code or "forbidden", decision.error_message or "not allowed")
    if decision.allow_pricier_fallbacks:
        decision = _covering_fallbacks(gateway, principal, model, facts, decision)
    admission = await gateway.meter.admit(principal, model.id, decision, ctx.request_id)
    gateway.metrics.credits("reserved", decision.reserve_credits)
    return decision, admission


def _covering_fallbacks(
    gateway: Gateway, principal: Principal, model: Model, facts: RequestFacts, decision: Decision
) -> Decision:
    """A plan that lets a pricier fallback answer holds, up front, the dearest reserve among the model and the
    fallbacks this caller may use: the one hold covers whichever answers (routed.py tries those under it)."""
    policy = gateway.policy.current
    reserves = (policy.decide(principal, gateway.models[f], facts) for f in model.fallbacks)
    dearest = max((d.reserve_credits for d in reserves if d.allowed), default=0.0)
    return replace(decision, reserve_credits=max(decision.reserve_credits, dearest))


def metered_call(
    gateway: Gateway, ctx: RequestContext, decision: Decision, admission: Admission, facts: RequestFacts,
) -> MeteredCall:
    """Around the upstream call (routed.py: every attempt): renew the hold while it runs; after it, record the
    answering call and settle whatever happened (each attempt has its own trace span, routed.py), at the price of the model that answered (`ctx.charged_as`).
    Nothing answered (a refusal, or every attempt failed): the admission is released."""
    return MeteredCall(gateway, ctx, decision, admission, facts)


class MeteredCall:
    """`metered_call`: a plain async context manager (one per call) rather than an @asynccontextmanager generator,
    whose generator and wrapper cost three times as much to enter and leave."""

    __slots__ = ("_gateway", "_ctx", "_decision", "_admission", "_facts", "_outcome", "_started")

    def __init__(
        self, gateway: Gateway, ctx: RequestContext, decision: Decision, admission: Admission, facts: RequestFacts
    ) -> None:
        self._gateway, self._ctx, self._decision, self._admission, self._facts = gateway, ctx, decision, admission, facts
        self._outcome = RelayOutcome()
        self._started = 0.0

    async def __aenter__(self) -> RelayOutcome:
        self._ctx.outcome = self._outcome
        self._gateway.metrics.stream_started()
        self._started = time.monotonic()
        self._admission.start_keepalive()  # a stream may outlive the reservation ttl: renew while it runs
        return self._outcome

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        gateway, ctx, outcome = self._gateway, self._ctx, self._outcome
        self._admission.stop_keepalive()
        if isinstance(exc, ApiError):
            outcome.error_code = outcome.error_code or exc.code
        gateway.metrics.stream_ended()
        if ctx.provider is not None:  # attempts that got no answer were recorded as they failed (routed.py)
            record_upstream(gateway, ctx.provider, outcome, upstream_outcome(outcome), self._started)
        # Shielded: a client that hangs up cancels the handler, but what it used must still be charged.
        charged_as = ctx.charged_as or self._decision
        await asyncio.shield(
            settle_or_charge_reserve(gateway, ctx, charged_as, self._admission, outcome, self._facts.input_bytes)
        )


def record_upstream(
    gateway: Gateway, provider: str, outcome: RelayOutcome, result: UpstreamOutcome, started: float
) -> None:
    """The answering upstream call's metrics: bytes and events, duration by outcome, errors by reason."""
    gateway.metrics.relayed(outcome.bytes_out, outcome.events_out)
    gateway.metrics.upstream_done(provider, result, time.monotonic() - started)
    if (reason := upstream_error_reason(outcome)) is not None:
        gateway.metrics.upstream_error(provider, reason)


def upstream_error_reason(outcome: RelayOutcome) -> str | None:
    """Why an upstream call failed, in the documented reasons: connect, timeout, status_5xx, stream_interrupted."""
    if outcome.error_code is None:
        return None
    if outcome.error_code == "upstream_timeout":
        return "timeout"
    if outcome.status >= 500:
        return "status_5xx"
    if outcome.status:
        return "stream_interrupted"  # headers came, the body broke off
    return "connect"


def upstream_outcome(outcome: RelayOutcome) -> UpstreamOutcome:
    if outcome.completed or outcome.delivered:
        return "ok"
    if outcome.error_code == "upstream_timeout":
        return "timeout"
    return "error" if outcome.error_code or outcome.status >= 500 else "cancelled"


def request_facts(route: str, body: dict[str, Any], input_bytes: int) -> RequestFacts:
    """What bounds the cost of a call before it is made; a count the bound relies on must be a sane integer."""
    if route == RESPONSES_ROUTE:
        return _responses_facts(body, input_bytes)
    # Both limits are checked: each one sent is lowered to the bound and forwarded (the wire format's prepare),
    # and a provider may honour either, so neither may be odd (a -1 can mean "no limit" to some servers).
    completion_limit = count_param(body, "max_completion_tokens", MAX_OUTPUT_TOKENS)
    legacy_limit = count_param(body, "max_tokens", MAX_OUTPUT_TOKENS)
    max_tokens = legacy_limit if completion_limit is None else completion_limit
    n = count_param(body, "n", MAX_CHOICES) or 1
    best_of = count_param(body, "best_of", MAX_CHOICES) or 1  # generated server-side, billed, n of them returned
    images = route == "/v1/images/generations"
    return RequestFacts(
        input_bytes=input_bytes,
        max_output_tokens=0 if route == "/v1/embeddings" else max_tokens,
        choices=_prompts(body.get("prompt")) * max(n, best_of),  # images: each of the n bounded like a choice
        media_parts=_media_parts(body.get("messages")),
        images=n if images else 1,
        stream=body.get("stream") is True,
    )


# Responses API fields whose cost the request does not bound, refused with the way around (docs/api.md): the
# provider would add input the request does not carry (stored responses, conversations, stored prompts), or go on
# working after the answer is settled (background). They also reach state in the provider account, shared by all.
_UNBOUNDED_RESPONSE_FIELDS = {
    "previous_response_id": "send the earlier turns in `input`",
    "conversation": "send the earlier turns in `input`",
    "prompt": "send the prompt's text in `instructions` and `input`",
    "background": "stream the response instead (`stream: true`)",
}
# Tools the provider does not bill beyond tokens. Hosted ones (web search, file search, code interpreter, MCP,
# image generation) carry fees per call or reach files in the provider account.
_TOKEN_PRICED_TOOLS = frozenset({"function", "custom"})
_TEXT_PARTS = frozenset({"input_text", "output_text", "refusal", "summary_text", "reasoning_text"})


def _responses_facts(body: dict[str, Any], input_bytes: int) -> RequestFacts:
    """A Responses API call's bounds: `max_output_tokens`, the media parts in `input`; unbounded features refused."""
    for name, instead in _UNBOUNDED_RESPONSE_FIELDS.items():
        if body.get(name) not in (None, False):
            raise ApiError("invalid_request", f"`{name}` is not supported through the gateway, which bounds and "
                           f"meters a call by what its request carries: {instead}", param=name)
    tools = body.get("tools")
    for tool in tools if isinstance(tools, list) else []:
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind not in _TOKEN_PRICED_TOOLS:
            raise ApiError("invalid_request", f"tool type {kind!r} is not supported through the gateway (it has fees "
                           "beyond tokens or reaches the provider account); use function tools", param="tools")
    items = body.get("input")
    return RequestFacts(
        input_bytes=input_bytes,
        max_output_tokens=count_param(body, "max_output_tokens", MAX_OUTPUT_TOKENS),
        media_parts=sum(_non_text_parts(item) for item in items if isinstance(item, dict)) if isinstance(items, list) else 0,
        stream=body.get("stream") is True,
    )


def _non_text_parts(item: dict[str, Any]) -> int:
    """Images, files and audio in a Responses input item: a message's `content`, a tool result's `output`."""
    parts = [part for key in ("content", "output") if isinstance(item.get(key), list) for part in item[key]]
    return sum(1 for part in parts if not (isinstance(part, dict) and part.get("type") in _TEXT_PARTS))


def _prompts(prompt: Any) -> int:
    """How many prompts a completions request carries: a string, a token array, or a list of either."""
    if isinstance(prompt, list) and prompt and not all(isinstance(p, int) for p in prompt):
        return len(prompt)
    return 1


def _media_parts(messages: Any) -> int:
    """Non-text content parts (images, audio, files) across all messages."""
    if not isinstance(messages, list):
        return 0
    return sum(_media_in(message) for message in messages if isinstance(message, dict))


def _media_in(message: dict[str, Any]) -> int:
    """A message's non-text parts, plus the earlier audio answer it refers to (`"audio": {"id": ...}`: a few bytes
    that the provider bills as that audio's input tokens)."""
    content = message.get("content")
    parts = content if isinstance(content, list) else []
    referred = 1 if isinstance(message.get("audio"), dict) else 0
    return referred + sum(1 for part in parts if not (isinstance(part, dict) and part.get("type") == "text"))


def count_param(body: dict[str, Any], name: str, maximum: int) -> int | None:
    """An optional count parameter: None when absent or null, else an integer 1..maximum or a 400 naming it."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
        raise ApiError("invalid_request", f"`{name}` must be an integer from 1 to {maximum}", param=name)
    return value


async def settle_or_charge_reserve(
    gateway: Gateway, ctx: RequestContext, decision: Decision, admission: Admission, outcome: RelayOutcome,
    input_bytes: int,
) -> None:
    """Settle; if working out the cost fails (a bug, or figures nothing can price), charge the reserve, so the
    slot is freed now and the charge is never below what the call could have cost."""
    try:
        await settle(gateway, ctx, decision, admission, outcome, input_bytes)
    except Exception:
        log.exception("settle failed: charging the reserve")
        await admission.settle_at_reserve()  # nothing more that could fail: its record names no deployment


async def settle(
    gateway: Gateway, ctx: RequestContext, decision: Decision, admission: Admission, outcome: RelayOutcome,
    input_bytes: int,
) -> None:
    """Charge what was used: the upstream's usage; an estimate without it; nothing if nothing came back."""
    usage = used(outcome, decision, input_bytes)
    if usage is None:
        await admission.release(call_usage(ctx, None))
        gateway.metrics.credits("released", decision.reserve_credits)
        return
    ctx.usage = usage
    ctx.credits_charged = cost(decision.price, usage) if decision.price else 0.0
    if not usage.final:
        # Only an estimate: never charge more than the most the request could have cost.
        ctx.credits_charged = min(ctx.credits_charged, decision.reserve_credits)
    elif ctx.credits_charged > decision.reserve_credits:
        ctx.credits_charged = overrun_charge(gateway, ctx, decision, ctx.credits_charged)
    await admission.settle(ctx.credits_charged, usage.input_tokens + usage.output_tokens, call_usage(ctx, usage))
    gateway.metrics.settled(decision.reserve_credits, ctx.credits_charged)


def call_usage(ctx: RequestContext, usage: Usage | None) -> CallUsage:
    """What the call's ledger record says beside its charge: the deployment that answered and what it used."""
    used = usage or Usage()
    seconds = used.seconds if math.isfinite(used.seconds) else 0.0
    return CallUsage(
        provider=ctx.provider or "", deployment=ctx.deployment or "", tokens_in=used.input_tokens,
        tokens_out=used.output_tokens, images=used.images, seconds_ms=round(max(0.0, min(seconds, 2.0**36)) * 1000),
    )


def overrun_charge(gateway: Gateway, ctx: RequestContext, decision: Decision, charge: float) -> float:
    """Usage costing more than the reserve means the provider ignored the bound it was sent (or an allowance
    was too small). Charged, counted and logged, but at most one more reserve: the balance can go below zero
    by at most the request's own bound, whatever a provider reports."""
    gateway.metrics.credit_overrun()
    capped = min(charge, 2 * decision.reserve_credits)
    log.warning("request %s: usage costs %.6f credits, over its reserve of %.6f; charged %.6f",
                ctx.request_id, charge, decision.reserve_credits, capped)
    return capped


def used(outcome: RelayOutcome, decision: Decision, input_bytes: int) -> Usage | None:
    """The provider's usage; without it, the reserve's bounds for a completed call (it may have used them all)
    or an estimate from the output relayed for a cut one; None when the call failed before any output (released).
    Seconds (for per_second prices): the audio length measured, else the usage's, else the reserve's bound."""
    if outcome.status >= 400 or not (outcome.status or outcome.abandoned):
        return None
    reported = outcome.usage
    if reported is not None and reported.final:
        usage = reported
    elif outcome.completed:
        usage = replace(decision.bound, final=False)
    elif outcome.output_chunks == 0 and outcome.bytes_out == 0 and outcome.error_code is not None:
        return None  # the upstream failed before any output
    else:  # cut short: by the upstream after some output, or by a client that left a provider working on it
        # An estimate (final=False: capped at the reserve); a stream that reported its input early keeps it.
        usage = Usage(
            input_tokens=reported.input_tokens if reported else input_bytes // _BYTES_PER_TOKEN,
            output_tokens=max(outcome.output_chunks, reported.output_tokens if reported else 0), final=False,
        )
    seconds = outcome.seconds if outcome.seconds is not None else usage.seconds or decision.bound.seconds
    return usage if seconds == usage.seconds else replace(usage, seconds=seconds)
