"""fal.ai's queue API (https://queue.fal.run), as a JobAdapter.

- submit: `POST {base}/{model_id}` with the model's input → `{"request_id", "status_url", "response_url",
  "cancel_url"}`; a model id may carry a subpath (`fal-ai/flux/dev`), which the later calls leave out: they go to
  the app (`owner/name`).
- status: `GET {base}/{app}/requests/{id}/status?logs=1` → `{"status": "IN_QUEUE", "queue_position"}`,
  `IN_PROGRESS` (with `logs`), `COMPLETED` (with `error` when the run failed).
- result: `GET {base}/{app}/requests/{id}` → the model's output (`images: [{url, width, height}]`,
  `video: {url}`); an error status with `{"detail"}` when the run failed.
- cancel: `PUT {base}/{app}/requests/{id}/cancel` → 202 `CANCELLATION_REQUESTED` or 400 `ALREADY_COMPLETED`.
- auth: `Authorization: Key <key>`.
- webhooks (`jobs.webhooks`): the submit carries `?fal_webhook=<gateway URL>`; fal POSTs `{"request_id",
  "gateway_request_id", "status": "OK"|"ERROR", "payload", "error"}` there when the run ends, signed with
  ED25519 (proxy/jobs/webhooks.py); `payload` is the result call's answer, so `job_result` reads both.

The later URLs are built from the configured base URL and the request id, never taken from an answer, so a
handle can never send the provider credential anywhere else.
"""

from __future__ import annotations

from typing import Any, Mapping
from urllib.parse import quote, urlencode

from .adapter import (
    PROVIDER_ID, Handle, JobCallFailed, JobRequest, JobResult, JobStatus, JobUnits, provider_names,
)
from .http import ProviderCalls, message, model_path
from .image_sizes import SIZED_CAPABILITIES, image_size
from .kinds import webhook_path

_PHASES = {"IN_QUEUE": "queued", "IN_PROGRESS": "running", "COMPLETED": "completed"}
_FAILED = frozenset({"FAILED", "CANCELED", "CANCELLED"})


def credential_headers(key: str) -> dict[str, str]:
    return {"Authorization": f"Key {key}"}


def fal_input(request: JobRequest) -> dict[str, Any]:
    """The gateway's inputs in fal's names: `n` → `num_images`, an image model's `aspect_ratio` → `image_size`."""
    inputs = provider_names(request.inputs, {"n": "num_images"})
    if request.capability in SIZED_CAPABILITIES and "aspect_ratio" in inputs:
        inputs["image_size"] = image_size(inputs.pop("aspect_ratio")).preset
    return inputs


class FalAdapter(ProviderCalls):
    """fal.ai's queue."""

    async def submit(self, request: JobRequest) -> Handle:
        model = request.upstream_model.strip("/")
        url = f"{self._base}/{model_path(model)}"
        if self._webhooks and request.public_url:
            url += "?" + urlencode({"fal_webhook": request.public_url.rstrip("/") + webhook_path("fal", self._name)})
        answer = await self._call("POST", url, fal_input(request))
        request_id = answer.get("request_id")
        if not isinstance(request_id, str) or not request_id:
            raise JobCallFailed(f"{self._name} queued the job without a request_id", retryable=False)
        handle = {"request_id": request_id, "app": "/".join(model.split("/")[:2])}
        return {**handle, PROVIDER_ID: request_id} if self._webhooks else handle  # indexed for the webhook

    async def status(self, handle: Handle) -> JobStatus:
        return status_of(await self.status_answer(handle), self._name)

    async def status_answer(self, handle: Handle) -> dict[str, Any]:
        """The status call's answer as fal sent it."""
        return await self._call("GET", f"{self._requests(handle)}/status?logs=1")

    async def result(self, handle: Handle, request: JobRequest) -> JobResult:
        return job_result(await self._call("GET", self._requests(handle)), request, self._name)

    async def cancel(self, handle: Handle) -> None:
        try:
            await self._call("PUT", f"{self._requests(handle)}/cancel")
        except JobCallFailed as failed:
            if failed.status != 400:  # 400: ALREADY_COMPLETED, nothing left to stop
                raise

    def _requests(self, handle: Handle) -> str:
        return f"{self._base}/{model_path(handle['app'])}/requests/{quote(handle['request_id'], safe='')}"


def status_of(answer: Mapping[str, Any], provider: str) -> JobStatus:
    """A status answer as a JobStatus: IN_QUEUE (with its position), IN_PROGRESS, COMPLETED; failed when the answer
    says FAILED or CANCELED, or COMPLETED with an `error`."""
    status = answer.get("status")
    if status in _FAILED or (status == "COMPLETED" and answer.get("error")):
        return JobStatus("failed", error=message(answer.get("error") or status))
    phase = _PHASES.get(status) if isinstance(status, str) else None
    if phase is None:
        raise JobCallFailed(f"{provider} answered an unknown job status {str(status)[:40]!r}", retryable=True)
    position = answer.get("queue_position")
    return JobStatus(phase, queue_position=position if type(position) is int and position >= 0 else None)


def job_result(answer: Mapping[str, Any], request: JobRequest, provider: str) -> JobResult:
    """A fal output as the gateway's: `{"url", "urls"}` for images (units: images, megapixels when sizes are
    given), `{"url"}` for a video (units: its `duration`, else the requested one)."""
    images = [i for i in answer.get("images") or () if isinstance(i, dict) and isinstance(i.get("url"), str)]
    if images:
        pixels = sum(_number(i.get("width")) * _number(i.get("height")) for i in images)
        urls = [i["url"] for i in images]
        return JobResult({"url": urls[0], "urls": urls}, JobUnits(images=len(urls), megapixels=pixels / 1e6))
    video = answer.get("video")
    if isinstance(video, dict) and isinstance(video.get("url"), str):
        seconds = _number(video.get("duration")) or _number(request.inputs.get("duration"))
        output = {"url": video["url"], **({"content_type": video["content_type"]}
                                          if isinstance(video.get("content_type"), str) else {})}
        return JobResult(output, JobUnits(seconds=seconds))
    raise JobCallFailed(f"{provider}'s result carries no image or video", retryable=False)


def webhook_status(delivery: Mapping[str, Any]) -> JobStatus:
    """A webhook's outcome: `OK` completed, `ERROR` failed with its `error` (or the payload's `detail`)."""
    if delivery.get("status") == "OK":
        return JobStatus("completed")
    payload = delivery.get("payload")
    detail = payload.get("detail") if isinstance(payload, dict) else None
    return JobStatus("failed", error=message(delivery.get("error") or detail or "ERROR"))


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else 0.0

