"""Driving jobs: each replica runs the jobs it holds the lease of (submit, poll, result, settle), renews those
leases, and picks up jobs whose lease expired (their replica died). Clients watch a job through the store, so a
stream or a poll may be answered by any replica.

A job's life, on the replica holding its lease:
  submit (unless the record has a handle already) → poll `status` every `poll_interval_s` → `result` → finish
  (completed) and settle from the provider's units; a failure, a timeout (`timeout_s`, then cancelled at the
  provider) or `retries` failed calls in a row → finish (failed) and release the hold. Only the replica whose
  finish applied settles; the store charges a hold once anyway.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import secrets
import time
from dataclasses import replace
from typing import Any, AsyncIterator, Awaitable, Callable, Mapping, TypeVar

from ..assets import Assets
from ..config import JobSettings
from ..errors import ApiError
from ..meter import Admission, Meter
from ..policy.pricing import cost
from ..policy.types import Usage
from ..store.base import CallUsage, StoreError
from .adapter import PROVIDER_ID, Handle, JobAdapter, JobCallFailed, JobRequest, JobResult, JobStatus
from .billing import decode_price, decode_reservation
from .kinds import VIDEO_CAPABILITIES
from .store import Created, JobRecord, JobStore, changed, dumps

log = logging.getLogger(__name__)
T = TypeVar("T")

_ORPHAN_BATCH = 50


class _LeaseLost(Exception):
    """Another replica holds the job's lease now (or the job ended elsewhere): stop driving it here."""


class JobService:
    """The replica's part in every job: create, drive, watch, resume."""

    def __init__(
        self, store: JobStore, meter: Meter, assets: Assets, *, lease_s: float, record_ttl_s: float,
        idempotency_ttl_s: float, clock: Callable[[], float] = time.time,
        on_settled: Callable[[float, float], None] = lambda reserved, charged: None,
    ) -> None:
        self.store = store
        self.owner = secrets.token_hex(8)  # this replica, as a lease holder
        self._meter = meter
        self._assets = assets
        self._lease_ms = int(lease_s * 1000)
        self._ttl_ms = int(record_ttl_s * 1000)
        self._idem_ttl_ms = int(idempotency_ttl_s * 1000)
        self._clock = clock
        self._on_settled = on_settled
        self._adapters: dict[str, JobAdapter] = {}
        self._settings: dict[str, JobSettings] = {}
        self._running: dict[str, asyncio.Task[None]] = {}
        self._watchers: dict[str, set[asyncio.Event]] = {}
        self._scanner: asyncio.Task[None] | None = None

    def add_adapter(self, provider: str, adapter: JobAdapter, settings: JobSettings) -> None:
        self._adapters[provider] = adapter
        self._settings[provider] = settings

    def settings(self, provider: str) -> JobSettings:
        return self._settings[provider]

    def start(self) -> None:
        """Look for orphaned jobs (lease expired) every half lease, in the running loop."""
        self._scanner = asyncio.create_task(self._scan())

    async def close(self) -> None:
        """Stop driving jobs and give their leases up, so another replica resumes them at once."""
        tasks = [t for t in (self._scanner, *self._running.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for adapter in self._adapters.values():
            await adapter.close()
        await self.store.close()

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    async def create(self, record: JobRecord, idempotency_key: str | None) -> Created:
        """Store a new job (with its idempotency key), or name the job the key already points to."""
        record = replace(record, created_ms=self._now_ms(), owner=self.owner,
                         lease_until=self._now_ms() + self._lease_ms)
        created = await self.store.create(record, idempotency_key, self._ttl_ms, self._idem_ttl_ms)
        if created.created:  # indexed at once: if this replica dies before driving it, another one finds it
            await self._index_quietly(record.key, record.lease_until)
        return created

    def run(self, key: str) -> None:
        """Drive the job in the background on this replica (it holds the lease from `create`)."""
        if key not in self._running:
            task = asyncio.create_task(self._drive(key))
            self._running[key] = task
            task.add_done_callback(lambda _: self._running.pop(key, None))

    async def watch(self, key: str, until: float) -> AsyncIterator[JobRecord]:
        """The job at least every second (changed or not, so a stream can keep itself alive), until it ends or
        the monotonic time `until`. Woken at once by changes this replica makes."""
        event = asyncio.Event()
        self._watchers.setdefault(key, set()).add(event)
        try:
            while True:
                event.clear()
                record = await self.store.get(key)
                if record is None:
                    return
                yield record
                if record.state != "working":
                    return
                left = until - time.monotonic()
                if left <= 0:
                    return
                try:
                    await asyncio.wait_for(event.wait(), min(left, 1.0))
                except asyncio.TimeoutError:
                    pass
        finally:
            watchers = self._watchers.get(key)
            if watchers is not None:
                watchers.discard(event)
                if not watchers:
                    del self._watchers[key]

    async def cancel(self, key: str) -> None:
        """Ask for a job to be cancelled (a client left, and its plan cancels then): whichever replica drives the
        job cancels it at the provider at its next poll (once submitted), fails it and releases its hold."""
        await self.store.update(key, "", {"cancel_requested": "1"})

    async def advance(self, key: str, status: JobStatus, result_of: Callable[[JobRequest], JobResult]) -> None:
        """What a provider's webhook says about a job: a finished one is finished here (the store finishes a job
        once, and only its finisher settles, so a webhook and the poller never both charge); one still running
        gets its phase and progress. The replica driving the job stops polling when it sees the job ended."""
        record = await self.store.get(key)
        if record is None or record.state != "working":
            return
        if status.phase == "failed":
            await self._finish_failed(record, _provider_failed(status))
        elif status.phase == "completed":
            try:
                result = result_of(_request(record))
            except JobCallFailed as failed:
                await self._finish_failed(record, ApiError(failed.code, str(failed)))
            else:
                await self._finish_completed(record, result)
        else:
            progress = _stored_progress(status)
            if await self.store.update(key, "", changed(record, phase=status.phase, progress=progress)[1]):
                self._changed(key)

    def _changed(self, key: str) -> None:
        for event in self._watchers.get(key, ()):
            event.set()

    async def _drive(self, key: str) -> None:
        """Run one job to its end while holding its lease; a lost lease (another replica took it) stops here."""
        heartbeat = asyncio.create_task(self._keep_lease(key, asyncio.current_task()))
        try:
            record = await self.store.get(key)
            if record is None or record.state != "working" or record.provider not in self._adapters:
                return
            async with self._meter.resume(decode_reservation(record.reservation)).keepalive():
                await self._run(record)
        except asyncio.CancelledError:
            await asyncio.shield(self._give_up(key))
            raise
        except _LeaseLost:
            log.info("job %s: no longer driven here (another replica holds it, or a webhook ended it)", key)
        except StoreError as exc:
            log.warning("job %s: the job store failed (%s); another replica resumes it", key, exc)
        finally:
            heartbeat.cancel()

    async def _give_up(self, key: str) -> None:
        try:
            await self.store.release(key, self.owner)
            await self.store.index(key, self._now_ms())
        except StoreError:
            pass  # the lease expires by itself

    async def _keep_lease(self, key: str, driver: asyncio.Task[None] | None) -> None:
        """Renew the lease every third of it; if another replica holds it now, stop driving the job here."""
        while True:
            await asyncio.sleep(self._lease_ms / 3000)
            try:
                ours = await self.store.claim(key, self.owner, self._now_ms(), self._lease_ms, renew=True)
            except StoreError:
                continue  # try again; the lease outlives two failed renewals
            if not ours:
                if driver is not None:
                    driver.cancel()
                return
            await self._index_quietly(key, self._now_ms() + self._lease_ms)

    async def _link_quietly(self, record: JobRecord, provider_id: str) -> None:
        try:
            await self.store.link(record.provider, provider_id, record.key, self._ttl_ms)
        except StoreError:
            log.warning("job %s: not indexed by its provider id; its webhooks go unanswered, it is polled", record.id)

    async def _index_quietly(self, key: str, lease_until: int) -> None:
        try:
            await self.store.index(key, lease_until)
        except StoreError:
            pass  # only a hint for finding orphans

    async def _run(self, record: JobRecord) -> None:
        adapter, settings = self._adapters[record.provider], self._settings[record.provider]
        request = _request(record)
        try:
            if not record.handle:
                handle = await self._retrying(settings, lambda: adapter.submit(request))
                record = await self._update(record, handle=dumps(handle))
                if PROVIDER_ID in handle:
                    await self._link_quietly(record, handle[PROVIDER_ID])
            handle = json.loads(record.handle)
            status = await self._until_done(record, adapter, settings, handle)
            if status.phase == "failed":
                raise _provider_failed(status)
            result = await self._retrying(settings, lambda: adapter.result(handle, request))
        except JobCallFailed as failed:
            await self._finish_failed(record, ApiError(failed.code, str(failed)))
        except ApiError as error:
            await self._finish_failed(record, error)
        else:
            await self._finish_completed(record, result)

    async def _until_done(
        self, record: JobRecord, adapter: JobAdapter, settings: JobSettings, handle: Handle
    ) -> JobStatus:
        while True:
            if self._now_ms() >= record.created_ms + settings.timeout_s * 1000:
                await self._cancel_at_provider(record, adapter, handle)
                raise ApiError("upstream_timeout", f"the job took longer than {settings.timeout_s:g}s")
            stored = await self.store.get(record.key)
            if stored is None or stored.state != "working":
                raise _LeaseLost  # finished by the provider's webhook (advance), or expired
            if stored.cancel_requested:
                await self._cancel_at_provider(record, adapter, handle)
                raise ApiError("upstream_error", "the job was cancelled: the client disconnected and its plan "
                               "cancels jobs then")
            status = await self._retrying(settings, lambda: adapter.status(handle))
            if status.phase in ("completed", "failed"):
                return status
            progress = _stored_progress(status)
            position = -1 if status.queue_position is None else status.queue_position
            if (status.phase, progress, position) != (record.phase, record.progress, record.queue_position):
                record = await self._update(record, phase=status.phase, progress=progress, queue_position=position)
            await asyncio.sleep(settings.poll_interval_s)

    @staticmethod
    async def _cancel_at_provider(record: JobRecord, adapter: JobAdapter, handle: Handle) -> None:
        try:
            await adapter.cancel(handle)
        except JobCallFailed as failed:
            log.warning("job %s: cancel at the provider failed: %s", record.id, failed)

    async def _retrying(self, settings: JobSettings, call: Callable[[], Awaitable[T]]) -> T:
        """A provider call, tried again after a retryable failure (`retries` times, backing off)."""
        for attempt in range(settings.retries + 1):
            try:
                return await call()
            except JobCallFailed as failed:
                if not failed.retryable or attempt == settings.retries:
                    raise
                await asyncio.sleep(min(settings.poll_interval_s * 2**attempt, 30) * random.uniform(0.5, 1.0))
        raise AssertionError("unreachable")

    async def _update(self, record: JobRecord, **changes: object) -> JobRecord:
        record, stored = changed(record, **changes)
        if not await self.store.update(record.key, self.owner, stored):
            raise _LeaseLost
        self._changed(record.key)
        return record

    async def _finish_completed(self, record: JobRecord, result: JobResult) -> None:
        output = await self._kept(record, result.output)
        record, stored = changed(record, state="completed", phase="completed", progress=1.0, queue_position=-1,
                                 output=dumps(output))
        if await self._finish(record, stored):
            units = result.units
            seconds = units.seconds or (record.bound_seconds if record.capability in VIDEO_CAPABILITIES else 0.0)
            # Bigger images than asked for cost no more than the size reserved for (the hold bounds the charge).
            megapixels = min(units.megapixels, record.bound_megapixels)
            await self._settle(record, Usage(images=units.images, seconds=seconds, megapixels=megapixels))

    async def _kept(self, record: JobRecord, output: dict[str, Any]) -> dict[str, Any]:
        """The output with the provider's URLs copied into the asset store when `assets.rehost.enabled`."""
        urls = output["urls"] if "urls" in output else [output["url"]]
        kept = [await self._assets.output_url(url, record.account, record.public_url) for url in urls]
        return {**output, "url": kept[0], **({"urls": kept} if "urls" in output else {})}

    async def _finish_failed(self, record: JobRecord, error: ApiError) -> None:
        record, stored = changed(record, state="failed", phase="failed", error=dumps(error.body()["error"]))
        if await self._finish(record, stored):
            await self._settle(record, None)

    async def _finish(self, record: JobRecord, stored: Mapping[str, str]) -> bool:
        applied = await self.store.finish(record.key, stored)
        self._changed(record.key)
        await self._index_quietly(record.key, 0)
        return applied

    async def _settle(self, record: JobRecord, usage: Usage | None) -> None:
        """Charge the units at the price of the submit (an overrun at most twice the hold), or release."""
        admission: Admission = self._meter.resume(decode_reservation(record.reservation))
        call = CallUsage(provider=record.provider, deployment=record.deployment, images=usage.images if usage else 0,
                         seconds_ms=round((usage.seconds if usage else 0.0) * 1000))
        if usage is None:
            await admission.release(call)
            self._on_settled(record.reserve, 0.0)
            return
        price = decode_price(record.price)
        charge = cost(price, usage) if price is not None else 0.0
        if charge > record.reserve:
            log.warning("job %s: units cost %.6f credits, over its hold of %.6f", record.id, charge, record.reserve)
            charge = min(charge, 2 * record.reserve)
        await admission.settle(charge, 0, call)
        self._on_settled(record.reserve, charge)

    async def _scan(self) -> None:
        """Claim jobs whose lease expired (their replica died or lost the store) and drive them here."""
        while True:
            await asyncio.sleep(self._lease_ms / 2000 * random.uniform(0.8, 1.0))
            try:
                for key in await self.store.orphans(self._now_ms(), _ORPHAN_BATCH):
                    if key in self._running:
                        continue
                    if await self.store.claim(key, self.owner, self._now_ms(), self._lease_ms, renew=False):
                        log.info("job %s: resuming a job whose replica stopped polling it", key)
                        self.run(key)
                        continue
                    record = await self.store.get(key)
                    if record is None or record.state != "working":
                        await self.store.index(key, 0)  # expired or finished: no longer a candidate
            except StoreError as exc:
                log.debug("job scan failed: %s", exc)


def _request(record: JobRecord) -> JobRequest:
    return JobRequest(record.upstream_model, record.capability, json.loads(record.inputs), record.public_url)


def _provider_failed(status: JobStatus) -> ApiError:
    return ApiError("upstream_error", f"the provider failed the job: {status.error or 'no reason given'}")


def _stored_progress(status: JobStatus) -> float:
    """A provider's progress as the job record keeps it: within 0..1, or -1 when it gives none."""
    return -1.0 if status.progress is None else max(0.0, min(1.0, status.progress))
