"""Which provider kinds run jobs, and which capabilities they run as jobs. Plain data: config.py validates
against it without importing the adapters (registry.py maps each kind to its adapter)."""

from __future__ import annotations

# Kinds that serve only jobs, with the example base_url named when a config leaves it out.
JOB_KINDS: dict[str, str] = {
    "fal": "https://queue.fal.run",
    "replicate": "https://api.replicate.com/v1",
}
# Capabilities each job kind runs as jobs; `demo` serves its other capabilities in the OpenAI format.
JOB_CAPABILITIES: dict[str, frozenset[str]] = {
    "fal": frozenset({"text2image", "image2image", "text2video", "image2video"}),
    "replicate": frozenset({"text2image", "image2image", "text2video", "image2video"}),
    "demo": frozenset({"image2image", "text2video", "image2video"}),
}


# Kinds whose provider calls the gateway back (webhooks, signed with `jobs.webhook_secret`).
WEBHOOK_KINDS = frozenset({"replicate"})


def runs_as_job(kind: str, capability: str) -> bool:
    """True when a model of `capability` on a provider of `kind` is a job (submitted, then polled)."""
    return capability in JOB_CAPABILITIES.get(kind, ())
