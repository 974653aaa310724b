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
"""

from __future__ import annotations

from typing import Any

from ...types import ToolCall
from ._decode import make_call
from ._scan import Block, rstrip_end
from ._schema import convert_value
from .hermes import TOOL_CALL_OPEN, HermesParser

FUNCTION_OPEN = "<function="
FUNCTION_CLOSE = "</function>"
PARAMETER_OPEN = "<parameter="
PARAMETER_CLOSE = "</parameter>"
MAX_NAME_CHARS = 256


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


def _read_name(view: str, start: int, end: int) -> tuple[str, int]:
    """Reads `NAME>` at `start`; returns the stripped name and the offset past `>`, or `("", -1)`."""
    close = view.find(">", start, min(end, start + MAX_NAME_CHARS))
    if close < 0:
        return "", -1
    name = view[start:close].strip()
    if "<" in name or "\n" in name:
        return "", -1
    return name, close + 1


class Qwen3XmlParser(HermesParser):
    """Parses `<tool_call><function=NAME><parameter=KEY>VALUE</parameter></function></tool_call>` blocks.

    The blocks are found as Hermes finds them; a body that is JSON is read as Hermes reads it.
    """

    name = "qwen3_xml"

    def _parse_body(self, text: str, view: str, block: Block, start: int, max_calls: int) -> list[ToolCall]:
        if view.startswith(("{", "[", "```"), start, block.body_end):
            return super()._parse_body(text, view, block, start, max_calls)
        return [self._parse_block(text, view, block, start)]

    def _parse_block(self, text: str, view: str, block: Block, start: int) -> ToolCall:
        body_end = block.body_end
        raw_end = block.end if block.closed else rstrip_end(view, block.body_start, body_end)
        function = view.find(FUNCTION_OPEN, start, body_end)
        if function < 0:
            if block.closed:
                return make_call(text, block.start, raw_end, "", None, "missing_name", "no <function=...> in tool call")
            return make_call(text, block.start, raw_end, "", None, "unclosed", f"{TOOL_CALL_OPEN} is not closed")
        name, params_start = _read_name(view, function + len(FUNCTION_OPEN), body_end)
        if params_start < 0:
            status = "missing_name" if block.closed else "unclosed"
            return make_call(text, block.start, raw_end, "", None, status, "malformed <function=...> tag")
        if not name:
            return make_call(text, block.start, raw_end, "", None, "missing_name", "empty function name")
        function_close = view.find(FUNCTION_CLOSE, params_start, body_end)
        params_end = function_close if function_close >= 0 else body_end
        arguments, error = self._read_parameters(view, name, params_start, params_end)
        if error is not None:
            status = "invalid_arguments" if function_close >= 0 else "unclosed"
            return make_call(text, block.start, raw_end, name, None, status, error)
        if function_close < 0:
            return make_call(
                text, block.start, raw_end, name, None, "unclosed", f"{FUNCTION_OPEN}{name}> is not closed"
            )
        return make_call(text, block.start, raw_end, name, arguments)

    def _read_parameters(self, view: str, name: str, start: int, end: int) -> tuple[dict[str, Any], str | None]:
        properties = self.tool_properties.get(name)
        arguments: dict[str, Any] = {}
        pos = start
        while True:
            opening = view.find(PARAMETER_OPEN, pos, end)
            if opening < 0:
                return arguments, None
            key, value_start = _read_name(view, opening + len(PARAMETER_OPEN), end)
            if value_start < 0 or not key:
                return arguments, "malformed <parameter=...> tag"
            closing = view.find(PARAMETER_CLOSE, value_start, end)
            if closing < 0:
                return arguments, f"{PARAMETER_OPEN}{key}> is not closed"
            value = trim_value(view[value_start:closing])
            schema = properties.get(key) if properties is not None else None
            arguments[key] = convert_value(value, schema)
            pos = closing + len(PARAMETER_CLOSE)
