"""Budget alerts over MemoryStore and RedisStore (real redis-server): a threshold is claimed by the settle that
reaches it, once per budget period, into the account's outbox; AlertDelivery POSTs it, signed, to a loopback
webhook that checks the signature, retries while the webhook is down, and takes over an alert whose reader died."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import time
from contextlib import asynccontextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
import redis.asyncio as aioredis
from aiohttp import web

from proxy.alerts import ALERT_ID_HEADER, AlertDelivery
from proxy.auth.api_keys import hash_key
from proxy.config import AlertSettings, ConfigError, parse_config
from proxy.gateway import build_gateway
from proxy.meter import Meter
from proxy.metrics import AlertOutcome
from proxy.policy.types import Budget
from proxy.store import RedisStore, Store
from proxy.store.alerts import AlertOutbox
from tests.gateway_harness import gateway_config, write_policy
from tests.redis_server import free_port
from tests.test_meter import ALICE, Clock, decide
from tests.test_workers import eventually

SECRET = b"alert-signing-secret-0123456789"
THRESHOLDS = (5000, 8000, 10000)
DAILY = decide(budget=Budget(credits=10, period="day", alerts=THRESHOLDS), reserve_credits=1)
ALERTS = "ep:{acme}:al"


@pytest.fixture
def clock() -> Clock:
    return Clock(datetime.fromtimestamp(time.time(), timezone.utc))


def alerting_meter(store: Store, clock: Clock) -> Meter:
    return Meter(store, reservation_ttl_s=60, clock=clock, alert_keep_s=3 * 86_400)


async def spend(meter: Meter, calls: int, credits: float = 1.0, decision: Any = DAILY) -> None:
    for i in range(calls):
        admission = await meter.admit(ALICE, "m/a", decision, f"req-{i}")
        assert await admission.settle(credits, 1)


async def outbox_ids(store: Store) -> list[str]:
    outbox: AlertOutbox = store  # type: ignore[assignment]
    found = await outbox.read_alerts(ALERTS, "probe", 100, 0)
    return [entry.fields["id"] for entry in found]


class Receiver:
    """A webhook on loopback that verifies every signature and keeps the alerts; `up` False answers 503."""

    def __init__(self) -> None:
        self.up = True
        self.alerts: list[dict[str, Any]] = []
        self.refused = 0
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self._runner: web.AppRunner | None = None

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/hook", self._hook)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    async def _hook(self, request: web.Request) -> web.Response:
        if not self.up:
            self.refused += 1
            return web.Response(status=503)
        body = await request.read()
        timestamp = request.headers["X-Edge-Timestamp"]
        expected = "v1=" + hmac.new(SECRET, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, request.headers["X-Edge-Signature"]) \
                or abs(time.time() - int(timestamp)) > 300:
            return web.Response(status=401)
        alert = json.loads(body)
        assert request.headers[ALERT_ID_HEADER] == alert["id"]
        self.alerts.append(alert)
        return web.Response(status=204)

    def ids(self) -> list[str]:
        return [alert["id"] for alert in self.alerts]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    hook = await Receiver().start()
    yield hook
    await hook.stop()


class Counted:
    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def budget_alert(self, outcome: AlertOutcome, count: int = 1) -> None:
        self.counts[outcome] = self.counts.get(outcome, 0) + count


def delivery(store: Store, url: str, metrics: Counted, clock: Any = time.time, **settings: Any) -> AlertDelivery:
    options = {"webhook_url": url, "secret_env": "UNUSED", "sweep_interval_s": 0.2, **settings}
    return AlertDelivery(store, AlertSettings(**options), SECRET, metrics, clock=clock)  # type: ignore[arg-type]


@asynccontextmanager
async def running(alerts: AlertDelivery) -> AsyncIterator[None]:
    """The delivery loop in the background, cancelled (and its HTTP session closed) when the block ends."""
    task = asyncio.create_task(alerts.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_each_threshold_is_claimed_once_per_period_by_the_settle_that_reaches_it(
    store: Store, clock: Clock
) -> None:
    meter = alerting_meter(store, clock)
    await spend(meter, 4)
    assert await outbox_ids(store) == []
    await spend(meter, 1)  # 5 of 10: 50 %
    budget = f"acme/account/acme/d{datetime.fromtimestamp(clock.now, timezone.utc):%Y%m%d}"
    assert await outbox_ids(store) == [f"{budget}/5000"]
    await spend(meter, 5)  # 80 % and 100 % on the way; each once
    assert await outbox_ids(store) == [f"{budget}/5000", f"{budget}/8000", f"{budget}/10000"]
    clock.set(datetime.fromtimestamp(clock.now, timezone.utc) + timedelta(days=1))  # a new period fires again
    await spend(meter, 5)
    ids = await outbox_ids(store)
    assert len(ids) == 4 and ids[3].endswith("/5000") and ids[3] != ids[0]


async def test_thresholds_are_not_claimed_without_a_webhook(store: Store, clock: Clock) -> None:
    meter = Meter(store, reservation_ttl_s=60, clock=clock)  # alert_keep_s 0: alerts are off
    await spend(meter, 10)
    assert await outbox_ids(store) == []


async def test_a_signed_alert_reaches_the_webhook_after_it_comes_back_up(
    store: Store, clock: Clock, receiver: Receiver
) -> None:
    meter = alerting_meter(store, clock)
    metrics = Counted()
    receiver.up = False
    async with running(delivery(store, receiver.url, metrics, max_backoff_s=0.5, claim_after_s=30)):
        await spend(meter, 5)
        await eventually(lambda: receiver.refused >= 2)  # retried with backoff while the webhook is down
        receiver.up = True
        await eventually(lambda: len(receiver.alerts) == 1)
        await eventually(lambda: metrics.counts.get("delivered") == 1)
    alert = receiver.alerts[0]
    assert alert["type"] == "budget.threshold_reached" and alert["threshold"] == 0.5
    assert alert["account"] == "acme" and alert["spent"] == 5.0 and alert["budget"]["credits"] == 10.0
    assert alert["trigger"] == {"key": "key1", "user": "u:g:alice", "request_id": "req-4"}
    assert metrics.counts["fired"] == 1 and metrics.counts["retried"] >= 2
    assert await outbox_ids(store) == []  # acknowledged and deleted


async def test_an_alert_read_by_a_reader_that_died_is_taken_over_and_delivered(
    store: Store, clock: Clock, receiver: Receiver
) -> None:
    meter = alerting_meter(store, clock)
    await spend(meter, 5)
    outbox: AlertOutbox = store  # type: ignore[assignment]
    assert len(await outbox.read_alerts(ALERTS, "dead-replica", 10, 60_000)) == 1  # read, never acknowledged
    metrics = Counted()
    async with running(delivery(store, receiver.url, metrics, max_backoff_s=0.2, timeout_s=0.5, claim_after_s=1)):
        await eventually(lambda: len(receiver.alerts) == 1)
    assert receiver.alerts[0]["threshold"] == 0.5


async def test_an_alert_older_than_retry_for_is_given_up_and_counted_failed(
    store: Store, clock: Clock, receiver: Receiver
) -> None:
    meter = alerting_meter(store, clock)
    await spend(meter, 5)
    metrics = Counted()
    a_day_later = lambda: clock.now + 86_401  # noqa: E731 - the delivery's clock judges the alert's age
    async with running(delivery(store, receiver.url, metrics, a_day_later)):
        await eventually(lambda: metrics.counts.get("failed") == 1)
    assert receiver.alerts == [] and await outbox_ids(store) == []


@pytest.mark.parametrize(("alerts", "env", "expected"), [
    ({"webhook_url": "https://hooks.example/a"}, {},
     "alerts: webhook_url needs its signing secret: give exactly one of secret_env or secret_file"),
    ({"webhook_url": "hooks.example/a", "secret_env": "S"}, {}, "alerts.webhook_url: String should match pattern"),
    ({"webhook_url": "https://hooks.example/a", "secret_env": "S", "claim_after_s": 10}, {},
     "claim_after_s (10) must exceed max_backoff_s + timeout_s (35)"),
    ({"webhook_url": "https://hooks.example/a", "secret_env": "ALERT_SECRET_UNSET"}, {},
     "alerts.secret_env: env var ALERT_SECRET_UNSET is unset or shorter than 16 bytes"),
    ({"webhook_url": "https://hooks.example/a", "secret_env": "ALERT_SECRET_SHORT"}, {"ALERT_SECRET_SHORT": "abc"},
     "alerts.secret_env: env var ALERT_SECRET_SHORT is unset or shorter than 16 bytes"),
    ({"webhook_url": "https://hooks.example/a", "secret_file": "missing-secret"}, {},
     "alerts.secret_file: cannot read"),
])
def test_invalid_alert_config_stops_start_up_naming_file_key_and_fix(
    alerts: dict[str, Any], env: dict[str, str], expected: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("ALERT_SECRET_UNSET", raising=False)
    config = gateway_config("http://127.0.0.1:9", write_policy(tmp_path / "policies"), alerts=alerts)
    with pytest.raises(ConfigError) as error:
        build_gateway(parse_config(config, "conf/gateway.yaml").model_copy(update={"base_dir": str(tmp_path)}))
    assert str(error.value).startswith("conf/gateway.yaml:") and expected in str(error.value)


@pytest.mark.parametrize(("budget", "expected"), [
    ("alerts: {thresholds: [0.8, 0.5]}", "plans.demo.budget.alerts.thresholds[1]: 0.5 is not above the threshold"),
    ("alerts: {thresholds: [1.5]}", "plans.demo.budget.alerts.thresholds[0]: 1.5 is not a share in (0, 1]"),
    ("alerts: {threshold: [0.5]}", "plans.demo.budget.alerts.threshold: unknown key; did you mean 'thresholds'?"),
])
def test_invalid_alert_thresholds_stop_start_up_naming_file_key_and_fix(
    budget: str, expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MOCK_PROVIDER_KEY", "x")
    policy = f'plans:\n  demo:\n    models: ["mock/*"]\n    budget: {{credits: 10, {budget}}}\n'
    config = gateway_config("http://127.0.0.1:9", write_policy(tmp_path / "policies", policy))
    with pytest.raises(ConfigError) as error:
        build_gateway(parse_config(config, "conf/gateway.yaml"))
    assert "test.yaml: " + expected in str(error.value)


def test_a_keys_override_replaces_its_plans_thresholds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = "sk_test_" + "o" * 40
    policy = (f'plans:\n  demo:\n    models: ["mock/*"]\n    budget: {{credits: 10, alerts: {{thresholds: [0.5]}}}}\n'
              f'keys:\n  - {{id: quiet, hash: "{hash_key(key)}", plan: demo,\n'
              f'     overrides: {{budget: {{alerts: {{thresholds: [0.9, 1]}}}}}}}}\n')
    monkeypatch.setenv("MOCK_PROVIDER_KEY", "x")
    config = gateway_config("http://127.0.0.1:9", write_policy(tmp_path / "policies", policy))
    gateway = build_gateway(parse_config(config, "conf/gateway.yaml"))
    budget = gateway.policy.current.key_plans["quiet"].budget
    assert budget is not None and (budget.credits, budget.alerts) == (10, (9000, 10000))


async def test_an_alert_claimed_by_a_replica_that_died_before_reading_it_is_found_by_anothers_sweep(
    redis_url: str, clock: Clock, receiver: Receiver
) -> None:
    """The claiming replica's settle landed, then it died: its outbox entry is unread and no other replica was told
    about it; another replica's sweep (SCAN of the outboxes) finds it within sweep_interval_s and delivers it."""
    client = aioredis.Redis.from_url(redis_url)
    await client.flushdb()
    await client.aclose()
    dead, alive = RedisStore(redis_url), RedisStore(redis_url)
    try:
        await spend(alerting_meter(dead, clock), 5)  # claims 50 % into the outbox; `dead` never delivers
        metrics = Counted()
        async with running(delivery(alive, receiver.url, metrics, sweep_interval_s=0.5)):
            await eventually(lambda: len(receiver.alerts) == 1)
        assert receiver.alerts[0]["threshold"] == 0.5 and "fired" not in metrics.counts  # fired where claimed
        assert await alive.alert_streams() == []  # delivered, acknowledged, the emptied outbox deleted
    finally:
        await dead.close()
        await alive.close()
