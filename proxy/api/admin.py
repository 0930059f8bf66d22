"""`/v1/admin/*`: manage API keys kept in the store and accounts' credits, with the admin token only.

Every call is audited: its access-log line carries `admin_action`, `admin_target` and `admin_reason`.
Keys declared in policy files are listed but never changed here (they change through the files).
"""

from __future__ import annotations

import secrets
import time
from dataclasses import replace
from typing import Any, Callable

from aiohttp import web

from ..auth.api_keys import ApiKey, generate_key, hash_key
from ..context import CONTEXT, AdminAudit
from ..errors import ApiError
from ..gateway import Gateway
from ..meter import to_micro
from ..policy.managed import key_spec
from ..policy.schema import MAX_BUDGET_CREDITS, NAME_RE, PERIODS, Invalid
from ..policy.types import Period
from ..store.base import StoreError
from ..store.keys import KeyDirectory, StoredKey
from .body import known_query, read_json_object
from .state import GATEWAY, authorization_header

MAX_BODY_BYTES = 64 * 1024
MAX_REASON_CHARS = 500
DEFAULT_PAGE = 100  # keys per page of GET /v1/admin/keys
MAX_PAGE = 1000
_EDITS_TRIED = 3  # compare-and-set attempts before answering edit_conflict
CREATE_FIELDS = frozenset({"id", "plan", "account", "allow_direct", "overrides", "reason"})
SET_FIELDS = frozenset({"plan", "account", "allow_direct", "overrides", "reason"})
_NO_STORE = {"Cache-Control": "no-store"}


async def admin_gateway(request: web.Request, action: str, target: str | None = None) -> Gateway:
    """The gateway, once the caller proved to hold the admin token; the call is noted for the access log."""
    gateway = request.app[GATEWAY]
    request[CONTEXT].admin = AdminAudit(action, target)
    if not gateway.admin.enabled:
        raise ApiError("admin_api_disabled", "the admin API is off: configure admin.token_env, token_file or token_sha256")
    ctx = request[CONTEXT]
    ctx.admin = replace(ctx.admin, actor=gateway.admin.check(authorization_header(request)))  # type: ignore[arg-type]
    return gateway


async def admin_body(request: web.Request, allowed: frozenset[str]) -> dict[str, Any]:
    """The JSON body with only `allowed` fields; its `reason` goes to the audit line."""
    body = await read_json_object(request, MAX_BODY_BYTES) if request.body_exists else {}
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ApiError("invalid_request", f"unknown field {unknown[0]!r}; allowed: {', '.join(sorted(allowed))}",
                       param=unknown[0])
    reason = body.get("reason")
    if reason is not None and (not isinstance(reason, str) or not reason.isprintable() or len(reason) > MAX_REASON_CHARS):
        raise ApiError("invalid_request", f"reason must be a printable string of at most {MAX_REASON_CHARS} characters",
                       param="reason")
    ctx = request[CONTEXT]
    if ctx.admin is not None:
        ctx.admin = replace(ctx.admin, reason=reason)
    return body


async def create_key(request: web.Request) -> web.Response:
    """`POST /v1/admin/keys` -> 201 with the key and its secret, shown this once."""
    gateway = await admin_gateway(request, "key.create")
    body = await admin_body(request, CREATE_FIELDS)
    key_id = body.get("id", "key_" + secrets.token_hex(8))
    if not isinstance(key_id, str) or not NAME_RE.match(key_id):
        raise ApiError("invalid_request", "id must be 1-128 letters, digits and . _ : @ - (starting with a letter or "
                       "digit)", param="id")
    request[CONTEXT].admin = replace(request[CONTEXT].admin, target=key_id)  # type: ignore[arg-type]
    if gateway.policy.files.key(key_id) is not None:
        raise _declared_in_files(key_id, "key_exists")
    secret = generate_key()
    now = int(time.time())
    fields = {name: body[name] for name in ("plan", "account", "allow_direct", "overrides") if name in body}
    if "plan" not in fields:
        raise ApiError("invalid_request", "plan is required: the name of a plan of the policy files", param="plan")
    record = _checked(gateway, StoredKey(id=key_id, hash=hash_key(secret), created_at=now, updated_at=now,
                                         **{"overrides": {}, **fields}))
    if not await _directory(gateway).put(record, None):
        raise ApiError("key_exists", f"a key with id {key_id!r} already exists; choose another id", id=key_id)
    await gateway.managed_keys.refresh()
    return web.json_response({"key": _stored_view(gateway, record), "secret": secret}, status=201, headers=_NO_STORE)


async def list_keys(request: web.Request) -> web.Response:
    """`GET /v1/admin/keys?limit=&cursor=`: a page of the keys, stored ones by id, then those declared in files by
    id; never a secret. `next_cursor` continues after the page's last key (null: this was the last page)."""
    gateway = await admin_gateway(request, "key.list")
    known_query(request.query, frozenset({"limit", "cursor"}))
    limit = _page_limit(request.query.get("limit"))
    after = _cursor(request.query.get("cursor"))
    _, stored = await _read(_directory(gateway).records())
    declared = gateway.policy.files.key_records
    places = [*(("store", key_id) for key_id in stored), *(("policy", key_id) for key_id in declared)]
    following = sorted((place for place in places if after is None or _rank(place) > _rank(after)), key=_rank)
    page = following[:limit]
    keys = [_stored_view(gateway, stored[key_id]) if source == "store" else _file_view(declared[key_id])
            for source, key_id in page]
    more = len(following) > limit
    return web.json_response({"keys": keys, "next_cursor": ":".join(page[-1]) if more else None})


def _rank(place: tuple[str, str]) -> tuple[int, str]:
    """A key's place in the listing: stored keys, then the files' keys, each by id."""
    return (0 if place[0] == "store" else 1, place[1])


def _page_limit(given: str | None) -> int:
    if given is None:
        return DEFAULT_PAGE
    # The length first: int() refuses a string of more than 4,300 digits with a ValueError (a 500 here).
    if len(given) > len(str(MAX_PAGE)) or not given.isascii() or not given.isdigit() or not 1 <= int(given) <= MAX_PAGE:
        raise ApiError("invalid_request", f"limit must be a whole number from 1 to {MAX_PAGE}", param="limit")
    return int(given)


def _cursor(given: str | None) -> tuple[str, str] | None:
    """The `next_cursor` of a previous page: `store:<id>` or `policy:<id>` (the page's last key)."""
    if given is None:
        return None
    source, _, key_id = given.partition(":")
    if source not in ("store", "policy") or not NAME_RE.match(key_id):
        raise ApiError("invalid_request", "cursor must be the next_cursor of a previous page", param="cursor")
    return source, key_id


async def get_key(request: web.Request) -> web.Response:
    """`GET /v1/admin/keys/{id}`."""
    key_id = request.match_info["key_id"]
    gateway = await admin_gateway(request, "key.get", key_id)
    declared = gateway.policy.files.key(key_id)
    if declared is not None:
        return web.json_response({"key": _file_view(declared)})
    return web.json_response({"key": _stored_view(gateway, await _stored(gateway, key_id))})


async def disable_key(request: web.Request) -> web.Response:
    """`POST /v1/admin/keys/{id}/disable`: the key and every token minted from it stop working."""
    return await _edit(request, "key.disable", frozenset({"reason"}), lambda record, _: replace(record, disabled=True))


async def enable_key(request: web.Request) -> web.Response:
    """`POST /v1/admin/keys/{id}/enable`."""
    return await _edit(request, "key.enable", frozenset({"reason"}), lambda record, _: replace(record, disabled=False))


async def set_key(request: web.Request) -> web.Response:
    """`PATCH /v1/admin/keys/{id}`: plan, account, allow_direct, overrides (null or {} clears them)."""

    def change(record: StoredKey, body: dict[str, Any]) -> StoredKey:
        fields = {name: body[name] for name in ("plan", "account", "allow_direct", "overrides") if name in body}
        if fields.get("overrides", {}) is None:
            fields["overrides"] = {}
        return replace(record, **fields)

    return await _edit(request, "key.set", SET_FIELDS, change)


async def rotate_key(request: web.Request) -> web.Response:
    """`POST /v1/admin/keys/{id}/rotate`: a new secret, shown once; the old one and its tokens stop at once."""
    secret = generate_key()
    return await _edit(request, "key.rotate", frozenset({"reason"}),
                       lambda record, _: replace(record, hash=hash_key(secret)), secret=secret)


async def _edit(
    request: web.Request,
    action: str,
    allowed: frozenset[str],
    change: Callable[[StoredKey, dict[str, Any]], StoredKey],
    secret: str | None = None,
) -> web.Response:
    """Apply `change` to a stored key by compare-and-set (retried when another admin changed it meanwhile)."""
    key_id = request.match_info["key_id"]
    gateway = await admin_gateway(request, action, key_id)
    body = await admin_body(request, allowed)
    if gateway.policy.files.key(key_id) is not None:
        raise _declared_in_files(key_id, "key_managed_by_policy")
    directory = _directory(gateway)
    for _ in range(_EDITS_TRIED):
        current = await _stored(gateway, key_id)
        record = _checked(gateway, replace(change(current, body), updated_at=int(time.time())))
        if await _read(directory.put(record, current)):
            await gateway.managed_keys.refresh()
            answer: dict[str, Any] = {"key": _stored_view(gateway, record)}
            if secret is not None:
                answer["secret"] = secret
            return web.json_response(answer, headers=_NO_STORE)
    raise ApiError("edit_conflict", f"key {key_id!r} kept changing under this call; retry", id=key_id)


async def adjust_credits(request: web.Request) -> web.Response:
    """`POST /v1/admin/accounts/{account}/credits` `{"credits", "reason", "period"?}`: a top-up (positive) or a
    charge (negative) of the account's budget in its current period, in one atomic store step."""
    account = request.match_info["account"]
    gateway = await admin_gateway(request, "credits.adjust", account)
    body = await admin_body(request, frozenset({"credits", "reason", "period"}))
    credits = body.get("credits")
    # An amount below one micro-credit (the store's unit) would change nothing: refused rather than echoed as done.
    if isinstance(credits, bool) or not isinstance(credits, (int, float)) or to_micro(abs(credits)) == 0 \
            or abs(credits) > MAX_BUDGET_CREDITS:
        raise ApiError("invalid_request", f"credits must be a number of at least 0.000001 in size, within "
                       f"±{MAX_BUDGET_CREDITS}", param="credits")
    if not body.get("reason"):
        raise ApiError("invalid_request", "reason is required: say why the balance changes", param="reason")
    if not NAME_RE.match(account):
        raise ApiError("invalid_request", "the account is not a valid name", param="account")
    period = _budget_period(gateway, account, body.get("period"))
    ctx = request[CONTEXT]
    assert ctx.admin is not None and ctx.admin.actor is not None  # set by admin_gateway
    spent = await gateway.meter.adjust_credits(account, period, credits, request_id=ctx.request_id,
                                               reason=body["reason"], actor=ctx.admin.actor)
    return web.json_response({"account": account, "period": period, "credits": credits, "spent": spent})


def _budget_period(gateway: Gateway, account: str, given: object) -> Period:
    """The period of the account's budget: given, or the one budget its keys share (scope account)."""
    if given is not None:
        if given not in PERIODS:
            raise ApiError("invalid_request", f"period must be one of {', '.join(PERIODS)}", param="period")
        return given  # type: ignore[return-value]
    policy = gateway.policy.current
    periods = sorted({
        plan.budget.period for key_id, plan in policy.key_plans.items()
        if plan.budget is not None and plan.budget.scope == "account"
        and policy.key_records[key_id].billing_account == account
    })
    if len(periods) != 1:
        found = f"budgets of periods {', '.join(periods)}" if periods else "no account budget"
        raise ApiError("invalid_request", f"the keys billed to account {account!r} have {found}; give period",
                       param="period")
    return periods[0]  # type: ignore[return-value]


def _checked(gateway: Gateway, record: StoredKey) -> StoredKey:
    """The record if a policy file could declare it with the current plans and models; else 400 naming the field."""
    if not isinstance(record.overrides, dict):
        raise ApiError("invalid_request", "overrides must be an object (the fields of a plan) or null",
                       param="overrides")
    try:
        spec = key_spec(record, tuple(gateway.models.values()))
    except Invalid as exc:
        raise ApiError("invalid_request", str(exc), param=exc.path.split(".")[0].split("[")[0] or None) from None
    _, problems = gateway.policy.files.with_keys([spec])
    if problems:
        raise ApiError("invalid_request", problems[record.id], param="plan")
    return record


async def _stored(gateway: Gateway, key_id: str) -> StoredKey:
    record = await _read(_directory(gateway).get(key_id))
    if record is None:
        raise ApiError("key_not_found", f"no key with id {key_id!r}", id=key_id)
    return record


def _directory(gateway: Gateway) -> KeyDirectory:
    return gateway.managed_keys.directory


async def _read(awaitable: Any) -> Any:
    """A store call; its failure is a 503, never a traceback."""
    try:
        return await awaitable
    except StoreError:
        raise ApiError("store_unavailable", "the key store is unavailable; retry shortly",
                       headers={"Retry-After": "1"}) from None


def _declared_in_files(key_id: str, code: str) -> ApiError:
    return ApiError(code, f"key {key_id!r} is declared in the policy files; change it there (or choose another id)",
                    id=key_id, source="policy")


def _stored_view(gateway: Gateway, record: StoredKey) -> dict[str, Any]:
    problem = gateway.policy.managed_problems.get(record.id)
    return {
        "id": record.id, "source": "store", "plan": record.plan, "account": record.account,
        "billing_account": record.account or record.id, "allow_direct": record.allow_direct,
        "disabled": record.disabled, "overrides": dict(record.overrides),
        "created_at": record.created_at, "updated_at": record.updated_at,
        "in_effect": problem is None and not record.disabled, "problem": problem,
    }


def _file_view(key: ApiKey) -> dict[str, Any]:
    return {
        "id": key.id, "source": "policy", "plan": key.plan, "account": key.account,
        "billing_account": key.billing_account, "allow_direct": key.allow_direct, "disabled": key.disabled,
        "in_effect": not key.disabled,
    }


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/admin/keys", create_key)
    app.router.add_get("/v1/admin/keys", list_keys)
    app.router.add_get("/v1/admin/keys/{key_id}", get_key)
    app.router.add_patch("/v1/admin/keys/{key_id}", set_key)
    app.router.add_post("/v1/admin/keys/{key_id}/disable", disable_key)
    app.router.add_post("/v1/admin/keys/{key_id}/enable", enable_key)
    app.router.add_post("/v1/admin/keys/{key_id}/rotate", rotate_key)
    app.router.add_post("/v1/admin/accounts/{account}/credits", adjust_credits)
