"""Open a generation call on the first deployment that answers, retrying only while nothing reached the client.

A connect error, a timeout before the headers, a 5xx or a 429 moves on to the next target the router offers
(upstream/routing.py): another deployment of the model, then its fallback models, within the attempt budget
and deadline. The last target's answer is passed on as it is (a 5xx becomes `upstream_error`, a 429 is
relayed). Once headers are accepted the call is the request's: whatever happens to it later is never retried.
The hold taken at admission covers every attempt; a fallback is tried only if the policy allows it for this
caller and its bound fits under that hold (a plan allowing pricier fallbacks held the dearest one's), and the
call is settled at the price of the model that answered.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import replace
from typing import Any, Mapping

import aiohttp

from ..auth.principal import Principal
from ..catalog import Model
from ..context import RequestContext
from ..errors import ApiError
from ..gateway import Gateway
from ..metrics import AttemptResult
from ..policy.types import Decision, RequestFacts
from ..tracing import UpstreamSpan
from ..upstream.relay import OpenedCall, RelayOutcome, open_upstream, stream_deadline
from ..upstream.routing import Attempts, Target, reset_after_s, retry_after_s
from ..upstream.shares import PoolShares
from .metered import upstream_outcome


def _end_user(principal: Principal) -> str:
    """Who a sticky model keeps on one deployment: the end user, else the key, else the account."""
    return f"{principal.kind}\0{principal.issuer or ''}\0{principal.subject or principal.key_id or principal.account}"


def _retryable(status: int) -> bool:
    return status == 429 or status >= 500


async def open_routed(
    gateway: Gateway, ctx: RequestContext, principal: Principal, decision: Decision, facts: RequestFacts,
    route: str, body: dict[str, Any], forward: Mapping[str, str],
) -> tuple[OpenedCall, AnsweringAttempt]:
    """The first answer worth relaying, and its attempt (its connection share, its health report and its span),
    for the caller to close once the call is over: `async with` it at once (no await in between)."""
    model = ctx.model
    assert model is not None and ctx.outcome is not None
    charges = {model.id: decision}

    def permits(fallback: Model) -> bool:
        other = gateway.policy.current.decide(principal, fallback, facts)
        if not other.allowed or other.reserve_credits > decision.reserve_credits:
            return False  # not this caller's, or it could cost more than the hold taken for the request
        charges[fallback.id] = replace(
            decision, price=other.price, bound=other.bound, max_output_tokens=other.max_output_tokens
        )
        return True

    attempts = gateway.router.plan(model, permits, _end_user(principal) if model.selection == "sticky" else "")
    while (target := attempts.next()) is not None:
        ctx.attempts = attempts.made
        if attempts.made > 1:
            gateway.metrics.route_retry(model.id, "retry" if target.model is model else "fallback")
        charged = charges[target.model.id]
        provider = gateway.providers[target.deployment.provider]
        try:
            upstream_model = target.deployment.upstream_model
            prepared = provider.format.prepare(route, body, upstream_model, charged.max_output_tokens)
            await provider.pool.take(principal.account)  # refused: not retried
        except BaseException:
            target.health.abandoned()  # nothing was sent: a half-open probe it claimed may go to another call
            raise
        started, ends_at = time.monotonic(), stream_deadline(provider)
        span = gateway.tracing.upstream_span(provider.name)  # current until ended: the traceparent sent is its own
        ctx.charged_as = charged  # this model is charged if this attempt answers, or its client leaves during it
        try:
            url = provider.url(route, upstream_model, prepared.stream)
            headers = {**forward, **dict(prepared.headers)} if prepared.headers else forward
            upstream = await open_upstream(provider, url, prepared.body, ctx.request_id, headers)
        except ApiError as exc:
            span.end(0, "timeout" if exc.code == "upstream_timeout" else "error", exc.code, exc)
            provider.pool.give_back(principal.account)
            target.health.failed()
            _attempt_failed(gateway, target, provider.name, exc.code, started)
            if not attempts.has_next():
                raise
            continue
        except BaseException as exc:
            span.end(0, "cancelled", None, None)
            target.health.abandoned()
            # The provider has the prompt (and bills it) although nobody will read the answer: settle charges it.
            ctx.outcome.abandoned = isinstance(exc, asyncio.CancelledError)
            provider.pool.give_back(principal.account)
            raise
        ctx.outcome.first_byte_s = time.monotonic() - started
        if not _retryable(upstream.status):
            target.health.observed(ctx.outcome.first_byte_s)  # a refusal's speed says nothing of the answers'
        elif attempts.has_next():
            span.end(upstream.status, "error", "upstream_error", None)
            _answer_refused(gateway, target, provider.name, upstream, started)
            upstream.close()
            provider.pool.give_back(principal.account)
            continue
        _respect_quota(gateway, target, upstream.headers)
        ctx.provider = provider.name
        ctx.deployment = target.label if target.model is model else f"{target.model.id}:{target.label}"
        answering = AnsweringAttempt(gateway, target, ctx.outcome, upstream.headers.get("Retry-After"), span,
                                     provider.pool, principal.account)
        # Without the bytes sent: the relay needs only how to read the answer, and a stream may last minutes.
        return OpenedCall(provider, upstream, prepared.without_body(), ends_at), answering
    raise _all_out(model, attempts)


def _respect_quota(gateway: Gateway, target: Target, headers: Mapping[str, str]) -> None:
    """The provider's request quota as its answer states it (`x-ratelimit-remaining-requests`): exported, and
    when it is used up the deployment rests until its reset instead of collecting a sure 429."""
    remaining = _quota_count(headers.get("x-ratelimit-remaining-requests"))
    if remaining is None:
        return
    gateway.metrics.deployment_quota(target.model.id, target.label, remaining)
    if remaining == 0:
        settings = gateway.router.settings
        reset = reset_after_s(headers.get("x-ratelimit-reset-requests"))
        target.health.rest(min(settings.max_cooldown_s, settings.throttle_cooldown_s if reset is None else reset))


def _quota_count(value: str | None) -> int | None:
    """A plain count of ASCII digits, else None: `str.isdigit` also takes digits `int` refuses (`²`), and `int`
    refuses more than 4,300 digits, either of which made a provider's odd header a 500."""
    if value is None or not value.isascii() or not value.isdigit() or len(value) > 18:
        return None
    return int(value)


class AnsweringAttempt:
    """The answering attempt, once its call is over: its span ended with the failure that ended it, if any, its
    deployment's verdict reported, its connection share given back. (One per open stream: a small object, not an
    AsyncExitStack with its deque and callbacks.)"""

    __slots__ = ("_gateway", "_target", "_outcome", "_retry_after", "_span", "_pool", "_account")

    def __init__(
        self, gateway: Gateway, target: Target, outcome: RelayOutcome, retry_after: str | None, span: UpstreamSpan,
        pool: PoolShares, account: str,
    ) -> None:
        self._gateway, self._target, self._outcome, self._retry_after = gateway, target, outcome, retry_after
        self._span, self._pool, self._account = span, pool, account

    async def __aenter__(self) -> None:
        pass

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        outcome = self._outcome
        try:
            try:
                error_code = outcome.error_code or (exc.code if isinstance(exc, ApiError) else None)
                self._span.end(outcome.status, upstream_outcome(outcome), error_code,
                               exc if isinstance(exc, Exception) else None)
            finally:
                _report(self._gateway, self._target, outcome, self._retry_after)
        finally:
            self._pool.give_back(self._account)


def _answer_refused(
    gateway: Gateway, target: Target, provider: str, upstream: aiohttp.ClientResponse, started: float
) -> None:
    """A 429 or 5xx that another target can make up for: the deployment rests or counts a failure."""
    if upstream.status == 429:
        _throttle(gateway, target, upstream.headers.get("Retry-After"))
        result, reason = "throttled", "status_429"
    else:
        target.health.failed()
        result, reason = "error", "status_5xx"
    gateway.metrics.upstream_done(provider, "error", time.monotonic() - started)
    gateway.metrics.upstream_error(provider, reason)
    gateway.metrics.deployment_attempt(target.model.id, target.label, result)  # type: ignore[arg-type]


def _throttle(gateway: Gateway, target: Target, retry_after: str | None) -> None:
    """The deployment rests for the provider's Retry-After, within the routing settings' default and cap."""
    settings = gateway.router.settings
    target.health.throttled(retry_after_s(retry_after, settings.throttle_cooldown_s, settings.max_cooldown_s))


def _attempt_failed(gateway: Gateway, target: Target, provider: str, code: str, started: float) -> None:
    """No answer at all: the connection failed or the headers did not come in time."""
    timeout = code == "upstream_timeout"
    gateway.metrics.upstream_done(provider, "timeout" if timeout else "error", time.monotonic() - started)
    gateway.metrics.upstream_error(provider, "timeout" if timeout else "connect")
    gateway.metrics.deployment_attempt(target.model.id, target.label, "timeout" if timeout else "error")


def _report(gateway: Gateway, target: Target, outcome: RelayOutcome, retry_after: str | None) -> None:
    """The answering deployment's verdict once its call is over."""
    # 429 first: upstream_outcome calls a completed 429 "ok"
    result: AttemptResult = "throttled" if outcome.status == 429 else upstream_outcome(outcome)
    if result == "throttled":
        _throttle(gateway, target, retry_after)
    elif result == "ok":
        target.health.succeeded()
    elif result == "cancelled":
        target.health.abandoned()  # the client left: no verdict on the deployment
    else:
        target.health.failed()  # a 5xx passed on, or a stream that broke off
    gateway.metrics.deployment_attempt(target.model.id, target.label, result)


def _all_out(model: Model, attempts: Attempts) -> ApiError:
    wait = max(1, math.ceil(attempts.ready_in()))
    return ApiError(
        "generation_unavailable",
        f"no deployment of model {model.id} can take calls now (failing or throttled); retry in {wait}s",
        headers={"Retry-After": str(wait)},
    )
