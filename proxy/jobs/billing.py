"""A job's credit hold as data: taken at submit by the replica that admitted it, kept in the job record, renewed
and settled by whichever replica polls the job (Meter.resume). The store's settle is idempotent per hold, so two
replicas settling one job charge it once."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from ..policy.types import Price
from ..store.base import AdmitRequest, CreditSpec, LeaseSpec, LedgerSpec, LimitSpec, Reservation


def encode_reservation(reservation: Reservation | None) -> str:
    """JSON of the hold ('' when the admission took nothing in the store)."""
    return "" if reservation is None else json.dumps(asdict(reservation), separators=(",", ":"))


def decode_reservation(text: str) -> Reservation | None:
    if not text:
        return None
    data = json.loads(text)
    request: dict[str, Any] = data["request"]
    return Reservation(
        AdmitRequest(
            reservation_id=request["reservation_id"], ticket_key=request["ticket_key"], now_ms=request["now_ms"],
            ttl_ms=request["ttl_ms"], limits=tuple(LimitSpec(**spec) for spec in request["limits"]),
            lease=LeaseSpec(**request["lease"]) if request["lease"] else None,
            credits=CreditSpec(**request["credits"]) if request["credits"] else None,
            ledger=LedgerSpec(**request["ledger"]) if request["ledger"] else None,
        ),
        fallback=data["fallback"],
    )


def encode_price(price: Price | None) -> str:
    return "" if price is None else json.dumps(asdict(price), separators=(",", ":"))


def decode_price(text: str) -> Price | None:
    return Price(**json.loads(text)) if text else None
