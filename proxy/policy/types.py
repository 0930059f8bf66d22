"""What the policy engine decides, handed to the meter. Plain data, no I/O."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Literal

Dimension = Literal["key", "user", "account", "model"]
Unit = Literal["requests", "tokens"]
Period = Literal["none", "day", "month"]
BudgetScope = Literal["key", "user", "account"]


@dataclass(frozen=True)
class RateLimit:
    """`limit` units (requests or tokens) per `window_s`, counted per the tuple of dimensions in `per`."""

    per: tuple[Dimension, ...]
    unit: Unit
    limit: int
    window_s: float

    @functools.cached_property
    def name(self) -> str:
        """A stable, low-cardinality rule name for metrics and headers, e.g. `user.requests.60s` (made once)."""
        return f"{'+'.join(self.per)}.{self.unit}.{self.window_s:g}s"


@dataclass(frozen=True)
class Budget:
    """A credit budget of `credits` per `period`, shared by everything in `scope`."""

    credits: int
    period: Period = "none"
    scope: BudgetScope = "account"
    # Alert thresholds in basis points of `credits` (8000: 80 %), ascending: each fires one signed webhook per
    # budget period when `spent` reaches it (docs/usage.md, "Budget alerts").
    alerts: tuple[int, ...] = ()


@dataclass(frozen=True)
class Price:
    """Credits charged for a call; every part that applies is added."""

    per_request: float = 0.0
    input_per_1k_tokens: float = 0.0
    output_per_1k_tokens: float = 0.0
    per_image: float = 0.0
    per_second: float = 0.0
    per_character: float = 0.0  # characters of text spoken (text-to-speech providers bill these)
    per_megapixel: float = 0.0  # megapixels of generated images (image providers that price by output size)


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """What the gateway knows about a request before forwarding it (used to bound its cost)."""

    input_bytes: int = 0
    max_output_tokens: int | None = None  # per choice
    choices: int = 1  # completions generated: prompts x max(n, best_of)
    media_parts: int = 0  # image/audio/file parts in messages: their tokens are not bounded by the body's bytes
    images: int = 1
    seconds: float | None = None
    characters: int = 0  # text to speak: its length bounds what a per-character price can charge
    megapixels: float = 0.0  # images requested x their requested size: bounds a per-megapixel price
    stream: bool = False


@dataclass(frozen=True, slots=True)
class Usage:
    """What a call really used, read from the upstream's answer."""

    input_tokens: int = 0
    output_tokens: int = 0
    images: int = 0
    seconds: float = 0.0
    characters: int = 0
    megapixels: float = 0.0
    # False: figures a stream reports before its end (Anthropic's `message_start`), which its final event
    # replaces; a stream cut before that is charged an estimate (its input known), never these alone.
    final: bool = True


@dataclass(frozen=True, slots=True)
class Decision:
    """Allow (with what to take and reserve) or deny (with the error code)."""

    allowed: bool
    plan: str
    error_code: str | None = None
    error_message: str | None = None
    rate_limits: tuple[RateLimit, ...] = field(default_factory=tuple)
    concurrency: int | None = None
    budget: Budget | None = None
    price: Price | None = None
    reserve_credits: float = 0.0  # the most this request can cost
    estimated_tokens: int = 0  # the most tokens it can use, taken from token limits up front
    max_output_tokens: int = 0  # per choice, forwarded upstream so the provider cannot exceed the reserve (0: none)
    bound: Usage = field(default_factory=Usage)  # the usage that costs exactly reserve_credits
    allow_pricier_fallbacks: bool = False  # the plan lets a dearer fallback model answer (its hold covers it)
    cancel_jobs_on_disconnect: bool = False  # a job is cancelled when the client streaming it disconnects
