"""A provider's connection pool, shared fairly: no account holds more than its share of the connections.

Every tenant's calls to a provider go through one pool (`providers.<name>.max_connections`). Without shares,
one account with enough calls in flight takes every connection and the others wait until they time out. Here an
admitted call takes a slot and keeps it until its upstream connection is released. An account holding its
share (`max_connections_per_account`) waits for one of its own calls to finish, and any call waits for a free
connection when the whole pool is busy, both within `pool_wait_s`: a burst is latency first, then a clear
refusal (429 `concurrency_limit` with rule `provider_connections` for the account's share, 503
`generation_unavailable` for the pool), while other accounts keep their connections.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Callable

from ..errors import ApiError

RULE = "provider_connections"


class PoolShares:
    def __init__(self, provider: str, size: int, per_account: int, wait_s: float) -> None:
        self._provider = provider
        self._size = size
        self._per_account = per_account
        self._wait_s = wait_s
        self._free = asyncio.Semaphore(size)
        self._shares: dict[str, asyncio.Semaphore] = {}
        self._callers: Counter[str] = Counter()  # calls holding or awaiting a slot, per account: idle shares go

    async def take(self, account: str) -> None:
        """Take one of the provider's connections for `account` (within its share), or refuse within the wait. Give
        it back with `give_back` once the call is over."""
        share = self._shares.setdefault(account, asyncio.Semaphore(self._per_account))
        self._callers[account] += 1
        deadline = asyncio.get_running_loop().time() + self._wait_s
        try:
            await _take(share, deadline, self._over_share)
            try:
                await _take(self._free, deadline, self._pool_busy)
            except BaseException:
                share.release()
                raise
        except BaseException:
            self._forget_caller(account)
            raise

    def give_back(self, account: str) -> None:
        self._free.release()
        self._shares[account].release()  # kept while the account has a caller, as this one is until the next line
        self._forget_caller(account)

    def _forget_caller(self, account: str) -> None:
        self._callers[account] -= 1
        if not self._callers[account]:
            del self._callers[account], self._shares[account]

    def _over_share(self) -> ApiError:
        return ApiError(
            "concurrency_limit",
            f"this account kept its {self._per_account} connections to provider {self._provider} (its share of "
            f"the {self._size} all accounts share) busy for {self._wait_s:g}s; retry when one of its calls finishes",
            headers={"Retry-After": "1"}, rule=RULE, limit=self._per_account,
        )

    def _pool_busy(self) -> ApiError:
        return ApiError(
            "generation_unavailable",
            f"all {self._size} connections to provider {self._provider} stayed busy for {self._wait_s:g}s; "
            "try again shortly",
            headers={"Retry-After": "1"},
        )


async def _take(semaphore: asyncio.Semaphore, deadline: float, refusal: Callable[[], ApiError]) -> None:
    if not semaphore.locked():
        await semaphore.acquire()  # free: returns at once, so no timer (twice a call: the share, the pool)
        return
    try:
        async with asyncio.timeout_at(deadline):
            await semaphore.acquire()
    except TimeoutError:
        raise refusal() from None
