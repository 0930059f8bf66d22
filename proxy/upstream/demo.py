"""A demo upstream speaking the OpenAI wire format, so the quick start runs with no provider keys."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import math
import struct
import time
import uuid
import wave
from typing import Any

from aiohttp import web

# A 1x1 PNG: enough for a client to fetch and display "an image".
_PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)
# The smallest MP4 players accept as a file (an `ftyp` box): the demo's "video".
_MP4 = b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2"
_TOKEN_DELAY_S = 0.02
_MAX_IMAGES = 10  # like real image APIs; also keeps a huge `n` from exhausting the demo's memory
# A demo job (fal's queue API, proxy/jobs/fal.py): queued this long, then running until done, in seconds.
JOB_QUEUED_S = 0.3
JOB_DONE_S = 1.5
_MAX_JOBS = 1000  # the oldest are forgotten beyond this


def _last_user_text(body: dict[str, Any]) -> str:
    for text in (body.get("prompt"), body.get("input")):  # completions; the Responses API
        if isinstance(text, str):
            return text
    for message in reversed(body.get("messages") or body.get("input") or []):
        if isinstance(message, dict) and message.get("role") == "user" and isinstance(message.get("content"), str):
            return message["content"]
    return ""


def _words(text: str) -> int:
    return max(1, len(text.split()))


def _reply_tokens(body: dict[str, Any]) -> list[str]:
    said = _last_user_text(body)
    reply = f"Hello from the edge-proxy demo upstream. You said: {said}".strip()
    tokens = [w + " " for w in reply.split()]
    limit = body.get("max_tokens") or body.get("max_completion_tokens") or body.get("max_output_tokens")
    return tokens[:limit] if isinstance(limit, int) and limit > 0 else tokens


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise web.HTTPBadRequest(text='{"error":{"message":"invalid JSON"}}', content_type="application/json")
    return body if isinstance(body, dict) else {}


def _usage(body: dict[str, Any], completion_tokens: int) -> dict[str, int]:
    prompt = _words(json.dumps(body.get("messages") or body.get("prompt") or body.get("input") or ""))
    return {"prompt_tokens": prompt, "completion_tokens": completion_tokens, "total_tokens": prompt + completion_tokens}


async def _completion(request: web.Request, *, chat: bool) -> web.StreamResponse:
    body = await _json_body(request)
    tokens = _reply_tokens(body)
    ident, created, model = f"demo-{uuid.uuid4().hex[:12]}", int(time.time()), body.get("model", "demo")
    kind = "chat.completion" if chat else "text_completion"

    def choice(text: str, finish: str | None, streamed: bool) -> dict[str, Any]:
        if not chat:
            return {"index": 0, "text": text, "finish_reason": finish}
        key = "delta" if streamed else "message"
        return {"index": 0, key: {"role": "assistant", "content": text}, "finish_reason": finish}

    if not body.get("stream"):
        answer = {"id": ident, "object": kind, "created": created, "model": model,
                  "choices": [choice("".join(tokens), "stop", False)], "usage": _usage(body, len(tokens))}
        return web.json_response(answer)

    chunk_kind = f"{kind}.chunk" if chat else kind
    include_usage = (body.get("stream_options") or {}).get("include_usage") is True
    events = []
    for i, token in enumerate(tokens):
        finish = "stop" if i == len(tokens) - 1 else None
        chunk = {"id": ident, "object": chunk_kind, "created": created, "model": model,
                 "choices": [choice(token, finish, True)], **({"usage": None} if include_usage else {})}
        events.append(f"data: {json.dumps(chunk)}\n\n".encode())
    if include_usage:
        final = {"id": ident, "object": chunk_kind, "created": created, "model": model, "choices": [],
                 "usage": _usage(body, len(tokens))}
        events.append(f"data: {json.dumps(final)}\n\n".encode())
    events.append(b"data: [DONE]\n\n")
    return await _stream(request, events)


async def _stream(request: web.Request, events: list[bytes]) -> web.StreamResponse:
    """Send SSE events at the demo's token pace."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    try:
        for event in events:
            await response.write(event)
            await asyncio.sleep(_TOKEN_DELAY_S)
        await response.write_eof()
    except ConnectionResetError:
        pass  # the caller hung up mid-stream: the normal end of a cancelled generation, not an error
    return response


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _completion(request, chat=True)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _completion(request, chat=False)


async def responses(request: web.Request) -> web.StreamResponse:
    """OpenAI's Responses API: the Response object, or its semantic events (named, numbered, no `[DONE]`)."""
    body = await _json_body(request)
    tokens = _reply_tokens(body)
    text, ident = "".join(tokens), uuid.uuid4().hex[:12]
    usage = _usage(body, len(tokens))
    message = {"id": f"msg_{ident}", "type": "message", "status": "completed", "role": "assistant",
               "content": [{"type": "output_text", "text": text, "annotations": []}]}

    def response(status: str, output: list[Any], usage: dict[str, Any] | None) -> dict[str, Any]:
        return {"id": f"resp_{ident}", "object": "response", "created_at": int(time.time()), "status": status,
                "model": body.get("model", "demo"), "output": output, "error": None, "incomplete_details": None,
                "parallel_tool_calls": True, "tool_choice": "auto", "tools": [], "usage": usage}

    done = response("completed", [message], {"input_tokens": usage["prompt_tokens"],
                                              "output_tokens": usage["completion_tokens"],
                                              "total_tokens": usage["total_tokens"]})
    if not body.get("stream"):
        return web.json_response(done)
    part = {"item_id": message["id"], "output_index": 0, "content_index": 0}
    events = [
        {"type": "response.created", "response": response("in_progress", [], None)},
        {"type": "response.in_progress", "response": response("in_progress", [], None)},
        {"type": "response.output_item.added", "output_index": 0,
         "item": {**message, "status": "in_progress", "content": []}},
        {"type": "response.content_part.added", **part, "part": {"type": "output_text", "text": "", "annotations": []}},
        *({"type": "response.output_text.delta", **part, "delta": token} for token in tokens),
        {"type": "response.output_text.done", **part, "text": text},
        {"type": "response.content_part.done", **part, "part": message["content"][0]},
        {"type": "response.output_item.done", "output_index": 0, "item": message},
        {"type": "response.completed", "response": done},
    ]
    return await _stream(request, [
        f"event: {e['type']}\ndata: {json.dumps({**e, 'sequence_number': n})}\n\n".encode()
        for n, e in enumerate(events)
    ])


async def embeddings(request: web.Request) -> web.Response:
    body = await _json_body(request)
    inputs = body.get("input")
    texts = inputs if isinstance(inputs, list) else [inputs]
    data = []
    for i, text in enumerate(texts):
        digest = hashlib.sha256(str(text).encode()).digest()
        data.append({"object": "embedding", "index": i, "embedding": [b / 255.0 for b in digest[:16]]})
    tokens = sum(_words(str(t)) for t in texts)
    return web.json_response({"object": "list", "data": data, "model": body.get("model", "demo"),
                              "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


async def images(request: web.Request) -> web.Response:
    """The images inline (`b64_json`, as gpt-image-1 answers), so the gateway keeps them as its own assets on its
    public URL; `response_format: "url"` gets URLs on the demo upstream itself, reachable from the gateway's host
    only."""
    body = await _json_body(request)
    n = min(body["n"], _MAX_IMAGES) if isinstance(body.get("n"), int) and body["n"] > 0 else 1
    if body.get("response_format") == "url":
        base = f"{request.scheme}://{request.host}"
        data = [{"url": f"{base}/files/{uuid.uuid4().hex}.png"} for _ in range(n)]
    else:
        data = [{"b64_json": base64.b64encode(_PNG).decode()} for _ in range(n)]
    return web.json_response({"created": int(time.time()), "data": data})


def demo_file(name: str) -> tuple[bytes, str] | None:
    """The body and type of a demo output file by name (`<id>.png`, `<id>.mp4`); None for any other name."""
    if name.endswith(".png"):
        return _PNG, "image/png"
    if name.endswith(".mp4"):
        return _MP4, "video/mp4"
    return None


async def image_file(request: web.Request) -> web.Response:
    found = demo_file(request.match_info["name"])
    if found is None:
        raise web.HTTPNotFound()
    return web.Response(body=found[0], content_type=found[1])


_JOBS = web.AppKey("jobs", dict)


async def queue_submit(request: web.Request) -> web.Response:
    """fal's `POST /{owner}/{app}`: the job is queued; its phases follow from the time since."""
    inputs = await _json_body(request)
    app, jobs = f"{request.match_info['owner']}/{request.match_info['app']}", request.app[_JOBS]
    if len(jobs) >= _MAX_JOBS:
        del jobs[next(iter(jobs))]
    request_id = str(uuid.uuid4())
    jobs[request_id] = {"started": time.monotonic(), "app": app, "inputs": inputs}
    base = f"{request.scheme}://{request.host}/queue/{app}/requests/{request_id}"
    return web.json_response({"request_id": request_id, "status": "IN_QUEUE", "queue_position": 0,
                              "status_url": f"{base}/status", "response_url": base, "cancel_url": f"{base}/cancel"})


def _queued_job(request: web.Request) -> tuple[dict[str, Any], float]:
    job = request.app[_JOBS].get(request.match_info["request_id"])
    if job is None:
        raise web.HTTPNotFound(text='{"detail":"Request not found"}', content_type="application/json")
    return job, time.monotonic() - job["started"]


async def queue_status(request: web.Request) -> web.Response:
    """IN_QUEUE, then IN_PROGRESS with a `progress` the demo adds to fal's shape, then COMPLETED."""
    job, elapsed = _queued_job(request)
    if job.get("cancelled"):
        return web.json_response({"status": "COMPLETED", "error": "cancelled"})
    if elapsed < JOB_QUEUED_S:
        return web.json_response({"status": "IN_QUEUE", "queue_position": 0}, status=202)
    if elapsed < JOB_DONE_S:
        progress = round((elapsed - JOB_QUEUED_S) / (JOB_DONE_S - JOB_QUEUED_S), 2)
        logs = [{"message": f"rendering: {progress:.0%}", "level": "INFO", "timestamp": ""}]
        return web.json_response({"status": "IN_PROGRESS", "progress": progress, "logs": logs}, status=202)
    return web.json_response({"status": "COMPLETED", "logs": []})


async def queue_result(request: web.Request) -> web.Response:
    job, elapsed = _queued_job(request)
    if elapsed < JOB_DONE_S or job.get("cancelled"):
        return web.json_response({"detail": "Request is still in progress"}, status=400)
    base = f"{request.scheme}://{request.host}/files/{request.match_info['request_id']}"
    if "video" in job["app"]:
        duration = job["inputs"].get("duration") or 5
        return web.json_response({"video": {"url": f"{base}.mp4", "content_type": "video/mp4",
                                            "duration": duration}})
    return web.json_response({"images": [{"url": f"{base}.png", "width": 1, "height": 1,
                                          "content_type": "image/png"}]})


async def queue_cancel(request: web.Request) -> web.Response:
    job, elapsed = _queued_job(request)
    if elapsed >= JOB_DONE_S:
        return web.json_response({"status": "ALREADY_COMPLETED"}, status=400)
    job["cancelled"] = True
    return web.json_response({"status": "CANCELLATION_REQUESTED"}, status=202)


async def speech(request: web.Request) -> web.Response:
    body = await _json_body(request)
    seconds = min(5.0, 0.1 * _words(str(body.get("input", ""))))
    return web.Response(body=_tone(seconds), content_type="audio/wav")


def _tone(seconds: float, rate: int = 8000) -> bytes:
    frames = b"".join(
        struct.pack("<h", int(8000 * math.sin(2 * math.pi * 440 * i / rate))) for i in range(int(seconds * rate))
    )
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(frames)
    return out.getvalue()


def demo_app() -> web.Application:
    app = web.Application()
    app[_JOBS] = {}
    app.router.add_post("/queue/{owner}/{app}", queue_submit)
    app.router.add_get("/queue/{owner}/{app}/requests/{request_id}/status", queue_status)
    app.router.add_get("/queue/{owner}/{app}/requests/{request_id}", queue_result)
    app.router.add_put("/queue/{owner}/{app}/requests/{request_id}/cancel", queue_cancel)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/responses", responses)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_post("/v1/images/generations", images)
    app.router.add_post("/v1/audio/speech", speech)
    app.router.add_get("/files/{name}", image_file)
    return app


async def start_demo_upstream(host: str = "127.0.0.1") -> tuple[web.AppRunner, str]:
    """Start the demo upstream on a free loopback port; returns the runner and its `/v1` base URL."""
    runner = web.AppRunner(demo_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://{host}:{port}/v1"
