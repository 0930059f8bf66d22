"""The model catalogue: which public model ids exist and where each one is served."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

Capability = Literal[
    "text2image", "image2image", "text2text", "text2video", "image2video", "text2speech", "speech2text"
]
CAPABILITIES: tuple[str, ...] = (
    "text2image", "image2image", "text2text", "text2video", "image2video", "text2speech", "speech2text",
)


@dataclass(frozen=True)
class Deployment:
    """One place a model is served: a provider, the model's id there, and its share of the traffic. `name` (the
    tag, else the provider) is unique within the model and names it in metrics and the access log."""

    name: str
    provider: str
    upstream_model: str
    weight: float = 1.0


@dataclass(frozen=True)
class Model:
    """A model as callers see it (`id`, `name`, `creator`, `capability`) and how it is served."""

    id: str
    name: str
    creator: str
    capability: str
    provider: str
    upstream_model: str
    max_output_tokens: int | None = None  # cap used to bound a reservation when the request sets none
    # Where it is served; empty: the one deployment `provider`/`upstream_model` (the first deployment otherwise).
    deployments: tuple[Deployment, ...] = ()
    fallbacks: tuple[str, ...] = ()  # model ids tried, in order, once every deployment of this one failed
    selection: str = "weighted"  # how the first deployment is chosen: weighted, least_in_flight or sticky
    wire_format: str = "openai"  # the request/answer body format its deployments speak (their kinds' dialect)
    # Form hints for its input schema (`x-property-order`, per input `x-imgly-*`), from config: not part of equality.
    schema_hints: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def served_by(self) -> tuple[Deployment, ...]:
        return self.deployments or (Deployment(self.provider, self.provider, self.upstream_model),)

    def public(self) -> dict[str, str]:
        return {"id": self.id, "name": self.name, "creator": self.creator, "capability": self.capability}
