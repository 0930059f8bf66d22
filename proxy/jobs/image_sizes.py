"""The image sizes job adapters ask providers for, by the schema's `aspect_ratio`: one table for the request
(fal's named `image_size`) and for the bound a `per_megapixel` price reserves (n images x the size's megapixels)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping


@dataclass(frozen=True)
class ImageSize:
    preset: str  # fal's name for the size
    width: int
    height: int

    @property
    def megapixels(self) -> float:
        return self.width * self.height / 1_000_000


# fal's presets (square_hd, landscape_16_9...) at the pixel sizes fal documents for them.
IMAGE_SIZES = {
    "1:1": ImageSize("square_hd", 1024, 1024),
    "16:9": ImageSize("landscape_16_9", 1024, 576),
    "9:16": ImageSize("portrait_16_9", 576, 1024),
    "4:3": ImageSize("landscape_4_3", 1024, 768),
    "3:4": ImageSize("portrait_4_3", 768, 1024),
}
SIZED_CAPABILITIES = frozenset({"text2image", "image2image"})


def image_size(aspect_ratio: Any) -> ImageSize:
    """The size asked for an aspect ratio (the schema allows only the table's; anything else gets the square)."""
    return IMAGE_SIZES.get(aspect_ratio, IMAGE_SIZES["1:1"])


def requested_megapixels(capability: str, inputs: Mapping[str, Any]) -> float:
    """What an image job may produce, in megapixels: `n` images of the requested size (0 for other jobs)."""
    if capability not in SIZED_CAPABILITIES:
        return 0.0
    return inputs.get("n", 1) * image_size(inputs.get("aspect_ratio")).megapixels
