"""Providers calling back about jobs: `POST /v1/webhooks/replicate/{provider}`.

No gateway credential: the delivery's Standard Webhooks signature (the provider's `jobs.webhook_secret`) is the
credential, checked on the raw body before anything is parsed. The prediction it carries finds its job by the
prediction id (indexed in the job store at submit, so any replica takes the webhook) and advances it: a finished
prediction finishes the job at once (settled once, whichever of the webhook and the poller gets there first);
one still running updates its progress. The replica driving the job keeps polling as the fallback.
"""

from __future__ import annotations

import re
import time

from aiohttp import web

from ..errors import ApiError
from ..jobs.adapter import JobCallFailed
from ..jobs.replicate import job_result, status_of
from ..store.base import StoreError
from ..upstream.sse import json_object
from .body import read_raw
from .state import GATEWAY

_MAX_WEBHOOK_BYTES = 1024 * 1024  # a prediction object: its input, output URLs and the logs' tail
_PREDICTION_ID = re.compile(r"^[A-Za-z0-9_-]{1,100}$")


async def replicate_webhook(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    provider = request.match_info["provider"]
    verifier = gateway.webhooks.get(provider)
    if verifier is None or gateway.provider_kinds.get(provider) != "replicate":
        raise ApiError("not_found", f"no replicate provider {provider[:60]!r} takes webhooks here (set its "
                       "jobs.webhook_secret)")
    body = await read_raw(request, _MAX_WEBHOOK_BYTES)
    verifier.verify(request.headers, body, time.time())
    prediction = json_object(body)
    prediction_id = prediction.get("id") if prediction is not None else None
    if prediction is None or not isinstance(prediction_id, str) or not _PREDICTION_ID.match(prediction_id):
        raise ApiError("invalid_request", "the webhook's body must be a prediction object with its `id`")
    try:
        status = status_of(prediction, provider)
    except JobCallFailed as exc:
        raise ApiError("invalid_request", str(exc)) from None
    try:
        key = await gateway.jobs.store.linked(provider, prediction_id)
        if key is None:
            raise ApiError("not_found", f"no job of provider {provider!r} waits for prediction {prediction_id}")
        await gateway.jobs.advance(key, status, lambda job: job_result(prediction, job, provider))
    except StoreError:  # answered 503: the provider delivers the webhook again later
        raise ApiError("store_unavailable", "The job store is unavailable; try again shortly.",
                       headers={"Retry-After": "1"}) from None
    return web.json_response({"received": True})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/webhooks/replicate/{provider}", replicate_webhook)
