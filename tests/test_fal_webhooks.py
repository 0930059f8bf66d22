"""fal.ai's webhooks, end to end: a gateway on a real Redis, a mock fal queue on loopback that calls the gateway
back signed with a real ED25519 key and publishes its public half as a JWKS. A job completes by webhook long
before its next poll and is charged once; a failed run releases its hold; forged, tampered, stale, unknown-key
and malformed webhooks are refused and change nothing."""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any, AsyncIterator

import aiohttp
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from multidict import CIMultiDict

from proxy.errors import ApiError
from proxy.jobs import webhooks
from proxy.jobs.webhooks import JwksVerifier

from .gateway_harness import PROVIDER_KEY, TEST_KEY, gateway_config, start_gateway, write_policy
from .mock_fal import MockFal, output_of
from .redis_server import RedisServer
from .test_jobs import balance, finished, poll, submit
from .test_replicate_jobs import HOOKED_POLL_S, PER_IMAGE  # the same price and fallback poll

pytestmark = pytest.mark.asyncio(loop_scope="module")

POLICY = f"""
plans:
  demo: {{models: ["mock/*"], budget: {{credits: 100000, period: month, scope: account}}}}
prices:
  mock/f-hooked: {{per_image: {PER_IMAGE}}}
"""


class Setup:
    def __init__(self, gateway: str, fal: MockFal) -> None:
        self.gateway, self.fal = gateway, fal


def fal_config(fal: MockFal, redis_url: str, policies: Any) -> dict[str, Any]:
    config = gateway_config("http://127.0.0.1:9/v1", policies, store={"kind": "redis", "redis_url": redis_url},
                            jobs={"detach_after_s": 10, "poll_after_ms": 250, "lease_s": 2})
    polled = {"kind": "fal", "base_url": fal.url, "api_key_env": "MOCK_PROVIDER_KEY",
              "timeouts": {"connect_s": 2, "first_byte_s": 2, "idle_s": 2, "total_s": 30},
              "jobs": {"poll_interval_s": 0.1, "timeout_s": 20, "retries": 2}}
    config["providers"]["fal"] = polled
    config["providers"]["fal-hooks"] = {**polled, "jobs": {
        "poll_interval_s": HOOKED_POLL_S, "timeout_s": 20, "retries": 2, "webhooks": True,
        "webhook_jwks_url": f"{fal.url}/.well-known/jwks.json"}}
    config["models"] = [
        {"id": "mock/f-hooked", "name": "Flux (webhooks)", "creator": "Tests", "capability": "text2image",
         "provider": "fal-hooks", "upstream_model": "fal-ai/flux/dev"},
    ]
    return config


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def setup(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Setup]:
    os.environ.update(EDGE_PROXY_DEMO_KEY=TEST_KEY, MOCK_PROVIDER_KEY=PROVIDER_KEY)
    policies = write_policy(tmp_path_factory.mktemp("policies"), POLICY)
    with RedisServer() as redis:
        fal = await MockFal(PROVIDER_KEY).start()
        gateway = await start_gateway(fal_config(fal, redis.url, policies))
        try:
            yield Setup(gateway.url, fal)
        finally:
            await gateway.stop()
            await fal.stop()


async def test_a_webhook_completes_the_job_before_the_next_poll_and_it_is_charged_once(setup: Setup) -> None:
    before, started, since = await balance(setup.gateway), time.monotonic(), len(setup.fal.deliveries)
    _, _, events = await submit(setup.gateway, {"model": "mock/f-hooked", "prompt": "hooked"})
    assert isinstance(events, list) and events[-1][0] == "generation.completed", events
    assert time.monotonic() - started < HOOKED_POLL_S - 1  # the runner polled once, then slept 5 s
    [(request_id, job)] = [(rid, job) for rid, job in setup.fal.jobs.items() if job.inputs.get("prompt") == "hooked"]
    assert job.webhook == f"{setup.gateway}/v1/webhooks/fal/fal-hooks"
    assert ("GET", f"/fal-ai/flux/requests/{request_id}") not in setup.fal.calls  # the result came by webhook
    await delivered(setup, ("OK", 200), since)
    assert events[-1][1]["output"]["urls"] == [f"https://v3.fal.media/files/{request_id}/0.png"]
    spent = (await balance(setup.gateway))["spent"]
    assert spent - before["spent"] == PER_IMAGE
    # fal delivers again (a retry): answered, and the job is neither finished nor charged a second time.
    body = delivery(request_id, "OK", output_of(job, request_id, setup.fal.url))
    assert await deliver(setup, body, setup.fal.sign(request_id, body)) == (200, {"received": True})
    after = await balance(setup.gateway)
    assert (after["spent"], after["held"]) == (spent, 0)


async def test_an_error_by_webhook_fails_the_job_and_releases_its_hold(setup: Setup) -> None:
    before, since = await balance(setup.gateway), len(setup.fal.deliveries)
    _, _, events = await submit(setup.gateway, {"model": "mock/f-hooked", "prompt": "fail"})
    assert isinstance(events, list) and events[-1][0] == "generation.failed", events
    assert "422" in events[-1][1]["error"]["message"]
    await delivered(setup, ("ERROR", 200), since)
    after = await balance(setup.gateway)
    assert (after["spent"], after["held"]) == (before["spent"], 0)


async def test_forged_tampered_stale_or_unknown_key_webhooks_are_refused_and_change_nothing(setup: Setup) -> None:
    before, fal = await balance(setup.gateway), setup.fal
    fal.run_s = 3.0  # the run (and its real webhook) ends after the attacks
    try:
        _, _, body = await submit(setup.gateway, {"model": "mock/f-hooked", "prompt": "guarded"},
                                  {"Prefer": "respond-async"})
        while not any(job.inputs.get("prompt") == "guarded" for job in fal.jobs.values()):
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)  # the gateway indexed the request id
    finally:
        fal.run_s = 1.0
    [request_id] = [rid for rid, job in fal.jobs.items() if job.inputs.get("prompt") == "guarded"]
    forged = delivery(request_id, "OK", {"images": [{"url": "https://evil.example/x.png"}]})
    other_key, fetches, now = Ed25519PrivateKey.generate(), fal.jwks_fetches, int(time.time())
    attacks: list[tuple[bytes, dict[str, str], str, tuple[int, str]]] = [
        (forged, fal.sign(request_id, forged, key=other_key), "fal/fal-hooks",
         (401, "invalid_webhook_signature")),  # a key fal does not publish
        (forged, fal.sign(request_id, delivery(request_id, "ERROR", {})), "fal/fal-hooks",
         (401, "invalid_webhook_signature")),  # a real signature over another body
        (forged, fal.sign(request_id, forged, timestamp=now - 3600), "fal/fal-hooks",
         (401, "invalid_webhook_signature")),  # a replay: too old
        (forged, {**fal.sign(request_id, forged), "X-Fal-Webhook-Request-Id": "another"}, "fal/fal-hooks",
         (401, "invalid_webhook_signature")),  # the signed headers changed
        (forged, {**fal.sign(request_id, forged), "X-Fal-Webhook-Signature": "zz"}, "fal/fal-hooks",
         (400, "invalid_request")),
        (forged, {**fal.sign(request_id, forged), "X-Fal-Webhook-Timestamp": "-1"}, "fal/fal-hooks",
         (400, "invalid_request")),
        (forged, {"Content-Type": "application/json"}, "fal/fal-hooks", (400, "invalid_request")),
        (b"[1]", fal.sign(request_id, b"[1]"), "fal/fal-hooks", (400, "invalid_request")),
        (unknown := delivery("unknown-request", "OK", {}), fal.sign("unknown-request", unknown), "fal/fal-hooks",
         (404, "not_found")),
        (forged, fal.sign(request_id, forged), "fal/fal", (404, "not_found")),  # a provider without webhooks
        (forged, fal.sign(request_id, forged), "replicate/fal-hooks", (404, "not_found")),  # another kind's route
    ]
    for data, headers, route, expected in attacks:
        status, answer = await deliver(setup, data, headers, route)
        assert (status, answer["error"]["code"]) == expected, (route, expected, answer)
    assert fal.jwks_fetches - fetches <= 1  # unknown signatures refetch the keys at most once per cooldown
    status, job = await poll(setup.gateway, body["request_id"])  # type: ignore[index]
    assert (status, job["status"]) == (200, "working")
    job = await finished(setup.gateway, body["request_id"])  # type: ignore[index]
    assert job["output"]["urls"] == [f"https://v3.fal.media/files/{request_id}/0.png"]
    assert (await balance(setup.gateway))["spent"] - before["spent"] == PER_IMAGE


async def test_a_rotated_key_is_fetched_on_its_first_use_and_unknown_keys_refetch_once_per_cooldown() -> None:
    fal = await MockFal(PROVIDER_KEY).start()
    try:
        verifier = JwksVerifier(f"{fal.url}/.well-known/jwks.json", tolerance_s=300)
        body = delivery("r1", "OK", {})
        await verifier.verify(CIMultiDict(fal.sign("r1", body)), body, time.time())
        await verifier.verify(CIMultiDict(fal.sign("r1", body)), body, time.time())
        assert fal.jwks_fetches == 1  # cached
        verifier._fetched_at -= webhooks.JWKS_REFETCH_S + 1  # the cooldown since the last fetch has passed
        fal.signing_key = Ed25519PrivateKey.generate()  # fal rotates its key
        await verifier.verify(CIMultiDict(fal.sign("r1", body)), body, time.time())
        assert fal.jwks_fetches == 2
        for _ in range(3):  # forged signatures within the cooldown: refused, no fetch
            with pytest.raises(ApiError) as refused:
                await verifier.verify(CIMultiDict(fal.sign("r1", body, key=Ed25519PrivateKey.generate())), body,
                                      time.time())
            assert refused.value.code == "invalid_webhook_signature"
        assert fal.jwks_fetches == 2
    finally:
        await fal.stop()


async def delivered(setup: Setup, expected: tuple[str, int], since: int) -> None:
    """Wait for the mock to note the gateway's answer to a webhook sent after the `since`th."""
    for _ in range(50):
        if expected in setup.fal.deliveries[since:]:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"no {expected} among {setup.fal.deliveries[since:]}")


def delivery(request_id: str, status: str, payload: dict[str, Any]) -> bytes:
    return json.dumps({"request_id": request_id, "gateway_request_id": request_id, "status": status,
                       "payload": payload, "error": None if status == "OK" else "failed"}).encode()


async def deliver(setup: Setup, body: bytes, headers: dict[str, str], route: str = "fal/fal-hooks",
                  ) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{setup.gateway}/v1/webhooks/{route}", data=body,
                             headers={"Content-Type": "application/json", **headers}) as r:
            return r.status, await r.json()
