"""Job provider kinds → their adapters. Adding a provider: an adapter module implementing `JobAdapter`
(adapter.py), its entry here and in kinds.py (the capabilities it runs), its config and tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import aiohttp

from ..config import ProviderSettings, Timeouts
from ..upstream.credentials import ProviderKeys, provider_keys
from ..upstream.providers import new_session
from . import fal, replicate
from .adapter import JobAdapter
from .demo import DemoAdapter

AdapterFactory = Callable[[str, str, aiohttp.ClientSession, "ProviderKeys | None", Timeouts], JobAdapter]


@dataclass(frozen=True)
class JobKind:
    """How to build a kind's adapter: the class (name, base URL, session, keys, timeouts), the credential
    headers of a key, and where its queue is relative to the provider's base URL."""

    adapter: AdapterFactory
    credential_headers: Callable[[str], dict[str, str]]
    queue_url: Callable[[str], str] = lambda base_url: base_url


JOB_ADAPTERS: dict[str, JobKind] = {
    "fal": JobKind(fal.FalAdapter, fal.credential_headers),
    "replicate": JobKind(replicate.ReplicateAdapter, replicate.credential_headers),
    # The demo upstream serves OpenAI's routes under /v1 and fal's queue under /queue.
    "demo": JobKind(DemoAdapter, fal.credential_headers, lambda base_url: base_url.removesuffix("/v1") + "/queue"),
}


def build_adapter(name: str, settings: ProviderSettings, base_url: str, base_dir: Path) -> JobAdapter | None:
    """The provider's job adapter, or None when its kind runs no jobs."""
    kind = JOB_ADAPTERS.get(settings.kind)
    if kind is None:
        return None
    keys = provider_keys(name, settings, base_dir, kind.credential_headers)
    return kind.adapter(name, kind.queue_url(base_url.rstrip("/")), new_session(settings), keys, settings.timeouts)
