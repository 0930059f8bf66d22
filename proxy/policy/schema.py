"""The policy file format: typed records and strict parsing, where every error names its key path and fix."""

from __future__ import annotations

import difflib
import re
from decimal import Decimal
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Literal, TypeVar

from proxy.catalog import CAPABILITIES
from proxy.policy.scopes import ModelScope
from proxy.policy.types import Budget, Price, RateLimit

T = TypeVar("T")
Unpriced = Literal["free", "deny"]

DIMENSIONS = ("key", "user", "account", "model")
PERIODS = ("none", "day", "month")
BUDGET_SCOPES = ("key", "user", "account")
HASH_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
# Names end up in metering keys and metric labels: keep them plain (no braces, which are Redis hash tags).
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")
_DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
# The store's bounds (proxy/store/base.py): a limit and a token count, a budget, requests in flight.
MAX_LIMIT = 10**12
MAX_BUDGET_CREDITS = 10**9
MAX_CONCURRENCY = 10**9
MAX_WINDOW_S = 10**9  # about 31 years, in the store's bound of 10**12 ms
DURATION_FIX = "write a number of seconds or a number with a unit ms, s, m, h or d (e.g. 30s, 1m, 1h, 1d)"


class PolicyError(ValueError):
    """Policies failed to load; `problems` lists each one as `file: key.path: what is wrong; how to fix`."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class Invalid(Exception):
    """One problem at one key path (collected, then raised together as a PolicyError)."""

    def __init__(self, path: str, problem: str, fix: str) -> None:
        super().__init__(f"{path}: {problem}; {fix}")
        self.path, self.problem, self.fix = path, problem, fix

    def located(self, source: str) -> str:
        """The full message, prefixed with the file (the top level of a file has an empty path)."""
        return f"{source}: {self}" if self.path else f"{source}: {self.problem}; {self.fix}"


@dataclass(frozen=True)
class Plan:
    """What callers on a plan may use, with per-key overrides already applied."""

    name: str
    scope: ModelScope
    rate_limits: tuple[RateLimit, ...] = ()
    concurrency: int | None = None
    budget: Budget | None = None
    max_output_tokens: int | None = None  # bound for a reservation when neither request nor model sets one
    max_seconds: float | None = None  # bound for per-second prices when the request gives no length
    # A fallback model dearer than the requested one may answer; the hold then covers the dearest (docs/routing.md).
    allow_pricier_fallbacks: bool = False
    # A job (video, queued images) is cancelled at the provider when the client that streams it disconnects.
    cancel_jobs_on_disconnect: bool = False


@dataclass(frozen=True)
class Defaults:
    """Policy-wide settings (`defaults:`)."""

    hide_unauthorized_models: bool = False
    unpriced: Unpriced = "deny"
    max_output_tokens: int = 4096
    max_seconds: float = 60.0


@dataclass(frozen=True)
class PlanPatch:
    """A key's `overrides:`: each field given replaces the plan's; a budget merges field by field."""

    scope: ModelScope | None = None
    rate_limits: tuple[RateLimit, ...] | None = None
    concurrency: int | None = None
    budget: dict[str, Any] | None = None
    max_output_tokens: int | None = None
    max_seconds: float | None = None
    allow_pricier_fallbacks: bool | None = None
    cancel_jobs_on_disconnect: bool | None = None

    def apply(self, plan: Plan) -> Plan:
        """The plan as this key sees it."""
        changes: dict[str, Any] = {
            k: v
            for k, v in (
                ("scope", self.scope),
                ("rate_limits", self.rate_limits),
                ("concurrency", self.concurrency),
                ("max_output_tokens", self.max_output_tokens),
                ("max_seconds", self.max_seconds),
                ("allow_pricier_fallbacks", self.allow_pricier_fallbacks),
                ("cancel_jobs_on_disconnect", self.cancel_jobs_on_disconnect),
            )
            if v is not None
        }
        if self.budget is not None:
            changes["budget"] = replace(plan.budget, **self.budget) if plan.budget else Budget(**self.budget)
        return replace(plan, **changes)


@dataclass(frozen=True)
class KeySpec:
    """A key declared in a policy file, before its plan is resolved."""

    id: str
    hash: str
    plan: str
    account: str | None = None
    allow_direct: bool = True
    disabled: bool = False
    overrides: PlanPatch = field(default_factory=PlanPatch)

    @property
    def needs_plan_budget(self) -> bool:
        """A partial budget override merges into the plan's budget, so it needs one to merge into."""
        return self.overrides.budget is not None and "credits" not in self.overrides.budget


# --- small typed readers; each raises Invalid naming the path -----------------------------------------


def child(path: str, key: object) -> str:
    """`plans.members` or, for keys that are not plain words, `prices["openai/*"]`."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    text = str(key)
    step = text if re.fullmatch(r"[A-Za-z0-9_-]+", text) else f'["{text}"]'
    return f"{path}{'' if step.startswith('[') else '.'}{step}" if path else text


def mapping(value: Any, path: str, allowed: Iterable[str], required: Iterable[str] = ()) -> dict[str, Any]:
    """A mapping with only `allowed` keys and all `required` ones; unknown keys get a did-you-mean."""
    allowed = tuple(allowed)
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise Invalid(path, f"expected a mapping, got {_kind(value)}", f"write keys {', '.join(allowed)}")
    for key in value:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise Invalid(child(path, key), "unknown key", f"{hint}allowed keys here: {', '.join(allowed)}")
    for key in required:
        if key not in value:
            raise Invalid(child(path, key), "missing", f"add {key}: (required)")
    return value


def integer(value: Any, path: str, minimum: int = 0, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise Invalid(path, f"{value!r} is not a whole number >= {minimum}", f"write an integer >= {minimum}")
    if maximum is not None and value > maximum:
        raise Invalid(path, f"{value} is more than the store counts ({maximum})", f"write at most {maximum}")
    return value


def number(value: Any, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or value != value:
        raise Invalid(path, f"{value!r} is not a number >= 0", "write a non-negative number, e.g. 0.15")
    return float(value)


def boolean(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise Invalid(path, f"{value!r} is not a boolean", "write true or false")
    return value


def choice(value: Any, path: str, options: tuple[str, ...]) -> str:
    if value not in options:
        raise Invalid(path, f"{value!r} is not allowed", f"use one of: {', '.join(options)}")
    return value


def name(value: Any, path: str) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise Invalid(
            path, f"{value!r} is not a valid name", "use letters, digits and . _ : @ - (max 128, no spaces or braces)"
        )
    return value


def string_list(value: Any, path: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise Invalid(path, f"expected a list of strings, got {_kind(value)}", 'write e.g. ["openai/*", "bfl/flux-2"]')
    return value


def duration(value: Any, path: str) -> float:
    """Seconds from `30`, `1.5`, `"30s"`, `"1m"`, `"1h"`, `"1d"` (must be > 0)."""
    seconds: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION_RE.match(value.strip())):
        seconds = float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
    if seconds is None or not seconds > 0:
        raise Invalid(path, f"{value!r} is not a positive duration", DURATION_FIX)
    return seconds


def each(items: Iterable[tuple[str, T]], parse: Callable[[str, T], Any], problems: list[str], source: str) -> list:
    """Parse every item, collecting one problem per failing item instead of stopping at the first."""
    parsed = []
    for path, item in items:
        try:
            parsed.append(parse(path, item))
        except Invalid as exc:
            problems.append(exc.located(source))
    return parsed


def _kind(value: Any) -> str:
    return "nothing" if value is None else type(value).__name__


# --- parts of a policy file ----------------------------------------------------------------------------

PLAN_FIELDS = (
    "models", "capabilities", "rate_limits", "concurrency", "budget", "max_output_tokens", "max_seconds", "fallbacks",
    "jobs",
)
BUDGET_FIELDS = ("credits", "period", "scope", "alerts")
MAX_ALERT_THRESHOLDS = 10
BASIS_POINTS = 10_000
PRICE_FIELDS = tuple(Price.__dataclass_fields__)
KEY_FIELDS = ("id", "hash", "plan", "account", "allow_direct", "disabled", "overrides")
DEFAULT_FIELDS = tuple(Defaults.__dataclass_fields__)


def parse_scope(raw: dict[str, Any], path: str) -> ModelScope:
    """`models:` (ids or globs) plus `capabilities:`; at least one must grant something."""
    patterns = string_list(raw.get("models", []), child(path, "models"))
    capabilities = string_list(raw.get("capabilities", []), child(path, "capabilities"))
    for i, cap in enumerate(capabilities):
        choice(cap, child(child(path, "capabilities"), i), CAPABILITIES)
    if not patterns and not capabilities:
        raise Invalid(path, "allows no model", 'add models: ["provider/*"] or capabilities: [text2text]')
    return ModelScope(tuple(patterns), frozenset(capabilities))


def parse_rate_limit(path: str, raw: Any) -> RateLimit:
    raw = mapping(raw, path, ("per", "requests", "tokens", "window"), required=("per", "window"))
    units = [u for u in ("requests", "tokens") if u in raw]
    if len(units) != 1:
        raise Invalid(path, "needs exactly one of requests: or tokens:", "e.g. {per: user, requests: 60, window: 1m}")
    unit = units[0]
    per = string_list(raw["per"], child(path, "per"))
    for i, dim in enumerate(per):
        choice(dim, child(child(path, "per"), i), DIMENSIONS)
    if len(set(per)) != len(per) or not per:
        raise Invalid(child(path, "per"), f"{per!r} repeats a dimension or is empty", "list each dimension once")
    limit = integer(raw[unit], child(path, unit), minimum=1, maximum=MAX_LIMIT)
    window_s = duration(raw["window"], child(path, "window"))
    if not 0.001 <= window_s <= MAX_WINDOW_S:  # limits count whole milliseconds
        raise Invalid(child(path, "window"), f"{raw['window']!r} is outside 1ms..{MAX_WINDOW_S:g}s", DURATION_FIX)
    return RateLimit(
        per=tuple(per),  # type: ignore[arg-type]
        unit=unit,  # type: ignore[arg-type]
        limit=limit,
        window_s=window_s,
    )


def parse_budget_fields(raw: Any, path: str, required: tuple[str, ...]) -> dict[str, Any]:
    """Budget fields that are present (a key's override may give only some of them)."""
    raw = mapping(raw, path, BUDGET_FIELDS, required=required)
    fields: dict[str, Any] = {}
    if "credits" in raw:
        fields["credits"] = integer(raw["credits"], child(path, "credits"), maximum=MAX_BUDGET_CREDITS)
    if "period" in raw:
        fields["period"] = choice(raw["period"], child(path, "period"), PERIODS)
    if "scope" in raw:
        fields["scope"] = choice(raw["scope"], child(path, "scope"), BUDGET_SCOPES)
    if "alerts" in raw:
        fields["alerts"] = parse_alerts(raw["alerts"], child(path, "alerts"))
    return fields


def parse_alerts(raw: Any, path: str) -> tuple[int, ...]:
    """`alerts: {thresholds: [0.5, 0.8, 1.0]}`: shares of the budget, ascending, as basis points (`[]`: none)."""
    raw = mapping(raw, path, ("thresholds",), required=("thresholds",))
    where = child(path, "thresholds")
    given = raw["thresholds"]
    fix = f"write up to {MAX_ALERT_THRESHOLDS} ascending shares of the budget in (0, 1], e.g. [0.5, 0.8, 1.0]"
    if not isinstance(given, list) or len(given) > MAX_ALERT_THRESHOLDS:
        raise Invalid(where, f"expected a list of at most {MAX_ALERT_THRESHOLDS} numbers, got {_kind(given)}", fix)
    points: list[int] = []
    for i, share in enumerate(given):
        number_given = isinstance(share, (int, float)) and not isinstance(share, bool) and 0 < share <= 1
        if not number_given or (Decimal(repr(share)) * BASIS_POINTS) % 1:
            raise Invalid(child(where, i), f"{share!r} is not a share in (0, 1] with at most 4 decimals", fix)
        points.append(round(share * BASIS_POINTS))
        if len(points) > 1 and points[-1] <= points[-2]:
            raise Invalid(child(where, i), f"{share!r} is not above the threshold before it", fix)
    return tuple(points)


def parse_limits(raw: dict[str, Any], path: str) -> dict[str, Any]:
    """The fields plans and overrides share, only those present."""
    out: dict[str, Any] = {}
    if "rate_limits" in raw:
        items = raw["rate_limits"] or []
        if not isinstance(items, list):
            raise Invalid(child(path, "rate_limits"), "expected a list", "write - {per: user, requests: 60, window: 1m}")
        out["rate_limits"] = tuple(parse_rate_limit(child(child(path, "rate_limits"), i), r) for i, r in enumerate(items))
    if "concurrency" in raw:
        out["concurrency"] = integer(raw["concurrency"], child(path, "concurrency"), minimum=1, maximum=MAX_CONCURRENCY)
    if "max_output_tokens" in raw:
        out["max_output_tokens"] = integer(raw["max_output_tokens"], child(path, "max_output_tokens"), minimum=1)
    if "max_seconds" in raw:
        out["max_seconds"] = duration(raw["max_seconds"], child(path, "max_seconds"))
    if "fallbacks" in raw:
        where = child(path, "fallbacks")
        fallbacks = mapping(raw["fallbacks"], where, ("allow_pricier",), required=("allow_pricier",))
        out["allow_pricier_fallbacks"] = boolean(fallbacks["allow_pricier"], child(where, "allow_pricier"))
    if "jobs" in raw:
        where = child(path, "jobs")
        jobs = mapping(raw["jobs"], where, ("cancel_on_disconnect",), required=("cancel_on_disconnect",))
        out["cancel_jobs_on_disconnect"] = boolean(jobs["cancel_on_disconnect"], child(where, "cancel_on_disconnect"))
    return out


def parse_plan(path: str, item: tuple[str, Any]) -> Plan:
    plan_name, raw = item
    raw = mapping(raw, path, PLAN_FIELDS)
    budget = raw.get("budget")
    return Plan(
        name=name(plan_name, path),
        scope=parse_scope(raw, path),
        budget=Budget(**parse_budget_fields(budget, child(path, "budget"), ("credits",))) if budget else None,
        **parse_limits(raw, path),
    )


def parse_overrides(raw: Any, path: str) -> PlanPatch:
    raw = mapping(raw, path, PLAN_FIELDS)
    scoped = "models" in raw or "capabilities" in raw
    budget = parse_budget_fields(raw["budget"], child(path, "budget"), ()) if "budget" in raw else None
    return PlanPatch(scope=parse_scope(raw, path) if scoped else None, budget=budget, **parse_limits(raw, path))


def parse_price(path: str, raw: Any) -> Price:
    raw = mapping(raw, path, PRICE_FIELDS)
    return Price(**{k: number(v, child(path, k)) for k, v in raw.items()})


def parse_key(path: str, raw: Any) -> KeySpec:
    raw = mapping(raw, path, KEY_FIELDS, required=("id", "hash", "plan"))
    digest = raw["hash"]
    if not isinstance(digest, str) or not HASH_RE.match(digest):
        raise Invalid(
            child(path, "hash"),
            "is not sha256: followed by 64 lowercase hex digits",
            "store only the key's hash, e.g. sha256: + the output of `printf %s \"$KEY\" | sha256sum`",
        )
    account = raw.get("account")
    return KeySpec(
        id=name(raw["id"], child(path, "id")),
        hash=digest,
        plan=name(raw["plan"], child(path, "plan")),
        account=name(account, child(path, "account")) if account is not None else None,
        allow_direct=boolean(raw.get("allow_direct", True), child(path, "allow_direct")),
        disabled=boolean(raw.get("disabled", False), child(path, "disabled")),
        overrides=parse_overrides(raw.get("overrides"), child(path, "overrides")) if raw.get("overrides") else PlanPatch(),
    )


def parse_default(path: str, key: str, value: Any) -> Any:
    """One `defaults:` entry, typed."""
    if key == "hide_unauthorized_models":
        return boolean(value, path)
    if key == "unpriced":
        return choice(value, path, ("free", "deny"))
    if key == "max_output_tokens":
        return integer(value, path, minimum=1)
    return duration(value, path)  # max_seconds
