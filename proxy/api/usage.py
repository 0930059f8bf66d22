"""`GET /v1/usage`: the caller's own spend by day and model, from the usage ledger's daily aggregates
(docs/usage.md). A credential with a subject sees its own user's usage; any other, its account's.
`GET /v1/admin/usage?account=...`: any account's (or one of its users'), with the admin token only."""

from __future__ import annotations

import re
from datetime import date, datetime, timedelta, timezone
from typing import Any, Mapping

from aiohttp import web

from ..errors import ApiError
from ..meter import Meter, from_micro, usage_user
from ..store.ledger import METRICS
from .admin import admin_gateway
from .body import known_query
from .state import GATEWAY, authenticated

MAX_DAYS = 92  # one query reads one aggregate per day: a quarter at most
GROUPS = ("day", "model")
_PARAMS = frozenset({"from", "to", "group_by"})
_ADMIN_PARAMS = frozenset({"account", "user"})
MAX_ACCOUNT_CHARS = 256  # an account is a key's name or an identity provider's claim
MAX_USER_CHARS = 600  # a namespaced user: `u:i:<issuer>:<sub>`, percent-encoded
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


async def usage(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    principal = await authenticated(request)
    decision = gateway.policy.current.plan_decision(principal)
    if not decision.allowed:
        raise ApiError(decision.error_code or "forbidden", decision.error_message or "not allowed")
    first, last, group_by = usage_query(request.query, today=datetime.now(timezone.utc).date())
    user = usage_user(principal)
    report = await usage_report(gateway.meter, principal.account, user, first, last, group_by)
    return web.json_response({"scope": "user" if user else "account", **report})


async def admin_usage(request: web.Request) -> web.Response:
    """Any account's usage, or one of its users' (`user`: the namespaced form the ledger records)."""
    query = request.query
    gateway = await admin_gateway(request, "usage.read", query.get("account"))
    first, last, group_by = usage_query(query, today=datetime.now(timezone.utc).date(), extra=_ADMIN_PARAMS)
    account, user = query.get("account"), query.get("user")
    if account is None or not _printable(account, MAX_ACCOUNT_CHARS):
        raise ApiError("invalid_request", "account is required: the account's name", param="account")
    if user is not None and not _printable(user, MAX_USER_CHARS):
        raise ApiError("invalid_request", "user is the ledger's namespaced user, e.g. u:g:alice", param="user")
    report = await usage_report(gateway.meter, account, user, first, last, group_by)
    return web.json_response({"scope": "user" if user else "account", **report}, headers={"Cache-Control": "no-store"})


def usage_query(
    query: Mapping[str, str], *, today: date, extra: frozenset[str] = frozenset()
) -> tuple[date, date, tuple[str, ...]]:
    """`from`, `to` (YYYY-MM-DD, UTC days, inclusive; default: the first of `to`'s month and today) and `group_by`
    (`day`, `model`, both comma-separated, or empty for totals only; default both); `extra` parameters are the
    caller's to read. 400 `invalid_request` naming the parameter otherwise."""
    known_query(query, _PARAMS | extra)
    last = _day(query, "to") or today
    first = _day(query, "from") or last.replace(day=1)
    if first > last:
        raise ApiError("invalid_request", "from must not be after to", param="from")
    if (last - first).days >= MAX_DAYS:
        raise ApiError("invalid_request", f"a query covers at most {MAX_DAYS} days", param="from")
    raw = query.get("group_by", ",".join(GROUPS))
    group_by = tuple(part for part in raw.split(",") if part)
    if any(part not in GROUPS for part in group_by) or len(set(group_by)) != len(group_by):
        raise ApiError("invalid_request", "group_by is a comma-separated subset of day, model", param="group_by")
    return first, last, tuple(part for part in GROUPS if part in group_by)


async def usage_report(
    meter: Meter, account: str, user: str | None, first: date, last: date, group_by: tuple[str, ...]
) -> dict[str, Any]:
    """The stable JSON of a usage query: rows by the requested groups (ordered), and the total."""
    days = [first + timedelta(days=n) for n in range((last - first).days + 1)]
    rows: dict[tuple[str, ...], dict[str, int]] = {}
    total = dict.fromkeys(METRICS, 0)
    for day, totals in await meter.usage(account, user, days):
        for name, value in totals.items():
            metric, _, model = name.partition(":")
            if metric not in total:
                continue
            group = tuple(day.isoformat() if part == "day" else model for part in group_by)
            rows.setdefault(group, dict.fromkeys(METRICS, 0))[metric] += value
            total[metric] += value
    return {
        "account": account,
        "user": user,
        "from": first.isoformat(),
        "to": last.isoformat(),
        "group_by": list(group_by),
        "data": [{**dict(zip(group_by, group)), **_figures(figures)} for group, figures in sorted(rows.items())],
        "total": _figures(total),
    }


def _figures(figures: dict[str, int]) -> dict[str, Any]:
    """Integers as they are, except credits (micro-credits in the store) and seconds (ms in the store)."""
    return {
        "calls": figures["calls"],
        "credits": from_micro(figures["credits"]),
        "tokens_in": figures["tokens_in"],
        "tokens_out": figures["tokens_out"],
        "images": figures["images"],
        "seconds": figures["seconds_ms"] / 1000,
    }


def _printable(value: str, limit: int) -> bool:
    return 0 < len(value) <= limit and value.isprintable()


def _day(query: Mapping[str, str], name: str) -> date | None:
    value = query.get(name)
    if value is None:
        return None
    try:
        if not _DATE.match(value):
            raise ValueError(value)
        return date.fromisoformat(value)
    except ValueError:
        raise ApiError("invalid_request", f"{name} must be a date YYYY-MM-DD", param=name) from None


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/usage", usage)
    app.router.add_get("/v1/admin/usage", admin_usage)
