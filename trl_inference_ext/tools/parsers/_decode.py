"""Decoding helpers shared by the parsers: safe JSON loading, argument coercion and `ToolCall` construction."""

from __future__ import annotations

import json
from typing import Any

from ...errors import InvalidValueError
from ...types import ToolCall

_NUMBER_OR_LITERAL_START = frozenset('-0123456789tfn"[{')


def _reject_constant(name: str) -> Any:
    raise InvalidValueError(f"{name} is not valid JSON")


_DECODER = json.JSONDecoder(strict=False, parse_constant=_reject_constant)


def loads(text: str) -> tuple[bool, Any]:
    """Decodes JSON without raising.

    Control characters are allowed inside strings (models write raw newlines in code arguments); `NaN` and
    `Infinity` are rejected. Nesting deep enough to hit the recursion limit is reported as a failure.

    Args:
        text (`str`): The JSON text (surrounding whitespace allowed).

    Returns:
        `tuple[bool, Any]`: `(True, value)` on success, `(False, None)` otherwise.
    """
    try:
        return True, _DECODER.decode(text)
    except (ValueError, RecursionError, MemoryError):
        return False, None


def raw_decode(text: str, pos: int) -> tuple[Any, int] | None:
    """Decodes the JSON value starting at `pos` without copying the text.

    Args:
        text (`str`): The text.
        pos (`int`): Offset of the value's first character.

    Returns:
        `tuple[Any, int] | None`: The value and the offset just past it, or `None` when no valid value starts there.
    """
    try:
        return _DECODER.raw_decode(text, pos)
    except (ValueError, RecursionError, MemoryError):
        return None


_JSON_SPACE = " \t\r\n"


def element_spans(text: str, start: int, end: int) -> list[tuple[int, int]] | None:
    """Offsets of the elements of the valid JSON array `text[start:end]`, found by decoding them one by one.

    Args:
        text (`str`): The text.
        start (`int`): Offset of the `[`.
        end (`int`): Offset just past the `]`.

    Returns:
        `list[tuple[int, int]] | None`: `(start, end)` of each element, or `None` if the array does not decode.
    """
    spans: list[tuple[int, int]] = []
    pos = _skip_json_space(text, start + 1, end)
    if pos < end and text[pos] == "]":
        return spans
    while pos < end:
        decoded = raw_decode(text, pos)
        if decoded is None or decoded[1] > end:
            return None
        spans.append((pos, decoded[1]))
        pos = _skip_json_space(text, decoded[1], end)
        if pos < end and text[pos] == "]":
            return spans
        if pos >= end or text[pos] != ",":
            return None
        pos = _skip_json_space(text, pos + 1, end)
    return None


def _skip_json_space(text: str, pos: int, end: int) -> int:
    while pos < end and text[pos] in _JSON_SPACE:
        pos += 1
    return pos


def decode_scalar(text: str) -> Any:
    """Decodes a text value as JSON when it is one (`"5"` → `5`, `"true"` → `True`, `"[1]"` → `[1]`), else keeps it.

    Args:
        text (`str`): The raw value.

    Returns:
        `Any`: The decoded value, or `text` unchanged.
    """
    stripped = text.strip()
    if not stripped or stripped[0] not in _NUMBER_OR_LITERAL_START:
        return text
    ok, value = loads(stripped)
    return value if ok else text


def json_type_name(value: Any) -> str:
    """Names the JSON type of a decoded value, for error messages.

    Args:
        value (`Any`): A decoded JSON value.
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return type(value).__name__


def coerce_arguments(value: Any) -> tuple[dict[str, Any] | None, str | None]:
    """Turns an `arguments` value into a dict, decoding it first when it is a JSON string.

    `None` and blank strings mean no arguments.

    Args:
        value (`Any`): The value of the `arguments` (or `parameters`) key.

    Returns:
        `tuple[dict[str, Any] | None, str | None]`: `(arguments, None)` on success, `(None, error)` otherwise.
    """
    if value is None:
        return {}, None
    if isinstance(value, str):
        if not value.strip():
            return {}, None
        ok, value = loads(value)
        if not ok:
            return None, "arguments are a string that is not valid JSON"
    if isinstance(value, dict):
        return value, None
    return None, f"arguments must be a JSON object, got {json_type_name(value)}"


def make_call(
    text: str,
    start: int,
    end: int,
    name: str,
    arguments: dict[str, Any] | None = None,
    status: str = "ok",
    error: str | None = None,
) -> ToolCall:
    """Builds a `ToolCall` whose `raw_text` is sliced from the original text, so the offset invariant always holds.

    Args:
        text (`str`): The original (not blanked) text.
        start (`int`): Start offset of the call.
        end (`int`): End offset (exclusive).
        name (`str`): The tool name (`""` when unknown).
        arguments (`dict[str, Any]`, *optional*): Decoded arguments (`{}` when `None`).
        status (`str`, *optional*, defaults to `"ok"`): One of `TOOL_CALL_STATUSES`.
        error (`str`, *optional*): Why the call is malformed.
    """
    return ToolCall(
        name=name,
        arguments={} if arguments is None else arguments,
        raw_text=text[start:end],
        start_pos=start,
        end_pos=end,
        status=status,
        error=error,
    )


def call_from_parts(
    text: str, start: int, end: int, name: Any, arguments: Any, *, has_arguments: bool = True
) -> ToolCall:
    """Validates a decoded name and arguments value and builds the call with the right status.

    Args:
        text (`str`): The original text.
        start (`int`): Start offset of the call.
        end (`int`): End offset (exclusive).
        name (`Any`): The decoded name (must be a non-empty string).
        arguments (`Any`): The decoded arguments (a dict, a JSON string of one, or `None`).
        has_arguments (`bool`, *optional*, defaults to `True`): Whether an arguments key was present at all.
    """
    args, error = coerce_arguments(arguments if has_arguments else None)
    if not isinstance(name, str) or not name.strip():
        reason = "tool call has no name" if name is None else "tool name must be a non-empty string"
        return make_call(text, start, end, "", args, "missing_name", reason)
    if args is None:
        return make_call(text, start, end, name.strip(), None, "invalid_arguments", error)
    return make_call(text, start, end, name.strip(), args)
