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

This is the layout of the Qwen3-Coder chat template: `<parameter=NAME>`, a newline, the value, a newline,
`</parameter>` and a newline, then the next parameter or `</function>`. A block whose body is JSON is read as the
`hermes` format, so Qwen models that mix both are handled.

Names
    A function or parameter name is an identifier: a letter or `_`, then letters, digits, `_`, `.`, `:` or `-` (at
    most 256 characters). `<function=NAME>` and `<function name="NAME">` (or `'NAME'`) are read alike, and so are
    `<parameter=NAME>` and `<parameter name="NAME">`; white space around the name is ignored. A call whose function
    name is not an identifier (empty, or a template placeholder such as `{{ tc.name }}` echoed by the model) is
    `missing_name`, not a call; a parameter whose name is not one makes its call `invalid_arguments`.

Types
    With a JSON schema for the parameter (`tool_schemas`), a value is converted by the declared type (`integer`,
    `number`, `boolean`, `null`, `object` and `array` are converted, `string` is kept), as `_schema.convert_value`
    does. Without one (no schema for the tool, a parameter it does not list, or one that declares no type), the value
    stays the string the model wrote: `5` is read as `"5"`, `{"a": 1}` as that text.

Where a value ends
    A value is the raw text between its opening tag and its own `</parameter>`, less one leading and one trailing
    newline. It may hold any text, the format's own tags included: coding agents write Python that builds these tags,
    HTML and XML, chat templates and documents about this very format. Its end is found by one forward pass over the
    tags written in it:

    1. Closing positions. A `</parameter>` is at a closing position when what follows it, after white space, is a
       `<parameter=NAME>` or `<parameter name="NAME">` tag (whatever the name), `</function>`, `<tool_call>`,
       `</tool_call>` or the end of the text: what the chat template writes after a value. Any other `</parameter>`
       is text (`x = "</parameter>"`, `a </parameter> b`).
    2. Markup in the value. `<tool_call>`, `<function ...>` and `<parameter ...>` (any start tag, placeholders and
       attributes included) written in the value open *elements* that their closing tags close, with the elements
       opened after them. An opening tag followed by a line break opens an element that lasts until it is closed;
       any other lasts at most to the end of its line, so that a tag in a one-line string (`"<parameter=path>\\n"`,
       `f"<tool_call>{body}"`) holds on to nothing. A closing tag with no open element of its kind is text.
    3. The end. The value ends at its first closing position that does not continue an element opened in it: one
       followed by `</function>` ends it unless a `<function` element is open; one followed by a parameter tag
       unless a `<function` or a `<parameter` element is open; one followed by `<tool_call>` or `</tool_call>` unless
       any element is open; one followed by the end of the text always. So a whole call, or a list of parameters,
       written in a file stays in the file.
    4. Markup never closed. Opening tags that the value never closes (a fixture of a cut call, a prefix string on
       several lines) hold on to the value's real `</parameter>`. The value then ends at the first closing position
       that rule 3 passed over if, after it, the pass meets a `</function>` or `</tool_call>` with no open element of
       its kind, laid out as the end of a call (see below), and no `<tool_call>` is written in between (with one,
       the value was never closed and ends at that tag, as below, so that a call written in it stays in it). If the
       text ends first, the value is cut and its call `unclosed`, as it is when the pass has read past passed-over
       positions, over the whole output, twice as many characters as the output holds plus 1 Mi (which keeps
       parsing linear). So a call written in a value is never read as a call, nor the value as complete, even when
       the output stops right after that call (at a stop string such as `</tool_call>`, say).
    5. Quotes. A tag written between two identical quotes (`"<tool_call>"`, `'</function>'`, a backquoted
       `<parameter=x>`) is text everywhere.

    A `</function>` or `</tool_call>` is laid out as the end of a call when the end of the text or a `<tool_call>`
    follows it (with one `</tool_call>` in between for `</function>`). A value in which the pass meets such a tag,
    with no open element of its kind, before any closing position, was never closed: it ends at that tag.

    Other parsers (vLLM's among them) end a value at its first `</parameter>` or at the next `<parameter=`, which cuts
    such files short or splits them into parameters the model never wrote. These rules never split a value into
    parameters: tags inside a value are at most a reason to report the call.

Statuses
    A call cut by the end of the output is `unclosed` and returns no arguments. The call is `invalid_arguments`, with
    the arguments read, when a value was never closed (its text read up to the tag that ended it, without its trailing
    white space and a misspelled or cut closing tag such as `</parameter2>`), when `</function>` is missing before
    `</tool_call>`, when a parameter tag has no identifier name (its value is left out), when a parameter is given
    twice, or when a value closes while a `<parameter ...>` element written in it is still open: that is how a
    forgotten `</parameter>` in the template's layout always reads (`path` in
    `<parameter=path>\\na.txt\\n<parameter=mode>\\nw\\n</parameter>` reads `a.txt\\n<parameter=mode>\\nw`, and the call
    is reported). It is `invalid_arguments` as well when an unquoted `</parameter>`, `</function>` or `</tool_call>`
    comes after the call and before the next `<tool_call>`: the trace of a value that held more than was read. So a
    policy is not rewarded for broken markup, and nothing is executed on a guess.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from ...errors import InvalidValueError
from ...types import ToolCall
from ._decode import make_call
from ._format import Call, ToolFormat, dump_json
from ._qwen3_values import (
    FUNCTION_CLOSE,
    FUNCTION_OPEN,
    FUNCTION_TAG,
    PARAMETER_CLOSE,
    PARAMETER_OPEN,
    PARAMETER_TAG,
    TAG,
    ScanBudget,
    is_identifier,
    quoted,
    read_name,
    recover_value,
    scan_value,
    start_tag_end,
    trim_value,
)
from ._scan import NextFinder, block_at, rstrip_end, skip_space
from ._schema import convert_value
from .base import MAX_CALLS, ToolParser
from .hermes import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, parse_json_block

_FUNCTION_START = re.compile(r"<function(?=[= \t])")
_STRAY_CLOSES = frozenset((PARAMETER_CLOSE, FUNCTION_CLOSE, TOOL_CALL_CLOSE))
_TYPE_KEYS = ("type", "anyOf", "oneOf", "enum")
"""Schema keys that declare a parameter's type; a schema without any of them leaves the value a string."""


class _Call:
    """The state of one `<function=NAME>` call being read."""

    __slots__ = ("arguments", "block_end", "error", "function_end", "truncated")

    def __init__(self) -> None:
        self.arguments: dict[str, Any] = {}
        self.error: str | None = None
        self.function_end = -1
        self.block_end = -1
        self.truncated: str | None = None  # why the call is cut, when the output ends inside it

    def fail(self, error: str) -> None:
        if self.error is None:
            self.error = error


def _typed(value: str, schema: Any) -> Any:
    """A value converted by its parameter's schema, or the text itself when no schema declares a type."""
    if isinstance(schema, Mapping) and any(key in schema for key in _TYPE_KEYS):
        return convert_value(value, schema)
    return value


def _stray_close(view: str, pos: int, end: int) -> str | None:
    """The first unquoted `</parameter>`, `</function>` or `</tool_call>` in `view[pos:end]`, if any."""
    while True:
        match = TAG.search(view, pos, end)
        if match is None:
            return None
        if match.group() in _STRAY_CLOSES and not quoted(view, match.start(), match.end()):
            return match.group()
        pos = match.end()


class Qwen3XmlParser(ToolParser):
    """Parses `<tool_call><function=NAME><parameter=KEY>VALUE</parameter></function></tool_call>` blocks.

    The rules (names, types, where a value ends, statuses) are those of the module docstring. A block whose body is
    JSON is read as the `hermes` parser reads it.
    """

    name = "qwen3_xml"

    def _parse(self, text: str, view: str) -> list[ToolCall]:
        calls: list[ToolCall] = []
        opens = NextFinder(view, TOOL_CALL_OPEN)
        closes = NextFinder(view, TOOL_CALL_CLOSE)
        budget = ScanBudget.for_output(len(view))
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
            function = _FUNCTION_START.search(view, body, block.body_end)
            if function is None:
                raw_end = block.end if block.closed else rstrip_end(view, start, block.end)
                status, error = ("missing_name", "no <function=...> in tool call")
                if not block.closed:
                    status, error = "unclosed", f"{TOOL_CALL_OPEN} is not closed"
                calls.append(make_call(text, start, raw_end, "", None, status, error))
                pos = block.end
                continue
            call, pos = self._read_call(text, view, start, function.start(), block.closed, block.end, opens, budget)
            calls.append(call)
        return calls

    def _read_call(
        self,
        text: str,
        view: str,
        start: int,
        function: int,
        closed: bool,
        block_end: int,
        opens: NextFinder,
        budget: ScanBudget,
    ) -> tuple[ToolCall, int]:
        """Reads the call of the block at `start` whose function tag is at `function`; returns it and where it ends.

        `closed` and `block_end` describe the block as found by its tags alone, used when the function tag itself is
        malformed.
        """
        name, params_start = read_name(view, function + len(FUNCTION_TAG))
        if params_start < 0:
            raw_end = block_end if closed else rstrip_end(view, start, block_end)
            status = "missing_name" if closed else "unclosed"
            return make_call(text, start, raw_end, "", None, status, "malformed <function=...> tag"), block_end
        valid_name = is_identifier(name)
        properties = self.tool_properties.get(name) if valid_name else None
        call = _Call()
        stop = self._read_parameters(text, view, properties, params_start, call, budget)
        if call.function_end >= 0:
            following = skip_space(view, call.function_end, len(view))
            if view.startswith(TOOL_CALL_CLOSE, following):
                call.block_end = following + len(TOOL_CALL_CLOSE)
            end = call.block_end if call.block_end >= 0 else call.function_end
        elif call.block_end >= 0:
            end = call.block_end
        else:
            end = rstrip_end(view, start, stop)
        if not valid_name:
            error = "empty function name" if not name else f"function name {name!r} is not an identifier"
            return make_call(text, start, end, "", None, "missing_name", error), max(end, stop)
        if call.truncated:
            return make_call(text, start, end, name, None, "unclosed", call.truncated), max(end, stop)
        next_block = opens.find(end)
        stray = _stray_close(view, end, next_block if next_block >= 0 else len(view))
        if stray is not None:
            call.fail(f"{stray} after the end of the call: a value may hold more than was read")
        if call.error is not None:
            return make_call(text, start, end, name, call.arguments, "invalid_arguments", call.error), end
        return make_call(text, start, end, name, call.arguments), end

    def _read_parameters(
        self,
        text: str,
        view: str,
        properties: Mapping[str, Any] | None,
        pos: int,
        call: _Call,
        budget: ScanBudget,
    ) -> int:
        """Reads the parameters from `pos` into `call`, converting them with `properties`; returns where it stopped."""
        not_closed = f"{FUNCTION_CLOSE} is missing"
        while True:
            match = TAG.search(view, pos)
            if match is None:
                call.truncated = f"{FUNCTION_CLOSE} is missing: the output ends first"
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
            if tag != PARAMETER_TAG:
                call.fail(f"unexpected {tag}{'...>' if tag == FUNCTION_TAG else ''} between parameters")
                pos = match.end()
                continue
            key, value_start = read_name(view, match.end())
            if value_start < 0:  # attributes other than `name`, say: its value is read, then left out
                key, value_start = "", start_tag_end(view, match.end())
                call.fail("malformed <parameter=...> tag")
                if value_start < 0:
                    pos = match.end()
                    continue
            value = scan_value(view, value_start, budget)
            if value.kind == "truncated":  # the output stops inside the value: the call is unclosed
                call.truncated = f"{PARAMETER_OPEN}{key}> is not closed: the output ends first"
                return len(view)
            pos = value.after
            if not is_identifier(key):
                call.fail("empty parameter name" if not key else f"parameter name {key!r} is not an identifier")
                continue  # the value is left out
            raw = text[value_start : value.end]
            if value.kind == "closed":
                content = trim_value(raw)
                if value.open_parameter:
                    call.fail(
                        f"the value of {key!r} holds a {PARAMETER_TAG}...> tag that is never closed: a "
                        f"{PARAMETER_CLOSE} may be missing"
                    )
            else:
                call.fail(f"{PARAMETER_OPEN}{key}> is not closed")
                content = recover_value(raw)
            if key in call.arguments:
                call.fail(f"parameter {key!r} is given twice")
            call.arguments[key] = _typed(content, properties.get(key) if properties else None)


def _written_name(name: str, what: str) -> str:
    if not is_identifier(name):
        raise InvalidValueError(f"{name!r} cannot be written as a {what} name: it is not an identifier")
    return name


def _written_value(value: Any) -> str:
    return value if isinstance(value, str) else dump_json(value).replace("<", "\\u003c")


def render_qwen3_xml(calls: Sequence[Call]) -> str:
    """Writes calls as Qwen3-Coder blocks: one `<tool_call>` per call, each value on its own lines.

    Strings are written as they are, other values as JSON (with `<` escaped as `\\u003c`, so that no tag appears in
    them). Domain: names and parameter names that are identifiers (see the module docstring); string values whose tags
    stay text by the rules of the module docstring (tags between quotes, elements closed within the value, closing
    tags at no closing position); other values read back with a schema that declares their type (without one, the
    parser returns the JSON text).

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
