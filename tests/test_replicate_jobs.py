"""Replicate predictions as jobs, end to end: a gateway on a real Redis, a mock Replicate on loopback speaking its
JSON shapes and status codes, predictions of ~1.2 s. Jobs complete by polling; every job is charged exactly
once, and a failed or canceled prediction releases its hold. With a webhook secret, the mock calls the gateway
back (signed as Standard Webhooks) and a job completes long before its next poll; forged, tampered, stale and
unknown webhooks are refused and change nothing."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from typing import Any, AsyncIterator

import aiohttp
import pytest
import pytest_asyncio

from proxy.jobs.store import MemoryJobStore

from .gateway_harness import PROVIDER_KEY, TEST_KEY, gateway_config, start_gateway, write_policy
from .mock_replicate import WEBHOOK_SECRET, MockReplicate, sign
from .redis_server import RedisServer
from .test_jobs import balance, finished, poll, submit

pytestmark = pytest.mark.asyncio(loop_scope="module")

PER_IMAGE, PER_SECOND = 3, 10
VERSION = "5c7d5dc6dd8bf75c1acaa8565735e7986bc5b66206b55cca93cb72c9bf15ccaa"
POLICY = f"""
plans:
  demo:
    models: ["mock/*"]
    budget: {{credits: 100000, period: month, scope: account}}
prices:
  "mock/*": {{per_image: {PER_IMAGE}}}
  mock/r-video: {{per_second: {PER_SECOND}}}
"""
HOOKED_POLL_S = 5  # webhooks on: polling is the fallback, slow enough that a job done sooner was called back
JOB_TIMEOUTS = {"connect_s": 2, "first_byte_s": 2, "idle_s": 2, "total_s": 30}


class Setup:
    def __init__(self, gateway: str, other: str, replicate: MockReplicate) -> None:
        self.gateway, self.other, self.replicate = gateway, other, replicate  # two replicas on one Redis


def replicate_config(replicate: MockReplicate, redis_url: str, policies: Any) -> dict[str, Any]:
    config = gateway_config("http://127.0.0.1:9/v1", policies, store={"kind": "redis", "redis_url": redis_url},
                            jobs={"detach_after_s": 10, "poll_after_ms": 250, "lease_s": 2})
    polled = {"kind": "replicate", "base_url": f"{replicate.url}/v1", "api_key_env": "MOCK_PROVIDER_KEY",
              "timeouts": JOB_TIMEOUTS, "jobs": {"poll_interval_s": 0.1, "timeout_s": 20, "retries": 2}}
    config["providers"]["replicate"] = polled
    # Two tokens, the first refused: a 401 rests it and the call is retried with the other.
    config["providers"]["replicate-two-keys"] = {**polled, "api_key_env": None,
                                                 "api_keys_env": ["BAD_REPLICATE_KEY", "MOCK_PROVIDER_KEY"]}
    config["providers"]["replicate-hooks"] = {**polled, "jobs": {
        "poll_interval_s": HOOKED_POLL_S, "timeout_s": 20, "retries": 2,
        "webhook_secret": {"env": "REPLICATE_WEBHOOK_SECRET"}}}
    config["models"] = [
        {"id": "mock/r-image", "name": "Flux", "creator": "Tests", "capability": "text2image",
         "provider": "replicate", "upstream_model": "black-forest-labs/flux-schnell"},
        {"id": "mock/r-video", "name": "Video", "creator": "Tests", "capability": "text2video",
         "provider": "replicate", "upstream_model": f"kwaivgi/kling-video:{VERSION}"},
        {"id": "mock/r-two-keys", "name": "Flux (two keys)", "creator": "Tests", "capability": "text2image",
         "provider": "replicate-two-keys", "upstream_model": "black-forest-labs/flux-schnell"},
        {"id": "mock/r-hooked", "name": "Flux (webhooks)", "creator": "Tests", "capability": "text2image",
         "provider": "replicate-hooks", "upstream_model": "black-forest-labs/flux-schnell"},
    ]
    return config


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def setup(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Setup]:
    os.environ.update(EDGE_PROXY_DEMO_KEY=TEST_KEY, MOCK_PROVIDER_KEY=PROVIDER_KEY, BAD_REPLICATE_KEY="r8_revoked",
                      REPLICATE_WEBHOOK_SECRET=WEBHOOK_SECRET)
    policies = write_policy(tmp_path_factory.mktemp("policies"), POLICY)
    with RedisServer() as redis:
        replicate = await MockReplicate(PROVIDER_KEY).start()
        gateway = await start_gateway(replicate_config(replicate, redis.url, policies))
        other = await start_gateway(replicate_config(replicate, redis.url, policies))
        try:
            yield Setup(gateway.url, other.url, replicate)
        finally:
            await gateway.stop()
            await other.stop()
            await replicate.stop()


async def test_an_image_job_is_polled_to_its_outputs_and_charged_per_image(setup: Setup) -> None:
    before = await balance(setup.gateway)
    status, _, events = await submit(setup.gateway, {"model": "mock/r-image", "prompt": "a fox", "n": 2})
    assert status == 200 and isinstance(events, list)
    assert events[0] == ("generation.status", {"status": "queued"}) and events[-1][0] == "generation.completed"
    progress = [data["progress"] for name, data in events if name == "generation.status" and "progress" in data]
    assert progress and all(0 <= p <= 1 for p in progress), events  # parsed from the model's progress bar
    [prediction] = setup.replicate.created("a fox")
    output = events[-1][1]["output"]
    assert output["urls"] == [f"https://replicate.delivery/xezq/{prediction.id}/out-{i}.webp" for i in (0, 1)]
    assert output["url"] == output["urls"][0]
    assert (prediction.model, prediction.inputs) == ("black-forest-labs/flux-schnell",
                                                     {"prompt": "a fox", "aspect_ratio": "1:1", "num_outputs": 2})
    assert ("POST", "/v1/models/black-forest-labs/flux-schnell/predictions") in setup.replicate.calls
    assert prediction.webhook is None  # no webhook secret configured: polled only
    assert (await balance(setup.gateway))["spent"] - before["spent"] == 2 * PER_IMAGE


async def test_a_version_pinned_video_is_charged_its_requested_seconds(setup: Setup) -> None:
    before = await balance(setup.gateway)
    _, headers, body = await submit(setup.gateway, {"model": "mock/r-video", "prompt": "waves", "duration": 3},
                                    {"Prefer": "respond-async"})
    job = await finished(setup.gateway, body["request_id"])  # type: ignore[index]
    [prediction] = setup.replicate.created("waves")
    assert (job["status"], job["output"]) == ("completed", {
        "url": f"https://replicate.delivery/xezq/{prediction.id}/output.mp4"})
    assert prediction.version == VERSION and ("POST", "/v1/predictions") in setup.replicate.calls
    assert (await balance(setup.gateway))["spent"] - before["spent"] == 3 * PER_SECOND


@pytest.mark.parametrize("prompt, reason", [("fail", "failed: CUDA out of memory"),
                                            ("canceled", "canceled: no reason given")])
async def test_a_failed_or_canceled_prediction_fails_the_job_and_releases_its_hold(
    setup: Setup, prompt: str, reason: str
) -> None:
    before = await balance(setup.gateway)
    _, _, events = await submit(setup.gateway, {"model": "mock/r-video", "prompt": prompt, "duration": 5})
    assert isinstance(events, list) and events[-1][0] == "generation.failed"
    error = events[-1][1]["error"]
    assert error["code"] == "upstream_error" and reason in error["message"], error
    after = await balance(setup.gateway)
    assert (after["spent"], after["held"]) == (before["spent"], 0)


async def test_a_refused_token_rests_and_the_job_completes_with_the_other(setup: Setup) -> None:
    calls = len(setup.replicate.calls)
    _, _, events = await submit(setup.gateway, {"model": "mock/r-two-keys", "prompt": "two keys"})
    assert isinstance(events, list) and events[-1][0] == "generation.completed", events
    assert len(setup.replicate.calls) - calls >= 5  # a create and several polls...
    assert setup.replicate.refused == 1  # ...of which one was refused: that token rests after its 401


async def test_a_webhook_completes_the_job_long_before_the_next_poll(setup: Setup) -> None:
    before, started, since = await balance(setup.gateway), time.monotonic(), len(setup.replicate.deliveries)
    _, _, events = await submit(setup.gateway, {"model": "mock/r-hooked", "prompt": "hooked"})
    assert isinstance(events, list) and events[-1][0] == "generation.completed", events
    assert time.monotonic() - started < HOOKED_POLL_S - 1  # the runner polled once, then slept 5 s
    [prediction] = setup.replicate.created("hooked")
    assert setup.replicate.calls.count(("GET", f"/v1/predictions/{prediction.id}")) <= 1
    assert prediction.webhook == f"{setup.gateway}/v1/webhooks/replicate/replicate-hooks"
    await delivered(setup, ("succeeded", 200), since)
    assert events[-1][1]["output"]["url"] == f"https://replicate.delivery/xezq/{prediction.id}/out-0.webp"
    spent = (await balance(setup.gateway))["spent"]
    assert spent - before["spent"] == PER_IMAGE
    # Replicate delivers again (a retry): answered, and the job is not finished or charged a second time.
    assert await deliver(setup, prediction_body(prediction.id, "succeeded")) == (200, {"received": True})
    after = await balance(setup.gateway)
    assert (after["spent"], after["held"]) == (spent, 0)


async def test_a_webhook_taken_by_another_replica_finishes_the_job(setup: Setup) -> None:
    before, started, since = await balance(setup.gateway), time.monotonic(), len(setup.replicate.deliveries)
    setup.replicate.deliver_to = setup.other  # the public URL's load balancer picks the replica not polling
    try:
        _, _, events = await submit(setup.gateway, {"model": "mock/r-hooked", "prompt": "elsewhere"})
    finally:
        setup.replicate.deliver_to = ""
    assert isinstance(events, list) and events[-1][0] == "generation.completed", events
    assert time.monotonic() - started < HOOKED_POLL_S - 1
    await delivered(setup, ("succeeded", 200), since)
    assert (await balance(setup.gateway))["spent"] - before["spent"] == PER_IMAGE


async def test_a_failed_prediction_by_webhook_fails_the_job_and_releases_its_hold(setup: Setup) -> None:
    before, since = await balance(setup.gateway), len(setup.replicate.deliveries)
    _, _, events = await submit(setup.gateway, {"model": "mock/r-hooked", "prompt": "fail"})
    assert isinstance(events, list) and events[-1][0] == "generation.failed"
    assert "CUDA out of memory" in events[-1][1]["error"]["message"]
    await delivered(setup, ("failed", 200), since)
    after = await balance(setup.gateway)
    assert (after["spent"], after["held"]) == (before["spent"], 0)


async def test_forged_tampered_stale_or_unknown_webhooks_are_refused_and_change_nothing(setup: Setup) -> None:
    before = await balance(setup.gateway)
    _, _, body = await submit(setup.gateway, {"model": "mock/r-hooked", "prompt": "guarded"},
                              {"Prefer": "respond-async"})
    while not setup.replicate.created("guarded"):
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.1)  # the gateway indexed the prediction id
    prediction_id = setup.replicate.created("guarded")[0].id
    forged = prediction_body(prediction_id, "succeeded", output=["https://evil.example/x.png"])
    now = int(time.time())
    attacks: list[tuple[bytes, dict[str, str], str, tuple[int, str]]] = [
        (forged, signed(forged, secret="whsec_" + base64.b64encode(b"x" * 32).decode()), "replicate-hooks",
         (401, "invalid_webhook_signature")),  # another secret
        (forged, signed(prediction_body(prediction_id, "processing")), "replicate-hooks",
         (401, "invalid_webhook_signature")),  # a real signature over another body
        (forged, signed(forged, timestamp=now - 3600), "replicate-hooks",
         (401, "invalid_webhook_signature")),  # a replay: too old
        (forged, {**signed(forged), "webhook-signature": ""}, "replicate-hooks", (400, "invalid_request")),
        (forged, signed(forged, timestamp=-1), "replicate-hooks", (400, "invalid_request")),
        (b"[1]", signed(b"[1]"), "replicate-hooks", (400, "invalid_request")),
        (unknown := prediction_body("unknownprediction", "succeeded"), signed(unknown), "replicate-hooks",
         (404, "not_found")),
        (forged, signed(forged), "replicate", (404, "not_found")),  # a provider without webhooks
    ]
    for data, headers, provider, expected in attacks:
        status, answer = await deliver(setup, data, headers, provider)
        assert (status, answer["error"]["code"]) == expected, (expected, answer)
    status, job = await poll(setup.gateway, body["request_id"])  # type: ignore[index]
    assert (status, job["status"]) == (200, "working")
    job = await finished(setup.gateway, body["request_id"])  # type: ignore[index]
    assert job["output"]["urls"] == [f"https://replicate.delivery/xezq/{prediction_id}/out-0.webp"]
    assert (await balance(setup.gateway))["spent"] - before["spent"] == PER_IMAGE


async def delivered(setup: Setup, delivery: tuple[str, int], since: int) -> None:
    """Wait for the mock to note the gateway's answer to a webhook sent after the `since`th (it notes it after
    the job may have ended)."""
    for _ in range(50):
        if delivery in setup.replicate.deliveries[since:]:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"no {delivery} among {setup.replicate.deliveries[since:]}")


def prediction_body(prediction_id: str, status: str, output: Any = None) -> bytes:
    files = f"https://replicate.delivery/xezq/{prediction_id}"
    return json.dumps({"id": prediction_id, "status": status, "input": {"prompt": "x"}, "logs": "", "error": None,
                       "output": output if output is not None else [f"{files}/out-0.webp"], "metrics": {}}).encode()


def signed(body: bytes, secret: str = WEBHOOK_SECRET, timestamp: int | None = None) -> dict[str, str]:
    stamp = int(time.time()) if timestamp is None else timestamp
    return {"webhook-id": "msg_test", "webhook-timestamp": str(stamp),
            "webhook-signature": sign(secret, "msg_test", stamp, body)}


async def deliver(
    setup: Setup, body: bytes, headers: dict[str, str] | None = None, provider: str = "replicate-hooks"
) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{setup.gateway}/v1/webhooks/replicate/{provider}", data=body,
                             headers={"Content-Type": "application/json", **(headers or signed(body))}) as r:
            return r.status, await r.json()


async def test_the_memory_store_finds_a_job_by_its_provider_id_until_the_record_expires() -> None:
    now = [1000.0]
    store = MemoryJobStore(clock=lambda: now[0])
    await store.link("replicate", "abc", "ep:{acct}:job:req_1", ttl_ms=60_000)
    assert (await store.linked("replicate", "abc"), await store.linked("other", "abc")) == ("ep:{acct}:job:req_1", None)
    now[0] += 60
    assert await store.linked("replicate", "abc") is None
