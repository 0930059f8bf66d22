"""`GET /v1/models/{id}/schema`: a model's input schema as an OpenAPI 3.1 document, by capability."""

from __future__ import annotations

from typing import Any

from ..catalog import Model

_PROMPT = {"type": "string", "minLength": 1, "description": "What to generate"}
_IMAGE_URL = {"type": "string", "format": "uri", "description": "Input image (a URL, e.g. from POST /v1/uploads)"}
_ASPECT = {"type": "string", "enum": ["1:1", "16:9", "9:16", "4:3", "3:4"], "default": "1:1"}

# The inputs each capability takes; a client renders its form from these.
INPUTS: dict[str, dict[str, Any]] = {
    "text2text": {"required": ["prompt"], "properties": {
        "prompt": _PROMPT, "max_tokens": {"type": "integer", "minimum": 1},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2}}},
    "text2image": {"required": ["prompt"], "properties": {
        "prompt": _PROMPT, "aspect_ratio": _ASPECT, "n": {"type": "integer", "minimum": 1, "maximum": 4, "default": 1}}},
    "image2image": {"required": ["prompt", "image_url"], "properties": {
        "prompt": _PROMPT, "image_url": _IMAGE_URL, "aspect_ratio": _ASPECT}},
    "text2video": {"required": ["prompt"], "properties": {
        "prompt": _PROMPT, "aspect_ratio": _ASPECT, "duration": {"type": "integer", "minimum": 1, "maximum": 60}}},
    "image2video": {"required": ["image_url"], "properties": {
        "prompt": _PROMPT, "image_url": _IMAGE_URL, "duration": {"type": "integer", "minimum": 1, "maximum": 60}}},
    "text2speech": {"required": ["input"], "properties": {
        "input": {"type": "string", "minLength": 1, "description": "Text to speak"},
        "voice": {"type": "string", "default": "alloy"}}},
    "speech2text": {"required": ["audio_url"], "properties": {
        "audio_url": {"type": "string", "format": "uri", "description": "Audio to transcribe"}}},
}


def openapi_document(model: Model) -> dict[str, Any]:
    """An OpenAPI 3.1 document whose `components.schemas.Input` describes the model's inputs."""
    inputs = INPUTS[model.capability]
    return {
        "openapi": "3.1.0",
        "info": {"title": model.name, "version": "1", "x-model-id": model.id, "x-capability": model.capability},
        "paths": {},
        "components": {"schemas": {"Input": {"type": "object", "additionalProperties": False, **inputs}}},
    }
