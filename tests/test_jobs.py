"""Jobs that outlive the connection, end to end: replicas sharing a real Redis, a mock fal.ai queue, jobs of ~1 s.

Replica A streams until a job ends; replica B detaches streams after 0.4 s; a replica run as a subprocess is
killed mid-job and another one finishes the job from its stored handle. Every job is charged exactly once."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest
import pytest_asyncio
from multidict import CIMultiDict

from proxy.auth.api_keys import hash_key

from .gateway_harness import PROVIDER_KEY, TEST_KEY, gateway_config, gateway_process, start_gateway, write_policy
from .mock_fal import VIDEO, MockFal
from .redis_server import RedisServer
from .test_responses import events_of

pytestmark = pytest.mark.asyncio(loop_scope="module")

API_KEY = {"Authorization": f"Bearer {TEST_KEY}"}
CANCELLER_KEY = "sk_test_" + "c" * 40
CANCELLER = {"Authorization": f"Bearer {CANCELLER_KEY}"}
VIDEO_PRICE, PER_SECOND, PER_IMAGE, PER_MEGAPIXEL = 1, 10, 3, 100
POLICY = f"""
plans:
  demo:
    models: ["mock/*"]
    budget: {{credits: 100000, period: month, scope: account}}
  canceller:
    models: ["mock/*"]
    budget: {{credits: 100000, period: month, scope: account}}
    jobs: {{cancel_on_disconnect: true}}
keys:
  - {{id: canceller, hash: "{hash_key(CANCELLER_KEY)}", plan: canceller}}
prices:
  "mock/*": {{per_request: 1}}
  mock/video: {{per_request: {VIDEO_PRICE}, per_second: {PER_SECOND}}}
  mock/flux: {{per_image: {PER_IMAGE}}}
  mock/flux-mp: {{per_megapixel: {PER_MEGAPIXEL}}}
"""


def video_cost(seconds: int) -> int:
    return VIDEO_PRICE + PER_SECOND * seconds


class Replicas:
    def __init__(self, a: str, b: str, fal: MockFal, config: dict[str, Any]) -> None:
        self.a, self.b, self.fal, self.config = a, b, fal, config


def jobs_config(
    fal: MockFal, redis_url: str, policies: Path, detach_after_s: float, closed_port: int
) -> dict[str, Any]:
    """Provider `fal` is the mock; `fal-down` a port nothing listens on."""
    config = gateway_config("http://127.0.0.1:9/v1", policies, store={"kind": "redis", "redis_url": redis_url},
                            jobs={"detach_after_s": detach_after_s, "poll_after_ms": 250, "lease_s": 1})
    config["providers"]["fal"] = {
        "kind": "fal", "base_url": fal.url, "api_key_env": "MOCK_PROVIDER_KEY",
        "timeouts": {"connect_s": 2, "first_byte_s": 2, "idle_s": 2, "total_s": 30},
        "jobs": {"poll_interval_s": 0.1, "timeout_s": 20, "retries": 2},
    }
    config["providers"]["fal-down"] = {**config["providers"]["fal"], "base_url": f"http://127.0.0.1:{closed_port}",
                                       "jobs": {"poll_interval_s": 0.1, "timeout_s": 20, "retries": 1}}
    config["models"] = [
        {"id": "mock/video", "name": "Mock Video", "creator": "Tests", "capability": "text2video",
         "provider": "fal", "upstream_model": "fal-ai/kling-video/v2/standard/text-to-video"},
        {"id": "mock/unreachable", "name": "Mock Unreachable", "creator": "Tests", "capability": "text2video",
         "provider": "fal-down", "upstream_model": "fal-ai/kling-video/v2/standard/text-to-video"},
        {"id": "mock/flux", "name": "Mock Flux", "creator": "Tests", "capability": "text2image",
         "provider": "fal", "upstream_model": "fal-ai/flux/dev"},
        {"id": "mock/flux-mp", "name": "Mock Flux by megapixel", "creator": "Tests", "capability": "text2image",
         "provider": "fal", "upstream_model": "fal-ai/flux/dev"},
    ]
    return config


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def replicas(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Replicas]:
    import os

    os.environ["EDGE_PROXY_DEMO_KEY"], os.environ["MOCK_PROVIDER_KEY"] = TEST_KEY, PROVIDER_KEY
    policies = write_policy(tmp_path_factory.mktemp("policies"), POLICY)
    # Bound and never listened on: connections are refused, and no other process can take the port meanwhile.
    with RedisServer() as redis, socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        fal = await MockFal(PROVIDER_KEY).start()
        a = await start_gateway(jobs_config(fal, redis.url, policies, 10, port))
        b = await start_gateway(jobs_config(fal, redis.url, policies, 0.4, port))
        try:
            yield Replicas(a.url, b.url, fal, jobs_config(fal, redis.url, policies, 10, port))
        finally:
            await a.stop()
            await b.stop()
            await fal.stop()


async def submit(
    gateway: str, body: dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[int, CIMultiDict[str], list[tuple[str, dict[str, Any]]] | dict[str, Any]]:
    """POST /v1/responses: the status, headers, and the events (a stream) or the JSON body."""
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{gateway}/v1/responses", json=body, headers={**API_KEY, **(headers or {})}) as r:
            if r.content_type == "text/event-stream":
                return r.status, CIMultiDict(r.headers), [event async for event in events_of(r)]
            return r.status, CIMultiDict(r.headers), await r.json()


async def poll(gateway: str, request_id: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{gateway}/v1/responses/{request_id}", headers=headers or API_KEY) as r:
            return r.status, await r.json()


async def finished(
    gateway: str, request_id: str, headers: dict[str, str] = API_KEY, timeout_s: float = 10.0
) -> dict[str, Any]:
    for _ in range(int(timeout_s / 0.1)):
        status, job = await poll(gateway, request_id, headers)
        assert status == 200, job
        if job["status"] != "working":
            return job
        await asyncio.sleep(0.1)
    raise AssertionError(f"job {request_id} did not finish: {job}")


async def balance(gateway: str, headers: dict[str, str] = API_KEY) -> dict[str, float]:
    """The account's balance once nothing is held (jobs settle just after they finish)."""
    async with aiohttp.ClientSession() as http:
        for _ in range(100):
            async with http.get(f"{gateway}/v1/me", headers=headers) as r:
                current = (await r.json())["balance"]
            if current["held"] == 0:
                return current
            await asyncio.sleep(0.05)
    raise AssertionError(f"a hold was never settled: {current}")


async def held(gateway: str) -> float:
    """The credits the account holds now (a job submitted with respond-async holds until it settles)."""
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{gateway}/v1/me", headers=API_KEY) as r:
            return (await r.json())["balance"]["held"]


async def token_for(gateway: str, sub: str) -> dict[str, str]:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{gateway}/v1/tokens", json={"sub": sub}, headers=API_KEY) as r:
            return {"Authorization": f"Bearer {(await r.json())['token']}"}


async def test_a_video_job_streams_progress_to_its_result_and_is_charged_its_seconds(replicas: Replicas) -> None:
    before = await balance(replicas.a)
    status, headers, events = await submit(replicas.a, {"model": "mock/video", "prompt": "a cat", "duration": 2})
    assert status == 200 and isinstance(events, list)
    names = [name for name, _ in events]
    assert names[0] == "generation.status" and names[-1] == "generation.completed", events
    statuses = [data for name, data in events if name == "generation.status"]
    assert {"status": "queued", "queue_position": 2} in statuses and {"status": "running"} in statuses
    output = events[-1][1]["output"]
    assert output["url"].startswith("https://v3.fal.media/files/") and output["content_type"] == "video/mp4"
    assert (await balance(replicas.a))["spent"] - before["spent"] == video_cost(2)
    status, job = await poll(replicas.b, headers["X-Request-Id"])  # the result, from any replica
    assert (status, job["status"], job["output"]) == (200, "completed", output)
    submitted = replicas.fal.jobs[next(reversed(replicas.fal.jobs))]
    assert (submitted.model, submitted.inputs) == ("fal-ai/kling-video/v2/standard/text-to-video",
                                                  {"prompt": "a cat", "aspect_ratio": "1:1", "duration": 2})


async def test_a_detached_stream_ends_and_another_replica_answers_the_poll(replicas: Replicas) -> None:
    before = await balance(replicas.a)
    _, headers, events = await submit(replicas.b, {"model": "mock/video", "prompt": "a dog", "duration": 3})
    assert isinstance(events, list) and events[-1] == ("generation.detached", {"poll_after_ms": 250})
    job = await finished(replicas.a, headers["X-Request-Id"])
    assert job["status"] == "completed" and job["output"]["url"].endswith("/output.mp4")
    assert (await balance(replicas.a))["spent"] - before["spent"] == video_cost(3)


async def test_respond_async_answers_202_at_once_and_the_poll_completes(replicas: Replicas) -> None:
    before = await balance(replicas.a)
    status, headers, body = await submit(replicas.a, {"model": "mock/flux", "prompt": "a fox", "n": 2},
                                         {"Prefer": "wait=5, respond-async"})
    assert status == 202 and isinstance(body, dict)
    assert body == {"request_id": headers["X-Request-Id"], "status": "working", "poll_after_ms": 250}
    assert (headers["Location"], headers["Preference-Applied"]) == (f"/v1/responses/{body['request_id']}",
                                                                    "respond-async")
    status, working = await poll(replicas.b, body["request_id"])
    assert (status, working["status"]) == (200, "working")
    job = await finished(replicas.b, body["request_id"])
    assert job["status"] == "completed" and len(job["output"]["urls"]) == 2
    assert (await balance(replicas.a))["spent"] - before["spent"] == 2 * PER_IMAGE
    assert replicas.fal.jobs[next(reversed(replicas.fal.jobs))].inputs["num_images"] == 2


async def test_a_per_megapixel_image_job_is_charged_the_megapixels_the_provider_reports(replicas: Replicas) -> None:
    """Asked for 1:1 (fal's square_hd, 1024x1024): held for that, charged the mock's 1024x768."""
    before = await balance(replicas.a)
    _, _, body = await submit(replicas.a, {"model": "mock/flux-mp", "prompt": "a hen"}, {"Prefer": "respond-async"})
    assert isinstance(body, dict) and (await held(replicas.a)) == pytest.approx(PER_MEGAPIXEL * 1024 * 1024 / 1e6)
    job = await finished(replicas.a, body["request_id"])
    assert job["status"] == "completed"
    assert replicas.fal.jobs[next(reversed(replicas.fal.jobs))].inputs["image_size"] == "square_hd"
    spent = (await balance(replicas.a))["spent"] - before["spent"]
    assert spent == pytest.approx(PER_MEGAPIXEL * 1024 * 768 / 1e6)


async def test_a_provider_reporting_bigger_images_than_asked_is_charged_no_more_than_the_hold(
    replicas: Replicas,
) -> None:
    """Asked for two 16:9 images (1024x576 each); the mock reports 1024x768: the charge stops at the hold."""
    before = await balance(replicas.a)
    _, _, body = await submit(replicas.a, {"model": "mock/flux-mp", "prompt": "two owls", "n": 2,
                                           "aspect_ratio": "16:9"}, {"Prefer": "respond-async"})
    assert isinstance(body, dict)
    hold = await held(replicas.a)
    assert hold == pytest.approx(PER_MEGAPIXEL * 2 * 1024 * 576 / 1e6)
    job = await finished(replicas.a, body["request_id"])
    assert job["status"] == "completed" and len(job["output"]["urls"]) == 2
    assert replicas.fal.jobs[next(reversed(replicas.fal.jobs))].inputs["image_size"] == "landscape_16_9"
    assert (await balance(replicas.a))["spent"] - before["spent"] == pytest.approx(hold)


async def test_an_idempotent_retry_returns_the_same_job_and_is_charged_once(replicas: Replicas) -> None:
    before = await balance(replicas.a)
    body, key = {"model": "mock/video", "prompt": "retried", "duration": 1}, {"Idempotency-Key": "order-77"}
    answers = await asyncio.gather(
        submit(replicas.a, body, {**key, "Prefer": "respond-async"}),
        submit(replicas.b, body, {**key, "Prefer": "respond-async"}),
    )
    ids = {answer[2]["request_id"] for answer in answers}  # type: ignore[index]
    assert len(ids) == 1 and [answer[0] for answer in answers] == [202, 202]
    _, headers, events = await submit(replicas.a, body, key)  # streamed: the same job's events
    assert headers["X-Request-Id"] in ids and isinstance(events, list)
    assert events[-1][0] == "generation.completed"
    assert replicas.fal.submitted("retried") == 1
    assert (await balance(replicas.a))["spent"] - before["spent"] == video_cost(1)
    status, _, error = await submit(replicas.a, {**body, "duration": 2}, key)
    assert (status, error["error"]["code"], error["error"]["param"]) == (  # type: ignore[index]
        422, "idempotency_key_reused", "Idempotency-Key")


async def assert_fails_and_releases_its_hold(gateway: str, body: dict[str, Any], reason: str) -> None:
    """The job's last event is `generation.failed` (an upstream_error saying `reason`); nothing is charged."""
    before = await balance(gateway)
    _, _, events = await submit(gateway, body)
    assert isinstance(events, list) and events[-1][0] == "generation.failed"
    error = events[-1][1]["error"]
    assert error["code"] == "upstream_error" and reason in error["message"]
    after = await balance(gateway)
    assert (after["spent"], after["held"]) == (before["spent"], 0)


async def test_a_failed_job_releases_its_hold(replicas: Replicas) -> None:
    await assert_fails_and_releases_its_hold(
        replicas.a, {"model": "mock/video", "prompt": "fail", "duration": 5}, "Internal error while generating")


async def test_a_provider_answering_503_is_polled_again_and_the_job_completes(replicas: Replicas) -> None:
    before = await balance(replicas.a)
    _, _, events = await submit(replicas.a, {"model": "mock/video", "prompt": "flaky", "duration": 1})
    assert isinstance(events, list) and events[-1][0] == "generation.completed", events
    assert (await balance(replicas.a))["spent"] - before["spent"] == video_cost(1)


async def test_an_unreachable_provider_fails_the_job_after_its_retries_and_releases_the_hold(
    replicas: Replicas
) -> None:
    await assert_fails_and_releases_its_hold(
        replicas.a, {"model": "mock/unreachable", "prompt": "x", "duration": 3}, "could not be reached")


async def test_job_outputs_are_re_hosted_into_the_asset_store_when_configured(replicas: Replicas) -> None:
    config = {**replicas.config, "assets": {"rehost": {"enabled": True, "private_hosts": ["127.0.0.1"]}}}
    rehosting = await start_gateway(config)
    try:
        _, _, events = await submit(rehosting.url, {"model": "mock/video", "prompt": "hosted here", "duration": 1})
        assert isinstance(events, list) and events[-1][0] == "generation.completed", events
        url = events[-1][1]["output"]["url"]
        assert url.startswith(f"{rehosting.url}/v1/assets/")
        async with aiohttp.ClientSession() as http:
            async with http.get(url) as r:
                assert (r.status, r.content_type, await r.read()) == (200, "video/mp4", VIDEO)
    finally:
        await rehosting.stop()


async def test_a_users_token_reads_only_that_users_jobs(replicas: Replicas) -> None:
    alice, bob = await token_for(replicas.a, "alice"), await token_for(replicas.a, "bob")
    _, _, body = await submit(replicas.a, {"model": "mock/flux", "prompt": "alice's"}, {**alice, "Prefer": "respond-async"})
    request_id = body["request_id"]  # type: ignore[index]
    assert (await poll(replicas.a, request_id, alice))[0] == 200  # A: the replica whose signing key minted them
    for stranger in (bob, API_KEY):  # another user, and the account's own key (another principal)
        status, error = await poll(replicas.a, request_id, stranger)
        assert (status, error["error"]["code"]) == (404, "not_found")
    await finished(replicas.a, request_id, alice)


async def leave_after_the_first_event(gateway: str, body: dict[str, Any], headers: dict[str, str]) -> str:
    """Open a job's stream, read its first event, hang up; the job's request id."""
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{gateway}/v1/responses", json=body, headers=headers) as r:
            assert (r.status, (await r.content.readline()).strip()) == (200, b"event: generation.status")
            return r.headers["X-Request-Id"]


async def test_a_client_that_leaves_does_not_cancel_the_job(replicas: Replicas) -> None:
    before = await balance(replicas.a)
    request_id = await leave_after_the_first_event(replicas.a, {"model": "mock/video", "prompt": "left",
                                                                "duration": 2}, API_KEY)
    assert (await finished(replicas.a, request_id))["status"] == "completed"
    assert (await balance(replicas.a))["spent"] - before["spent"] == video_cost(2)


async def test_a_plan_that_cancels_on_disconnect_cancels_at_the_provider_and_releases(replicas: Replicas) -> None:
    before = await balance(replicas.a, CANCELLER)
    request_id = await leave_after_the_first_event(replicas.a, {"model": "mock/video", "prompt": "cancel me",
                                                                "duration": 2}, CANCELLER)
    job = await finished(replicas.a, request_id, CANCELLER)
    assert job["status"] == "failed" and "disconnected" in job["error"]["message"]
    assert ("PUT", f"/fal-ai/kling-video/requests/{cancelled_id(replicas.fal, 'cancel me')}/cancel") in replicas.fal.calls
    after = await balance(replicas.a, CANCELLER)
    assert (after["spent"], after["held"]) == (before["spent"], 0)


def cancelled_id(fal: MockFal, prompt: str) -> str:
    return next(request_id for request_id, job in fal.jobs.items() if job.inputs.get("prompt") == prompt)


async def test_hostile_headers_and_ids_get_json_errors(replicas: Replicas) -> None:
    body = {"model": "mock/video", "prompt": "x"}
    for headers, param in [
        ({"Prefer": "respond-async, " + "x" * 2000}, "Prefer"),
        ({"Idempotency-Key": "k" * 256}, "Idempotency-Key"),
        ({"Idempotency-Key": "has space"}, "Idempotency-Key"),
    ]:
        status, _, error = await submit(replicas.a, body, headers)
        assert (status, error["error"]["code"], error["error"]["param"]) == (400, "invalid_request", param)  # type: ignore[index]
    async with aiohttp.ClientSession() as http:
        twice = [("Idempotency-Key", "a-key-1"), ("Idempotency-Key", "a-key-2"), *API_KEY.items()]
        async with http.post(f"{replicas.a}/v1/responses", json=body, headers=twice) as r:
            assert (r.status, (await r.json())["error"]["param"]) == (400, "Idempotency-Key")
    for request_id, expected in [("req_" + "0" * 24, (404, "not_found")), ("nope", (400, "invalid_request")),
                                 ("req_" + "A" * 24, (400, "invalid_request")), ("%00" * 40, (400, "invalid_request"))]:
        status, error = await poll(replicas.a, request_id)
        assert (status, error["error"]["code"]) == expected, request_id
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{replicas.a}/v1/responses/req_{'0' * 24}") as r:
            assert (r.status, (await r.json())["error"]["code"]) == (401, "missing_credentials")


async def test_a_replica_killed_mid_job_leaves_the_job_to_another_charged_once(
    replicas: Replicas, tmp_path: Path
) -> None:
    before = await balance(replicas.a)
    async with gateway_process(replicas.config, tmp_path) as (process, url):
        status, _, body = await submit(url, {"model": "mock/video", "prompt": "orphaned", "duration": 4},
                                       {"Prefer": "respond-async"})
        assert status == 202
        request_id = body["request_id"]  # type: ignore[index]
        while replicas.fal.submitted("orphaned") == 0:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)  # the handle is stored; the job is queued at the provider
        process.kill()  # no shutdown: its lease must expire before another replica resumes the job
        await process.wait()
    job = await finished(replicas.b, request_id)
    assert job["status"] == "completed", json.dumps(job)
    assert replicas.fal.submitted("orphaned") == 1  # resumed from the stored handle, not submitted again
    assert (await balance(replicas.a))["spent"] - before["spent"] == video_cost(4)
