"""Hot reload: valid changes swap in, broken ones keep the old policy, readers always see a whole policy."""

from __future__ import annotations

import asyncio
import logging
import random
import threading
from pathlib import Path

import pytest

from tests.policy_support import CATALOG, write_policies
from proxy.auth.api_keys import ApiKey, hash_key
from proxy.policy import PolicyError, PolicyHolder


def plan_text(n: int) -> str:
    """A policy whose limit, concurrency and budget all equal `n`: a mixed policy would show."""
    return f"""
plans:
  members:
    models: ["openai/*"]
    rate_limits: [{{per: user, requests: {n}, window: 1m}}]
    concurrency: {n}
    budget: {{credits: {n}}}
"""


def consistent(policy) -> int:
    plan = policy.plans["members"]
    n = plan.rate_limits[0].limit
    assert plan.concurrency == n and plan.budget.credits == n
    return n


class Recorder:
    def __init__(self) -> None:
        self.results: list[bool] = []

    def __call__(self, ok: bool) -> None:
        self.results.append(ok)


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    return write_policies(tmp_path / "policies", {"main.yaml": plan_text(1)})


def test_valid_change_swaps_and_keeps_in_flight_policy(directory: Path) -> None:
    observer = Recorder()
    demo = ApiKey(id="demo", hash=hash_key("sk_demo"), plan="members")
    holder = PolicyHolder(directory, CATALOG, extra_keys=[demo], on_reload=observer)
    in_flight = holder.current
    (directory / "main.yaml").write_text(plan_text(2))
    assert holder.reload() is True
    assert consistent(holder.current) == 2 and consistent(in_flight) == 1
    assert holder.current.version != in_flight.version
    assert holder.current.keys.find("sk_demo") == demo  # extra keys survive reloads
    assert observer.results == [True] and holder.last_error is None


def test_broken_file_keeps_old_policy_and_reports(directory: Path, caplog) -> None:
    observer = Recorder()
    holder = PolicyHolder(directory, CATALOG, on_reload=observer)
    before = holder.current
    (directory / "main.yaml").write_text(plan_text(2).replace("window: 1m", "window: often"))
    with caplog.at_level(logging.ERROR, logger="proxy.policy"):
        assert holder.reload() is False
    assert holder.current is before and observer.results == [False]
    assert "policies/main.yaml: plans.members.rate_limits[0].window" in holder.last_error
    assert "keeping version" in caplog.text


def test_broken_policy_at_start_is_fatal(tmp_path: Path) -> None:
    directory = write_policies(tmp_path / "policies", {"main.yaml": "plans: {members: {models: [nope/*]}}\n"})
    with pytest.raises(PolicyError, match="matches no model"):
        PolicyHolder(directory, CATALOG)


def test_failing_observer_does_not_break_reload(directory: Path) -> None:
    def explode(ok: bool) -> None:
        raise RuntimeError("observer bug")

    holder = PolicyHolder(directory, CATALOG, on_reload=explode)
    (directory / "main.yaml").write_text(plan_text(3))
    assert holder.reload() is True and consistent(holder.current) == 3


async def wait_for(condition, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def test_watcher_picks_up_changes_and_does_not_retry_broken_files(directory: Path) -> None:
    observer = Recorder()
    holder = PolicyHolder(directory, CATALOG, on_reload=observer)
    watcher = asyncio.create_task(holder.watch(interval_s=0.02))
    try:
        (directory / "main.yaml").write_text(plan_text(5))
        await wait_for(lambda: consistent(holder.current) == 5)
        (directory / "extra.yaml").write_text("plans: {members: {models: [bfl/flux-2]}}\n")  # duplicate plan
        await wait_for(lambda: observer.results == [True, False])
        await asyncio.sleep(0.2)  # many more polls: a broken file is not reloaded again until it changes
        assert observer.results == [True, False] and consistent(holder.current) == 5
        (directory / "extra.yaml").unlink()
        (directory / "main.yaml").write_text(plan_text(6))
        await wait_for(lambda: consistent(holder.current) == 6)
    finally:
        watcher.cancel()
    with pytest.raises(asyncio.CancelledError):
        await watcher


async def test_readers_always_see_a_whole_policy_during_reloads(directory: Path) -> None:
    holder = PolicyHolder(directory, CATALOG)
    stop = threading.Event()
    seen: set[int] = set()

    def writer() -> None:
        # Rewrites and reloads as fast as it can, from another thread, as SIGHUP and the watcher would.
        n = 1
        while not stop.is_set():
            n += 1
            (directory / "main.yaml").write_text(plan_text(n))
            holder.reload()

    async def reader() -> None:
        for _ in range(200):
            policy = holder.current  # a request takes the policy once...
            n = consistent(policy)
            seen.add(n)
            await asyncio.sleep(random.random() / 1000)
            assert consistent(policy) == n  # ...and it does not change under it

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        async with asyncio.timeout(20):
            await asyncio.gather(*(reader() for _ in range(50)))
    finally:
        stop.set()
        thread.join(timeout=5)
    assert not thread.is_alive()
    assert len(seen) > 1  # the readers really ran across several swaps
