"""Route: a provider's credentials. One key or several (from env or files), spread over calls, a key that was
refused (401) or throttled (429) resting meanwhile; a key file is re-read when it changes (rotated keys, short-lived
bearer tokens such as Entra access tokens written by a sidecar). Keys never leave this module except in the
headers of the call they authenticate: never logged, never in errors, metrics or records.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..config import ConfigError, ProviderSettings
from .routing import retry_after_s

log = logging.getLogger("edge_proxy.credentials")

_RECHECK_FILE_S = 1.0  # a key file is looked at (stat) at most this often; read again only when it changed
_MAX_REST_S = 3600.0  # the longest a provider's Retry-After rests a key
_REFUSED = frozenset({401, 429})  # statuses that say "not this key, not now"


@dataclass
class KeySource:
    """One key: fixed (from env), or from a file kept current (stat at most once a second, read when changed)."""

    label: str  # `env:NAME` or `file:PATH`: names the source in errors, never the key
    value: str
    path: Path | None = None
    _stamp: tuple[int, int, int] = (0, 0, 0)
    _checked_at: float = 0.0

    def current(self, now: float) -> str:
        if self.path is not None and now - self._checked_at >= _RECHECK_FILE_S:
            self._checked_at = now
            self._reload()
        return self.value

    def _reload(self) -> None:
        assert self.path is not None
        try:
            info = self.path.stat()  # follows symlinks: a projected volume's atomic swap changes the stamp
            stamp = (info.st_mtime_ns, info.st_size, info.st_ino)
            if stamp != self._stamp:
                value = self.path.read_text().strip()
                if value:
                    self.value, self._stamp = value, stamp
        except OSError as exc:  # mid-rotation or removed: keep the last key read, say so without the key
            log.warning("provider key %s could not be re-read (%s); the previous key stays in use",
                        self.label, exc.strerror)


@dataclass
class ChosenKey:
    index: int
    headers: dict[str, str]


@dataclass
class ProviderKeys:
    """The keys of one provider and which one the next call uses."""

    sources: list[KeySource]
    headers_for: Callable[[str], dict[str, str]]  # the kind's credential headers for a key
    selection: str = "round_robin"  # or least_recently_throttled (providers.<name>.key_selection)
    rest_s: float = 60.0
    clock: Callable[[], float] = time.monotonic
    _rest_until: list[float] = field(default_factory=list)
    _throttled_at: list[float] = field(default_factory=list)
    _next: int = 0
    _headers: dict[str, dict[str, str]] = field(default_factory=dict)  # per key value, built once

    def __post_init__(self) -> None:
        self._rest_until = [0.0] * len(self.sources)
        self._throttled_at = [0.0] * len(self.sources)

    def __len__(self) -> int:
        return len(self.sources)

    def choose(self) -> ChosenKey:
        """The key for the next call: round robin (or the least recently throttled) among the keys not resting;
        if all rest, the one whose rest ends first."""
        now = self.clock()
        index = self._pick(now) if len(self.sources) > 1 else 0  # one key: nothing to choose
        value = self.sources[index].current(now)
        headers = self._headers.get(value)
        if headers is None:
            if len(self._headers) > 4 * len(self.sources):  # old rotated keys: forget them
                self._headers.clear()
            headers = self._headers[value] = self.headers_for(value)
        return ChosenKey(index, headers)

    def _pick(self, now: float) -> int:
        count = len(self.sources)
        order = [(self._next + step) % count for step in range(count)]
        ready = [i for i in order if self._rest_until[i] <= now]
        if not ready:
            index = min(order, key=lambda i: self._rest_until[i])
        elif self.selection == "least_recently_throttled":
            index = min(ready, key=lambda i: self._throttled_at[i])  # stable: round robin among equals
        else:
            index = ready[0]
        self._next = (index + 1) % count
        return index

    def refused(self, chosen: ChosenKey, status: int, retry_after: str | None) -> bool:
        """Note the upstream's answer to a call made with `chosen`: a 401 or 429 rests that key (a 429 for its
        Retry-After when given). True when the call may be sent again with another key that is not resting."""
        if status not in _REFUSED:
            return False
        now = self.clock()
        self._throttled_at[chosen.index] = now
        rest = retry_after_s(retry_after, self.rest_s, _MAX_REST_S) if status == 429 else self.rest_s
        self._rest_until[chosen.index] = now + rest
        return any(until <= now for until in self._rest_until)


def provider_keys(
    name: str, settings: ProviderSettings, base_dir: Path, headers_for: Callable[[str], dict[str, str]]
) -> ProviderKeys | None:
    """The provider's keys from env and files, read at start-up; errors name the provider, the key and the fix.
    None when it has no credential (e.g. the demo upstream)."""
    sources = [_env_key(name, "api_key_env" if single else "api_keys_env", var)
               for single, var in _named(settings.api_key_env, settings.api_keys_env)]
    sources += [_file_key(name, "api_key_file" if single else "api_key_files", base_dir / path, path)
                for single, path in _named(settings.api_key_file, settings.api_key_files)]
    if not sources:
        return None
    return ProviderKeys(sources, headers_for, settings.key_selection, settings.key_rest_s)


def _named(single: str | None, several: tuple[str, ...]) -> list[tuple[bool, str]]:
    return ([(True, single)] if single else []) + [(False, entry) for entry in several]


def _env_key(provider: str, key: str, var: str) -> KeySource:
    value = os.environ.get(var, "").strip()
    if not value:
        raise ConfigError(
            f"providers.{provider}.{key}: environment variable {var} is empty or unset. "
            f"Fix: export {var}=<key> or remove it (or provider {provider!r} and its models)"
        )
    return KeySource(f"env:{var}", value)


def _file_key(provider: str, key: str, path: Path, named: str) -> KeySource:
    try:
        value = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(
            f"providers.{provider}.{key}: cannot read {named}: {exc.strerror}. "
            "Fix: mount the key file there or use api_key_env"
        ) from None
    if not value:
        raise ConfigError(f"providers.{provider}.{key}: {named} is empty. Fix: write the key into it")
    source = KeySource(f"file:{named}", value, path)
    source._reload()  # its stamp, so the first re-check does not read it again
    return source
