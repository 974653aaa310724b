"""Checking parsed tool-call arguments against a tool's JSON schema (the subset tool schemas use)."""

from __future__ import annotations

from typing import Any

_TYPE_CHECKS: dict[str, Any] = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
    "null": lambda v: v is None,
}
MAX_DEPTH = 32
"""Nesting depth beyond which values are not inspected further (model output is untrusted)."""


def _value_errors(value: Any, schema: Any, where: str, depth: int) -> list[str]:
    if not isinstance(schema, dict) or depth > MAX_DEPTH:
        return []
    errors: list[str] = []
    kinds = schema.get("type")
    kinds = [kinds] if isinstance(kinds, str) else kinds
    if isinstance(kinds, list) and kinds and not any(_TYPE_CHECKS.get(k, lambda v: True)(value) for k in kinds):
        return [f"{where} should be of type {'/'.join(kinds)}, got {type(value).__name__}"]
    if "enum" in schema and isinstance(schema["enum"], list) and value not in schema["enum"]:
        errors.append(f"{where} should be one of {schema['enum']}")
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value[:1000]):
            errors += _value_errors(item, schema["items"], f"{where}[{i}]", depth + 1)
    if isinstance(value, dict) and isinstance(schema.get("properties"), dict):
        errors += _object_errors(value, schema, where, depth + 1)
    return errors


def _object_errors(value: dict[str, Any], schema: dict[str, Any], where: str, depth: int) -> list[str]:
    properties = schema.get("properties") or {}
    errors = [f"{where}.{key} is required" for key in schema.get("required") or [] if key not in value]
    for key, item in value.items():
        if key in properties:
            errors += _value_errors(item, properties[key], f"{where}.{key}", depth)
        elif schema.get("additionalProperties") is False or properties:
            errors.append(f"{where}.{key} is not a parameter")
    return errors


def argument_errors(parameters: dict[str, Any], arguments: Any) -> list[str]:
    """Lists what is wrong with `arguments` for a tool whose parameters are the JSON schema `parameters`.

    Checked: required keys, unknown keys (when properties are declared), types, enums, array items and nested
    objects. An empty list means the arguments are valid.

    Args:
        parameters (`dict`): The tool's `parameters` JSON schema (an object schema).
        arguments: The parsed arguments.
    """
    if not isinstance(arguments, dict):
        return [f"arguments should be an object, got {type(arguments).__name__}"]
    return _object_errors(arguments, parameters if isinstance(parameters, dict) else {}, "arguments", 0)
