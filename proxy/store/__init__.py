"""Shared counters behind one interface: Redis (Lua scripts, exact across replicas) and in-memory."""

from proxy.store.base import (
    AdmitCancelled,
    AdmitRequest,
    AdmitResult,
    Balance,
    CreditSpec,
    Denial,
    LeaseSpec,
    LimitSpec,
    LimitState,
    NullObserver,
    Reservation,
    Store,
    StoreError,
    StoreObserver,
    StoreOverloaded,
    StoreUnavailable,
)
from proxy.store.memory import MemoryStore
from proxy.store.redis_store import RedisStore
from proxy.store.resilient import ResilientStore
from proxy.store.settings import StoreConfigError, StoreSettings, build_store

__all__ = [
    "AdmitCancelled",
    "AdmitRequest",
    "AdmitResult",
    "Balance",
    "CreditSpec",
    "Denial",
    "LeaseSpec",
    "LimitSpec",
    "LimitState",
    "MemoryStore",
    "NullObserver",
    "RedisStore",
    "Reservation",
    "ResilientStore",
    "Store",
    "StoreConfigError",
    "StoreError",
    "StoreObserver",
    "StoreOverloaded",
    "StoreSettings",
    "StoreUnavailable",
    "build_store",
]
