"""A stand-in for fal.ai's queue API (queue.fal.run) on loopback, with its JSON shapes and status codes.

- `POST /{owner}/{app}[/{subpath}]` (`Authorization: Key <key>`) → 200 `{"request_id", "response_url",
  "status_url", "cancel_url"}`; 401 `{"detail"}` with another key.
- `GET /{owner}/{app}/requests/{id}/status?logs=1` → 202 `IN_QUEUE` (queue_position) for `queued_s`, 202
  `IN_PROGRESS` (logs) until `run_s`, then 200 `COMPLETED` (with `error` when the prompt asks to fail).
- `GET /{owner}/{app}/requests/{id}` → 200 the output (`video` or `images`), 422 `{"detail": [...]}` for a
  failed run, 400 while it still runs; `PUT .../cancel` → 202 `CANCELLATION_REQUESTED` or 400 `ALREADY_COMPLETED`.
Unknown ids are 404 `{"detail": "Request not found"}`. Prompts steer it: `fail` fails the run; `flaky` answers
its first two status calls 503 `{"detail"}` (an overloaded queue); `hosted here` gets a video URL on the mock
itself (`GET /files/...` serves it), for re-hosting.

Webhooks as fal sends them: a submit with `?fal_webhook=<url>` gets, once the run ends, a POST there of
`{"request_id", "gateway_request_id", "status": "OK"|"ERROR", "payload", "error"}` signed with the mock's ED25519
key (`sign`), whose public half `GET /.well-known/jwks.json` publishes. `deliveries` notes (status, the answer).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from .mock_provider import LoopbackServer


USER_ID = "mock-user-1"
VIDEO = b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2" + b"\x00" * 64


@dataclass
class FalJob:
    app: str
    model: str
    inputs: dict[str, Any]
    started: float
    cancelled: bool = False
    status_calls: int = 0
    webhook: str | None = None


@dataclass
class MockFal:
    key: str
    queued_s: float = 0.2
    run_s: float = 1.0
    jobs: dict[str, FalJob] = field(default_factory=dict)
    calls: list[tuple[str, str]] = field(default_factory=list)  # (method, path) of every call
    url: str = ""
    signing_key: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    deliveries: list[tuple[str, int]] = field(default_factory=list)  # (webhook status, the gateway's answer)
    jwks_fetches: int = 0
    _server: LoopbackServer = field(default_factory=LoopbackServer)

    async def start(self) -> "MockFal":
        app = web.Application()
        app.router.add_get("/{owner}/{app}/requests/{request_id}/status", self._status)
        app.router.add_get("/{owner}/{app}/requests/{request_id}", self._result)
        app.router.add_get("/files/{path:.+}", self._file)
        app.router.add_get("/.well-known/jwks.json", self._jwks)
        app.router.add_put("/{owner}/{app}/requests/{request_id}/cancel", self._cancel)
        app.router.add_post("/{model:.+}", self._submit)
        self.url = await self._server.start(app)
        return self

    async def stop(self) -> None:
        await self._server.stop()

    def submitted(self, prompt: str) -> int:
        return sum(1 for job in self.jobs.values() if job.inputs.get("prompt") == prompt)

    def _authorized(self, request: web.Request) -> None:
        self.calls.append((request.method, request.path))
        if request.headers.get("Authorization") != f"Key {self.key}":
            raise web.HTTPUnauthorized(text='{"detail":"Invalid API key"}', content_type="application/json")

    def _job(self, request: web.Request) -> tuple[FalJob, float]:
        self._authorized(request)
        job = self.jobs.get(request.match_info["request_id"])
        if job is None or job.app != f"{request.match_info['owner']}/{request.match_info['app']}":
            raise web.HTTPNotFound(text='{"detail":"Request not found"}', content_type="application/json")
        return job, time.monotonic() - job.started

    async def _submit(self, request: web.Request) -> web.Response:
        self._authorized(request)
        model = request.match_info["model"]
        request_id = str(uuid.uuid4())
        app = "/".join(model.split("/")[:2])
        job = self.jobs[request_id] = FalJob(app, model, await request.json(), time.monotonic(),
                                             webhook=request.query.get("fal_webhook"))
        if job.webhook:
            self._server.spawn(self._call_back(request_id, job))
        base = f"{self.url}/{app}/requests/{request_id}"
        return web.json_response({"request_id": request_id, "response_url": base, "status_url": f"{base}/status",
                                  "cancel_url": f"{base}/cancel"})

    async def _status(self, request: web.Request) -> web.Response:
        job, elapsed = self._job(request)
        job.status_calls += 1
        if job.inputs.get("prompt") == "flaky" and job.status_calls <= 2:
            return web.json_response({"detail": "Service temporarily unavailable"}, status=503)
        base = f"{self.url}/{job.app}/requests/{request.match_info['request_id']}"
        if job.cancelled:
            return web.json_response({"status": "COMPLETED", "error": "Request was cancelled",
                                      "response_url": base})
        if elapsed < self.queued_s:
            return web.json_response({"status": "IN_QUEUE", "queue_position": 2, "response_url": base}, status=202)
        if elapsed < self.run_s:
            logs = [{"message": "Generating...", "level": "INFO", "source": "user",
                     "timestamp": "2026-11-26T08:00:00.000000"}]
            return web.json_response({"status": "IN_PROGRESS", "logs": logs, "response_url": base}, status=202)
        done: dict[str, Any] = {"status": "COMPLETED", "logs": [], "response_url": base,
                                "metrics": {"inference_time": self.run_s}}
        if job.inputs.get("prompt") == "fail":
            done.update(error="Internal error while generating", error_type="runner_error")
        return web.json_response(done)

    async def _result(self, request: web.Request) -> web.Response:
        job, elapsed = self._job(request)
        if elapsed < self.run_s:
            return web.json_response({"detail": "Request is still in progress"}, status=400)
        if job.inputs.get("prompt") == "fail":
            return web.json_response({"detail": [{"loc": ["body"], "msg": "Internal error while generating",
                                                  "type": "runner_error"}]}, status=422)
        return web.json_response(output_of(job, request.match_info["request_id"], self.url))

    async def _call_back(self, request_id: str, job: FalJob) -> None:
        await asyncio.sleep(self.run_s)
        failed = job.inputs.get("prompt") == "fail"
        payload = {"detail": [{"msg": "Internal error while generating", "type": "runner_error"}]} if failed \
            else output_of(job, request_id, self.url)
        status = "ERROR" if failed else "OK"
        body = json.dumps({"request_id": request_id, "gateway_request_id": request_id, "status": status,
                           "payload": payload, "error": "Invalid status code: 422" if failed else None}).encode()
        assert job.webhook is not None
        async with aiohttp.ClientSession() as http:
            async with http.post(job.webhook, data=body, headers=self.sign(request_id, body)) as answer:
                self.deliveries.append((status, answer.status))

    def sign(self, request_id: str, body: bytes, timestamp: int | None = None,
             key: Ed25519PrivateKey | None = None) -> dict[str, str]:
        """fal's webhook headers for `body`: request id, user id, timestamp and the body's SHA-256, signed."""
        stamp = str(int(time.time()) if timestamp is None else timestamp)
        signed = "\n".join((request_id, USER_ID, stamp, hashlib.sha256(body).hexdigest())).encode()
        return {"Content-Type": "application/json", "X-Fal-Webhook-Request-Id": request_id,
                "X-Fal-Webhook-User-Id": USER_ID, "X-Fal-Webhook-Timestamp": stamp,
                "X-Fal-Webhook-Signature": (key or self.signing_key).sign(signed).hex()}

    async def _jwks(self, request: web.Request) -> web.Response:
        self.jwks_fetches += 1
        raw = self.signing_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        x = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
        return web.json_response({"keys": [{"kty": "OKP", "crv": "Ed25519", "x": x, "kid": "mock-1", "use": "sig"}]})

    async def _file(self, request: web.Request) -> web.Response:
        return web.Response(body=VIDEO, content_type="video/mp4")

    async def _cancel(self, request: web.Request) -> web.Response:
        job, elapsed = self._job(request)
        if elapsed >= self.run_s:
            return web.json_response({"status": "ALREADY_COMPLETED"}, status=400)
        job.cancelled = True
        return web.json_response({"status": "CANCELLATION_REQUESTED"}, status=202)


def output_of(job: FalJob, request_id: str, url: str) -> dict[str, Any]:
    """A finished run's output, as the result call answers it and a webhook's `payload` carries it."""
    files = f"{url}/files" if job.inputs.get("prompt") == "hosted here" else "https://v3.fal.media/files"
    if "video" in job.model:
        return {"video": {"url": f"{files}/{request_id}/output.mp4", "content_type": "video/mp4",
                          "file_name": "output.mp4", "file_size": 1534052}}
    count = job.inputs.get("num_images", 1)
    images = [{"url": f"https://v3.fal.media/files/{request_id}/{i}.png", "width": 1024, "height": 768,
               "content_type": "image/png"} for i in range(count)]
    return {"images": images, "seed": 42, "has_nsfw_concepts": [False] * count, "prompt": job.inputs.get("prompt")}
