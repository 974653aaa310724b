"""The `xml` format: `<invoke>` elements, optionally wrapped in `<function_calls>`.

Two layouts are accepted, and several `<invoke>` elements may share one block::

    <function_calls>
    <invoke><tool_name>search</tool_name><parameters><query>Python tutorials</query>
    <max_results>5</max_results></parameters></invoke>
    </function_calls>

    <invoke name="search"><parameter name="query">Python tutorials</parameter></invoke>

Values are XML-unescaped (`&lt;` → `<`; CDATA sections are kept verbatim), trimmed of one leading and one trailing
newline, then converted with the tool's JSON schema when one is given, else JSON-decoded when they are valid JSON
(`5` → 5, `true` → True, `[1, 2]` → a list) and kept as strings otherwise. Nested elements inside a value are kept
as text.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from typing import Any

from ...errors import InvalidValueError
from ...types import ToolCall
from ._decode import make_call
from ._format import Call, ToolFormat, dump_json
from ._qwen3_values import trim_value
from ._scan import NextFinder, rstrip_end
from ._schema import convert_value
from .base import MAX_CALLS, ToolParser

INVOKE_OPEN = "<invoke"
INVOKE_CLOSE = "</invoke>"
FUNCTION_CALLS_OPEN = "<function_calls>"
FUNCTION_CALLS_CLOSE = "</function_calls>"
MAX_TAG_CHARS = 1024

_NAME_ATTRIBUTE = re.compile(r"""(?:^|\s)name\s{0,16}=\s{0,16}(?:"([^"<>]{0,256})"|'([^'<>]{0,256})')""")
_PARAMETER_TAG = re.compile(
    r"""<parameter\s{1,16}name\s{0,16}=\s{0,16}(?:"([^"<>]{0,256})"|'([^'<>]{0,256})')\s{0,16}(/?)>"""
)
_ELEMENT_TAG = re.compile(r"<([A-Za-z_][A-Za-z0-9_.:\-]{0,127})\s{0,16}(/?)>")
_CDATA_START = "<![CDATA["
_CDATA_END = "]]>"


def xml_text(value: str) -> str:
    """Returns the text content of an element: CDATA kept verbatim, otherwise entities unescaped.

    Args:
        value (`str`): The raw text between the tags.
    """
    stripped = value.strip()
    if stripped.startswith(_CDATA_START) and stripped.endswith(_CDATA_END):
        return stripped[len(_CDATA_START) : -len(_CDATA_END)]
    return html.unescape(value) if "&" in value else value


def _attribute_name(match: re.Match[str] | None) -> str | None:
    if match is None:
        return None
    return html.unescape(match.group(1) if match.group(1) is not None else match.group(2)).strip()


class XmlParser(ToolParser):
    """Parses `<invoke>` calls with `<tool_name>`/`<parameters>` children or `name` attributes."""

    name = "xml"

    def _parse(self, text: str, view: str) -> list[ToolCall]:
        calls: list[ToolCall] = []
        opens = NextFinder(view, INVOKE_OPEN)
        closes = NextFinder(view, INVOKE_CLOSE)
        pos = 0
        while len(calls) < MAX_CALLS:
            start = opens.find(pos)
            if start < 0:
                break
            after = start + len(INVOKE_OPEN)
            pos = after
            if after < len(view) and view[after] not in "> \t\r\n/":
                continue
            tag_end = view.find(">", after, after + MAX_TAG_CHARS)
            if tag_end < 0:
                if after + MAX_TAG_CHARS >= len(view):
                    end = rstrip_end(view, start, len(view))
                    calls.append(make_call(text, start, end, "", None, "unclosed", "<invoke> tag is not closed"))
                    break
                continue
            attributes = view[after:tag_end]
            name = _attribute_name(_NAME_ATTRIBUTE.search(attributes))
            if attributes.endswith("/"):
                pos = tag_end + 1
                calls.append(self._finish(text, start, pos, name, {}, None, closed=True))
                continue
            body_start = tag_end + 1
            following = opens.find(body_start)
            closing = closes.find(body_start)
            closed = closing >= 0 and (following < 0 or closing < following)
            body_end = closing if closed else (following if following >= 0 else len(view))
            end = closing + len(INVOKE_CLOSE) if closed else rstrip_end(view, start, body_end)
            pos = end if closed else body_end
            if name is None:
                name = self._tool_name(view, body_start, body_end)
            arguments, error = self._arguments(view, name or "", body_start, body_end)
            calls.append(self._finish(text, start, end, name, arguments, error, closed=closed))
        return calls

    @staticmethod
    def _finish(
        text: str,
        start: int,
        end: int,
        name: str | None,
        arguments: dict[str, Any],
        error: str | None,
        *,
        closed: bool,
    ) -> ToolCall:
        if not closed:
            return make_call(text, start, end, name or "", None, "unclosed", "<invoke> is not closed")
        if not name:
            return make_call(text, start, end, "", arguments if error is None else None, "missing_name", "no tool name")
        if error is not None:
            return make_call(text, start, end, name, None, "invalid_arguments", error)
        return make_call(text, start, end, name, arguments)

    @staticmethod
    def _tool_name(view: str, start: int, end: int) -> str | None:
        opening = view.find("<tool_name>", start, end)
        if opening < 0:
            return None
        closing = view.find("</tool_name>", opening, end)
        if closing < 0:
            return None
        return xml_text(view[opening + len("<tool_name>") : closing]).strip()

    def _arguments(self, view: str, name: str, start: int, end: int) -> tuple[dict[str, Any], str | None]:
        properties = self.tool_properties.get(name)
        block = view.find("<parameters", start, end)
        if block >= 0 and view.startswith((">", " ", "\t", "\n", "\r"), block + len("<parameters")):
            return self._child_elements(view, block, end, properties)
        return self._parameter_tags(view, start, end, properties)

    def _child_elements(
        self, view: str, block: int, end: int, properties: dict[str, Any] | None
    ) -> tuple[dict[str, Any], str | None]:
        tag_end = view.find(">", block, min(end, block + MAX_TAG_CHARS))
        if tag_end < 0:
            return {}, "malformed <parameters> tag"
        if view[tag_end - 1] == "/":
            return {}, None
        block_end = view.find("</parameters>", tag_end, end)
        if block_end < 0:
            return {}, "<parameters> is not closed"
        arguments: dict[str, Any] = {}
        pos = tag_end + 1
        while True:
            opening = view.find("<", pos, block_end)
            if opening < 0:
                return arguments, None
            match = _ELEMENT_TAG.match(view, opening, block_end)
            if match is None:
                return arguments, "malformed parameter element"
            key = match.group(1)
            if match.group(2):
                arguments[key] = convert_value("", properties.get(key) if properties else None)
                pos = match.end()
                continue
            closing_tag = f"</{key}>"
            closing = view.find(closing_tag, match.end(), block_end)
            if closing < 0:
                return arguments, f"<{key}> is not closed"
            value = trim_value(xml_text(view[match.end() : closing]))
            arguments[key] = convert_value(value, properties.get(key) if properties else None)
            pos = closing + len(closing_tag)

    def _parameter_tags(
        self, view: str, start: int, end: int, properties: dict[str, Any] | None
    ) -> tuple[dict[str, Any], str | None]:
        arguments: dict[str, Any] = {}
        pos = start
        while True:
            opening = view.find("<parameter", pos, end)
            if opening < 0:
                return arguments, None
            match = _PARAMETER_TAG.match(view, opening, end)
            if match is None:
                return arguments, "malformed <parameter> tag"
            key = _attribute_name(match) or ""
            if not key:
                return arguments, "parameter without a name"
            if match.group(3):
                arguments[key] = convert_value("", properties.get(key) if properties else None)
                pos = match.end()
                continue
            closing = view.find("</parameter>", match.end(), end)
            if closing < 0:
                return arguments, f"parameter {key!r} is not closed"
            value = trim_value(xml_text(view[match.end() : closing]))
            arguments[key] = convert_value(value, properties.get(key) if properties else None)
            pos = closing + len("</parameter>")


def render_xml(calls: Sequence[Call]) -> str:
    """Writes calls as `<invoke name="...">` elements with `<parameter name="...">` children in one block.

    Names and values are XML-escaped; values that are not strings are written as JSON, and each value stands on its
    own lines. Domain: names and parameter names without surrounding white space and up to 40 characters; string
    values that are not themselves valid JSON (those would be read back decoded, as the parser does without a schema).

    Args:
        calls (`Sequence[tuple[str, Mapping[str, Any]]]`): `(name, arguments)` pairs.

    Raises:
        ValueError: If a name or a parameter name cannot be written in this format.
    """
    if not calls:
        return ""
    invokes = []
    for name, arguments in calls:
        parameters = "".join(
            f'<parameter name="{_written_name(key)}">\n'
            f"{html.escape(value if isinstance(value, str) else dump_json(value), quote=False)}\n</parameter>\n"
            for key, value in arguments.items()
        )
        invokes.append(f'{INVOKE_OPEN} name="{_written_name(name)}">\n{parameters}{INVOKE_CLOSE}\n')
    return f"{FUNCTION_CALLS_OPEN}\n{''.join(invokes)}{FUNCTION_CALLS_CLOSE}"


def _written_name(name: str) -> str:
    escaped = html.escape(name, quote=True)
    if not name or name != name.strip() or len(escaped) > 256:
        raise InvalidValueError(f"{name!r} cannot be written as an XML name attribute")
    return escaped


FORMAT = ToolFormat(
    parser=XmlParser,
    render=render_xml,
    instruction=(
        f"{FUNCTION_CALLS_OPEN}\n<invoke>\n<tool_name><tool name></tool_name>\n<parameters>\n"
        f"<argument name as tag>value</argument name as tag>\n</parameters>\n</invoke>\n{FUNCTION_CALLS_CLOSE}"
    ),
    template_markers=(FUNCTION_CALLS_OPEN, INVOKE_OPEN),
)
