"""The authenticated caller, as every later stage sees it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

PrincipalKind = Literal["api_key", "gateway_token", "issuer"]


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling and on whose behalf.

    `account` is whom credits are billed to; `subject` is the end user (for per-user limits);
    `key_id` is the API key behind the credential (an API key or a token minted from one).
    `scopes` narrows the plan's model scopes (minted tokens); None means the plan's own.
    """

    kind: PrincipalKind
    account: str
    plan: str
    key_id: str | None = None
    subject: str | None = None
    issuer: str | None = None
    scopes: tuple[str, ...] | None = None
    token_id: str | None = None

    @property
    def label(self) -> str:
        """Low-cardinality caller type for metrics and logs: api_key, gateway_token or the issuer name."""
        return self.issuer if self.kind == "issuer" and self.issuer else self.kind
