"""Tool schemas as the parsers use them: known tool names and schema-driven conversion of text parameter values.

XML-style formats carry every value as text, so `<parameter=n>5</parameter>` needs the tool's JSON schema to know
whether `n` is the integer 5 or the string "5".
"""

from __future__ import annotations

import ast
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from ...errors import InvalidTypeError, InvalidValueError
from ._decode import decode_scalar, loads

MAX_LITERAL_CHARS = 65536
"""Longest value handed to `ast.literal_eval` (Python-style dicts and lists in object/array parameters)."""

ToolSchemas = Sequence[Mapping[str, Any]]
"""OpenAI-style `{"type": "function", "function": {...}}` dicts or bare `{"name": ..., "parameters": ...}` dicts."""


def index_tool_schemas(tool_schemas: ToolSchemas | None) -> dict[str, dict[str, Any]]:
    """Maps each tool name to the JSON schemas of its parameters.

    Args:
        tool_schemas (`Sequence[Mapping[str, Any]]`, *optional*): Tool definitions, either OpenAI-style
            `{"type": "function", "function": {"name": ..., "parameters": {...}}}` or bare
            `{"name": ..., "parameters": {...}}`.

    Returns:
        `dict[str, dict[str, Any]]`: `{tool_name: {parameter_name: parameter_schema}}`.

    Raises:
        TypeError: If `tool_schemas` is not a sequence of mappings.
        ValueError: If a definition has no non-empty string name.
    """
    if tool_schemas is None:
        return {}
    if isinstance(tool_schemas, (str, bytes, Mapping)) or not isinstance(tool_schemas, Sequence):
        raise InvalidTypeError(f"`tool_schemas` must be a list of dicts, got {type(tool_schemas).__name__}.")
    index: dict[str, dict[str, Any]] = {}
    for position, schema in enumerate(tool_schemas):
        if not isinstance(schema, Mapping):
            raise InvalidTypeError(f"`tool_schemas[{position}]` must be a dict, got {type(schema).__name__}.")
        function = schema.get("function")
        definition = function if isinstance(function, Mapping) else schema
        name = definition.get("name")
        if not isinstance(name, str) or not name.strip():
            raise InvalidValueError(f"`tool_schemas[{position}]` has no tool name.")
        index[name.strip()] = _properties(definition.get("parameters"))
    return index


_SHORTHAND_TYPES = {"str": "string", "int": "integer", "float": "number", "bool": "boolean", "list": "array"}


def _properties(parameters: Any) -> dict[str, Any]:
    """Parameter schemas of a JSON schema object, or of the `{"query": "string"}` shorthand."""
    if not isinstance(parameters, Mapping):
        return {}
    properties = parameters.get("properties")
    if isinstance(properties, Mapping):
        return dict(properties)
    if "type" in parameters:
        return {}
    shorthand: dict[str, Any] = {}
    for key, value in parameters.items():
        if isinstance(value, str):
            kind = value.lower()
            shorthand[key] = {"type": "object" if kind == "dict" else _SHORTHAND_TYPES.get(kind, kind)}
        elif isinstance(value, Mapping):
            shorthand[key] = value
    return shorthand


def _schema_types(schema: Mapping[str, Any]) -> list[str]:
    declared = schema.get("type")
    if isinstance(declared, str):
        return [declared]
    if isinstance(declared, list):
        return [item for item in declared if isinstance(item, str)]
    types: list[str] = []
    for key in ("anyOf", "oneOf"):
        options = schema.get(key)
        if isinstance(options, list):
            for option in options:
                if isinstance(option, Mapping):
                    types.extend(_schema_types(option))
    if not types and isinstance(schema.get("enum"), list) and all(isinstance(v, str) for v in schema["enum"]):
        types.append("string")
    return types


def _python_literal(text: str) -> tuple[bool, Any]:
    if len(text) > MAX_LITERAL_CHARS:
        return False, None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return True, ast.literal_eval(text)
    except Exception:  # literal_eval raises ValueError, SyntaxError, TypeError, MemoryError, RecursionError...
        return False, None


def _convert(text: str, kind: str) -> tuple[bool, Any]:
    stripped = text.strip()
    if kind == "integer":
        ok, value = loads(stripped)
        if ok and isinstance(value, float) and value.is_integer():
            return True, int(value)
        return ok and isinstance(value, int) and not isinstance(value, bool), value
    if kind == "number":
        ok, value = loads(stripped)
        if ok and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, value
        try:
            number = float(stripped)
        except (ValueError, OverflowError):
            return False, None
        return math.isfinite(number), number
    if kind == "boolean":
        lowered = stripped.lower()
        return lowered in ("true", "false"), lowered == "true"
    if kind == "null":
        return stripped.lower() in ("null", "none"), None
    if kind in ("object", "array"):
        expected = dict if kind == "object" else list
        ok, value = loads(stripped)
        if not (ok and isinstance(value, expected)):
            ok, value = _python_literal(stripped)
            if ok and isinstance(value, tuple) and expected is list:
                value = list(value)
        return ok and isinstance(value, expected), value
    if kind == "string":
        return True, text
    return False, None


def convert_value(text: str, schema: Mapping[str, Any] | None) -> Any:
    """Converts a text parameter value with the parameter's JSON schema.

    Declared types are tried in order (`string` last when others are declared too); `integer`, `number`, `boolean`,
    `null`, `object` and `array` are converted, `string` keeps the text. Without a schema, or when no declared type
    fits, the value is JSON-decoded when it is valid JSON and kept as text otherwise.

    Args:
        text (`str`): The raw value.
        schema (`Mapping[str, Any]`, *optional*): The parameter's JSON schema.

    Returns:
        `Any`: The converted value.
    """
    types = _schema_types(schema) if isinstance(schema, Mapping) else []
    if not types:
        return decode_scalar(text)
    for kind in sorted(types, key=lambda kind: kind == "string"):
        ok, value = _convert(text, kind)
        if ok:
            return value
    return decode_scalar(text)
