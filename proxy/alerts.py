"""Budget alert delivery: POST each alert of the outboxes (proxy/store/alerts.py) to the configured webhook, signed,
retried with exponential backoff, acknowledged once delivered (docs/usage.md, "Budget alerts").

Every replica runs one AlertDelivery. It reads the outboxes its own settles appended to at once, and every
`sweep_interval_s` all of them (an alert claimed by a replica that died before reading it); an alert read by a
replica that died is taken over `claim_after_s` later. Delivery is at least once: the receiver dedupes on the
alert id (the payload's `id` and the X-Edge-Proxy-Alert-Id header).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Protocol
from urllib.parse import unquote

import aiohttp

from proxy.config import AlertSettings, Config, ConfigError
from proxy.export.signature import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign
from proxy.metrics import AlertOutcome
from proxy.store.alerts import AlertOutbox, OutboxEntry
from proxy.store.base import StoreError

log = logging.getLogger(__name__)

ALERT_ID_HEADER = "X-Edge-Alert-Id"
MIN_SECRET_BYTES = 16
READ_BATCH = 100
TICK_S = 1.0  # how often outboxes with alerts in hand are read again (due retries, taken-over alerts)

class AlertMetrics(Protocol):
    def budget_alert(self, outcome: AlertOutcome, count: int = 1) -> None:
        ...


def load_secret(config: Config) -> bytes:
    """The webhook's signing secret from `alerts.secret_env` or `alerts.secret_file`; ConfigError naming the key."""
    alerts = config.alerts
    if alerts.secret_env:
        secret = os.environ.get(alerts.secret_env, "").strip()
        where = f"alerts.secret_env: env var {alerts.secret_env}"
    else:
        assert alerts.secret_file is not None  # one of the two, checked with the config
        path = config.path(alerts.secret_file)
        try:
            secret = Path(path).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"{config.source}: alerts.secret_file: cannot read {path}: {exc.strerror}; fix the "
                              "path") from None
        where = f"alerts.secret_file {path}"
    if len(secret.encode()) < MIN_SECRET_BYTES:
        raise ConfigError(f"{config.source}: {where} is unset or shorter than {MIN_SECRET_BYTES} bytes; set a "
                          "random secret, e.g. the output of `openssl rand -hex 32`")
    return secret.encode()


def payload(fields: dict[str, str]) -> dict[str, Any]:
    """The webhook's JSON for one outbox entry."""
    account, scope, owner, period = (fields["budget"].split("/") + ["", "", "", ""])[:4]
    budget = int(fields["budget_micro"])
    spent = int(fields["spent_micro"])
    return {
        "id": fields["id"],
        "type": "budget.threshold_reached",
        "account": unquote(account),
        "budget": {"scope": scope, "owner": owner, "period": period, "credits": budget / 1_000_000},
        "threshold": int(fields["threshold_bp"]) / 10_000,
        "spent": spent / 1_000_000,
        "used": round(spent / budget, 6) if budget else None,
        "fired_at": datetime.fromtimestamp(int(fields["ts"]) / 1000, timezone.utc).isoformat(timespec="milliseconds"),
        "trigger": {"key": unquote(fields["key"]) or None, "user": fields["user"] or None,
                    "request_id": fields["request_id"] or None},
    }


@dataclass
class _Retry:
    attempts: int
    next_at: float  # monotonic


class AlertDelivery:
    """Drains the budget alert outboxes into the webhook (see the module docstring)."""

    def __init__(
        self,
        outbox: AlertOutbox,
        settings: AlertSettings,
        secret: bytes,
        metrics: AlertMetrics,
        *,
        prefix: str = "ep",
        clock: Callable[[], float] = time.time,
    ) -> None:
        assert settings.webhook_url is not None
        self._outbox = outbox
        self._settings = settings
        self._url = settings.webhook_url
        self._secret = secret
        self._metrics = metrics
        self._prefix = prefix
        self._clock = clock
        self._consumer = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self._retries: dict[str, _Retry] = {}  # alert id -> its failed attempts on this replica
        self._active: set[str] = set()  # outboxes this replica holds or last found alerts in

    async def run(self) -> None:
        """Deliver until cancelled; store and webhook failures are logged and retried, never raised."""
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._settings.timeout_s)) as http:
            next_sweep = 0.0
            while True:
                wait_s = TICK_S if self._active else max(0.0, next_sweep - time.monotonic())
                fresh, fired = await self._outbox.fresh_alerts.wait(wait_s)
                if fired:
                    self._metrics.budget_alert("fired", fired)
                self._active |= fresh
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + self._settings.sweep_interval_s
                    await self._sweep()
                for stream in sorted(self._active):
                    try:
                        await self._drain(http, stream)
                    except Exception:  # a bug must not end delivery for every other alert
                        log.exception("budget alerts: delivering from %s failed", stream)

    async def _sweep(self) -> None:
        try:
            self._active.update(await self._outbox.alert_streams(self._prefix))
        except StoreError as exc:
            log.warning("budget alerts: cannot list the outboxes (%s); retrying at the next sweep", exc)

    async def _drain(self, http: aiohttp.ClientSession, stream: str) -> None:
        """Attempt every alert of `stream` in hand whose retry is due; acknowledge those done with."""
        try:
            entries = await self._outbox.read_alerts(
                stream, self._consumer, READ_BATCH, int(self._settings.claim_after_s * 1000))
        except StoreError as exc:
            log.warning("budget alerts: cannot read %s (%s); retrying", stream, exc)
            return
        if not entries:
            self._active.discard(stream)
            return
        done = [entry.id for entry in entries if await self._settled(http, entry)]
        try:
            await self._outbox.ack_alerts(stream, done)
        except StoreError as exc:  # they stay pending and are delivered again: the receiver dedupes
            log.warning("budget alerts: cannot acknowledge %d alerts of %s (%s)", len(done), stream, exc)

    async def _settled(self, http: aiohttp.ClientSession, entry: OutboxEntry) -> bool:
        """True once the alert is delivered or given up; False while it waits for a retry."""
        try:
            alert_id, body = entry.fields["id"], json.dumps(payload(entry.fields), separators=(",", ":")).encode()
        except (KeyError, ValueError):  # trimmed from its outbox before it was read (no fields), or not ours
            log.error("budget alerts: dropped outbox entry %s of %s: not an alert", entry.id, entry.stream)
            return True
        retry = self._retries.get(alert_id)
        if retry is not None and retry.next_at > time.monotonic():
            return False
        age_s = self._clock() - int(entry.fields["ts"]) / 1000
        if age_s > self._settings.retry_for_s:
            log.error("budget alert %s given up: not delivered within alerts.retry_for_s (%gs)",
                      alert_id, self._settings.retry_for_s)
            self._metrics.budget_alert("failed")
            self._retries.pop(alert_id, None)
            return True
        problem = await self._post(http, alert_id, body)
        if problem is None:
            self._metrics.budget_alert("delivered")
            self._retries.pop(alert_id, None)
            return True
        attempts = retry.attempts + 1 if retry else 1
        backoff_s = min(self._settings.max_backoff_s, 2.0 ** (attempts - 1))
        self._retries[alert_id] = _Retry(attempts, time.monotonic() + backoff_s)
        self._metrics.budget_alert("retried")
        log.warning("budget alert %s not delivered (%s); attempt %d, next in %gs", alert_id, problem, attempts,
                    backoff_s)
        return False

    async def _post(self, http: aiohttp.ClientSession, alert_id: str, body: bytes) -> str | None:
        """POST one alert; None if the webhook took it (2xx), else what went wrong."""
        timestamp = int(self._clock())
        headers = {
            "Content-Type": "application/json",
            ALERT_ID_HEADER: alert_id,
            TIMESTAMP_HEADER: str(timestamp),
            SIGNATURE_HEADER: sign(self._secret, timestamp, body),  # the ledger exporter's HTTP sink's signature
        }
        try:
            async with http.post(self._url, data=body, headers=headers, allow_redirects=False) as response:
                await response.read()
                return None if 200 <= response.status < 300 else f"HTTP {response.status}"
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            return type(exc).__name__
