"""A stand-in for Replicate's predictions API (api.replicate.com/v1) on loopback, with its JSON shapes, status
codes and signed webhooks.

- `POST /v1/models/{owner}/{name}/predictions` or `POST /v1/predictions` (`{"version"}`), `Authorization: Bearer`
  → 201 a prediction `{"id", "model", "version", "input", "status": "starting", "urls", ...}`; 401 problem+json
  with another token; 422 `{"detail", "status", "title"}` without `input`.
- `GET /v1/predictions/{id}` → 200 the prediction: `starting` for `queued_s`, `processing` (logs with a progress
  bar) until `run_s`, then `succeeded` (output: a list of image URLs, or a video URL when
  the input has a `duration`) or `failed` (`error`).
- `POST /v1/predictions/{id}/cancel` → 200 the prediction, `canceled` unless it had ended.
- With `webhook` on create: a `start` and a `completed` webhook carrying the prediction, signed as Standard
  Webhooks (`webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<base64 HMAC-SHA256>` with the `whsec_`
  secret); the gateway's answers are kept in `deliveries`.
Prompts steer it: `fail` fails the run, `canceled` has it canceled (a deadline) once it starts.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from .mock_provider import LoopbackServer

WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"mock replicate webhook signing key!").decode()


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header of a Standard Webhooks delivery."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    digest = hmac.new(key, f"{message_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


@dataclass
class Prediction:
    id: str
    model: str
    version: str
    inputs: dict[str, Any]
    webhook: str | None
    started: float
    canceled: bool = False


@dataclass
class MockReplicate:
    key: str
    queued_s: float = 0.2
    run_s: float = 1.2
    secret: str = WEBHOOK_SECRET
    predictions: dict[str, Prediction] = field(default_factory=dict)
    calls: list[tuple[str, str]] = field(default_factory=list)  # (method, path) of every call
    refused: int = 0  # calls answered 401
    deliveries: list[tuple[str, int]] = field(default_factory=list)  # (event status, the gateway's answer)
    deliver_to: str = ""  # an origin the webhooks go to instead of the URL's (a load balancer picking a replica)
    url: str = ""
    _server: LoopbackServer = field(default_factory=LoopbackServer)

    async def start(self) -> "MockReplicate":
        app = web.Application()
        app.router.add_post("/v1/models/{owner}/{name}/predictions", self._create)
        app.router.add_post("/v1/predictions", self._create)
        app.router.add_get("/v1/predictions/{id}", self._get)
        app.router.add_post("/v1/predictions/{id}/cancel", self._cancel)
        self.url = await self._server.start(app)
        return self

    async def stop(self) -> None:
        await self._server.stop()

    def created(self, prompt: str) -> list[Prediction]:
        return [p for p in self.predictions.values() if p.inputs.get("prompt") == prompt]

    def _authorized(self, request: web.Request) -> None:
        self.calls.append((request.method, request.path))
        if request.headers.get("Authorization") != f"Bearer {self.key}":
            self.refused += 1
            raise _problem(401, "Unauthenticated", "You did not pass a valid authentication token")

    def _prediction(self, request: web.Request) -> Prediction:
        self._authorized(request)
        prediction = self.predictions.get(request.match_info["id"])
        if prediction is None:
            raise _problem(404, "Not found", "The requested resource could not be found.")
        return prediction

    async def _create(self, request: web.Request) -> web.Response:
        self._authorized(request)
        body = await request.json()
        if not isinstance(body.get("input"), dict):
            raise _problem(422, "Input validation failed", "input is required")
        model = (f"{request.match_info['owner']}/{request.match_info['name']}" if "owner" in request.match_info
                 else "owner/model")
        prediction = Prediction(secrets.token_hex(13), model, body.get("version") or "", body["input"],
                                body.get("webhook"), time.monotonic())
        self.predictions[prediction.id] = prediction
        if prediction.webhook:
            self._server.spawn(self._send_webhooks(prediction))
        return web.json_response(self._object(prediction), status=201)

    async def _get(self, request: web.Request) -> web.Response:
        return web.json_response(self._object(self._prediction(request)))

    async def _cancel(self, request: web.Request) -> web.Response:
        prediction = self._prediction(request)
        if self._object(prediction)["status"] in ("starting", "processing"):
            prediction.canceled = True
        return web.json_response(self._object(prediction))

    def _object(self, p: Prediction) -> dict[str, Any]:
        """The prediction as Replicate shows it now."""
        elapsed = time.monotonic() - p.started
        base = f"{self.url}/v1/predictions/{p.id}"
        answer: dict[str, Any] = {
            "id": p.id, "model": p.model, "version": p.version, "input": p.inputs, "logs": "", "output": None,
            "data_removed": False, "error": None, "status": "starting", "created_at": "2026-11-26T09:00:00.000Z",
            "urls": {"cancel": f"{base}/cancel", "get": base, "web": f"https://replicate.com/p/{p.id}"},
            "metrics": {},
        }
        if p.canceled or (p.inputs.get("prompt") == "canceled" and elapsed >= self.queued_s):
            return {**answer, "status": "canceled", "completed_at": "2026-11-26T09:00:01.000Z"}
        if elapsed < self.queued_s:
            return answer
        if elapsed < self.run_s:
            percent = int(100 * (elapsed - self.queued_s) / (self.run_s - self.queued_s))
            return {**answer, "status": "processing", "started_at": "2026-11-26T09:00:00.200Z",
                    "logs": f"Using seed: 42\n{percent:3d}%|{'#' * (percent // 10):<10}| {percent // 2}/50"}
        done = {**answer, "started_at": "2026-11-26T09:00:00.200Z", "completed_at": "2026-11-26T09:00:01.200Z",
                "metrics": {"predict_time": self.run_s - self.queued_s, "total_time": self.run_s}}
        if p.inputs.get("prompt") == "fail":
            return {**done, "status": "failed", "error": "CUDA out of memory", "logs": "Traceback ..."}
        files = f"https://replicate.delivery/xezq/{p.id}"
        if "duration" in p.inputs:  # a video model
            return {**done, "status": "succeeded", "output": f"{files}/output.mp4"}
        count = p.inputs.get("num_outputs", 1)
        return {**done, "status": "succeeded", "output": [f"{files}/out-{i}.webp" for i in range(count)]}

    async def _send_webhooks(self, p: Prediction) -> None:
        """`start` at once, `completed` when the run ends (as `webhook_events_filter: [start, completed]`)."""
        async with aiohttp.ClientSession() as http:
            await self._deliver(http, p)
            await asyncio.sleep(max(self.run_s - (time.monotonic() - p.started), 0) + 0.01)
            await self._deliver(http, p)

    async def _deliver(self, http: aiohttp.ClientSession, p: Prediction) -> None:
        assert p.webhook is not None
        body = json.dumps(self._object(p)).encode()
        message_id, timestamp = "msg_" + secrets.token_hex(12), int(time.time())
        headers = {"Content-Type": "application/json", "webhook-id": message_id,
                   "webhook-timestamp": str(timestamp), "webhook-signature": sign(self.secret, message_id,
                                                                                 timestamp, body)}
        url = p.webhook
        if self.deliver_to:
            url = self.deliver_to + "/" + url.split("/", 3)[3]
        async with http.post(url, data=body, headers=headers) as response:
            self.deliveries.append((json.loads(body)["status"], response.status))


def _problem(status: int, title: str, detail: str) -> web.HTTPException:
    body = json.dumps({"title": title, "detail": detail, "status": status})
    cls = {401: web.HTTPUnauthorized, 404: web.HTTPNotFound, 422: web.HTTPUnprocessableEntity}[status]
    return cls(text=body, content_type="application/problem+json")
