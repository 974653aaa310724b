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

Values are raw text, so they may hold the format's own tags (a coding agent writes parser fixtures, chat templates and
XML): where a value ends is decided by the four rules of `_qwen3_values`. In short, tags inside a value are text; a
`</parameter>` closes it only before `<parameter=` or `</function>`; outside a `<function=...>` or `<tool_call>`
region written in the value, an unquoted, unpaired `<parameter=NAME>` starts the next parameter after a value left
open, and an unquoted `</function>` or `</tool_call>` ends the call.

A value ended by rule 3 or 4 was never closed, so its call is `invalid_arguments`, and so is a call whose
`</function>` is missing before `</tool_call>`. A silently merged value is never `ok`, but the arguments read are
still returned, each value cut before the tag that ended it, without its trailing white space and a misspelled or cut
closing tag (`</parameter2>`, `</param`). A call cut by the end of the output is `unclosed` and returns no arguments.
A call followed right away by a stray `</parameter>`, `</function>` or `</tool_call>` is `invalid_arguments` too:
that is the trace of a value that held such a tag and was read shorter than written. Where other parsers (vLLM's,
for example) read these calls as well formed, this one reports them, so that a policy is not rewarded for broken
markup and nothing is executed on a guess; the values it would have guessed are in `arguments`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ...errors import InvalidValueError
from ...types import ToolCall
from ._decode import make_call
from ._format import Call, ToolFormat, dump_json
from ._qwen3_values import (
    FUNCTION_CLOSE,
    FUNCTION_OPEN,
    PARAMETER_CLOSE,
    PARAMETER_OPEN,
    TAG,
    read_name,
    recover_value,
    scan_value,
    trim_value,
)
from ._scan import NextFinder, block_at, rstrip_end, skip_space
from ._schema import convert_value
from .base import MAX_CALLS, ToolParser
from .hermes import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, parse_json_block

_STRAY_CLOSES = (PARAMETER_CLOSE, FUNCTION_CLOSE, TOOL_CALL_CLOSE)


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
        name, params_start = read_name(view, function + len(FUNCTION_OPEN))
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
            match = TAG.search(view, pos)
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
            key, value_start = read_name(view, match.end())
            if value_start < 0 or not key:
                call.fail("malformed <parameter=...> tag")
                pos = match.end()
                continue
            value = scan_value(view, key, value_start)
            if value.kind == "end":  # the output stops inside the value: the call is unclosed, its values unused
                call.fail(f"{PARAMETER_OPEN}{value.segments[0][0]}> is not closed")
                call.truncated = True
                return len(view)
            for segment_key, segment_start, segment_end, segment_closed in value.segments:
                raw = view[segment_start:segment_end]
                if not segment_closed:
                    call.fail(f"{PARAMETER_OPEN}{segment_key}> is not closed")
                text_value = trim_value(raw) if segment_closed else recover_value(raw)
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
        raise InvalidValueError(f"{name!r} cannot be written as a {what} name")
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
