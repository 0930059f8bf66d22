"""Job models on `POST /v1/responses` (video, queued images), and `GET /v1/responses/{request_id}`.

A submit is admitted like any call (its hold covers the most the job can cost), stored as a job, and driven in
the background by the replica holding its lease (proxy/jobs/runner.py), so the job outlives the connection:
- streamed: `generation.status` as it moves (phase, progress, queue position), then `generation.completed` or
  `generation.failed`; a stream still open after `jobs.detach_after_s` ends with `generation.detached`;
- `Prefer: respond-async`: `202 {"request_id", "status": "working", "poll_after_ms"}` at once;
- `GET /v1/responses/{request_id}` by the same principal: `working`, `completed` (with the output) or `failed`.
An `Idempotency-Key` makes a retried submit (same caller, same body) answer for the job the first one made.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import re
import secrets
import time
from contextlib import aclosing
from typing import Any

from aiohttp import web

from ..auth.principal import Principal
from ..catalog import Model
from ..context import CONTEXT
from ..errors import ApiError
from ..jobs.billing import encode_price, encode_reservation
from ..jobs.demo import DEMO_FILES_ROUTE
from ..jobs.image_sizes import requested_megapixels
from ..jobs.store import JobRecord
from ..meter import user_id
from ..policy.types import RequestFacts
from ..store.base import StoreError
from ..upstream.demo import demo_file
from ..upstream.relay import RelayOutcome
from .events import EventStream
from .inputs import checked_inputs
from .metered import authorize_and_admit
from .schema import INPUTS
from .state import GATEWAY, authenticated
from .uploads import public_base

_REQUEST_ID = re.compile(r"^req_[0-9a-f]{24}$")
_IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")  # visible ASCII, as the IETF draft's examples use
_MAX_PREFER = 1024


def new_request_id() -> str:
    """A job's id: minted here, never the client's X-Request-Id, so two submits can never share one."""
    return "req_" + secrets.token_hex(12)


def prefers_async(request: web.Request) -> bool:
    """`Prefer: respond-async` (RFC 7240) among the preferences; others are ignored, as the RFC says."""
    values = request.headers.getall("Prefer", [])
    text = ",".join(values)
    if len(text) > _MAX_PREFER or any(not 0x20 <= ord(ch) <= 0x7e for ch in text):
        raise ApiError("invalid_request", f"the Prefer header must be at most {_MAX_PREFER} printable ASCII "
                       "characters, e.g. `Prefer: respond-async`", param="Prefer")
    tokens = (part.split(";", 1)[0].split("=", 1)[0].strip().lower() for part in text.split(","))
    return "respond-async" in tokens


def idempotency_key(request: web.Request) -> str | None:
    values = request.headers.getall("Idempotency-Key", [])
    if not values:
        return None
    if len(values) > 1 or not _IDEMPOTENCY_KEY.match(values[0]):
        raise ApiError("invalid_request", "send one Idempotency-Key of 1 to 255 visible ASCII characters (e.g. a "
                       "UUID)", param="Idempotency-Key")
    return values[0]


def job_key(request: web.Request, account: str, request_id: str) -> str:
    return f"{request.app[GATEWAY].meter.account_prefix(account)}:job:{request_id}"


def _idempotency_store_key(request: web.Request, principal: Principal, key: str) -> str:
    """Per caller (account and user): another caller's key never names this caller's job. Hashed: bounded size."""
    digest = hashlib.sha256(f"{user_id(principal)}\0{key}".encode()).hexdigest()
    return f"{request.app[GATEWAY].meter.account_prefix(principal.account)}:idem:{digest}"


def _job_facts(capability: str, inputs: dict[str, Any], input_bytes: int) -> RequestFacts:
    """A job's bounds: its images (`n`) and their megapixels at the requested size, and, for a video, its
    `duration` (else the plan's max_seconds)."""
    duration = inputs.get("duration")
    return RequestFacts(input_bytes=input_bytes, images=inputs.get("n", 1),
                        seconds=float(duration) if isinstance(duration, int) else None,
                        megapixels=requested_megapixels(capability, inputs))


async def generate_job(request: web.Request, principal: Principal, model: Model, body: dict[str, Any]) -> web.StreamResponse:
    """Submit (or, with a known Idempotency-Key, find) the job, then answer 202 or stream it."""
    gateway, ctx = request.app[GATEWAY], request[CONTEXT]
    inputs = checked_inputs({k: v for k, v in body.items() if k != "model"}, INPUTS[model.capability])
    respond_async, given_key = prefers_async(request), idempotency_key(request)
    idem_key = _idempotency_store_key(request, principal, given_key) if given_key else None
    body_hash = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    if idem_key is not None:
        found = await _stored(gateway.jobs.store.find_idempotent(idem_key))
        if found is not None:
            return await _answer_existing(request, principal, found, body_hash, respond_async)
    ctx.request_id = new_request_id()
    facts = _job_facts(model.capability, inputs, len(await request.read()))
    decision, admission = await authorize_and_admit(gateway, ctx, principal, model, facts)
    deployment = model.served_by()[0]
    record = JobRecord(
        key=job_key(request, principal.account, ctx.request_id), id=ctx.request_id, account=principal.account,
        user=user_id(principal), model=model.id, capability=model.capability, provider=deployment.provider,
        deployment=deployment.name, upstream_model=deployment.upstream_model, inputs=json.dumps(inputs),
        public_url=public_base(request).rstrip("/"), reservation=encode_reservation(admission.reservation),
        price=encode_price(decision.price), reserve=decision.reserve_credits, bound_seconds=decision.bound.seconds,
        bound_megapixels=decision.bound.megapixels,
        body_hash=body_hash, cancel_on_disconnect=decision.cancel_jobs_on_disconnect,
    )
    try:
        created = await gateway.jobs.create(record, idem_key)
    except StoreError:
        await admission.release()
        raise job_store_unavailable() from None
    if not created.created:  # a retry with the same key won the race: answer for its job, hold nothing
        await admission.release()
        return await _answer_existing(
            request, principal, (created.existing_id, created.existing_hash), body_hash, respond_async)
    gateway.jobs.run(record.key)
    if respond_async:
        return _accepted(request, record.id, admission.headers)
    return await _stream(request, record.key, record.id, admission.headers, record.cancel_on_disconnect)


async def _answer_existing(
    request: web.Request, principal: Principal, found: tuple[str, str], body_hash: str, respond_async: bool,
) -> web.StreamResponse:
    job_id, stored_hash = found
    if stored_hash != body_hash:
        raise ApiError("idempotency_key_reused", "this Idempotency-Key was used with a different request body; use "
                       "a new key for a new request", param="Idempotency-Key")
    request[CONTEXT].request_id = job_id
    if respond_async:
        return _accepted(request, job_id, {})
    return await _stream(request, job_key(request, principal.account, job_id), job_id, {}, False)


def _accepted(request: web.Request, job_id: str, headers: dict[str, str]) -> web.Response:
    poll_after_ms = request.app[GATEWAY].config.jobs.poll_after_ms
    return web.json_response(
        {"request_id": job_id, "status": "working", "poll_after_ms": poll_after_ms}, status=202,
        headers={**headers, "Location": f"/v1/responses/{job_id}", "Preference-Applied": "respond-async",
                 "Retry-After": str(math.ceil(poll_after_ms / 1000))},
    )


async def _stream(
    request: web.Request, key: str, job_id: str, headers: dict[str, str], cancel_on_disconnect: bool,
) -> web.StreamResponse:
    """The job's events until it ends, or `generation.detached` once the stream was open `detach_after_s`."""
    gateway = request.app[GATEWAY]
    events = await EventStream.open(request, headers, RelayOutcome(), job_id)
    last: JobRecord | None = None
    sent: tuple[str, dict[str, Any]] | None = None
    keepalive_s, written = gateway.config.server.sse_keepalive_s, time.monotonic()
    try:
        until = time.monotonic() + gateway.config.jobs.detach_after_s
        async with aclosing(gateway.jobs.watch(key, until)) as changes:
            async for last in changes:
                event = _event(last)
                if event != sent:  # else nothing the client can see changed (e.g. the provider's handle stored)
                    await events.send(*event)
                    sent, written = event, time.monotonic()
                elif keepalive_s and time.monotonic() - written >= keepalive_s:
                    await events.ping()
                    written = time.monotonic()
    except asyncio.CancelledError:
        if cancel_on_disconnect:
            await asyncio.shield(gateway.jobs.cancel(key))
        raise
    except StoreError:
        last = None  # the store went away mid-stream: the client polls, like after a detach
    if last is None or last.state == "working":
        await events.send("generation.detached", {"poll_after_ms": gateway.config.jobs.poll_after_ms})
    await events.response.write_eof()
    return events.response


def _event(record: JobRecord) -> tuple[str, dict[str, Any]]:
    if record.state == "completed":
        return "generation.completed", {"output": json.loads(record.output)}
    if record.state == "failed":
        return "generation.failed", {"error": json.loads(record.error)}
    return "generation.status", _progress(record)


def _progress(record: JobRecord) -> dict[str, Any]:
    return {"status": record.phase,
            **({"progress": record.progress} if record.progress >= 0 else {}),
            **({"queue_position": record.queue_position} if record.queue_position >= 0 else {})}


async def poll_job(request: web.Request) -> web.Response:
    """`GET /v1/responses/{request_id}`: the job of this very principal (any other caller gets 404)."""
    principal = await authenticated(request)
    job_id = request.match_info["request_id"]
    if not _REQUEST_ID.match(job_id):
        raise ApiError("invalid_request", "request_id must look like req_ followed by 24 hex digits, as "
                       "POST /v1/responses answered it", param="request_id")
    record = await _stored(request.app[GATEWAY].jobs.store.get(job_key(request, principal.account, job_id)))
    if record is None or record.user != user_id(principal):
        raise ApiError("not_found", "no such request for this caller; results are kept for jobs.record_ttl_s "
                       "after the submit")
    return web.json_response(job_view(record, request.app[GATEWAY].config.jobs.poll_after_ms))


def job_view(record: JobRecord, poll_after_ms: int) -> dict[str, Any]:
    view: dict[str, Any] = {"request_id": record.id, "model": record.model, "status": record.state,
                            "created_at": record.created_ms // 1000}
    if record.state == "working":
        view.update(_progress(record), status="working", phase=record.phase, poll_after_ms=poll_after_ms)
    elif record.state == "completed":
        view["output"] = json.loads(record.output)
    else:
        view["error"] = json.loads(record.error)
    return view


async def serve_demo_file(request: web.Request) -> web.Response:
    """The demo provider's outputs, on the gateway's public URL (its upstream listens on loopback only)."""
    demo = any(p.kind == "demo" for p in request.app[GATEWAY].config.providers.values())
    found = demo_file(request.match_info["name"]) if demo else None
    if found is None:
        raise ApiError("not_found", "no such demo file")
    return web.Response(body=found[0], content_type=found[1], headers={"Cache-Control": "public, max-age=3600"})


async def _stored(awaitable: Any) -> Any:
    try:
        return await awaitable
    except StoreError:
        raise job_store_unavailable() from None


def job_store_unavailable() -> ApiError:
    """503 for a job store that failed: the client (or the provider, for a webhook) tries again shortly."""
    return ApiError("store_unavailable", "The job store is unavailable; try again shortly.",
                    headers={"Retry-After": "1"})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/responses/{request_id}", poll_job)
    app.router.add_get(DEMO_FILES_ROUTE + "/{name}", serve_demo_file)
