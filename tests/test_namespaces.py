"""Kinds of identity never share a counter: the API key "k2", a token's sub "k2" and an IdP user "k2" (per
issuer) each have their own limits, concurrency slots and budgets."""

from __future__ import annotations

import time

import pytest

from proxy.auth.principal import Principal
from proxy.errors import ApiError
from proxy.meter import Meter
from proxy.policy.types import Budget, Decision, RateLimit
from proxy.store import Store

SAME_NAME = (
    Principal(kind="api_key", account="acme", plan="pro", key_id="k2"),
    Principal(kind="gateway_token", account="acme", plan="pro", key_id="k1", subject="k2"),
    Principal(kind="issuer", account="acme", plan="pro", issuer="clerk", subject="k2"),
    Principal(kind="issuer", account="acme", plan="pro", issuer="auth0", subject="k2"),
)


@pytest.mark.parametrize(
    "decision",
    [
        Decision(allowed=True, plan="pro", rate_limits=(RateLimit(("user",), "requests", 1, 60),)),
        Decision(allowed=True, plan="pro", rate_limits=(RateLimit(("key",), "requests", 1, 60),)),
        Decision(allowed=True, plan="pro", concurrency=1),
        Decision(allowed=True, plan="pro", budget=Budget(1, scope="user"), reserve_credits=1.0),
        Decision(allowed=True, plan="pro", budget=Budget(1, scope="key"), reserve_credits=1.0),
    ],
    ids=["per-user limit", "per-key limit", "concurrency", "user budget", "key budget"],
)
async def test_identities_of_different_kinds_with_the_same_name_share_nothing(store: Store, decision: Decision) -> None:
    meter = Meter(store, clock=time.time)
    for principal in SAME_NAME:
        await meter.admit(principal, "m/a", decision, "r")  # each its own: none is refused
    with pytest.raises(ApiError):  # while the same identity again is
        await meter.admit(SAME_NAME[2], "m/a", decision, "r")
