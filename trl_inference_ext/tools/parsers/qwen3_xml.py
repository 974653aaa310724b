"""The `qwen3_xml` format (Qwen3-Coder): XML-style calls inside `<tool_call>` tags.

::

    <tool_call>
    <function=search>
    <parameter=query>
    Python tutorials
    </parameter>
    <parameter=max_results>
    5
    </parameter>
    </function>
    </tool_call>

One leading and one trailing newline are trimmed from each value. Values are converted with the tool's JSON schema
when one is given (`integer`, `number`, `boolean`, `null`, `object` and `array` are converted, `string` kept);
without a schema a value that is valid JSON is decoded and any other value stays a string. A block whose body is
JSON is parsed as the `hermes` format, so Qwen models that mix both are handled.

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
   parameters), unless it is literal text: quoted (`"<parameter=x>"`) or paired with a
   later `</parameter>` that rule 2 does not count as closing (`Write <parameter=x>v</parameter> here`), in which
   case the value is kept whole.
4. Outside literal regions, an unquoted `</function>` or `</tool_call>` ends the unclosed value, and the function
   (and the block) with it.

A value ended by rule 3 or 4 was never closed, so its call is `invalid_arguments`, and so is a call whose
`</function>` is missing before `</tool_call>`. A silently merged value is never `ok`, but the arguments read are
still returned, each value cut before the tag that ended it, without its trailing white space and a misspelled or cut
closing tag (`</parameter2>`, `</param`). A call cut by the end of the output is `unclosed` and returns no arguments.
A call followed right away by a stray `</parameter>`, `</function>` or `</tool_call>` is `invalid_arguments` too:
that is the trace of a value that held such a tag and was read shorter than written. Where other parsers (vLLM's,
for example) read these calls as well formed, this one reports them, so that a policy is not rewarded for broken
markup and nothing is executed on a guess; the values it would have guessed are in `arguments`.

Every scan moves forward, each tag is visited once, and literal regions are tracked with a capped stack.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from ...types import ToolCall
from ._decode import make_call
from ._format import Call, ToolFormat, dump_json
from ._scan import MAX_DEPTH, NextFinder, block_at, rstrip_end, skip_space
from ._schema import convert_value
from .base import MAX_CALLS, ToolParser
from .hermes import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, parse_json_block

FUNCTION_OPEN = "<function="
FUNCTION_CLOSE = "</function>"
PARAMETER_OPEN = "<parameter="
PARAMETER_CLOSE = "</parameter>"
MAX_NAME_CHARS = 256

_TAG = re.compile(r"<parameter=|</parameter>|<function=|</function>|</?tool_call>")
"""Every tag of the format (`<tool_call>` and `</tool_call>` by one alternative)."""
_NAME = re.compile(f"([^<>\\n]{{0,{MAX_NAME_CHARS}}})>")
"""`NAME>` after `<function=` or `<parameter=`: no `<`, `>` or newline in the name."""
_BROKEN_CLOSE = re.compile(r"</para[A-Za-z0-9_]{0,16}>?\Z")
"""A closing tag misspelled or cut at the end of an unclosed value (`</parameter2>`, `</param`, `</parameter`)."""
_QUOTES = "\"'`"
_STRAY_CLOSES = (PARAMETER_CLOSE, FUNCTION_CLOSE, TOOL_CALL_CLOSE)
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


def _recover_value(value: str) -> str:
    """The text of a value that was never closed: cut before trailing white space and a broken closing tag."""
    value = value.rstrip()
    broken = _BROKEN_CLOSE.search(value, max(0, len(value) - 32))
    if broken is not None:
        value = value[: broken.start()].rstrip()
    return value[1:] if value.startswith("\n") else value


def _read_name(view: str, start: int) -> tuple[str, int]:
    """Reads `NAME>` at `start`; returns the stripped name and the offset past `>`, or `("", -1)`."""
    match = _NAME.match(view, start)
    if match is None:
        return "", -1
    return match.group(1).strip(), match.end()


def _quoted(view: str, start: int, end: int) -> bool:
    """Whether the tag `view[start:end]` is written between two identical quotes, as text."""
    return start > 0 and end < len(view) and view[start - 1] in _QUOTES and view[end] == view[start - 1]


class _Value:
    """Where one parameter value ended, as found by `_scan_value`.

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


def _scan_value(view: str, key: str, start: int) -> _Value:
    """Finds where the value of `key` starting at `start` ends, by the rules of the module docstring."""
    result = _Value()
    literal: list[str] = []  # literal regions open, innermost last: FUNCTION_CLOSE or TOOL_CALL_CLOSE, what ends each
    open_regions = {FUNCTION_CLOSE: 0, TOOL_CALL_CLOSE: 0}
    candidates: list[tuple[int, int, str]] = []  # unquoted <parameter=NAME> tags: (start, value start, name)
    unpaired: list[int] = []  # indices into `candidates` not yet paired with a literal </parameter>
    end = len(view)
    for match in _TAG.finditer(view, start):
        tag, at = match.group(), match.start()
        if tag in _REGION_CLOSE:
            tag_end = _read_name(view, match.end())[1] if tag == FUNCTION_OPEN else match.end()
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
            name, value_start = _read_name(view, match.end())
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


class _Call:
    """The state of one `<function=NAME>` call being read."""

    __slots__ = ("arguments", "block_end", "error", "function_end", "truncated")

    def __init__(self) -> None:
        self.arguments: dict[str, Any] = {}
        self.error: str | None = None
        self.function_end = -1
        self.block_end = -1
        self.truncated = False

    def fail(self, error: str) -> None:
        if self.error is None:
            self.error = error


class Qwen3XmlParser(ToolParser):
    """Parses `<tool_call><function=NAME><parameter=KEY>VALUE</parameter></function></tool_call>` blocks.

    A block whose body is JSON is read as the `hermes` parser reads it.
    """

    name = "qwen3_xml"

    def _parse(self, text: str, view: str) -> list[ToolCall]:
        calls: list[ToolCall] = []
        opens = NextFinder(view, TOOL_CALL_OPEN)
        closes = NextFinder(view, TOOL_CALL_CLOSE)
        functions = NextFinder(view, FUNCTION_OPEN)
        pos = 0
        while len(calls) < MAX_CALLS:
            start = opens.find(pos)
            if start < 0:
                break
            body = skip_space(view, start + len(TOOL_CALL_OPEN), len(view))
            if view.startswith(("{", "[", "```"), body):
                block = block_at(view, start, TOOL_CALL_OPEN, opens, closes, json_bodies=True)
                calls.extend(parse_json_block(text, view, block, body, max_calls=MAX_CALLS - len(calls)))
                pos = block.end
                continue
            block = block_at(view, start, TOOL_CALL_OPEN, opens, closes)
            function = functions.find(body)
            if function < 0 or function >= block.body_end:
                raw_end = block.end if block.closed else rstrip_end(view, start, block.end)
                status, error = ("missing_name", "no <function=...> in tool call")
                if not block.closed:
                    status, error = "unclosed", f"{TOOL_CALL_OPEN} is not closed"
                calls.append(make_call(text, start, raw_end, "", None, status, error))
                pos = block.end
                continue
            call, pos = self._read_call(text, view, start, function, block.closed, block.end)
            calls.append(call)
        return calls

    def _read_call(
        self, text: str, view: str, start: int, function: int, closed: bool, block_end: int
    ) -> tuple[ToolCall, int]:
        """Reads the call of the block at `start` whose `<function=` is at `function`; returns it and where it ends.

        `closed` and `block_end` describe the block as found by its tags alone, used when the function tag itself is
        malformed.
        """
        name, params_start = _read_name(view, function + len(FUNCTION_OPEN))
        if params_start < 0 or not name:
            raw_end = block_end if closed else rstrip_end(view, start, block_end)
            status = "missing_name" if closed or params_start >= 0 else "unclosed"
            error = "empty function name" if params_start >= 0 else "malformed <function=...> tag"
            return make_call(text, start, raw_end, "", None, status, error), block_end
        call = _Call()
        stop = self._read_parameters(view, name, params_start, call)
        if call.function_end >= 0:
            following = skip_space(view, call.function_end, len(view))
            if view.startswith(TOOL_CALL_CLOSE, following):
                call.block_end = following + len(TOOL_CALL_CLOSE)
            end = call.block_end if call.block_end >= 0 else call.function_end
        elif call.block_end >= 0:
            end = call.block_end
        else:
            end = rstrip_end(view, start, stop)
        stray = skip_space(view, end, len(view))
        if not call.truncated and view.startswith(_STRAY_CLOSES, stray):
            call.fail("unexpected closing tag after the call: a value may hold more than was read")
        if call.truncated:
            error = call.error or f"{FUNCTION_OPEN}{name}> is not closed"
            return make_call(text, start, end, name, None, "unclosed", error), max(end, stop)
        if call.error is not None:
            return make_call(text, start, end, name, call.arguments, "invalid_arguments", call.error), end
        return make_call(text, start, end, name, call.arguments), end

    def _read_parameters(self, view: str, name: str, pos: int, call: _Call) -> int:
        """Reads the parameters of function `name` from `pos` into `call`; returns where reading stopped."""
        properties = self.tool_properties.get(name)
        not_closed = f"{FUNCTION_OPEN}{name}> is not closed"
        while True:
            match = _TAG.search(view, pos)
            if match is None:
                call.truncated = True
                return len(view)
            tag = match.group()
            if tag == FUNCTION_CLOSE:
                call.function_end = match.end()
                return match.end()
            if tag == TOOL_CALL_CLOSE:
                call.fail(not_closed)
                call.block_end = match.end()
                return match.end()
            if tag == TOOL_CALL_OPEN:
                call.fail(not_closed)
                return match.start()
            if tag != PARAMETER_OPEN:
                call.fail(f"unexpected {tag} between parameters")
                pos = match.end()
                continue
            key, value_start = _read_name(view, match.end())
            if value_start < 0 or not key:
                call.fail("malformed <parameter=...> tag")
                pos = match.end()
                continue
            value = _scan_value(view, key, value_start)
            if value.kind == "end":  # the output stops inside the value: the call is unclosed, its values unused
                call.fail(f"{PARAMETER_OPEN}{value.segments[0][0]}> is not closed")
                call.truncated = True
                return len(view)
            for segment_key, segment_start, segment_end, segment_closed in value.segments:
                raw = view[segment_start:segment_end]
                if not segment_closed:
                    call.fail(f"{PARAMETER_OPEN}{segment_key}> is not closed")
                text_value = trim_value(raw) if segment_closed else _recover_value(raw)
                schema = properties.get(segment_key) if properties is not None else None
                call.arguments[segment_key] = convert_value(text_value, schema)
            if value.kind == "function":
                call.function_end = value.after
                return value.after
            if value.kind == "tool_call":
                call.fail(not_closed)
                call.block_end = value.after
                return value.after
            pos = value.after


def _written_name(name: str, what: str) -> str:
    if not name or name != name.strip() or any(char in name for char in "<>\n"):
        raise ValueError(f"{name!r} cannot be written as a {what} name")
    return name


def _written_value(value: Any) -> str:
    return value if isinstance(value, str) else dump_json(value).replace("<", "\\u003c")


def render_qwen3_xml(calls: Sequence[Call]) -> str:
    """Writes calls as Qwen3-Coder blocks: one `<tool_call>` per call, each value on its own lines.

    Strings are written as they are, other values as JSON (with `<` escaped as `\\u003c`, so that no tag appears in
    them). Domain: names and parameter names without `<`, `>`, newlines or surrounding white space; string values
    that are not themselves valid JSON (those would be read back decoded, as the parser does without a schema) and
    that keep the format's tags literal by the rules of this module.

    Args:
        calls (`Sequence[tuple[str, Mapping[str, Any]]]`): `(name, arguments)` pairs.

    Raises:
        ValueError: If a name or a parameter name cannot be written in this format.
    """
    blocks = []
    for name, arguments in calls:
        parameters = "".join(
            f"{PARAMETER_OPEN}{_written_name(key, 'parameter')}>\n{_written_value(value)}\n{PARAMETER_CLOSE}\n"
            for key, value in arguments.items()
        )
        blocks.append(
            f"{TOOL_CALL_OPEN}\n{FUNCTION_OPEN}{_written_name(name, 'function')}>\n{parameters}{FUNCTION_CLOSE}\n"
            f"{TOOL_CALL_CLOSE}"
        )
    return "\n".join(blocks)


FORMAT = ToolFormat(
    parser=Qwen3XmlParser,
    render=render_qwen3_xml,
    instruction=(
        f"{TOOL_CALL_OPEN}\n{FUNCTION_OPEN}<tool name>>\n{PARAMETER_OPEN}<argument>>\nvalue\n{PARAMETER_CLOSE}\n"
        f"{FUNCTION_CLOSE}\n{TOOL_CALL_CLOSE}"
    ),
    template_markers=(TOOL_CALL_OPEN, FUNCTION_OPEN),
    special_tokens=(TOOL_CALL_OPEN, TOOL_CALL_CLOSE, "<tool_response>", "</tool_response>"),
)
