"""Which provider kinds run jobs, and which capabilities they run as jobs. Plain data: config.py validates
against it without importing the adapters (registry.py maps each kind to its adapter)."""

from __future__ import annotations

from urllib.parse import quote

# Kinds that serve only jobs, with the example base_url named when a config leaves it out.
JOB_KINDS: dict[str, str] = {
    "fal": "https://queue.fal.run",
    "replicate": "https://api.replicate.com/v1",
}
# Capabilities whose job makes a video: billed by its seconds (the reported length, else the requested duration).
VIDEO_CAPABILITIES = frozenset({"text2video", "image2video"})
# Capabilities each job kind runs as jobs; `demo` serves its other capabilities in the OpenAI format.
JOB_CAPABILITIES: dict[str, frozenset[str]] = {
    "fal": frozenset({"text2image", "image2image", "text2video", "image2video"}),
    "replicate": frozenset({"text2image", "image2image", "text2video", "image2video"}),
    "demo": frozenset({"image2image", "text2video", "image2video"}),
}


# Kinds whose provider calls the gateway back, and how it signs: with a shared secret (`jobs.webhook_secret`) or
# with a key published as a JWKS (`jobs.webhooks` + `jobs.webhook_jwks_url`).
WEBHOOK_KINDS: dict[str, str] = {"replicate": "secret", "fal": "jwks"}
FAL_JWKS_URL = "https://rest.alpha.fal.ai/.well-known/jwks.json"


def webhook_path(kind: str, provider: str) -> str:
    """Where the gateway takes a provider's webhooks (proxy/api/webhooks.py)."""
    return f"/v1/webhooks/{kind}/{quote(provider, safe='')}"


def runs_as_job(kind: str, capability: str) -> bool:
    """True when a model of `capability` on a provider of `kind` is a job (submitted, then polled)."""
    return capability in JOB_CAPABILITIES.get(kind, ())
