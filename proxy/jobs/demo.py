"""The demo provider's jobs: its in-process upstream speaks fal's queue API (proxy/upstream/demo.py), so the
fal adapter drives them; this adds the progress the demo reports and serves its outputs through the gateway
(`/v1/demo/files/...` on the public URL), since the demo upstream listens on loopback only."""

from __future__ import annotations

from typing import Any

from .adapter import Handle, JobRequest, JobResult, JobStatus
from .fal import FalAdapter, status_of

DEMO_FILES_ROUTE = "/v1/demo/files"


class DemoAdapter(FalAdapter):
    async def status(self, handle: Handle) -> JobStatus:
        answer = await self.status_answer(handle)
        status = status_of(answer, "demo")
        progress = answer.get("progress")
        if status.phase == "running" and isinstance(progress, (int, float)):
            return JobStatus("running", progress=float(progress))
        return status

    async def result(self, handle: Handle, request: JobRequest) -> JobResult:
        result = await super().result(handle, request)
        return JobResult(_public(result.output, request.public_url), result.units)


def _public(output: dict[str, Any], public_url: str) -> dict[str, Any]:
    """The demo upstream's file URLs as the gateway's: `<public url>/v1/demo/files/<name>`."""
    def public(url: str) -> str:
        return f"{public_url.rstrip('/')}{DEMO_FILES_ROUTE}/{url.rsplit('/', 1)[-1]}"

    changed = {**output, "url": public(output["url"])}
    if "urls" in output:
        changed["urls"] = [public(url) for url in output["urls"]]
    return changed
