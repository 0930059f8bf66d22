"""Admin-managed keys (kept in the store) joined to the policy loaded from files.

A stored record is checked exactly like a key in a policy file (same parser, same catalogue check). The files
win every conflict: a stored key whose id or hash a policy file also uses, or whose plan the files no longer
define, is left out (it authenticates nothing) and reported with the reason, never failing a reload.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Iterable

from proxy.catalog import Model
from proxy.policy.engine import Policy
from proxy.policy.loader import unmatched_patterns
from proxy.policy.schema import KEY_FIELDS, Invalid, KeySpec, parse_key
from proxy.store.base import StoreError
from proxy.store.keys import KeyDirectory, StoredKey

if TYPE_CHECKING:
    from proxy.policy.reload import PolicyHolder

log = logging.getLogger("proxy.policy")


def key_spec(record: StoredKey, catalog: tuple[Model, ...]) -> KeySpec:
    """The record as a policy key; Invalid (naming the field) if a policy file could not declare it either."""
    raw = {name: getattr(record, name) for name in KEY_FIELDS}
    if not raw["overrides"]:
        raw.pop("overrides")
    if raw["account"] is None:
        raw.pop("account")
    spec = parse_key("", raw)
    for i, pattern in unmatched_patterns(spec.overrides.scope, catalog) if spec.overrides.scope else ():
        raise Invalid(f"overrides.models[{i}]", f"{pattern!r} matches no model", "name models of GET /v1/models")
    return spec


def with_managed_keys(
    policy: Policy, records: Iterable[StoredKey], catalog: tuple[Model, ...]
) -> tuple[Policy, dict[str, str]]:
    """The policy with every stored key it can take, and why each other one was left out (by key id)."""
    specs: list[KeySpec] = []
    problems: dict[str, str] = {}
    for record in records:
        try:
            specs.append(key_spec(record, catalog))
        except Invalid as exc:
            problems[record.id] = str(exc)
    joined, refused = policy.with_keys(specs)
    return joined, {**problems, **refused}


class ManagedKeys:
    """Keeps the policy's admin-managed keys in step with the store, so authentication never calls the store.

    Every `refresh_s` one small read (the directory's version) tells whether anything changed; only then are the
    records read and joined. A change made on any replica is in effect everywhere within `refresh_s` plus one
    store call. While the store cannot be read, the last records stay in effect (logged once per outage).
    """

    def __init__(self, directory: KeyDirectory, holder: PolicyHolder, refresh_s: float) -> None:
        self.directory = directory
        self._holder = holder
        self._refresh_s = refresh_s
        self._version: int | None = None
        self._failing = False

    async def refresh(self) -> None:
        """Re-read the records if their version moved (and at the first call)."""
        try:
            if self._version is not None and await self.directory.version() == self._version:
                self._recovered()
                return
            version, records = await self.directory.records()
        except StoreError as exc:
            if not self._failing:
                log.warning("cannot read admin-managed keys (%s); the last ones read stay in effect", exc)
            self._failing = True
            return
        self._recovered()
        self._holder.set_managed_keys(records.values())
        self._version = version

    async def run(self) -> None:
        """Refresh every `refresh_s` until cancelled."""
        while True:
            await self.refresh()
            await asyncio.sleep(self._refresh_s)

    def _recovered(self) -> None:
        if self._failing:
            log.info("admin-managed keys readable again")
        self._failing = False
