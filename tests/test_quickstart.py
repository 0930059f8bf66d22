"""The README's quick start: the shipped config.yaml, the demo upstream, the openai SDK, streaming included."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import openai

from tests.gateway_harness import wait_healthy
from tests.redis_server import free_port

ROOT = Path(__file__).resolve().parent.parent


async def test_edge_proxy_serve_with_the_default_config_answers_the_sdk() -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "EDGE_PROXY_DEMO_KEY"}
    process = subprocess.Popen(
        [sys.executable, "-m", "proxy", "serve", "--config", "config.yaml", "--port", str(port)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        assert process.stdout is not None
        key = None
        for _ in range(20):  # the key line comes among the start-up log lines
            line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), 20)
            if key := re.search(r"demo API key .*: (sk_\S+)$", line.strip()):
                break
        assert key, "the demo key was not printed"
        base = f"http://127.0.0.1:{port}"
        await wait_healthy(base, lambda: process.poll() is not None)
        # The README's base URL for OpenAI SDKs; /v1 answers the routes both surfaces share.
        async with openai.AsyncOpenAI(base_url=f"{base}/openai/v1", api_key=key.group(1), max_retries=0,
                                      timeout=10) as client:
            models = [m.id async for m in client.models.list()]
            answer = await client.chat.completions.create(
                model="demo/chat", messages=[{"role": "user", "content": "ping"}]
            )
            stream = await client.chat.completions.create(
                model="demo/chat", messages=[{"role": "user", "content": "ping"}], stream=True
            )
            streamed = "".join([c.choices[0].delta.content or "" async for c in stream])
            image = await client.images.generate(model="demo/image", prompt="a lighthouse")
            response = await client.responses.create(model="demo/chat", input="ping")
            async with client.responses.stream(model="demo/chat", input="ping") as events:
                streamed_response = "".join([e.delta async for e in events if e.type == "response.output_text.delta"])
        async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=key.group(1), max_retries=0, timeout=10) as client:
            assert [m.id async for m in client.models.list()] == models
            assert (await client.chat.completions.create(
                model="demo/chat", messages=[{"role": "user", "content": "ping"}]
            )).choices[0].message.content == answer.choices[0].message.content
        assert "demo/chat" in models and "demo/image" in models
        assert "You said: ping" in (answer.choices[0].message.content or "")
        assert streamed == answer.choices[0].message.content == response.output_text == streamed_response
        assert image.data and base64.b64decode(image.data[0].b64_json or "").startswith(b"\x89PNG")
        await _demo_video_job(base, key.group(1))
        await _demo_image_on_the_gateways_url(base, key.group(1))
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=20)


async def _demo_video_job(base: str, key: str) -> None:
    """The demo's job mode: queued, progress, the result on the gateway's own URL (not the demo's loopback one)."""
    headers = {"Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{base}/v1/responses", json={"model": "demo/video", "prompt": "a lighthouse"},
                             headers=headers) as r:
            events = [json.loads(line[5:]) for line in (await r.text()).splitlines() if line.startswith("data:")]
        assert events[0]["status"] == "queued" and any(e.get("progress") for e in events)
        assert {e["request_id"] for e in events} == {r.headers["X-Request-Id"]}
        url = events[-1]["output"]["url"]
        assert url.startswith(f"{base}/v1/demo/files/") and url.endswith(".mp4")
        async with http.get(url) as video:
            assert (video.status, video.content_type) == (200, "video/mp4")


async def _demo_image_on_the_gateways_url(base: str, key: str) -> None:
    """The demo's image through /v1/responses: an asset URL of the gateway, never the demo upstream's loopback one."""
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{base}/v1/responses", json={"model": "demo/image", "prompt": "a lighthouse"},
                             headers={"Authorization": f"Bearer {key}"}) as r:
            events = [json.loads(line[5:]) for line in (await r.text()).splitlines() if line.startswith("data:")]
        url = events[-1]["output"]["url"]
        assert url.startswith(f"{base}/v1/assets/"), url
        async with http.get(url) as image:
            assert (image.status, image.content_type) == (200, "image/png")
