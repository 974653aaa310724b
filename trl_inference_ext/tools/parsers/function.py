"""The `function` format: Python-style calls with keyword arguments (also known as "pythonic").

::

    search(query="Python tutorials", max_results=5)
    [search(query="a"), clock()]

Candidates are found from each `(` (a literal-prefixed, bounded regex, so the engine jumps between them), a bounded
backward walk over the identifier before it (dotted names allowed), and a lazy single-pass bracket matcher that skips
quoted strings. Each candidate (at most `MAX_CANDIDATE_CHARS`) is parsed with `ast.parse` and every argument value is
read with `ast.literal_eval` — nothing is ever evaluated. Values may be strings, numbers, booleans, `None`, and lists,
tuples (returned as lists) and dicts of those; JSON's `true`, `false` and `null` are accepted as bare argument
values. A call nested in another call's arguments is part of that call, not a call of its own.

When the parser knows the tool names (from `tool_schemas`) only those names are calls, and positional or non-literal
arguments make the call `invalid_arguments`. Without names, a candidate is a call only when its arguments are all
keyword arguments (or there are none), so prose such as `print(x)` or `see (below)` is not a call.
"""

from __future__ import annotations

import ast
import math
import re
import string
import warnings
from collections.abc import Sequence
from keyword import iskeyword
from typing import Any

from ...errors import InvalidValueError
from ...types import ToolCall
from ._decode import make_call
from ._format import Call, ToolFormat
from ._scan import ParenMatcher, rstrip_end
from .base import MAX_CALLS, ToolParser

MAX_CANDIDATE_CHARS = 65536
"""Longest call handed to `ast.parse`; a longer call is reported as `invalid_arguments` without being parsed."""

MAX_NAME_CHARS = 256
_NAME_CHARS = frozenset(string.ascii_letters + string.digits + "_.")
_DOTTED_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}(?:\.[A-Za-z_][A-Za-z0-9_]{0,63}){0,3}")
_PAREN = re.compile(r"\(")
"""Any `(`: a candidate when the tool names are known (the name before it is checked)."""
_KEYWORD_PAREN = re.compile(r"\((?=\s{0,16}(?:\)|[A-Za-z_][A-Za-z0-9_]{0,63}\s{0,16}=(?!=)))")
"""`(` followed by `)` or `key=`: a candidate when the tool names are unknown. Starting with a literal lets the regex
engine jump from one `(` to the next."""
_JSON_NAMES = {"true": True, "false": False, "null": None}


class _NotJson(ValueError):
    pass


def _jsonable(value: Any) -> Any:
    """Maps a literal to JSON-compatible types (tuples become lists); raises `_NotJson` for sets, bytes, complex."""
    if value is None or isinstance(value, (bool, int, float, str)):
        if isinstance(value, float) and not math.isfinite(value):
            raise _NotJson("NaN and infinity are not allowed")
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, dict):
        if not all(isinstance(key, str) for key in value):
            raise _NotJson("dict keys must be strings")
        return {key: _jsonable(item) for key, item in value.items()}
    raise _NotJson(f"{type(value).__name__} values are not allowed")


def _literal(node: ast.expr) -> Any:
    if isinstance(node, ast.Constant) and isinstance(node.value, (str, int, float, type(None))):
        return _jsonable(node.value)  # the common case, without `literal_eval`'s dispatch
    if isinstance(node, ast.Name) and node.id in _JSON_NAMES:
        return _JSON_NAMES[node.id]
    return _jsonable(ast.literal_eval(node))


def _name_start(view: str, paren: int) -> int:
    """Returns where the (dotted) identifier ending right before `paren` starts, or `-1` if there is none."""
    start = paren
    lowest = max(0, paren - MAX_NAME_CHARS)
    while start > lowest and view[start - 1] in _NAME_CHARS:
        start -= 1
    if start == paren or (start > 0 and (view[start - 1].isalnum() or view[start - 1] in "_.")):
        return -1  # no name, or part of a longer word
    return start if _DOTTED_NAME.fullmatch(view, start, paren) else -1


class FunctionParser(ToolParser):
    """Parses Python-style calls `name(key=value, ...)` whose values are literals."""

    name = "function"

    def _parse(self, text: str, view: str) -> list[ToolCall]:
        known = frozenset(self.tool_properties)
        parens = (_PAREN if known else _KEYWORD_PAREN).finditer(view)
        matcher: ParenMatcher | None = None
        calls: list[ToolCall] = []
        taken_until = 0
        for paren_match in parens:
            paren = paren_match.start()
            start = _name_start(view, paren)
            if start < taken_until:  # no name (-1), or inside a call already taken
                continue
            name = view[start:paren]
            if known and name not in known:
                continue
            if matcher is None:
                matcher = ParenMatcher(view, start)
            end = matcher.close_of(paren)
            if end is None:
                if matcher.is_unclosed(paren):
                    end = rstrip_end(view, start, len(view))
                    calls.append(make_call(text, start, end, name, None, "unclosed", f"{name}( is not closed"))
                    break
                continue
            call = self._parse_candidate(text, view, start, end, name, strict=bool(known))
            if call is None:
                continue
            calls.append(call)
            taken_until = end
            if len(calls) >= MAX_CALLS:
                break
        return calls

    @staticmethod
    def _parse_candidate(text: str, view: str, start: int, end: int, name: str, *, strict: bool) -> ToolCall | None:
        """Parses one `name(...)` span; `None` when it is prose rather than a call."""
        if end - start > MAX_CANDIDATE_CHARS:
            return make_call(text, start, end, name, None, "invalid_arguments", "call is too long to parse")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tree = ast.parse(view[start:end], mode="eval")
        except Exception:  # SyntaxError, ValueError (null bytes, huge ints), RecursionError, MemoryError
            return make_call(text, start, end, name, None, "invalid_arguments", "not a valid Python call")
        call = tree.body
        if not isinstance(call, ast.Call):
            return None
        if call.args or any(keyword.arg is None for keyword in call.keywords):
            if not strict:
                return None
            return make_call(text, start, end, name, None, "invalid_arguments", "only keyword arguments are allowed")
        arguments: dict[str, Any] = {}
        for keyword in call.keywords:
            try:
                arguments[str(keyword.arg)] = _literal(keyword.value)
            except Exception:  # ValueError, TypeError, MemoryError, RecursionError from non-literal values
                error = f"argument {keyword.arg!r} is not a literal value"
                return make_call(text, start, end, name, None, "invalid_arguments", error)
        return make_call(text, start, end, name, arguments)


def render_function(calls: Sequence[Call]) -> str:
    """Writes calls as Python calls with literal keyword arguments; several calls go in a list.

    Domain: dotted identifiers (up to four parts of up to 64 characters, no keyword) as names and identifiers as
    argument names (the first one up to 64 characters); values that are JSON-compatible (`None`, booleans, numbers,
    strings, lists, and dicts with string keys), written with `repr`.

    Args:
        calls (`Sequence[tuple[str, Mapping[str, Any]]]`): `(name, arguments)` pairs.

    Raises:
        ValueError: If a name or an argument name cannot be written as Python.
    """
    written = []
    for name, arguments in calls:
        if not _DOTTED_NAME.fullmatch(name) or any(iskeyword(part) for part in name.split(".")):
            raise InvalidValueError(f"{name!r} is not a Python call name")
        for key in arguments:
            if not key.isidentifier() or iskeyword(key):
                raise InvalidValueError(f"{key!r} is not a Python keyword argument name")
        written.append(f"{name}({', '.join(f'{key}={value!r}' for key, value in arguments.items())})")
    return written[0] if len(written) == 1 else f"[{', '.join(written)}]" if written else ""


FORMAT = ToolFormat(
    parser=FunctionParser,
    render=render_function,
    instruction='<tool name>(<argument>="value", <other argument>=5)',
)
