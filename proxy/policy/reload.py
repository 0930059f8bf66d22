"""Hot reload: validate new policy files off to the side, then swap them in atomically."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from pathlib import Path
from typing import Callable, Iterable

from proxy.auth.api_keys import ApiKey
from proxy.catalog import Model
from proxy.policy.engine import Policy
from proxy.policy.loader import load_policy
from proxy.policy.managed import with_managed_keys
from proxy.policy.schema import PolicyError
from proxy.store.keys import StoredKey

log = logging.getLogger("proxy.policy")
ReloadObserver = Callable[[bool], None]  # called with True after a swap, False after a rejected reload


class PolicyHolder:
    """Holds the current Policy. Readers take `.current` once per request; reloads replace it whole.

    The current policy is the files' policy joined with the admin-managed keys (`set_managed_keys`): a reload
    of either rebuilds it from the latest of both.
    """

    def __init__(
        self,
        directory: str | Path,
        catalog: Iterable[Model],
        *,
        issuer_plans: Iterable[str] = (),
        extra_keys: Iterable[ApiKey] = (),
        on_reload: ReloadObserver | None = None,
    ) -> None:
        self.directory = Path(directory)
        self._catalog = tuple(catalog)
        self._issuer_plans = frozenset(issuer_plans)
        self._extra_keys = tuple(extra_keys)
        self._on_reload = on_reload
        self._lock = threading.Lock()  # SIGHUP and the watcher may reload at once; one at a time
        self._join_lock = threading.Lock()  # a file reload (thread) and a key refresh (loop) join one at a time
        self.last_error: str | None = None
        self._fingerprint = self.fingerprint()
        self._files = self._load()  # at start-up a broken policy is fatal: raise PolicyError
        self._managed: tuple[StoredKey, ...] = ()
        self.managed_problems: dict[str, str] = {}  # stored keys left out, by id, with the reason
        self._current = self._files

    @property
    def current(self) -> Policy:
        return self._current

    @property
    def files(self) -> Policy:
        """The policy of the files alone (with the demo key): the keys the admin API may not touch."""
        return self._files

    def set_managed_keys(self, records: Iterable[StoredKey]) -> None:
        """Swap in the admin-managed keys as read from the store."""
        with self._join_lock:
            self._managed = tuple(records)
            self._join()

    def reload(self) -> bool:
        """Load and validate the files; swap on success, keep the old policy on failure. Never raises PolicyError."""
        with self._lock:
            # Taken before reading: a write racing this load changes it again, so the watcher retries.
            self._fingerprint = self.fingerprint()
            try:
                policy = self._load()
            except (PolicyError, OSError) as exc:
                self.last_error = str(exc)
                log.error("policy reload rejected, keeping version %s:\n%s", self._current.version, exc)
                self._notify(False)
                return False
            previous = self._current
            with self._join_lock:
                self._files = policy
                self._join()
            self.last_error = None
            log.info("policy reloaded: version %s -> %s", previous.version, policy.version)
            self._notify(True)
            return True

    def changed(self) -> bool:
        """Have the policy files changed since the last load attempt? (stat only; no reads, no parsing)"""
        return self.fingerprint() != self._fingerprint

    def fingerprint(self) -> tuple[tuple[str, int, int, int], ...]:
        """Name, inode, size and mtime of every `*.yaml`; stat follows symlinks, so ConfigMap swaps show up."""
        entries = []
        for path in sorted(self.directory.glob("*.yaml")):
            try:
                st = os.stat(path)
            except FileNotFoundError:  # removed between glob and stat
                continue
            entries.append((path.name, st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(entries)

    async def watch(self, interval_s: float = 2.0) -> None:
        """Poll for changes every `interval_s` and reload; runs until cancelled."""
        while True:
            await asyncio.sleep(interval_s)
            # Threads keep stat and parsing off the event loop; a broken file is not retried until it changes.
            if await asyncio.to_thread(self.changed):
                await asyncio.to_thread(self.reload)

    def _load(self) -> Policy:
        return load_policy(
            self.directory, self._catalog, issuer_plans=self._issuer_plans, extra_keys=self._extra_keys
        )

    def _join(self) -> None:
        policy, problems = with_managed_keys(self._files, self._managed, self._catalog)
        for key_id, problem in problems.items():
            if self.managed_problems.get(key_id) != problem:  # once per change, not at every refresh
                log.error("admin-managed key %s is not in effect: %s", key_id, problem)
        self.managed_problems = problems
        self._current = policy  # one reference assignment: readers see old or new

    def _notify(self, ok: bool) -> None:
        if self._on_reload is not None:
            try:
                self._on_reload(ok)
            except Exception:  # an observer bug must not break reloading
                log.exception("policy reload observer failed")
