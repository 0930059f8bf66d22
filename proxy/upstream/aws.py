"""Route: AWS credentials and SigV4 signing for Bedrock, from botocore (a well-kept library, never by hand).

Credentials come from botocore's standard chain (env vars, shared config and profile, web identity for IRSA,
container credentials, instance metadata), resolved once at start-up in a thread. Refreshable credentials
(web identity, container, instance) are refreshed by botocore; its refresh is a blocking call, so a background
task asks for them in a thread every `_REFRESH_EVERY_S` and the hot path only signs with the last frozen copy.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..config import ConfigError

try:  # an extra (`pip install 'edge-proxy[bedrock]'`): only Bedrock providers need it
    import botocore.session
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
except ImportError:  # pragma: no cover - checked at start-up when a bedrock provider is configured
    botocore = None  # type: ignore[assignment]

log = logging.getLogger("edge_proxy.aws")
_REFRESH_EVERY_S = 60.0  # botocore refreshes 15 (advisory) to 10 (mandatory) minutes before expiry
_SERVICE = "bedrock"

# botocore logs canonical requests (security token included) at debug level: never let them into our logs.
logging.getLogger("botocore").setLevel(logging.WARNING)


@dataclass
class AwsSigner:
    """Signs Bedrock calls with the current credentials of the standard chain."""

    region: str
    profile: str | None = None
    _credentials: Any = None  # botocore Credentials (maybe refreshable)
    _frozen: Any = None  # their last ReadOnlyCredentials: all the hot path touches
    _task: asyncio.Task[None] | None = field(default=None, repr=False)

    async def start(self, provider: str) -> None:
        """Resolve credentials (in a thread: the chain may read files or call a metadata endpoint)."""
        self._credentials = await asyncio.to_thread(_resolve, self.profile)
        if self._credentials is None:
            raise ConfigError(
                f"providers.{provider}: no AWS credentials found in the standard chain. Fix: set "
                "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile (aws_profile), web identity (IRSA) or "
                "container credentials"
            )
        self._frozen = await asyncio.to_thread(self._credentials.get_frozen_credentials)
        if getattr(self._credentials, "refresh_needed", None) is not None:  # refreshable: keep them fresh
            self._task = asyncio.create_task(self._keep_fresh())

    async def _keep_fresh(self) -> None:
        while True:
            await asyncio.sleep(_REFRESH_EVERY_S)
            await self.refresh()

    async def refresh(self) -> None:
        """Take botocore's current credentials, refreshed by it if due, in a thread; calls meanwhile sign with
        the last ones."""
        try:
            self._frozen = await asyncio.to_thread(self._credentials.get_frozen_credentials)
        except Exception as exc:  # botocore's refresh failed: the last credentials stay until they expire
            log.warning("AWS credentials could not be refreshed (%s); retrying in %gs",
                        type(exc).__name__, _REFRESH_EVERY_S)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def sign(self, url: str, headers: Mapping[str, str], body: bytes) -> dict[str, str]:
        """The SigV4 headers (Authorization, X-Amz-Date, X-Amz-Security-Token when a session) for this POST,
        signed over `headers` as they will be sent."""
        request = AWSRequest(method="POST", url=url, data=body, headers=dict(headers))
        SigV4Auth(self._frozen, _SERVICE, self.region).add_auth(request)
        return {name: value for name, value in request.headers.items() if name not in headers}


def _resolve(profile: str | None) -> Any:
    if botocore is None:
        raise ConfigError("kind bedrock needs botocore, which is not installed. Fix: pip install 'edge-proxy[bedrock]'")
    return botocore.session.Session(profile=profile).get_credentials()
