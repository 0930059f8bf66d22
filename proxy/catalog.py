"""The model catalogue: which public model ids exist and where each one is served."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Capability = Literal[
    "text2image", "image2image", "text2text", "text2video", "image2video", "text2speech", "speech2text"
]
CAPABILITIES: tuple[str, ...] = (
    "text2image", "image2image", "text2text", "text2video", "image2video", "text2speech", "speech2text",
)


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

    def public(self) -> dict[str, str]:
        return {"id": self.id, "name": self.name, "creator": self.creator, "capability": self.capability}
