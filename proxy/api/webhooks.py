"""Providers calling back about jobs: `POST /v1/webhooks/{kind}/{provider}` (kinds.WEBHOOK_KINDS).

No gateway credential: the delivery's signature is the credential, checked on the raw body before anything is
parsed (Replicate: Standard Webhooks with `jobs.webhook_secret`; fal: ED25519 with its published keys). The
delivery names the provider's job (Replicate: the prediction `id`; fal: the `request_id`), which finds the
gateway's job (indexed in the job store at submit, so any replica takes the webhook) and advances it: a finished
run finishes the job at once (settled once, whichever of the webhook and the poller gets there first); one still
running updates its progress. The replica driving the job keeps polling as the fallback.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from aiohttp import web

from ..errors import ApiError
from ..jobs import fal, replicate
from ..jobs.adapter import JobCallFailed, JobRequest, JobResult, JobStatus
from ..store.base import StoreError
from ..upstream.sse import json_object
from .body import read_raw
from .jobs import job_store_unavailable
from .state import GATEWAY

_MAX_WEBHOOK_BYTES = 1024 * 1024  # a prediction object or a fal result: its input, output URLs and the logs' tail
_PROVIDER_JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,100}$")


@dataclass(frozen=True)
class Delivery:
    """What a webhook says: the provider's job id, its status, and (once completed) how to read its result."""

    provider_id: Any
    status: JobStatus
    result_of: Callable[[JobRequest], JobResult]


def _replicate(prediction: Mapping[str, Any], provider: str) -> Delivery:
    return Delivery(prediction.get("id"), replicate.status_of(prediction, provider),
                    lambda job: replicate.job_result(prediction, job, provider))


def _fal(delivery: Mapping[str, Any], provider: str) -> Delivery:
    payload = delivery.get("payload")
    return Delivery(delivery.get("request_id"), fal.webhook_status(delivery),
                    lambda job: fal.job_result(payload if isinstance(payload, dict) else {}, job, provider))


_DELIVERIES: dict[str, Callable[[Mapping[str, Any], str], Delivery]] = {"replicate": _replicate, "fal": _fal}


async def provider_webhook(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    kind, provider = request.match_info["kind"], request.match_info["provider"]
    verifier = gateway.webhooks.get(provider)
    if verifier is None or kind not in _DELIVERIES or gateway.provider_kinds.get(provider) != kind:
        raise ApiError("not_found", f"no {kind[:20]} provider {provider[:60]!r} takes webhooks here (set its "
                       "jobs.webhook_secret or jobs.webhooks)")
    body = await read_raw(request, _MAX_WEBHOOK_BYTES)
    await verifier.verify(request.headers, body, time.time())
    parsed = json_object(body)
    try:
        delivery = _DELIVERIES[kind](parsed, provider) if parsed is not None else None
    except JobCallFailed as exc:
        raise ApiError("invalid_request", str(exc)) from None
    if delivery is None or not isinstance(delivery.provider_id, str) or not _PROVIDER_JOB_ID.match(delivery.provider_id):
        raise ApiError("invalid_request", "the webhook's body must be the provider's job object with its id")
    try:
        key = await gateway.jobs.store.linked(provider, delivery.provider_id)
        if key is None:
            raise ApiError("not_found", f"no job of provider {provider!r} waits for {delivery.provider_id}")
        await gateway.jobs.advance(key, delivery.status, delivery.result_of)
    except StoreError:  # answered 503: the provider delivers the webhook again later
        raise job_store_unavailable() from None
    return web.json_response({"received": True})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/webhooks/{kind}/{provider}", provider_webhook)
