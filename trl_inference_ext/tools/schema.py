"""Tool definitions: the original documentation's dicts, OpenAI/JSON-schema dicts and Python callables.

Everything is normalised to the OpenAI function format that chat templates render:
`{"type": "function", "function": {"name", "description", "parameters": <JSON schema object>}}`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ..errors import InvalidTypeError, InvalidValueError

_SIMPLE_TYPES = {
    "string": "string",
    "str": "string",
    "integer": "integer",
    "int": "integer",
    "number": "number",
    "float": "number",
    "boolean": "boolean",
    "bool": "boolean",
    "array": "array",
    "list": "array",
    "object": "object",
    "dict": "object",
    "null": "null",
}


def _simple_parameters(parameters: dict[str, Any], where: str) -> dict[str, Any]:
    """`{"query": "string"}` (the original documentation's shorthand) to a JSON schema object."""
    properties: dict[str, Any] = {}
    for key, value in parameters.items():
        if isinstance(value, str):
            if value.lower() not in _SIMPLE_TYPES:
                raise InvalidValueError(
                    f"`{where}.parameters.{key}` has unknown type {value!r}; use one of {sorted(_SIMPLE_TYPES)}."
                )
            properties[key] = {"type": _SIMPLE_TYPES[value.lower()]}
        elif isinstance(value, dict):
            properties[key] = value
        else:
            raise InvalidTypeError(f"`{where}.parameters.{key}` must be a type name or a JSON schema dict.")
    return {"type": "object", "properties": properties, "required": list(properties)}


def normalize_tool(tool: Any, where: str = "available_tools[0]") -> dict[str, Any]:
    """Normalises one tool definition to the OpenAI function format.

    Args:
        tool: A dict (`{"name", "description", "parameters"}` with shorthand or JSON-schema parameters, or
            `{"type": "function", "function": {...}}`) or a callable with type hints and a Google docstring.
        where (`str`): Name used in error messages.

    Raises:
        TypeError: If `tool` is neither a dict nor a callable.
        ValueError: If a dict lacks a name or has malformed parameters.
    """
    if callable(tool) and not isinstance(tool, dict):
        from transformers.utils import get_json_schema

        try:
            return get_json_schema(tool)
        except Exception as err:  # transformers raises its own DocstringParsingException / TypeHintParsingException
            raise InvalidValueError(
                f"`{where}` ({getattr(tool, '__name__', tool)!r}) cannot be described: {err}"
            ) from err
    if not isinstance(tool, dict):
        raise InvalidTypeError(f"`{where}` must be a dict or a callable, got {type(tool).__name__}.")
    function = tool["function"] if tool.get("type") == "function" and isinstance(tool.get("function"), dict) else tool
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidValueError(f"`{where}` needs a non-empty string 'name'.")
    parameters = function.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidTypeError(f"`{where}.parameters` must be a dict.")
    if parameters.get("type") != "object":
        parameters = _simple_parameters(parameters, where)
    return {
        "type": "function",
        "function": {"name": name, "description": str(function.get("description", "")), "parameters": parameters},
    }


def normalize_tools(tools: Sequence[Any] | None) -> list[dict[str, Any]]:
    """Normalises a list of tool definitions; names must be unique.

    Raises:
        TypeError / ValueError: Naming the offending `available_tools[i]`.
    """
    if tools is None:
        return []
    if isinstance(tools, (dict, str)) or not isinstance(tools, Sequence):
        raise InvalidTypeError(f"`available_tools` must be a list of tool definitions, got {type(tools).__name__}.")
    schemas = [normalize_tool(t, f"available_tools[{i}]") for i, t in enumerate(tools)]
    names = [s["function"]["name"] for s in schemas]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InvalidValueError(f"`available_tools` has duplicate tool names: {duplicates}.")
    return schemas


def tool_functions(tools: Sequence[Any] | None) -> dict[str, Callable[..., Any]]:
    """Maps tool names to the callables among `tools` (dict definitions have no implementation)."""
    out: dict[str, Callable[..., Any]] = {}
    for i, tool in enumerate(tools or []):
        if callable(tool) and not isinstance(tool, dict):
            out[normalize_tool(tool, f"available_tools[{i}]")["function"]["name"]] = tool
    return out
