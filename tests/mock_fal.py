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
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from .mock_provider import serve_on_loopback


VIDEO = b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2" + b"\x00" * 64


@dataclass
class FalJob:
    app: str
    model: str
    inputs: dict[str, Any]
    started: float
    cancelled: bool = False
    status_calls: int = 0


@dataclass
class MockFal:
    key: str
    queued_s: float = 0.2
    run_s: float = 1.0
    jobs: dict[str, FalJob] = field(default_factory=dict)
    calls: list[tuple[str, str]] = field(default_factory=list)  # (method, path) of every call
    url: str = ""
    _runner: web.AppRunner | None = None

    async def start(self) -> "MockFal":
        app = web.Application()
        app.router.add_get("/{owner}/{app}/requests/{request_id}/status", self._status)
        app.router.add_get("/{owner}/{app}/requests/{request_id}", self._result)
        app.router.add_get("/files/{path:.+}", self._file)
        app.router.add_put("/{owner}/{app}/requests/{request_id}/cancel", self._cancel)
        app.router.add_post("/{model:.+}", self._submit)
        self._runner, self.url = await serve_on_loopback(app)
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

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
        self.jobs[request_id] = FalJob(app, model, await request.json(), time.monotonic())
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
        name = request.match_info["request_id"]
        files = f"{self.url}/files" if job.inputs.get("prompt") == "hosted here" else "https://v3.fal.media/files"
        if "video" in job.model:
            return web.json_response({"video": {"url": f"{files}/{name}/output.mp4",
                                                "content_type": "video/mp4", "file_name": "output.mp4",
                                                "file_size": 1534052}})
        count = job.inputs.get("num_images", 1)
        images = [{"url": f"https://v3.fal.media/files/{name}/{i}.png", "width": 1024, "height": 768,
                   "content_type": "image/png"} for i in range(count)]
        return web.json_response({"images": images, "seed": 42, "has_nsfw_concepts": [False] * count,
                                  "prompt": job.inputs.get("prompt")})

    async def _file(self, request: web.Request) -> web.Response:
        return web.Response(body=VIDEO, content_type="video/mp4")

    async def _cancel(self, request: web.Request) -> web.Response:
        job, elapsed = self._job(request)
        if elapsed >= self.run_s:
            return web.json_response({"status": "ALREADY_COMPLETED"}, status=400)
        job.cancelled = True
        return web.json_response({"status": "CANCELLATION_REQUESTED"}, status=202)
