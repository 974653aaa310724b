"""Tags, names and value ends of the `qwen3_xml` format, by the rules written in the `qwen3_xml` module docstring.

Everything here reads untrusted model output in forward passes: `scan_value` visits each tag after a value's start
once, keeps the elements written in the value on a stack capped at `MAX_DEPTH`, and every regex is anchored or a
plain alternation with bounded quantifiers. The only text read twice is what lies past a closing position that was
passed over (rule 4) when the value is then ended there, and `ScanBudget` caps that, over a whole output, at twice its
length plus 1 Mi characters.
"""

from __future__ import annotations

import re

from ._scan import MAX_DEPTH, skip_space
from .hermes import TOOL_CALL_CLOSE, TOOL_CALL_OPEN

FUNCTION_OPEN = "<function="
FUNCTION_CLOSE = "</function>"
PARAMETER_OPEN = "<parameter="
PARAMETER_CLOSE = "</parameter>"
FUNCTION_TAG = "<function"
"""How a function tag starts, in both spellings (`<function=NAME>`, `<function name="NAME">`)."""
PARAMETER_TAG = "<parameter"
"""How a parameter tag starts, in both spellings (`<parameter=NAME>`, `<parameter name="NAME">`)."""
END = ""
"""What `next_token` returns at the end of the text."""
MAX_NAME_CHARS = 256
MIN_BUDGET_CHARS = 1 << 20
"""The part of `ScanBudget.for_output` that does not depend on the output's length (1 Mi characters)."""

TAG = re.compile(r"<parameter(?=[= \t])|</parameter>|<function(?=[= \t])|</function>|</?tool_call>")
"""Every tag of the format; an opening function or parameter tag is matched up to its name only."""
_NAME = re.compile(
    f"=([^<>\\n]{{0,{MAX_NAME_CHARS}}})>"
    f"|[ \\t]{{1,16}}name[ \\t]{{0,16}}=[ \\t]{{0,16}}"
    f"(?:\"([^\"<>\\n]{{0,{MAX_NAME_CHARS}}})\"|'([^'<>\\n]{{0,{MAX_NAME_CHARS}}})')[ \\t]{{0,16}}>"
)
"""The rest of a name tag after `<function` or `<parameter`: `=NAME>` or ` name="NAME">` (or `'NAME'`)."""
_START_TAG = re.compile(f"=[^<>\\n]{{0,{MAX_NAME_CHARS}}}>|[ \\t][^<>]{{0,{MAX_NAME_CHARS}}}>")
"""The rest of any start tag after `<function` or `<parameter` written in a value, placeholders and attributes
included (`<function={{ tc.name }}>`, `<parameter name="a" type="int">`)."""
_IDENTIFIER = re.compile(f"[^\\W\\d][\\w.:-]{{0,{MAX_NAME_CHARS - 1}}}")
"""A letter or `_`, then letters, digits, `_`, `.`, `:` or `-`."""
_QUOTES = "\"'`"
_CLOSING = {TOOL_CALL_OPEN: TOOL_CALL_CLOSE, FUNCTION_TAG: FUNCTION_CLOSE, PARAMETER_TAG: PARAMETER_CLOSE}
"""The closing tag of each element a value can hold, by the start of its opening tag."""
_BROKEN_CLOSE = re.compile(r"</para[A-Za-z0-9_]{0,16}>?\Z")
"""A closing tag misspelled or cut at the end of a value never closed (`</parameter2>`, `</param`)."""


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
    """Reads the name part of a tag: `=NAME>` or ` name="NAME">` after `<function` or `<parameter`.

    Args:
        view (`str`): The text.
        start (`int`): Offset just past `<function` or `<parameter`.

    Returns:
        `tuple[str, int]`: The name without surrounding white space (possibly empty, and not necessarily an
        identifier) and the offset past `>`, or `("", -1)` when no name tag is written there.
    """
    match = _NAME.match(view, start)
    if match is None:
        return "", -1
    name = next(group for group in match.groups() if group is not None)
    return name.strip(), match.end()


def is_identifier(name: str) -> bool:
    """Whether `name` can name a function or a parameter: a letter or `_`, then letters, digits, `_`, `.`, `:`, `-`.

    Args:
        name (`str`): The name as read by `read_name`.
    """
    return _IDENTIFIER.fullmatch(name) is not None


def next_token(view: str, pos: int) -> tuple[str | None, int]:
    """What follows `pos` after white space, as rule 1 of the module docstring of `qwen3_xml` looks at it.

    Args:
        view (`str`): The text.
        pos (`int`): Where to look from.

    Returns:
        `tuple[str | None, int]`: `END`, `FUNCTION_CLOSE`, `TOOL_CALL_CLOSE`, `TOOL_CALL_OPEN`, `PARAMETER_TAG` (a
        parameter start tag, in either spelling, whatever its name) or `None` (anything else), and the offset of what
        was found.
    """
    at = skip_space(view, pos, len(view))
    if at >= len(view):
        return END, at
    for tag in (FUNCTION_CLOSE, TOOL_CALL_CLOSE, TOOL_CALL_OPEN):
        if view.startswith(tag, at):
            return tag, at
    if view.startswith(PARAMETER_TAG, at) and start_tag_end(view, at + len(PARAMETER_TAG)) >= 0:
        return PARAMETER_TAG, at
    return None, at


def ends_call(view: str, tag: str, pos: int) -> bool:
    """Whether the `</function>` or `</tool_call>` just before `pos` is laid out as the end of a call.

    That is, followed by the end of the text or a `<tool_call>`, with one `</tool_call>` in between for `</function>`.

    Args:
        view (`str`): The text.
        tag (`str`): `FUNCTION_CLOSE` or `TOOL_CALL_CLOSE`.
        pos (`int`): Offset just past the tag.
    """
    kind, at = next_token(view, pos)
    if tag == FUNCTION_CLOSE and kind == TOOL_CALL_CLOSE:
        kind, at = next_token(view, at + len(TOOL_CALL_CLOSE))
    return kind in (END, TOOL_CALL_OPEN)


def quoted(view: str, start: int, end: int) -> bool:
    """Whether the tag `view[start:end]` is written between two identical quotes (`"`, `'` or a backquote), as text.

    Args:
        view (`str`): The text.
        start (`int`): Offset of the tag.
        end (`int`): Offset just past it.
    """
    return start > 0 and end < len(view) and view[start - 1] in _QUOTES and view[end] == view[start - 1]


def start_tag_end(view: str, pos: int) -> int:
    """The end of any start tag whose `<function` or `<parameter` ends at `pos`, or `-1`.

    Any start tag: `=` and a name that may be a placeholder (`<function={{ tc.name }}>`), or attributes
    (`<parameter name="a" type="int">`); not a self-closing one (`<parameter name="a"/>`).

    Args:
        view (`str`): The text.
        pos (`int`): Offset just past `<function` or `<parameter`.
    """
    match = _START_TAG.match(view, pos)
    if match is None or view[match.end() - 2] == "/":  # none, or self-closing (`<parameter name="a"/>`)
        return -1
    return match.end()


class ScanBudget:
    """How many more characters `scan_value` may read past closing positions it passed over, for one output.

    Args:
        chars (`int`): The budget.
    """

    __slots__ = ("left",)

    def __init__(self, chars: int) -> None:
        self.left = chars

    @classmethod
    def for_output(cls, size: int) -> ScanBudget:
        """The budget of an output of `size` characters: twice its length plus `MIN_BUDGET_CHARS`.

        Realistic outputs never spend it; an adversarial one is read at most three times over, plus 1 Mi characters.

        Args:
            size (`int`): The output's length.
        """
        return cls(2 * size + MIN_BUDGET_CHARS)


class Value:
    """Where one parameter value ended, as found by `scan_value`.

    Attributes:
        kind (`str`): `"closed"` (by its `</parameter>`), `"unclosed"` (never closed: ended by a `</function>` or
            `</tool_call>` laid out as the end of the call) or `"truncated"` (the text ends inside it).
        end (`int`): Offset where the value's text ends (its `</parameter>`, or the tag that ended it).
        after (`int`): Where reading goes on: past the `</parameter>`, or at the tag that ended an unclosed value.
        open_parameter (`bool`): Whether a `<parameter ...>` element written in the value was still open when it
            closed.
    """

    __slots__ = ("after", "end", "kind", "open_parameter")

    def __init__(self, kind: str, end: int, after: int, open_parameter: bool = False) -> None:
        self.kind = kind
        self.end = end
        self.after = after
        self.open_parameter = open_parameter


class _Elements:
    """The elements written in a value and still open: a stack capped at `MAX_DEPTH`, counted by closing tag.

    An element opened by a tag that a line break does not follow is *inline*; `end_line` drops every inline element,
    all of which sit at or above `lowest_inline` (the elements above the lowest inline one were opened on its line).
    """

    __slots__ = ("counts", "lowest_inline", "stack")

    def __init__(self) -> None:
        self.stack: list[tuple[str, bool]] = []
        self.counts = {PARAMETER_CLOSE: 0, FUNCTION_CLOSE: 0, TOOL_CALL_CLOSE: 0}
        self.lowest_inline = -1

    def push(self, closing: str, inline: bool) -> None:
        if inline and self.lowest_inline < 0:
            self.lowest_inline = len(self.stack)
        self.stack.append((closing, inline))
        self.counts[closing] += 1

    def close(self, closing: str) -> None:
        """Closes the innermost open element that `closing` closes (one must be open), and those opened after it."""
        stack, counts = self.stack, self.counts
        while True:
            kind, _ = stack.pop()
            counts[kind] -= 1
            if kind == closing:
                break
        if self.lowest_inline >= len(stack):
            self.lowest_inline = -1

    def end_line(self) -> None:
        """Drops the inline elements: their line has ended."""
        if self.lowest_inline < 0:
            return
        segment = self.stack[self.lowest_inline :]
        del self.stack[self.lowest_inline :]
        for closing, inline in segment:
            if inline:
                self.counts[closing] -= 1
            else:
                self.stack.append((closing, inline))
        self.lowest_inline = -1

    def continued_by(self, kind: str) -> bool:
        """Whether `kind`, following a `</parameter>`, continues an open element rather than the call (rule 3)."""
        if kind == FUNCTION_CLOSE:
            return self.counts[FUNCTION_CLOSE] > 0
        if kind == PARAMETER_TAG:
            return self.counts[FUNCTION_CLOSE] > 0 or self.counts[PARAMETER_CLOSE] > 0
        return bool(self.stack)  # <tool_call> or </tool_call>


def scan_value(view: str, start: int, budget: ScanBudget) -> Value:
    """Finds where the parameter value starting at `start` ends, by the rules of the `qwen3_xml` module docstring.

    Args:
        view (`str`): The text with reasoning blanked.
        start (`int`): Offset just past the value's opening tag.
        budget (`ScanBudget`): The output's budget for reading past closing positions passed over (rule 4).

    Returns:
        `Value`: Where the value ends and how.
    """
    size = len(view)
    elements = _Elements()
    passed = passed_after = -1  # the first closing position passed over (rule 4)
    crossed_call = False  # whether a <tool_call> is written past `passed`
    limit = size
    pos = start
    while True:
        match = TAG.search(view, pos, limit)
        if match is None:
            break
        at, tag = match.start(), match.group()
        if elements.lowest_inline >= 0 and view.find("\n", pos, at) >= 0:
            elements.end_line()
        pos = match.end()
        if tag in _CLOSING:  # an opening tag
            if tag == TOOL_CALL_OPEN and passed >= 0:
                crossed_call = True  # quoted or not: the block loop would read it as a call
            end = pos if tag == TOOL_CALL_OPEN else start_tag_end(view, pos)
            if end < 0:
                continue
            pos = end
            if len(elements.stack) >= MAX_DEPTH or quoted(view, at, end):
                continue
            inline = not view.startswith(("\n", "\r\n"), end)
            elements.push(_CLOSING[tag], inline)
            continue
        if tag == PARAMETER_CLOSE:
            kind, _ = next_token(view, pos)
            if kind == END or (kind is not None and not elements.continued_by(kind)):
                return Value("closed", at, pos, elements.counts[PARAMETER_CLOSE] > 0)
            if kind is not None and passed < 0:
                passed, passed_after = at, pos
                limit = min(size, at + budget.left)
            if elements.counts[PARAMETER_CLOSE] and not quoted(view, at, pos):
                elements.close(PARAMETER_CLOSE)
            continue
        if quoted(view, at, pos):  # </function> or </tool_call> between quotes: text
            continue
        if elements.counts[tag]:
            elements.close(tag)
            continue
        if ends_call(view, tag, pos):  # a closing tag with nothing of its kind open, laid out as the end of the call
            if passed >= 0 and not crossed_call:
                budget.left = max(0, budget.left - (at - passed))  # what was read past `passed` is read again
                return Value("closed", passed, passed_after)
            return Value("unclosed", at, at)
    return Value("truncated", size, -1)  # the text (or the budget) ends first
