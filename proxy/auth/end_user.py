"""`X-End-User-Id`: a server-side API-key caller names the end user a call is made for.

The value becomes the principal's `subject`, exactly like the `sub` of a token minted from the same key: per-user
limits, the usage ledger's `user` and `GET /v1/usage` then count that end user (`u:g:<id>` within the account).
A token or an identity provider's session already names its user (or deliberately none): its `sub` is fixed, so
such a caller sending another value is refused (403), never silently re-attributed; the same value is accepted.
"""

from __future__ import annotations

import re
from dataclasses import replace

from .principal import Principal
from ..errors import ApiError

END_USER_HEADER = "X-End-User-Id"
MAX_END_USER_CHARS = 128
# Ids as backends write them (database ids, UUIDs, e-mail addresses, `org:user`), nothing that needs escaping.
_END_USER_ID = re.compile(rf"[A-Za-z0-9._:@+-]{{1,{MAX_END_USER_CHARS}}}")


def with_end_user(principal: Principal, values: list[str]) -> Principal:
    """The principal as the `X-End-User-Id` header values (`values`: every one sent) attribute it."""
    if not values:
        return principal
    if len(values) > 1:
        raise _invalid(f"send exactly one {END_USER_HEADER} header")
    end_user = values[0]
    if not _END_USER_ID.fullmatch(end_user):
        raise _invalid(
            f"{END_USER_HEADER} must be 1-{MAX_END_USER_CHARS} characters of A-Z a-z 0-9 and . _ : @ + -"
        )
    if principal.kind == "api_key":
        return replace(principal, subject=end_user)
    if end_user == principal.subject:
        return principal
    raise ApiError(
        "forbidden",
        f"{END_USER_HEADER} is for API-key callers; this token's end user is fixed by its sub when it is minted",
        param=END_USER_HEADER,
    )


def _invalid(message: str) -> ApiError:
    return ApiError("invalid_request", message, param=END_USER_HEADER)
