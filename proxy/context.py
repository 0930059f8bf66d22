"""The one object a request carries through the stages: who, what, and what happened."""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass, field

from aiohttp import web

from .auth.principal import Principal
from .catalog import Model
from .errors import ApiError
from .policy.types import Decision, Usage
from .upstream.relay import RelayOutcome

_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{8,128}$")


@dataclass(frozen=True)
class AdminAudit:
    """What an admin call did, for its access-log line: the action, its target (key id or account), the reason, and
    who made it (the admin token's actor, once checked)."""

    action: str
    target: str | None = None
    reason: str | None = None
    actor: str | None = None


@dataclass(slots=True)
class RequestContext:
    request_id: str
    route: str
    started: float = field(default_factory=time.monotonic)
    principal: Principal | None = None
    model: Model | None = None
    outcome: RelayOutcome | None = None
    provider: str | None = None  # the provider of the deployment that answered
    deployment: str | None = None  # its name (the model's own, or a fallback model's: `model/deployment`)
    attempts: int = 0  # upstream calls made, the answering one included
    charged_as: Decision | None = None  # the answering model's price and bounds under the request's hold
    usage: Usage | None = None
    credits_charged: float | None = None
    error: ApiError | None = None
    admin: AdminAudit | None = None

    @property
    def error_code(self) -> str | None:
        """The refusal's code, else the upstream failure's (a stream cut after its headers were sent)."""
        return self.error.code if self.error else (self.outcome.error_code if self.outcome else None)


CONTEXT = web.RequestKey("context", RequestContext)


def request_id_for(request: web.Request) -> str:
    """The client's X-Request-Id if it is well-formed (so traces join up), else a new one."""
    given = request.headers.get("X-Request-Id", "")
    return given if _CLIENT_REQUEST_ID.match(given) else "req_" + secrets.token_hex(12)


def route_name(request: web.Request) -> str:
    """The matched route pattern (bounded set), never the raw path."""
    info = request.match_info.route.resource
    return info.canonical if info is not None else "unmatched"
