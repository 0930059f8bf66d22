"""A model's input schema by capability, with the form hints config gives it: `GET /v1/models/{id}/schema` (an
OpenAPI 3.1 document) and the seeds' `GET /v1/models/schema?model=<id>` (the schema itself, as `input_schema`)."""

from __future__ import annotations

import copy
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
    "image2image": {"required": ["prompt"], "properties": {  # and image_urls or image_url (checked when mapped)
        "prompt": _PROMPT, "image_urls": {"type": "array", "items": _IMAGE_URL, "minItems": 1, "maxItems": 4,
                                          "description": "Input images (URLs, e.g. from POST /v1/uploads)"},
        "image_url": _IMAGE_URL, "aspect_ratio": _ASPECT}},
    "text2video": {"required": ["prompt"], "properties": {
        "prompt": _PROMPT, "aspect_ratio": _ASPECT, "duration": {"type": "integer", "minimum": 1, "maximum": 60}}},
    "image2video": {"required": ["image_url"], "properties": {
        "prompt": _PROMPT, "image_url": _IMAGE_URL, "duration": {"type": "integer", "minimum": 1, "maximum": 60}}},
    "text2speech": {"required": ["input"], "properties": {
        "input": {"type": "string", "minLength": 1, "description": "Text to speak"},
        "voice": {"type": "string", "minLength": 1,
                  "description": "Voice: OpenAI's name (default alloy) or an ElevenLabs voice id (default George)"}}},
    "speech2text": {"required": ["audio_url"], "properties": {
        "audio_url": {"type": "string", "format": "uri", "description": "Audio to transcribe"}}},
}


def input_schema(model: Model) -> dict[str, Any]:
    """The JSON Schema of the model's inputs, with its hints: `x-property-order` (config's, else every input in
    order) and each input's `title`, `description` and `x-imgly-*` keywords from config."""
    inputs = copy.deepcopy(INPUTS[model.capability])
    hints = model.schema_hints
    for name, keywords in hints.get("properties", {}).items():
        inputs["properties"][name].update(keywords)
    order = hints.get("x-property-order") or list(inputs["properties"])
    return {"type": "object", "additionalProperties": False, **inputs, "x-property-order": order}


def openapi_document(model: Model) -> dict[str, Any]:
    """An OpenAPI 3.1 document whose `components.schemas.Input` describes the model's inputs."""
    return {
        "openapi": "3.1.0",
        "info": {"title": model.name, "version": "1", "x-model-id": model.id, "x-capability": model.capability},
        "paths": {},
        "components": {"schemas": {"Input": input_schema(model)}},
    }


def schema_answer(model: Model) -> dict[str, Any]:
    """`GET /v1/models/schema?model=<id>`: the model and its `input_schema`."""
    return {"model": model.id, "name": model.name, "capability": model.capability, "input_schema": input_schema(model)}
