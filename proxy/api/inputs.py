"""Check generation inputs against a model's input schema (the JSON Schema subset proxy/api/schema.py uses).

Supported: required, type, enum, minimum/maximum, minLength, minItems/maxItems and items, and additionalProperties
false (always, as the published schema says). Errors are 400 `invalid_request` naming the field in `param`.
"""

from __future__ import annotations

from typing import Any

from ..errors import ApiError

_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,),
    "object": (dict,), "array": (list,),
}


def validate_inputs(inputs: dict[str, Any], schema: dict[str, Any]) -> None:
    """Raise the first problem found, in a stable order: unknown fields, missing fields, then each value."""
    properties: dict[str, dict[str, Any]] = schema.get("properties", {})
    for name in inputs:
        if name not in properties:
            raise _invalid(name, f"unknown field `{name}`; this model takes: {', '.join(properties)}")
    for name in schema.get("required", ()):
        if name not in inputs:
            raise _invalid(name, f"`{name}` is required")
    for name, value in inputs.items():
        _check_value(name, value, properties[name])


def checked_inputs(inputs: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """The inputs validated against the schema, with the schema's defaults filled in."""
    validate_inputs(inputs, schema)
    defaults = {name: rule["default"] for name, rule in schema["properties"].items() if "default" in rule}
    return {**defaults, **inputs}


def _check_value(name: str, value: Any, rule: dict[str, Any]) -> None:
    kind = rule.get("type")
    if kind is not None and not _is_type(value, kind):
        raise _invalid(name, f"`{name}` must be of type {kind}")
    if "enum" in rule and value not in rule["enum"]:
        raise _invalid(name, f"`{name}` must be one of {', '.join(map(str, rule['enum']))}")
    if "minimum" in rule and value < rule["minimum"]:
        raise _invalid(name, f"`{name}` must be at least {rule['minimum']}")
    if "maximum" in rule and value > rule["maximum"]:
        raise _invalid(name, f"`{name}` must be at most {rule['maximum']}")
    if "minLength" in rule and len(value) < rule["minLength"]:
        raise _invalid(name, f"`{name}` must have at least {rule['minLength']} characters")
    if "minItems" in rule and len(value) < rule["minItems"]:
        raise _invalid(name, f"`{name}` must have at least {rule['minItems']} items")
    if "maxItems" in rule and len(value) > rule["maxItems"]:
        raise _invalid(name, f"`{name}` must have at most {rule['maxItems']} items")
    for item in value if "items" in rule else ():
        _check_value(name, item, rule["items"])


def _is_type(value: Any, kind: str) -> bool:
    # JSON has no bool/int overlap: `true` is not an integer even though Python says bool is an int.
    if isinstance(value, bool) and kind != "boolean":
        return False
    return isinstance(value, _TYPES.get(kind, (object,)))


def _invalid(name: str, message: str) -> ApiError:
    return ApiError("invalid_request", message, param=name)
