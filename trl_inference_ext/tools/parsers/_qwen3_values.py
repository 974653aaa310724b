"""Where a `qwen3_xml` parameter value ends, when it holds the format's own tags.

Values are raw text, so they may hold the format's own tags: a coding agent writes parser fixtures, chat templates
and XML. Where a value ends is decided by these rules, in order of position from the value's start:

1. Tags inside a value are text, unless a rule below says otherwise. A `<function=...>` or `<tool_call>` written in
   the value opens a *literal* region that its own `</function>` or `</tool_call>` closes; everything inside a
   literal region is text (a fixture of a whole call stays in the value). A tag written between two identical
   quotes (`"<tool_call>"`, also with `'` or a backtick) is text everywhere: it opens, closes and ends nothing.
2. Outside literal regions, a `</parameter>` closes the value when what follows it (after white space) is
   `<parameter=`, `</function>` or the end of the text. Followed by `</tool_call>` or `<tool_call>`, it closes the
   value but the function was never closed (the call is `invalid_arguments`). Followed by anything else it is text
   (`x = "</parameter>"`).
3. Outside literal regions, a well-formed `<parameter=NAME>` is a new parameter of the same function: the open value
   was left unclosed and ends there (`<parameter=path>notes.txt<parameter=mode>append</parameter>` gives both
   parameters), unless it is literal text: quoted (`"<parameter=x>"`) or paired with a later `</parameter>` that
   rule 2 does not count as closing (`Write <parameter=x>v</parameter> here`), in which case the value is kept
   whole.
4. Outside literal regions, an unquoted `</function>` or `</tool_call>` ends the unclosed value, and the function
   (and the block) with it.

Every scan moves forward, each tag is visited once, and literal regions are tracked with a capped stack.
"""

from __future__ import annotations

import re

from ._scan import MAX_DEPTH, skip_space
from .hermes import TOOL_CALL_CLOSE, TOOL_CALL_OPEN

FUNCTION_OPEN = "<function="
FUNCTION_CLOSE = "</function>"
PARAMETER_OPEN = "<parameter="
PARAMETER_CLOSE = "</parameter>"
MAX_NAME_CHARS = 256

TAG = re.compile(r"<parameter=|</parameter>|<function=|</function>|</?tool_call>")
"""Every tag of the format (`<tool_call>` and `</tool_call>` by one alternative)."""
_NAME = re.compile(f"([^<>\\n]{{0,{MAX_NAME_CHARS}}})>")
"""`NAME>` after `<function=` or `<parameter=`: no `<`, `>` or newline in the name."""
_BROKEN_CLOSE = re.compile(r"</para[A-Za-z0-9_]{0,16}>?\Z")
"""A closing tag misspelled or cut at the end of an unclosed value (`</parameter2>`, `</param`, `</parameter`)."""
_QUOTES = "\"'`"
_REGION_CLOSE = {FUNCTION_OPEN: FUNCTION_CLOSE, TOOL_CALL_OPEN: TOOL_CALL_CLOSE}
"""The tags that open a literal region in a value, and the tag that closes each."""


def trim_value(value: str) -> str:
    """Removes one leading and one trailing newline (the layout newlines around a value).

    Args:
        value (`str`): The text between the value tags.
    """
    if value.startswith("\n"):
        value = value[1:]
    if value.endswith("\n"):
        value = value[:-1]
    return value


def recover_value(value: str) -> str:
    """The text of a value that was never closed: without its trailing white space and a broken closing tag.

    Args:
        value (`str`): The text from the opening tag to the tag that ended the value.
    """
    value = value.rstrip()
    broken = _BROKEN_CLOSE.search(value, max(0, len(value) - 32))
    if broken is not None:
        value = value[: broken.start()].rstrip()
    return value[1:] if value.startswith("\n") else value


def read_name(view: str, start: int) -> tuple[str, int]:
    """Reads the `NAME>` that follows `<function=` or `<parameter=`.

    Args:
        view (`str`): The text.
        start (`int`): Offset just past the `=`.

    Returns:
        `tuple[str, int]`: The stripped name and the offset past `>`, or `("", -1)` when no `>` ends a name there.
    """
    match = _NAME.match(view, start)
    if match is None:
        return "", -1
    return match.group(1).strip(), match.end()


def _quoted(view: str, start: int, end: int) -> bool:
    """Whether the tag `view[start:end]` is written between two identical quotes, as text."""
    return start > 0 and end < len(view) and view[start - 1] in _QUOTES and view[end] == view[start - 1]


class Value:
    """Where one parameter value ended, as found by `scan_value`.

    Attributes:
        segments (`list[tuple[str, int, int, bool]]`): `(key, start, end, closed)` of the value and of the parameters
            that rule 3 found inside it, in order; only the last one can be closed.
        kind (`str`): What ended it: `"close"` (a closing `</parameter>`), `"close_call"` (a `</parameter>` before
            `</tool_call>` or `<tool_call>`), `"function"` or `"tool_call"` (rule 4), or `"end"` (the text ended).
        after (`int`): Offset just past the tag that ended it (`-1` for `"end"`).
    """

    __slots__ = ("after", "kind", "segments")

    def __init__(self) -> None:
        self.segments: list[tuple[str, int, int, bool]] = []
        self.kind = "end"
        self.after = -1


def scan_value(view: str, key: str, start: int) -> Value:
    """Finds where the value of `key` starting at `start` ends, by the rules of the module docstring.

    Args:
        view (`str`): The text with reasoning blanked.
        key (`str`): The parameter's name.
        start (`int`): Offset just past its `<parameter=KEY>` tag.
    """
    result = Value()
    literal: list[str] = []  # literal regions open, innermost last: FUNCTION_CLOSE or TOOL_CALL_CLOSE, what ends each
    open_regions = {FUNCTION_CLOSE: 0, TOOL_CALL_CLOSE: 0}
    candidates: list[tuple[int, int, str]] = []  # unquoted <parameter=NAME> tags: (start, value start, name)
    unpaired: list[int] = []  # indices into `candidates` not yet paired with a literal </parameter>
    end = len(view)
    for match in TAG.finditer(view, start):
        tag, at = match.group(), match.start()
        if tag in _REGION_CLOSE:
            tag_end = read_name(view, match.end())[1] if tag == FUNCTION_OPEN else match.end()
            if len(literal) < MAX_DEPTH and not (tag_end >= 0 and _quoted(view, at, tag_end)):
                literal.append(_REGION_CLOSE[tag])
                open_regions[_REGION_CLOSE[tag]] += 1
            continue
        if literal:
            if open_regions.get(tag) and not _quoted(view, at, match.end()):
                while True:
                    closing = literal.pop()
                    open_regions[closing] -= 1
                    if closing == tag:
                        break
            continue
        if tag == PARAMETER_CLOSE:
            following = skip_space(view, match.end(), end)
            if following >= end or view.startswith((PARAMETER_OPEN, FUNCTION_CLOSE), following):
                result.kind, result.after = "close", match.end()
            elif view.startswith((TOOL_CALL_CLOSE, TOOL_CALL_OPEN), following):
                result.kind, result.after = "close_call", match.end()
            else:
                if unpaired:
                    candidates[unpaired.pop()] = (-1, -1, "")
                continue
            end = at
            break
        if tag == PARAMETER_OPEN:
            name, value_start = read_name(view, match.end())
            if name and not _quoted(view, at, value_start):
                unpaired.append(len(candidates))
                candidates.append((at, value_start, name))
            continue
        if not _quoted(view, at, match.end()):
            result.kind, result.after = ("function" if tag == FUNCTION_CLOSE else "tool_call"), match.end()
            end = at
            break
    for at, value_start, name in candidates:
        if at >= 0:
            result.segments.append((key, start, at, False))
            key, start = name, value_start
    result.segments.append((key, start, end, result.kind in ("close", "close_call")))
    return result
