"""Replicate's predictions API (https://api.replicate.com/v1), as a JobAdapter.

- submit: `POST {base}/models/{owner}/{name}/predictions` for an official model (`upstream_model: owner/name`),
  or `POST {base}/predictions` with `{"version"}` (`owner/name:<version>` or a bare version id); the body carries
  `input`, and with webhooks on, `webhook` + `webhook_events_filter`. Answer 201: a prediction
  `{"id", "status": "starting", "urls": {...}, ...}`.
- status: `GET {base}/predictions/{id}` → the prediction: `status` starting | processing | succeeded | failed |
  canceled | aborted, `output` (a URL or a list of URLs once succeeded), `error`, `logs` (progress parsed from
  their last `NN%`), `metrics.predict_time`.
- cancel: `POST {base}/predictions/{id}/cancel` → 200 the prediction.
- auth: `Authorization: Bearer <token>`; errors are problem+json `{"title", "detail", "status"}`.

The later URLs are built from the configured base URL and the prediction id, never from the answer's `urls`, so
a handle can never send the provider token anywhere else. A webhook (proxy/api/webhooks.py) carries the same
prediction object: `status_of` and `job_result` read both.
"""

from __future__ import annotations

import re
from typing import Any, Mapping
from urllib.parse import quote

from .adapter import (
    PROVIDER_ID, Handle, JobCallFailed, JobRequest, JobResult, JobStatus, JobUnits, provider_names,
)
from .http import ProviderCalls, model_path
from .kinds import VIDEO_CAPABILITIES, webhook_path

_PHASES = {"starting": "queued", "processing": "running", "succeeded": "completed"}
_FAILED = frozenset({"failed", "canceled", "aborted"})
_VERSION = re.compile(r"^[0-9a-f]{64}$")
_PERCENT = re.compile(r"(\d{1,3})%")
_LOG_TAIL = 2000  # progress is in the last lines of the logs
WEBHOOK_EVENTS = ("start", "completed")


def credential_headers(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def replicate_input(request: JobRequest) -> dict[str, Any]:
    """The gateway's inputs in the names most Replicate models use: `n` → `num_outputs`, `image_url` → `image`."""
    return provider_names(request.inputs, {"n": "num_outputs", "image_url": "image"})


class ReplicateAdapter(ProviderCalls):
    """Replicate's predictions; `webhooks`: ask Replicate to call the gateway back (its signing secret is set)."""

    async def submit(self, request: JobRequest) -> Handle:
        model = request.upstream_model.strip("/")
        body: dict[str, Any] = {"input": replicate_input(request)}
        owner_name, _, version = model.rpartition(":") if ":" in model else (model, "", "")
        if version or _VERSION.match(owner_name):
            body["version"] = version or owner_name
            url = f"{self._base}/predictions"
        else:
            url = f"{self._base}/models/{model_path(owner_name)}/predictions"
        if self._webhooks and request.public_url:
            body["webhook"] = request.public_url.rstrip("/") + webhook_path("replicate", self._name)
            body["webhook_events_filter"] = list(WEBHOOK_EVENTS)
        answer = await self._call("POST", url, body)
        prediction_id = answer.get("id")
        if not isinstance(prediction_id, str) or not prediction_id:
            raise JobCallFailed(f"{self._name} created the prediction without an id", retryable=False)
        return {PROVIDER_ID: prediction_id}

    async def status(self, handle: Handle) -> JobStatus:
        return status_of(await self._call("GET", self._prediction(handle)), self._name)

    async def result(self, handle: Handle, request: JobRequest) -> JobResult:
        return job_result(await self._call("GET", self._prediction(handle)), request, self._name)

    async def cancel(self, handle: Handle) -> None:
        await self._call("POST", f"{self._prediction(handle)}/cancel")

    def _prediction(self, handle: Handle) -> str:
        return f"{self._base}/predictions/{quote(handle[PROVIDER_ID], safe='')}"


def status_of(prediction: Mapping[str, Any], provider: str) -> JobStatus:
    """A prediction as a JobStatus: starting → queued, processing → running (progress from the logs' last
    percentage), succeeded → completed; failed, canceled and aborted → failed with the prediction's `error`."""
    status = prediction.get("status")
    if status in _FAILED:
        return JobStatus("failed", error=f"{status}: {str(prediction.get('error') or 'no reason given')[:300]}")
    phase = _PHASES.get(status) if isinstance(status, str) else None
    if phase is None:
        raise JobCallFailed(f"{provider} answered an unknown prediction status {str(status)[:40]!r}", retryable=True)
    return JobStatus(phase, progress=_progress(prediction.get("logs")) if phase == "running" else None)


def job_result(prediction: Mapping[str, Any], request: JobRequest, provider: str) -> JobResult:
    """A succeeded prediction's output as the gateway's: `{"url", "urls"}` for images (units: how many), `{"url"}`
    for a video (units: the requested duration; Replicate reports no length)."""
    output = prediction.get("output")
    urls = [output] if isinstance(output, str) else [u for u in output or () if isinstance(u, str)] \
        if isinstance(output, list) else []
    urls = [url for url in urls if url.startswith(("https://", "http://"))]
    if not urls:
        raise JobCallFailed(f"{provider}'s prediction has no output URL", retryable=False)
    if request.capability in VIDEO_CAPABILITIES:
        duration = request.inputs.get("duration")
        seconds = float(duration) if isinstance(duration, (int, float)) and not isinstance(duration, bool) else 0.0
        return JobResult({"url": urls[0]}, JobUnits(seconds=max(seconds, 0.0)))
    return JobResult({"url": urls[0], "urls": urls}, JobUnits(images=len(urls)))


def _progress(logs: Any) -> float | None:
    """The last percentage in the logs (a model's progress bar: `50%|█████     | 25/50`), as 0..1."""
    if not isinstance(logs, str):
        return None
    found = _PERCENT.findall(logs[-_LOG_TAIL:])
    return min(int(found[-1]), 100) / 100 if found else None
