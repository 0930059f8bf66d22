"""The store interface: one atomic admit per request, an idempotent settle, and the plain data they exchange.

Everything inside the store is an integer: milliseconds, micro-credits, tokens, and GCRA arrival times
as whole milliseconds plus a fraction in units of 1/limit ms (see gcra.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

DenialKind = Literal["rate_limit", "concurrency", "credits"]


# Bounds of every amount a store accepts (validated before any script runs, identically in both stores):
# one call may hold or charge at most MAX_AMOUNT micro-credits (a million credits) and MAX_TOKENS tokens,
# and a budget is at most MAX_BUDGET micro-credits. The meter clamps to these; a store refuses beyond them
# with ValueError. They keep every ledger sum an exact integer in Lua's doubles (below 2**53).
MAX_AMOUNT = 10**12
MAX_TOKENS = 10**12
MAX_BUDGET = 10**15


class StoreError(Exception):
    """The store could not be reached or did not answer in time.

    `certain` is True when the operation surely did not run (it never went on the wire); otherwise Redis may
    still run it after the caller gave up, and an admit must be cancelled (see Store.cancel).
    """

    def __init__(self, message: str, *, certain: bool = False) -> None:
        super().__init__(message)
        self.certain = certain


class StoreScriptError(StoreError):
    """The store answered with an error (a bug in a script or in its arguments): not an outage.

    It changed nothing (scripts validate before they write). It must not open the circuit breaker."""

    def __init__(self, message: str) -> None:
        super().__init__(message, certain=True)


class StoreUnavailable(StoreError):
    """The store is down and the fail mode for this request says: refuse (fail closed)."""


class StoreOverloaded(StoreError):
    """Too many calls already wait for the store on this replica; nothing was sent. Not a sign of an outage."""

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message, certain=True)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True, slots=True)
class LimitSpec:
    """A GCRA limit: a burst of `limit` units, refilled at `limit / window_ms`; this request costs `cost`."""

    key: str
    limit: int
    window_ms: int
    cost: int
    tokens: bool = False  # settle corrects the cost of token limits from the estimate to the actual


@dataclass(frozen=True, slots=True)
class LeaseSpec:
    """At most `limit` requests in flight under `key`; each holds a lease until settled or expired."""

    key: str
    limit: int


@dataclass(frozen=True, slots=True)
class AlertSpec:
    """The budget's alert thresholds, claimed by the settle that makes `spent` reach them (docs/usage.md, "Budget
    alerts"): each `(basis points, micro-credits)` once per ledger, i.e. per budget period, across replicas.

    A claimed alert goes to the account's outbox (proxy/store/alerts.py) in the same step; `budget_id` names the
    budget and its period (alert ids are `<budget_id>/<basis points>`); the outbox keeps an alert `keep_ms`."""

    budget_id: str
    levels: tuple[tuple[int, int], ...]
    keep_ms: int


@dataclass(frozen=True, slots=True)
class CreditSpec:
    """Reserve `amount` micro-credits against `budget` in the ledger `ledger_key` (holds in `holds_key`).

    `expire_at_ms` is when the ledger of this period may vanish; 0 keeps it (period "none").
    """

    ledger_key: str
    holds_key: str
    budget: int
    amount: int
    expire_at_ms: int = 0
    alerts: AlertSpec | None = None


@dataclass(frozen=True, slots=True)
class LedgerSpec:
    """Where the call's usage ledger lives and who the call is for: every settle (and every expired hold it
    sweeps) appends a record there and adds to the daily aggregates beside it (docs/usage.md).

    Its keys hang off `prefix` (the account's prefix with its hash tag: proxy/store/ledger.py names them), so
    they live in the slot of the admit's other keys. Names (`key_id`, `user`, `model`) are percent-encoded."""

    prefix: str
    request_id: str
    account: str
    key_id: str
    user: str
    model: str
    retention_ms: int  # records and daily aggregates are kept this long (aggregates: after their day ends)
    max_records: int  # per account stream, trimmed approximately (Redis MAXLEN ~) beyond this


@dataclass(frozen=True)
class Adjustment:
    """An admin's change of a balance, for its ledger record (outcome `topup` or `adjustment`): written with the
    change, so the ledger explains every balance change. `ledger` names the account (its key, user and model are
    empty) and the admin call's request id."""

    ledger: LedgerSpec
    record_id: str
    now_ms: int
    reason: str
    actor: str


@dataclass(frozen=True, slots=True)
class CallUsage:
    """What a settle records in the ledger beside its charge. `released`: nothing billable came back."""

    outcome: Literal["settled", "released"] = "settled"
    provider: str = ""
    deployment: str = ""
    tokens_in: int = 0
    tokens_out: int = 0
    images: int = 0
    seconds_ms: int = 0


@dataclass(frozen=True, slots=True)
class AdmitRequest:
    """Everything one admission decision checks and takes, in one atomic step."""

    reservation_id: str
    ticket_key: str
    now_ms: int
    ttl_ms: int  # how long the lease and the credit hold live without a settle
    limits: tuple[LimitSpec, ...] = ()
    lease: LeaseSpec | None = None
    credits: CreditSpec | None = None
    ledger: LedgerSpec | None = None  # None: this call writes no usage record (e.g. admitted by the local fallback)

    @property
    def estimated_tokens(self) -> int:
        """The token cost taken up front (the largest token-limit cost)."""
        return max((spec.cost for spec in self.limits if spec.tokens), default=0)


def check_admit(request: AdmitRequest) -> None:
    """Refuse (ValueError) an admit whose numbers a store could not apply exactly."""
    _check("ttl_ms", request.ttl_ms, 1, 10**12)
    _check("now_ms", request.now_ms, 0, 2**52)
    for spec in request.limits:
        _check("limit", spec.limit, 1, MAX_TOKENS)
        _check("window_ms", spec.window_ms, 1, 10**12)
        _check("cost", spec.cost, 0, MAX_TOKENS)
    if request.lease is not None:
        _check("lease limit", request.lease.limit, 0, 10**9)
    if request.credits is not None:
        _check("budget", request.credits.budget, 0, MAX_BUDGET)
        _check("amount", request.credits.amount, 0, MAX_AMOUNT)
        _check("expire_at_ms", request.credits.expire_at_ms, 0, 2**52)
        if request.credits.alerts is not None:
            _check("alert keep_ms", request.credits.alerts.keep_ms, 1, 2**46)
            for points, amount in request.credits.alerts.levels:
                _check("alert threshold", points, 1, 10_000)
                _check("alert amount", amount, 0, MAX_BUDGET)
    if request.ledger is not None:
        _check("ledger retention_ms", request.ledger.retention_ms, 1, 2**46)
        _check("ledger max_records", request.ledger.max_records, 1, 10**9)


def check_settle(amount: int, tokens: int, now_ms: int, usage: CallUsage | None = None) -> None:
    """Refuse (ValueError) a settle whose numbers a store could not apply exactly."""
    _check("amount", amount, 0, MAX_AMOUNT)
    _check("tokens", tokens, 0, MAX_TOKENS)
    _check("now_ms", now_ms, 0, 2**52)
    if usage is not None:
        if usage.outcome not in ("settled", "released"):
            raise ValueError(f"store: outcome must be settled or released, got {usage.outcome!r}")
        for name in ("tokens_in", "tokens_out", "images"):
            _check(name, getattr(usage, name), 0, MAX_TOKENS)
        _check("seconds_ms", usage.seconds_ms, 0, 2**46)


def check_adjust(delta: int, expire_at_ms: int, audit: Adjustment) -> None:
    """Refuse (ValueError) a credit adjustment the stores could not apply exactly."""
    _check("delta", delta, -MAX_BUDGET, MAX_BUDGET)
    _check("expire_at_ms", expire_at_ms, 0, 2**52)
    _check("now_ms", audit.now_ms, 0, 2**52)
    _check("ledger retention_ms", audit.ledger.retention_ms, 1, 2**46)
    _check("ledger max_records", audit.ledger.max_records, 1, 10**9)


def check_renew(ttl_ms: int, now_ms: int) -> None:
    """Refuse (ValueError) a renewal the stores could not apply exactly."""
    _check("ttl_ms", ttl_ms, 1, 10**12)
    _check("now_ms", now_ms, 0, 2**52)


def _check(name: str, value: int, low: int, high: int) -> None:
    if type(value) is not int or not low <= value <= high:  # noqa: E721 - bool and float are refused too
        raise ValueError(f"store: {name} must be an integer in [{low}, {high}], got {value!r}")


@dataclass(frozen=True, slots=True)
class Reservation:
    """What an admitted request holds; settle it exactly once (later settles are no-ops)."""

    request: AdmitRequest
    fallback: bool = False  # taken from the local fallback store while the shared one was down


@dataclass(frozen=True)
class LimitState:
    """A limit after the decision: whole units still admissible now, and ms until it is fully refilled."""

    remaining: int
    reset_ms: int


@dataclass(frozen=True)
class Balance:
    """A credit ledger in micro-credits."""

    budget: int
    spent: int
    held: int

    @property
    def remaining(self) -> int:
        """What a new reservation may still take (never negative)."""
        return max(0, self.budget - self.spent - self.held)


@dataclass(frozen=True)
class Denial:
    """Which rule refused: `index` is the limit's position for rate limits; retry_after_ms None = never fits."""

    kind: DenialKind
    index: int = 0
    retry_after_ms: int | None = None


@dataclass(frozen=True)
class AdmitResult:
    """The outcome of admit (or peek): state of every limit, lease count, balance, and the denial if any."""

    allowed: bool
    limits: tuple[LimitState, ...] = field(default_factory=tuple)
    in_flight: int = 0
    balance: Balance | None = None
    denial: Denial | None = None
    reservation: Reservation | None = None
    # The shared store failed uncertainly and this answer came from the local fallback: the shared admit may
    # still run there, so it must be cancelled (Store.cancel).
    shared_uncertain: bool = False


class AdmitCancelled(StoreError):
    """An admit reached the store after it was cancelled by its ticket: it took nothing."""

    def __init__(self) -> None:
        super().__init__("admit arrived after its cancel: nothing taken", certain=True)


class Store(Protocol):
    """Shared counters. Implementations: MemoryStore, RedisStore, ResilientStore (breaker + fail modes)."""

    async def admit(self, request: AdmitRequest) -> AdmitResult:
        """Check every limit, the lease and the credits; take all of them or nothing."""
        ...

    async def settle(
        self, reservation: Reservation, amount: int, tokens: int, now_ms: int, usage: CallUsage | None = None
    ) -> bool:
        """Charge `amount`, correct token limits to `tokens`, drop the lease, and append the call's ledger record
        (with `usage`) in the same step. False, writing nothing, if already settled."""
        ...

    async def renew(self, reservation: Reservation, ttl_ms: int, now_ms: int) -> bool:
        """Push the lease and hold expiry to `now_ms + ttl_ms` (heartbeat of a running request). False, changing
        nothing, if it was settled or already expired: an expired hold is charged, never revived."""
        ...

    async def peek(self, request: AdmitRequest) -> AdmitResult:
        """The state `admit` would see, taking nothing (costs and amount are ignored)."""
        ...

    async def cancel(self, request: AdmitRequest, now_ms: int) -> bool:
        """Undo the admit with this ticket, whose answer was lost: release what it took (as a release does:
        nothing charged, lease freed, token estimate returned) and leave a tombstone, so that the admit, if it
        reaches the store later, takes nothing (AdmitCancelled). Idempotent; True if it undid a taken admit."""
        ...

    async def adjust_credits(self, ledger_key: str, delta: int, expire_at_ms: int, audit: Adjustment) -> int:
        """Take `delta` micro-credits off `spent` in one atomic step (a top-up is positive, a charge negative), with
        its usage ledger record, and return the new `spent`; the ledger keeps `expire_at_ms` (0: no expiry)."""
        ...

    async def ping(self) -> bool:
        """True if the store answers."""
        ...

    @property
    def healthy(self) -> bool:
        """False while the store is known to be unreachable (for readiness)."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


class StoreObserver(Protocol):
    """Hooks for metrics; the gateway connects these to Prometheus. Must not block."""

    def on_op(self, op: str, seconds: float, outcome: str) -> None:
        """One store operation: outcome is ok, error, overloaded, fallback or refused."""
        ...

    def on_breaker(self, state: str) -> None:
        """The circuit breaker changed state: closed, open or half_open."""
        ...


class NullObserver:
    """An observer that records nothing."""

    def on_op(self, op: str, seconds: float, outcome: str) -> None:
        """Ignore the operation."""

    def on_breaker(self, state: str) -> None:
        """Ignore the state change."""
