"""Job provider kinds → their adapters. Adding a provider: an adapter module implementing `JobAdapter`
(adapter.py), its entry here and in kinds.py (the capabilities it runs), its config and tests."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
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
    headers of a key, where its queue is relative to the provider's base URL, and (kinds.WEBHOOK_KINDS) the
    adapter asking the provider for webhooks, used when the provider takes webhooks (`jobs.webhook_secret`, `jobs.webhooks`)."""

    adapter: AdapterFactory
    credential_headers: Callable[[str], dict[str, str]]
    queue_url: Callable[[str], str] = lambda base_url: base_url
    with_webhooks: AdapterFactory | None = None


JOB_ADAPTERS: dict[str, JobKind] = {
    "fal": JobKind(fal.FalAdapter, fal.credential_headers, with_webhooks=partial(fal.FalAdapter, webhooks=True)),
    "replicate": JobKind(replicate.ReplicateAdapter, replicate.credential_headers,
                         with_webhooks=partial(replicate.ReplicateAdapter, webhooks=True)),
    # The demo upstream serves OpenAI's routes under /v1 and fal's queue under /queue.
    "demo": JobKind(DemoAdapter, fal.credential_headers, lambda base_url: base_url.removesuffix("/v1") + "/queue"),
}


def build_adapter(name: str, settings: ProviderSettings, base_url: str, base_dir: Path) -> JobAdapter | None:
    """The provider's job adapter, or None when its kind runs no jobs."""
    kind = JOB_ADAPTERS.get(settings.kind)
    if kind is None:
        return None
    keys = provider_keys(name, settings, base_dir, kind.credential_headers)
    factory = kind.with_webhooks if kind.with_webhooks and settings.jobs.takes_webhooks() else kind.adapter
    return factory(name, kind.queue_url(base_url.rstrip("/")), new_session(settings), keys, settings.timeouts)
