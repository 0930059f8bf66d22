"""Prices: the most a request can cost before it runs, and what it really cost afterwards."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

from proxy.catalog import Model
from proxy.policy.scopes import is_glob, matches
from proxy.policy.types import Price, RequestFacts, Usage

FREE = Price()
# Only these produce text whose length the caller bounds with max_tokens; for images, audio and
# embeddings a default output cap would only inflate token limits (a model's own cap still counts).
TEXT_OUTPUT_CAPABILITIES = frozenset({"text2text", "speech2text"})
# Input tokens allowed per image, audio or file part of a message: a URL of a few bytes can cost many tokens.
# OpenAI's dearest image (high detail, patch-based models) is ~3.8k tokens; inline data is also bounded by its bytes.
MEDIA_PART_TOKENS = 4096


@dataclass(frozen=True)
class Bounds:
    """Upper bounds of what one request can use; `Usage` within these never costs more than `estimate`."""

    input_tokens: int
    output_tokens: int  # all choices
    images: int
    seconds: float
    output_tokens_per_choice: int = 0
    characters: int = 0
    megapixels: float = 0.0

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens


def bounds(facts: RequestFacts, model: Model, default_output_tokens: int, default_seconds: float) -> Bounds:
    """Bound a request without a tokenizer: a BPE token is at least one byte, so tokens <= body bytes."""
    per_choice = _output_bound(facts, model, default_output_tokens)
    return Bounds(
        input_tokens=max(facts.input_bytes, 0) + max(facts.media_parts, 0) * MEDIA_PART_TOKENS,
        output_tokens=max(facts.choices, 1) * per_choice,
        images=max(facts.images, 0),
        seconds=facts.seconds if facts.seconds is not None else default_seconds,
        output_tokens_per_choice=per_choice,
        characters=max(facts.characters, 0),
        megapixels=max(facts.megapixels, 0.0),
    )


def _output_bound(facts: RequestFacts, model: Model, default: int) -> int:
    """Per choice: the request's max tokens, clamped by the model's cap; else the cap; else the plan's default."""
    caps = [c for c in (facts.max_output_tokens, model.max_output_tokens) if c is not None]
    if caps:
        return max(min(caps), 0)
    return default if model.capability in TEXT_OUTPUT_CAPABILITIES else 0


def _charge(
    price: Price,
    input_tokens: float,
    output_tokens: float,
    images: float,
    seconds: float,
    characters: float,
    megapixels: float,
) -> float:
    # One formula for both estimate and cost: with non-negative prices it is monotone in every
    # argument (IEEE rounding is monotone too), which is what makes reserve >= cost hold exactly.
    return (
        price.per_request
        + input_tokens * price.input_per_1k_tokens / 1000
        + output_tokens * price.output_per_1k_tokens / 1000
        + images * price.per_image
        + seconds * price.per_second
        + characters * price.per_character
        + megapixels * price.per_megapixel
    )


def estimate(
    price: Price, facts: RequestFacts, model: Model, default_output_tokens: int = 4096, default_seconds: float = 60.0
) -> float:
    """The most the request can cost, in credits: what to reserve before forwarding it."""
    return charge_bounds(price, bounds(facts, model, default_output_tokens, default_seconds))


def charge_bounds(price: Price, limit: Bounds) -> float:
    """Credits for a request that uses everything its bounds allow."""
    return _charge(
        price, limit.input_tokens, limit.output_tokens, limit.images, limit.seconds, limit.characters, limit.megapixels
    )


def cost(price: Price, usage: Usage) -> float:
    """The real cost, in credits, of what the upstream reports the call used."""
    return _charge(
        price, usage.input_tokens, usage.output_tokens, usage.images, usage.seconds, usage.characters, usage.megapixels
    )


def specificity(pattern: str) -> tuple[int, int]:
    """Sort key for price patterns: an exact id beats any glob; among globs, more literal characters win."""
    if not is_glob(pattern):
        return (1, len(pattern))
    return (0, sum(1 for ch in pattern if ch not in "*?[]"))


def resolve_price(prices: Mapping[str, Price], model_id: str) -> Price | None:
    """The price that applies to a model: exact id, else the most specific matching glob (ties: first declared)."""
    exact = prices.get(model_id)
    if exact is not None:
        return exact
    best: tuple[tuple[int, int], Price] | None = None
    for pattern, price in prices.items():
        if is_glob(pattern) and matches(pattern, model_id):
            if best is None or specificity(pattern) > best[0]:
                best = (specificity(pattern), price)
    return best[1] if best else None


def price_table(prices: Mapping[str, Price], models: Iterable[Model]) -> dict[str, Price]:
    """Prices resolved for every catalogue model at load time, so a request does one dict lookup."""
    table = {}
    for model in models:
        price = resolve_price(prices, model.id)
        if price is not None:
            table[model.id] = price
    return table
