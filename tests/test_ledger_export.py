"""The usage ledger's exporters (proxy/export/, docs/usage.md "Exporters"), on both stores and a real
redis-server: every record delivered and acknowledged; an exporter process killed mid-batch and restarted
delivers every record at least once, and a sink deduping by record id has each exactly once; the HTTP sink's
batches are signed (a tampered body, another secret or an old timestamp fail the check); a sink that is down
gets everything once it is back; bad settings stop start-up with a clear error."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import AsyncIterator, Callable

import pytest
import redis.asyncio as aioredis
import yaml

from proxy.__main__ import main
from proxy.export.exporter import ExportSettings, Exporter
from proxy.export.signature import sign, verify
from proxy.export.sinks import HttpSink, JsonlSink, SinkError, encode
from proxy.meter import Meter
from proxy.store import RedisStore, Store
from proxy.store.base import CallUsage
from proxy.store.ledger import LedgerReader, LedgerRecord
from tests.export_sink import SECRET, ExportReceiver
from tests.gateway_harness import REPO
from tests.redis_server import free_port
from tests.test_meter import ALICE, Clock, decide
from tests.test_usage_ledger import BUDGET, CAROL, USED

FAST = ExportSettings(batch_size=7, poll_interval_s=0.05, discover_interval_s=0.2, claim_idle_s=0.3, max_backoff_s=0.2)


@pytest.fixture
def clock() -> Clock:
    return Clock(datetime.fromtimestamp(time.time(), timezone.utc))


@pytest.fixture
async def receiver() -> AsyncIterator[ExportReceiver]:
    running = await ExportReceiver().start()
    yield running
    await running.stop()


async def settle_calls(store: Store, clock: Clock, count: int, tag: str = "r") -> None:
    """`count` settled calls, alternating between two accounts (two ledger streams)."""
    meter = Meter(store, reservation_ttl_s=60, clock=clock)
    for i in range(count):
        principal = ALICE if i % 2 else CAROL
        await (await meter.admit(principal, "m/a", BUDGET, f"{tag}{i}")).settle(0.01, 1, USED)


async def ledger_ids(store: Store) -> set[str]:
    reader: LedgerReader = store  # type: ignore[assignment]
    return {record.fields["id"] for stream in await reader.ledger_streams()
            for record in await reader.read_ledger(stream, count=10_000)}


async def test_every_record_is_exported_once_and_acknowledged(store: Store, clock: Clock, tmp_path: Path) -> None:
    await settle_calls(store, clock, 20)
    out = tmp_path / "usage.jsonl"
    sink = JsonlSink(out)
    counts = await Exporter(store, sink, FAST).run(once=True)  # type: ignore[arg-type]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["id"] for line in lines] != [] and {line["id"] for line in lines} == await ledger_ids(store)
    assert len(lines) == 20 == counts.exported and counts.batches == 3  # 20 records in batches of at most 7
    assert isinstance(lines[0]["credits"], int) and lines[0]["credits"] == 10_000 and lines[0]["outcome"] == "settled"
    reader: LedgerReader = store  # type: ignore[assignment]
    for stream in await reader.ledger_streams():  # all acknowledged: nothing pending for anyone
        assert await reader.claim_ledger(stream, FAST.group, "other", 0) == []
    out.rename(tmp_path / "usage-rotated.jsonl")  # rotation: the next batch starts a new file at the path
    await settle_calls(store, clock, 3, tag="later")  # a later run exports only what is new
    again = await Exporter(store, sink, FAST).run(once=True)  # type: ignore[arg-type]
    assert again.exported == 3 and sorted(json.loads(line)["request_id"] for line in out.read_text().splitlines()) == [
        "later0", "later1", "later2"]
    assert len((tmp_path / "usage-rotated.jsonl").read_text().splitlines()) == 20


async def test_a_sink_that_is_down_gets_everything_once_it_is_back(store: Store, clock: Clock) -> None:
    await settle_calls(store, clock, 10)
    port = free_port()
    exporter = Exporter(store, HttpSink(f"http://127.0.0.1:{port}/ingest", SECRET.encode(), 2.0), FAST)  # type: ignore[arg-type]
    running = asyncio.create_task(exporter.run(once=True))
    await asyncio.sleep(0.5)  # nothing listens: connections are refused, the exporter backs off and retries
    assert not running.done() and exporter.counts.failures >= 2 and exporter.counts.exported == 0
    receiver = ExportReceiver()
    receiver.fail_next = 2  # back, but answering 503 at first
    await receiver.start(port)
    try:
        counts = await asyncio.wait_for(running, 10)
    finally:
        await receiver.stop()
    assert receiver.unique_ids() == await ledger_ids(store) and len(receiver.records) == 10 == counts.exported
    assert receiver.refused == 0


async def test_batches_are_signed_and_a_tampered_body_an_old_timestamp_or_another_secret_fail() -> None:
    secret, body, now = SECRET.encode(), b'{"id":"r1","credits":10}\n', time.time()
    stamp = int(now)
    signature = sign(secret, stamp, body)
    assert verify(secret, str(stamp), signature, body, now)
    assert not verify(secret, str(stamp), signature, body.replace(b"10", b"99"), now)
    assert not verify(b"another-secret-of-16-bytes", str(stamp), signature, body, now)
    assert not verify(secret, str(stamp + 1), signature, body, now)  # the timestamp is signed too
    old = stamp - 301
    assert not verify(secret, str(old), sign(secret, old, body), body, now)  # a replay after 5 minutes
    assert not verify(secret, "", signature, body, now) and not verify(secret, "1e9", signature, body, now)


async def test_a_receiver_with_another_secret_refuses_every_batch(receiver: ExportReceiver, store: Store,
                                                                  clock: Clock) -> None:
    await settle_calls(store, clock, 2)
    receiver.secret = b"not-the-exporters-secret-0123456789"
    exporter = Exporter(store, HttpSink(receiver.url, SECRET.encode(), 2.0), FAST)  # type: ignore[arg-type]
    running = asyncio.create_task(exporter.run())
    await asyncio.sleep(0.4)
    exporter.stop()
    counts = await asyncio.wait_for(running, 5)
    assert receiver.records == [] and receiver.refused >= 2 and counts.exported == 0
    reader: LedgerReader = store  # type: ignore[assignment]
    streams = await reader.ledger_streams()  # refused: nothing acknowledged, all still to be delivered
    assert sum([len(await reader.claim_ledger(s, FAST.group, "next", 0)) for s in streams]) == 2


async def empty_redis(redis_url: str) -> RedisStore:
    """A store on the session's redis-server, emptied first (the exporter processes share it)."""
    client = aioredis.Redis.from_url(redis_url)
    await client.flushdb()
    await client.aclose()
    return RedisStore(redis_url)


def write_config(directory: Path, redis_url: str) -> Path:
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump({"store": {"kind": "redis", "redis_url": redis_url}}))
    return path


async def exporter_process(config: Path, receiver: ExportReceiver, consumer: str, *extra: str) -> asyncio.subprocess.Process:
    env = {**os.environ, "PYTHONPATH": str(REPO), "EXPORT_URL": receiver.url, "EXPORT_SECRET": SECRET}
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "export", "--config", str(config), "--sink", "http",
        "--url-env", "EXPORT_URL", "--secret-env", "EXPORT_SECRET", "--consumer", consumer, "--batch-size", "10",
        "--poll-interval", "0.05", "--claim-idle", "0.5", *extra, env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )


async def test_an_exporter_killed_mid_batch_and_restarted_delivers_every_record_and_the_sink_dedupes(
    redis_url: str, receiver: ExportReceiver, clock: Clock, tmp_path: Path
) -> None:
    store = await empty_redis(redis_url)
    await settle_calls(store, clock, 40)
    config = write_config(tmp_path, redis_url)
    receiver.hang_after = 2  # the third batch reaches the sink, which keeps it but never answers
    first = await exporter_process(config, receiver, "pod-a")
    try:
        await asyncio.wait_for(receiver.hung.wait(), 15)
    finally:
        first.send_signal(signal.SIGKILL)  # between the sink's keeping the batch and the exporter's ack
        await first.wait()
    kept = len(receiver.records)
    assert receiver.batches == 2 and kept == 30
    receiver.hang_after = None
    await asyncio.sleep(0.5)  # pod-a's unacknowledged batch is now idle for --claim-idle
    second = await exporter_process(config, receiver, "pod-b", "--once")  # another pod takes over
    _, stderr = await asyncio.wait_for(second.communicate(), 15)
    assert second.returncode == 0, stderr.decode()
    everything = await ledger_ids(store)
    await store.close()
    assert len(everything) == 40 and receiver.unique_ids() == everything  # at least once
    delivered = [record["id"] for record in receiver.records]
    assert len(delivered) == 50  # the third batch twice: the one the dead exporter never acknowledged
    assert len(set(delivered)) == 40  # deduped by id: exactly once
    assert b"10 records delivered" in stderr


@pytest.mark.parametrize("args, env, message", [
    (["--sink", "jsonl"], {}, "--sink jsonl needs --out"),
    (["--sink", "jsonl", "--out", "/nonexistent-dir/usage.jsonl"], {}, "--out /nonexistent-dir/usage.jsonl: cannot"),
    (["--sink", "http", "--url-env", "U"], {"U": "http://127.0.0.1:1/"}, "exactly one of --secret-env"),
    (["--sink", "http", "--url-env", "U", "--secret-env", "S"], {"U": "http://127.0.0.1:1/"}, "'S', which is not set"),
    (["--sink", "http", "--url-env", "U", "--secret-env", "S"], {"U": "http://127.0.0.1:1/", "S": "short"},
     "shorter than 16 bytes"),
    (["--sink", "http", "--url-env", "U", "--secret-env", "S"], {"U": "ftp://h/x", "S": SECRET}, "http:// or https://"),
    (["--sink", "http", "--url-env", "U", "--url-file", "f", "--secret-env", "S"], {"S": SECRET}, "exactly one of --url"),
    (["--sink", "jsonl", "--out", "-", "--batch-size", "0"], {}, "--batch-size 0: use 1 to 10000"),
    (["--sink", "jsonl", "--out", "-", "--claim-idle", "0"], {}, "--claim-idle 0.0: use a number of seconds"),
    (["--sink", "jsonl", "--out", "-", "--group", "a b"], {}, "--group 'a b': use 1 to 128"),
])
def test_bad_export_settings_stop_start_up_with_a_clear_error(
    args: list[str], env: dict[str, str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("U", "S"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    config = write_config(tmp_path, "redis://127.0.0.1:1")
    assert main(["export", "--config", str(config), *args]) == 2
    assert message in capsys.readouterr().err


def test_the_exporter_refuses_the_memory_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("store:\n  kind: memory\n")
    assert main(["export", "--config", str(config), "--sink", "jsonl", "--out", "-"]) == 2
    assert "store.kind is memory" in capsys.readouterr().err


async def test_between_scans_the_exporter_reads_the_accounts_the_gateways_index_marks(
    store: Store, clock: Clock, tmp_path: Path
) -> None:
    """A new account's stream, created after the exporter's scan, is found through the index within a round or
    two (the store marks it after its records are written), not at the next scan minutes later."""
    await settle_calls(store, clock, 2)
    out = tmp_path / "usage.jsonl"
    exporter = Exporter(store, JsonlSink(out), ExportSettings(poll_interval_s=0.05, discover_interval_s=600))  # type: ignore[arg-type]
    running = asyncio.create_task(exporter.run())
    try:
        while exporter.counts.exported < 2:
            await asyncio.sleep(0.02)
        meter = Meter(store, reservation_ttl_s=60, clock=clock)
        newcomer = dataclasses.replace(CAROL, account="initech", key_id="key7")
        await (await meter.admit(newcomer, "m/a", BUDGET, "n1")).settle(0.01, 1, USED)
        await asyncio.wait_for(until(lambda: exporter.counts.exported == 3), 5)  # Redis: marked within a second
    finally:
        exporter.stop()
        await running
    assert json.loads(out.read_text().splitlines()[-1])["account"] == "initech"


async def until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0.02)


async def test_the_index_lists_the_streams_written_since_a_time_and_forgets_those_past_retention(
    redis_url: str, clock: Clock
) -> None:
    client = aioredis.Redis.from_url(redis_url)
    await client.flushdb()
    await client.zadd("ep:lgix", {"ep:{gone}:lg": 1})  # marked long ago: past the ledger's retention
    store = RedisStore(redis_url)
    before_ms = int(time.time() * 1000)
    await settle_calls(store, clock, 2)
    await store.close()  # flushes the marks not written yet
    store = RedisStore(redis_url)
    try:
        assert await store.active_ledger_streams(before_ms) == ["ep:{acme}:lg", "ep:{globex}:lg"]
        assert await store.active_ledger_streams(int(time.time() * 1000) + 60_000) == []
        assert await client.zscore("ep:lgix", "ep:{gone}:lg") is None
    finally:
        await store.close()
        await client.aclose()


async def test_a_refusal_is_logged_by_its_first_bytes_whatever_its_size(receiver: ExportReceiver) -> None:
    receiver.fail_next, receiver.fail_body = 1, b"x" * 20_000_000
    sink = HttpSink(receiver.url, SECRET.encode(), 5.0)
    try:
        with pytest.raises(SinkError) as refused:
            await sink.send(b'{"id":"r1"}\n')
    finally:
        await sink.close()
    assert str(refused.value).startswith("HTTP 503: b'xxx") and len(str(refused.value)) < 300


def test_a_record_the_export_does_not_expect_is_exported_as_it_is() -> None:
    """A field missing or a number that is not one (an older record, a hand-written entry) neither stops the export
    nor is made up: the sink gets what the ledger holds."""
    odd = LedgerRecord("ep:{acme}:lg", "5-0", {"id": "r9", "credits": "12x", "tokens_in": "-3"})
    row = json.loads(encode([odd]))
    assert (row["id"], row["credits"], row["tokens_in"], row["model"], row["stream_id"]) == ("r9", "12x", -3, "", "5-0")


async def test_sigterm_stops_the_exporter_at_once_and_leaves_the_unconfirmed_batch_pending(
    redis_url: str, clock: Clock, tmp_path: Path
) -> None:
    store = await empty_redis(redis_url)
    await settle_calls(store, clock, 3)
    nobody = ExportReceiver()
    nobody.url = f"http://127.0.0.1:{free_port()}/ingest"  # the sink is down
    process = await exporter_process(write_config(tmp_path, redis_url), nobody, "pod-a", "--max-backoff", "0.2")
    await asyncio.sleep(1.5)  # started, read the batch, retrying it
    process.send_signal(signal.SIGTERM)
    _, stderr = await asyncio.wait_for(process.communicate(), 5)
    streams = await store.ledger_streams()
    pending = [record for stream in streams for record in await store.claim_ledger(stream, "export", "pod-b", 0)]
    await store.close()
    assert process.returncode == 0, stderr.decode()
    assert b"the sink refused 3 records" in stderr and b"0 records in 0 batches" in stderr
    assert len(pending) == 3  # nothing acknowledged: the next exporter sends them
