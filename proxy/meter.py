"""The pipeline's meter stage: turn a policy decision into one atomic store admission, and settle it later.

Credits are floats at this boundary and integer micro-credits inside the store (no float drift).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import logging
import math
import secrets
import time
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import date, datetime, timezone
from typing import Any, Callable
from urllib.parse import quote

from proxy.auth.principal import Principal
from proxy.errors import ApiError
from proxy.pending_settles import PendingCancel, PendingSettle, PendingSettles
from proxy.policy.schema import BASIS_POINTS
from proxy.policy.types import Decision, Dimension, Period, RateLimit
from proxy.store.ledger import DAY_MS, LedgerReader, account_usage_key, user_usage_key
from proxy.store.base import (
    MAX_AMOUNT,
    MAX_BUDGET,
    MAX_TOKENS,
    Adjustment,
    AdmitRequest,
    AlertSpec,
    AdmitResult,
    CallUsage,
    CreditSpec,
    LeaseSpec,
    LedgerSpec,
    LimitSpec,
    LimitState,
    Reservation,
    Store,
    StoreError,
    StoreScriptError,
    StoreOverloaded,
)

log = logging.getLogger(__name__)

MICRO = 1_000_000


def to_micro(credits: float, *, round_up: bool = False) -> int:
    """Credits -> integer micro-credits in [0, MAX_AMOUNT]; reservations round up so a hold never falls short.
    The amount is the decimal that `repr` writes (0.1 is 100,000 exactly), rounded half up or up, in integers.

    Never raises: negative amounts are 0, huge ones and +infinity are MAX_AMOUNT (NaN is the caller's to
    avoid: it is 0 here; `Admission.settle` charges the reserve instead)."""
    if isinstance(credits, float) and not math.isfinite(credits):
        return MAX_AMOUNT if credits > 0 else 0
    if credits <= 0:
        return 0
    if credits >= MAX_AMOUNT / MICRO:  # also keeps a 400-digit integer out of the arithmetic below
        return MAX_AMOUNT
    digits, places = _decimal_digits(credits)
    if places <= _MICRO_PLACES:
        return digits * 10 ** (_MICRO_PLACES - places)
    unit = 10 ** (places - _MICRO_PLACES)
    micro, rest = divmod(digits, unit)
    return micro + (rest > 0 if round_up else 2 * rest >= unit)


_MICRO_PLACES = 6  # MICRO = 10**6


def _decimal_digits(amount: float) -> tuple[int, int]:
    """`amount` as `repr` writes it, as (digits, places): 1.5e-05 is (15, 6), 12.25 is (1225, 2)."""
    mantissa, _, exponent = repr(amount).partition("e")
    whole, _, fraction = mantissa.partition(".")
    return int(whole + fraction), len(fraction) - int(exponent or 0)


def clamp_tokens(tokens: int) -> int:
    """A token count in [0, MAX_TOKENS]."""
    return max(0, min(int(tokens), MAX_TOKENS))


def from_micro(micro: int) -> float:
    return micro / MICRO


def format_credits(micro: int) -> str:
    """A header value: the credit amount without float noise, e.g. `12.5`."""
    whole, fraction = divmod(abs(micro), MICRO)
    sign = "-" if micro < 0 else ""
    return f"{sign}{whole}.{fraction:06d}".rstrip("0") if fraction else f"{sign}{whole}"


@dataclass(frozen=True)
class _Period:
    label: str  # part of the ledger key, so a new period starts from zero without any cron
    ends_at: datetime | None
    ends_ms: int = 0  # ends_at in epoch milliseconds (0: never)


def _period_of(period: str, now_ms: int) -> _Period:
    return _period_of_day(period, now_ms // DAY_MS)


@functools.lru_cache(maxsize=16)
def _period_of_day(period: str, day: int) -> _Period:
    """A period by the UTC day it contains: every admission of a day shares one (datetimes cost ~9 µs a call)."""
    now = datetime.fromtimestamp(day * DAY_MS / 1000, timezone.utc)
    if period == "day":
        return _ends(f"d{now:%Y%m%d}", datetime.fromtimestamp((day + 1) * DAY_MS / 1000, timezone.utc))
    if period == "month":
        year, month = (now.year + 1, 1) if now.month == 12 else (now.year, now.month + 1)
        return _ends(f"m{now:%Y%m}", datetime(year, month, 1, tzinfo=timezone.utc))
    return _Period("all", None)


def _ends(label: str, ends_at: datetime) -> _Period:
    return _Period(label, ends_at, int(ends_at.timestamp() * 1000))


class Admission:
    """An admitted request: the headers to send, and a settle/release that act once."""

    __slots__ = ("headers", "_store", "_clock", "_pending", "_reservation", "_settled", "_heartbeat")  # one per call

    def __init__(
        self,
        store: Store,
        clock: Callable[[], float],
        reservation: Reservation | None,
        headers: dict[str, str],
        pending: PendingSettles,
    ) -> None:
        self.headers = headers
        self._store = store
        self._clock = clock
        self._pending = pending
        self._reservation = reservation
        self._settled = reservation is None
        # A timer, not a task that sleeps, until a renewal is due: most calls end long before, and a timer costs a
        # fraction of a task to create and cancel.
        self._heartbeat: asyncio.TimerHandle | asyncio.Task[None] | None = None

    @property
    def settled(self) -> bool:
        """True once settled or released, or queued for a retry while the store is down."""
        return self._settled

    @property
    def reservation(self) -> Reservation | None:
        """What the admission holds (None: nothing in the store), e.g. to hand a job's hold to another replica."""
        return self._reservation

    def keepalive(self) -> AbstractAsyncContextManager[None]:
        """Renew the lease and the hold every ttl/3 while the body runs, so that only the holds of a replica
        that died expire (and get charged). Renewal problems are logged, never raised into the request."""
        return _Keepalive(self)

    def start_keepalive(self) -> None:
        """`keepalive` without a context manager: renewals start; `stop_keepalive` ends them."""
        if not self._settled and self._reservation is not None:
            self._schedule_renewal(self._reservation)

    async def settle(self, actual_credits: float, actual_tokens: int, usage: CallUsage | None = None) -> bool:
        """Charge the real cost and free the lease; True if this call applied it. The store writes the call's usage
        ledger record (with `usage`) in the same step. Never raises on store errors: the settle is queued and
        retried in the background (docs/metering.md). Figures are clamped to the store's bounds; a figure that
        is not a number at all (NaN) is charged at the reserve."""
        if self._settled or self._reservation is None:
            return False
        request = self._reservation.request
        if isinstance(actual_credits, float) and math.isnan(actual_credits):
            actual_credits = from_micro(request.credits.amount) if request.credits else 0.0
        return await self._apply(to_micro(actual_credits), clamp_tokens(actual_tokens), usage or CallUsage())

    async def settle_at_reserve(self) -> bool:
        """Charge what was reserved (the most the call could cost) and free the lease: for a call whose real
        cost could not be worked out. A no-op once settled."""
        if self._settled or self._reservation is None:
            return False
        request = self._reservation.request
        amount = request.credits.amount if request.credits else 0
        return await self._apply(amount, request.estimated_tokens, CallUsage())

    async def _apply(self, amount: int, tokens: int, usage: CallUsage) -> bool:
        assert self._reservation is not None
        self.stop_keepalive()
        self._settled = True
        pending = PendingSettle(self._reservation, amount, tokens, _bounded(usage))
        try:
            await pending.apply(self._store, int(self._clock() * 1000))
        except StoreScriptError:
            # logged and counted by the store, and retrying would fail the same way: the hold's expiry charges it
            return False
        except StoreError as exc:
            log.warning("settle of reservation %s failed (%s): queued for retry", pending.reservation_id, exc)
            self._pending.add(pending)
            return False
        return True

    async def release(self, usage: CallUsage | None = None) -> bool:
        """The request produced nothing billable: settle with zero (its record's outcome is `released`)."""
        return await self.settle(0.0, 0, dataclasses.replace(usage or CallUsage(), outcome="released"))

    def _schedule_renewal(self, reservation: Reservation) -> None:
        """Renew every ttl/3 (three chances to get through before the ttl runs out) until settled."""
        self._heartbeat = asyncio.get_running_loop().call_later(
            reservation.request.ttl_ms / 3000, self._start_renewal, reservation
        )

    def _start_renewal(self, reservation: Reservation) -> None:
        self._heartbeat = asyncio.create_task(self._renew(reservation))

    async def _renew(self, reservation: Reservation) -> None:
        ttl_ms = reservation.request.ttl_ms
        rid = reservation.request.reservation_id
        try:
            renewed = await self._store.renew(reservation, ttl_ms, int(self._clock() * 1000))
        except StoreError as exc:
            log.debug("renew failed for reservation %s: %s", rid, exc)
        else:
            if not renewed:  # the store was down, or the hold already expired and was charged
                log.debug("reservation %s was not renewed", rid)
        if not self._settled:
            self._schedule_renewal(reservation)

    def stop_keepalive(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            self._heartbeat = None


class _Keepalive:
    """`Admission.keepalive`: a plain context manager rather than a generator's, whose frame every open stream
    would keep."""

    __slots__ = ("_admission",)

    def __init__(self, admission: Admission) -> None:
        self._admission = admission

    async def __aenter__(self) -> None:
        self._admission.start_keepalive()

    async def __aexit__(self, *exc_info: object) -> None:
        self._admission.stop_keepalive()


class Meter:
    """Builds store keys from the principal and the decision; one store call per admission. Settles the store
    could not take are retried in the background between `start()` and `close()`."""

    def __init__(
        self,
        store: Store,
        *,
        reservation_ttl_s: float = 600.0,
        ledger_retention_s: float = 2 * 86_400,
        usage_retention_s: float = 35 * 86_400,
        usage_max_records: int = 100_000,
        clock: Callable[[], float] = time.time,
        prefix: str = "ep",
        max_pending_settles: int = 10_000,
        on_pending_settles: Callable[[int], None] = lambda length: None,
        alert_keep_s: float = 0.0,
        on_budget_used: Callable[[str, str, str, float], None] = lambda account, scope, owner, ratio: None,
    ) -> None:
        """`alert_keep_s`: how long a claimed budget alert waits in its outbox for delivery; 0: budgets' alert
        thresholds are not claimed (no webhook is configured). `on_budget_used(account, scope, owner, share)`: the
        share of the caller's budget spent, as each admission saw it."""
        self._store = store
        self._ttl_ms = int(reservation_ttl_s * 1000)
        self._retention_ms = int(ledger_retention_s * 1000)
        self._usage_retention_ms = int(usage_retention_s * 1000)
        self._usage_max_records = usage_max_records
        self._clock = clock
        self._prefix = prefix
        self._alert_keep_ms = int(alert_keep_s * 1000)
        self._on_budget_used = on_budget_used
        self._pending = PendingSettles(store, clock, max_pending=max_pending_settles, on_length=on_pending_settles)

    @property
    def pending_settles(self) -> int:
        """How many settles wait for the store to come back."""
        return len(self._pending)

    def start(self) -> None:
        """Start retrying queued settles in the background (in the running loop)."""
        self._pending.start()

    async def close(self, flush_timeout_s: float = 2.0) -> None:
        """Stop the retries and try once more, for at most `flush_timeout_s`, to apply the queued settles."""
        await self._pending.close(flush_timeout_s)

    async def admit(self, principal: Principal, model_id: str, decision: Decision, request_id: str) -> Admission:
        """Take every limit, the concurrency lease and the credit hold, or raise the ApiError that denied it."""
        now_ms = int(self._clock() * 1000)
        rid = _record_id(request_id)
        rules = decision.rate_limits
        request = self._request(principal, model_id, decision, rules, rid, now_ms, request_id)
        if not _touches_store(request):
            return Admission(self._store, self._clock, None, {}, self._pending)
        result = await self._admit(request)
        budget, balance = decision.budget, result.balance
        if budget is not None and balance is not None and balance.budget:
            owner = _owner_label(_dimension(principal, budget.scope, None))
            self._on_budget_used(principal.account, budget.scope, owner, balance.spent / balance.budget)
        if result.denial is not None or result.reservation is None:
            raise _denial(rules, request, result)
        return Admission(self._store, self._clock, result.reservation, _headers(rules, result), self._pending)

    def resume(self, reservation: Reservation | None) -> Admission:
        """An admission for a hold taken earlier, maybe by another replica (a job's): it renews and settles that
        hold. Settling twice, from here or anywhere, charges once (the store's settle is idempotent)."""
        return Admission(self._store, self._clock, reservation, {}, self._pending)

    async def _admit(self, request: AdmitRequest) -> AdmitResult:
        """Admit; if the store may run the admit although its answer was lost, queue a cancel by its ticket."""
        try:
            result = await self._store.admit(request)
        except StoreError as exc:
            if not exc.certain:
                self._cancel_later(request, str(exc))
            raise _store_error(exc) from exc
        except asyncio.CancelledError:  # the caller went away while the admit was under way
            self._cancel_later(request, "cancelled")
            raise
        if result.shared_uncertain:
            self._cancel_later(request, "answered by the local fallback")
        return result

    def _cancel_later(self, request: AdmitRequest, why: str) -> None:
        log.warning("admit of reservation %s may still run in the store (%s): cancel queued",
                    request.reservation_id, why)
        self._pending.add(PendingCancel(request))

    async def state(self, principal: Principal, decision: Decision, model_id: str | None = None) -> dict[str, Any]:
        """Balance and per-limit state for GET /v1/me, taking nothing. Model-scoped limits need `model_id`."""
        now_ms = int(self._clock() * 1000)
        rules = _applicable(decision, model_id)
        request = self._request(principal, model_id, decision, rules, "peek", now_ms)
        result = await self._peek(request) if _touches_store(request) else AdmitResult(True)
        limits = [
            {"rule": rule.name, "unit": rule.unit, "limit": rule.limit, "window_s": rule.window_s,
             "remaining": state.remaining, "reset_s": math.ceil(state.reset_ms / 1000)}
            for rule, state in zip(rules, result.limits)
        ]
        balance = None
        if decision.budget is not None and result.balance is not None:
            period = _period_of(decision.budget.period, now_ms)
            balance = {
                "budget": from_micro(result.balance.budget),
                "spent": from_micro(result.balance.spent),
                "held": from_micro(result.balance.held),
                "remaining": from_micro(result.balance.remaining),
                "period": decision.budget.period,
                "scope": decision.budget.scope,
                "resets_at": period.ends_at.isoformat() if period.ends_at else None,
            }
        concurrency = None if decision.concurrency is None else {"limit": decision.concurrency, "in_flight": result.in_flight}
        return {"balance": balance, "rate_limits": limits, "concurrency": concurrency}

    def _request(
        self,
        principal: Principal,
        model_id: str | None,
        decision: Decision,
        rules: tuple[RateLimit, ...],
        rid: str,
        now_ms: int,
        request_id: str = "",
    ) -> AdmitRequest:
        base = self.account_prefix(principal.account)
        user = user_id(principal)
        tokens = clamp_tokens(decision.estimated_tokens)
        limits = tuple(
            LimitSpec(key, rule.limit, int(rule.window_s * 1000), tokens if rule.unit == "tokens" else 1,
                      rule.unit == "tokens")
            for key, rule in zip(_limit_keys(base, principal, model_id, rules), rules)
        )
        lease = None
        if decision.concurrency is not None:
            lease = LeaseSpec(f"{base}:cc:{user}", decision.concurrency)
        credits = self._credits(base, principal, decision, now_ms)
        ledger = LedgerSpec(
            base, request_id, principal.account, principal.key_id or "", user, model_id or "",
            self._usage_retention_ms, self._usage_max_records,
        )
        return AdmitRequest(rid, f"{base}:tk:{rid}", now_ms, self._ttl_ms, limits, lease, credits, ledger)

    async def usage(self, account: str, user: str | None, days: list[date]) -> list[tuple[date, dict[str, int]]]:
        """The daily usage aggregates of `account` (or of one of its users, in the meter's namespaced form: see
        `usage_user`) for each day, as `<metric>:<model>` -> integer (credits in micro-credits), in one round trip."""
        prefix = self.account_prefix(account)
        labels = [day.strftime("%Y%m%d") for day in days]
        keys = [user_usage_key(prefix, user, label) if user else account_usage_key(prefix, label) for label in labels]
        reader: LedgerReader = self._store  # type: ignore[assignment]  # every store is a LedgerReader
        try:
            hashes = await reader.read_usage(keys)
        except StoreError as exc:
            raise _store_error(exc) from exc
        return [(day, {name: int(value) for name, value in totals.items()}) for day, totals in zip(days, hashes)]

    def account_prefix(self, account: str) -> str:
        """The prefix of every key of `account`, with its hash tag (one Redis Cluster slot per account)."""
        return f"{self._prefix}:{{{_escaped(account)}}}"

    def _credits(self, base: str, principal: Principal, decision: Decision, now_ms: int) -> CreditSpec | None:
        budget = decision.budget
        if budget is None:
            return None
        owner = _dimension(principal, budget.scope, None)
        ledger, expire_at, label = self._ledger(base, budget.scope, owner, budget.period, now_ms)
        amount = to_micro(decision.reserve_credits, round_up=True)
        total = min(budget.credits * MICRO, MAX_BUDGET)
        alerts = None
        if budget.alerts and self._alert_keep_ms:
            levels = tuple((points, -(-total * points // BASIS_POINTS)) for points in budget.alerts)
            budget_id = f"{_escaped(principal.account)}/{budget.scope}/{owner}/{label}"
            alerts = AlertSpec(budget_id, levels, self._alert_keep_ms)
        return CreditSpec(ledger, f"{ledger}:holds", total, amount, expire_at, alerts)

    def _ledger(self, base: str, scope: str, owner: str, period_name: Period, now_ms: int) -> tuple[str, int, str]:
        """The credit ledger of this budget owner in the current period, when it may expire (0: never), and the
        period's label."""
        period = _period_of(period_name, now_ms)
        expire_at = 0
        if period.ends_at is not None:
            expire_at = max(period.ends_ms + self._retention_ms, now_ms + 2 * self._ttl_ms)
        return f"{base}:cr:{scope}:{owner}:{period.label}", expire_at, period.label

    async def adjust_credits(
        self, account: str, period: Period, credits: float, *, request_id: str, reason: str, actor: str
    ) -> float:
        """Top up (positive) or charge (negative) an account-scoped budget in its current period, atomically in
        the store with its usage ledger record (outcome `topup` or `adjustment`, the reason and the admin actor);
        returns the period's `spent` after it. StoreError ApiErrors as for admissions."""
        now_ms = int(self._clock() * 1000)
        prefix = self.account_prefix(account)
        ledger, expire_at, _ = self._ledger(prefix, "account", _escaped(account), period, now_ms)
        micro = to_micro(abs(credits)) * (1 if credits >= 0 else -1)
        record = LedgerSpec(prefix, request_id, account, "", "", "", self._usage_retention_ms, self._usage_max_records)
        audit = Adjustment(record, _record_id(request_id), now_ms, reason, actor)
        try:
            return from_micro(await self._store.adjust_credits(ledger, micro, expire_at, audit))
        except StoreError as exc:
            raise _store_error(exc) from exc

    async def _peek(self, request: AdmitRequest) -> AdmitResult:
        try:
            return await self._store.peek(request)
        except StoreError as exc:
            raise _store_error(exc) from exc


def _store_error(exc: StoreError) -> ApiError:
    """503 overloaded (this replica has too many store calls waiting) or 503 store_unavailable."""
    if isinstance(exc, StoreOverloaded):
        return ApiError(
            "overloaded",
            f"This gateway has too many metering calls waiting; retry after {exc.retry_after_s}s.",
            headers={"Retry-After": str(exc.retry_after_s)},
        )
    return ApiError(
        "store_unavailable", "The metering store is unavailable; try again shortly.", headers={"Retry-After": "1"}
    )


def _headers(rules: tuple[RateLimit, ...], result: AdmitResult) -> dict[str, str]:
    """RateLimit-* of the tightest limit (smallest share left) and the credit balance after the hold."""
    headers: dict[str, str] = {}
    if result.limits:
        rule, state = min(zip(rules, result.limits), key=lambda pair: pair[1].remaining / pair[0].limit)
        headers.update(_ratelimit_headers(rule, state))
    if result.balance is not None:
        headers["X-Credits-Balance"] = format_credits(result.balance.remaining)
    return headers


def _denial(rules: tuple[RateLimit, ...], request: AdmitRequest, result: AdmitResult) -> ApiError:
    """The ApiError for the rule that refused: 429 rate_limit / concurrency_limit or 402."""
    denial = result.denial
    assert denial is not None  # admit returns a reservation or a denial
    if denial.kind == "rate_limit":
        rule = rules[denial.index]
        state = result.limits[denial.index]
        headers = _ratelimit_headers(rule, state)
        if denial.retry_after_ms is None:
            return ApiError(
                "rate_limit",
                f"This request needs more {rule.unit} than the limit {rule.name} allows at all.",
                headers=headers, rule=rule.name, limit=rule.limit,
            )
        retry_s = max(1, math.ceil(denial.retry_after_ms / 1000))
        return ApiError(
            "rate_limit",
            f"Rate limit {rule.name} exceeded; retry after {retry_s}s.",
            headers={"Retry-After": str(retry_s), **headers}, rule=rule.name, limit=rule.limit,
            retry_after=retry_s,
        )
    if denial.kind == "concurrency":
        limit = request.lease.limit if request.lease else 0
        return ApiError(
            "concurrency_limit",
            f"Too many requests in flight (limit {limit}); retry when one finishes.",
            headers={"Retry-After": "1"}, rule="concurrency", limit=limit, in_flight=result.in_flight,
        )
    balance = result.balance
    credits = request.credits
    assert balance is not None and credits is not None
    return ApiError(
        "insufficient_credits",
        "Not enough credits left for this request.",
        headers={"X-Credits-Balance": format_credits(balance.remaining)},
        credits_needed=from_micro(credits.amount),
        credits_balance=from_micro(balance.remaining),
    )


@functools.lru_cache(maxsize=4096)
def _limit_keys(base: str, principal: Principal, model_id: str | None, rules: tuple[RateLimit, ...]) -> tuple[str, ...]:
    """The rate limits' counter keys, one per rule: the same few for each caller and model, so built once each."""
    return tuple(
        f"{base}:rl:{rule.name}:" + ":".join(_dimension(principal, dim, model_id) for dim in rule.per) for rule in rules
    )


def _applicable(decision: Decision, model_id: str | None) -> tuple[RateLimit, ...]:
    """The rate limits that can be keyed: model-scoped ones only when a model is known."""
    if model_id is not None:
        return decision.rate_limits
    return tuple(rule for rule in decision.rate_limits if "model" not in rule.per)


def _dimension(principal: Principal, dim: Dimension, model_id: str | None) -> str:
    """The principal's identity along one limit dimension (escaped and namespaced: see `user_id`)."""
    if dim == "key":
        return _key_id(principal)
    if dim == "user":
        return user_id(principal)
    return _escaped(principal.account if dim == "account" else model_id or "")


def usage_user(principal: Principal) -> str | None:
    """Whose usage a caller may read: its own user's (a credential with a subject), else None: its account's."""
    return user_id(principal) if principal.subject else None


def user_id(principal: Principal) -> str:
    """The end user in the namespace of its kind, so that no two kinds of identity ever share a counter:
    `u:i:<issuer>:<sub>` (an identity provider's user), `u:g:<sub>` (the sub of a gateway-minted token), else
    the API key (bare), else `a:<account>`. Values are percent-encoded and so never contain `:`: a bare value
    is always an API key, and no value can forge another."""
    if principal.subject:
        if principal.kind == "issuer":
            return f"u:i:{_escaped(principal.issuer or '')}:{_escaped(principal.subject)}"
        return f"u:g:{_escaped(principal.subject)}"
    if principal.key_id:
        return _escaped(principal.key_id)
    return f"a:{_escaped(principal.account)}"


def _record_id(request_id: str) -> str:
    """A reservation's (and its ledger record's) id: the request id, percent-encoded, and 12 random hex digits."""
    return f"{quote(request_id[:64], safe='')}.{secrets.token_hex(6)}"


def _owner_label(owner: str) -> str:
    """A budget owner as a metric label: an end user's subject only as a short hash (as in the access log)."""
    return f"sub_{hashlib.sha256(owner.encode()).hexdigest()[:12]}" if owner.startswith("u:") else owner


def _key_id(principal: Principal) -> str:
    """The API key behind the credential; callers without one (identity-provider sessions) count as their user."""
    return _escaped(principal.key_id) if principal.key_id else user_id(principal)


@functools.lru_cache(maxsize=4096)
def _escaped(value: str) -> str:
    """Percent-encoded (a few per metered call, of the same few account, key, user and model ids: cached)."""
    return quote(value, safe="")


def _ratelimit_headers(rule: RateLimit, state: LimitState) -> dict[str, str]:
    return {
        "RateLimit-Limit": str(rule.limit),
        "RateLimit-Remaining": str(state.remaining),
        "RateLimit-Reset": str(math.ceil(state.reset_ms / 1000)),
    }


def _bounded(usage: CallUsage) -> CallUsage:
    """The record's figures clamped to the store's bounds, like the charge's (a provider may report anything).
    Figures within them (nearly always) keep the record as it is: no copy."""
    tokens = (usage.tokens_in, usage.tokens_out, usage.images)
    if all(type(n) is int and 0 <= n <= MAX_TOKENS for n in tokens) and type(usage.seconds_ms) is int \
            and 0 <= usage.seconds_ms <= 2**46:
        return usage
    return dataclasses.replace(
        usage,
        tokens_in=clamp_tokens(usage.tokens_in),
        tokens_out=clamp_tokens(usage.tokens_out),
        images=clamp_tokens(usage.images),
        seconds_ms=max(0, min(int(usage.seconds_ms), 2**46)),
    )


def _touches_store(request: AdmitRequest) -> bool:
    return bool(request.limits or request.lease or request.credits)

