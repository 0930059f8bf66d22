"""The job adapter interface: how the gateway drives one provider's queue (submit, status, result, cancel).

An adapter is stateless between calls: everything it needs to find a job again is in the `handle` it returned
from `submit` (a small JSON object kept in the job record), so any replica can resume a job another one started.
Adapters raise `JobCallFailed` for a failed provider call; the runner retries retryable ones (`retries` in a row,
per provider) and fails the job on the others. docs/jobs.md describes how to add one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Protocol

Handle = dict[str, str]  # what the provider needs to find the job again (its request id, URLs); JSON-able
# The handle entry naming the job at the provider when the provider calls back with that id (webhooks): the runner
# indexes the job by it, so the replica taking the webhook finds the job.
PROVIDER_ID = "provider_id"
Phase = Literal["queued", "running", "completed", "failed"]


@dataclass(frozen=True)
class JobRequest:
    """What to generate: the model's id at the provider, its capability, and the inputs (checked against the
    capability's schema, defaults filled in). `public_url` is where clients reach the gateway (for webhooks,
    and for outputs the demo provider serves through the gateway)."""

    upstream_model: str
    capability: str
    inputs: Mapping[str, Any]
    public_url: str = ""


@dataclass(frozen=True)
class JobStatus:
    """Where the job is at the provider. `progress` is 0..1 when the provider says; `error` explains `failed`."""

    phase: Phase
    progress: float | None = None
    queue_position: int | None = None
    error: str | None = None


@dataclass(frozen=True)
class JobUnits:
    """What the provider produced, in the units prices use (policies: per_image, per_second, per_megapixel)."""

    images: int = 0
    seconds: float = 0.0
    megapixels: float = 0.0


@dataclass(frozen=True)
class JobResult:
    """The finished job: the `generation.completed` output (`{"url", "urls"}` for images, `{"url"}` for a video,
    plus what else the provider describes) and the units it is charged by."""

    output: dict[str, Any]
    units: JobUnits = field(default_factory=JobUnits)


class JobCallFailed(Exception):
    """A provider call failed. `retryable`: a 5xx, a 429 or a connection problem (the runner tries again);
    otherwise the job fails with `code` (a catalogue code: upstream_error, invalid_request...)."""

    def __init__(self, message: str, *, retryable: bool, code: str = "upstream_error", status: int = 0) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.code = code
        self.status = status


def provider_names(inputs: Mapping[str, Any], names: Mapping[str, str]) -> dict[str, Any]:
    """The gateway's inputs with each of `names`' keys renamed to the provider's name for it."""
    return {names.get(name, name): value for name, value in inputs.items()}


class JobAdapter(Protocol):
    """One provider's queue. Implementations: `fal.FalAdapter` (fal.ai, and the demo upstream's queue),
    `replicate.ReplicateAdapter`."""

    async def submit(self, request: JobRequest) -> Handle:
        """Queue the job; return its handle. Called once per job (again only if a replica died before the
        handle was stored)."""
        ...

    async def status(self, handle: Handle) -> JobStatus:
        """Where the job is now; cheap, called every `poll_interval_s`."""
        ...

    async def result(self, handle: Handle, request: JobRequest) -> JobResult:
        """The output and units of a job whose status was `completed`."""
        ...

    async def cancel(self, handle: Handle) -> None:
        """Ask the provider to stop the job (best effort: a job already running may still finish and be billed)."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...
