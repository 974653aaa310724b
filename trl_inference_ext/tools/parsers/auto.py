"""The `auto` parser: tries every format in a fixed order and keeps the first that finds a call."""

from __future__ import annotations

from ...types import ToolCall
from ._schema import ToolSchemas
from .base import ToolParser
from .registry import FORMATS

AUTO_ORDER = ("qwen3_xml", "mistral", "xml", "json", "function")
"""Formats tried by `AutoParser`: markup-delimited formats first, bare JSON next, Python-style calls (the format most
prone to false positives in prose) last. `hermes` and `llama3_json` need no turn of their own: `qwen3_xml` also reads
JSON payloads in `<tool_call>` blocks, and `json` accepts `{"name": ..., "parameters": ...}` objects anywhere."""

PARSER_CLASSES: dict[str, type[ToolParser]] = {tool_format.name: tool_format.parser for tool_format in FORMATS}
"""The parser class of each format, by name (from `registry.FORMATS`)."""


class AutoParser(ToolParser):
    """Tries the formats of `AUTO_ORDER` in turn and returns the calls of the first one that finds any call.

    A malformed call counts as found, so a broken `<tool_call>` block is reported rather than re-read as bare JSON.
    `hermes` output is read by `qwen3_xml` and `llama3_json` output by `json`.

    Args:
        tool_schemas (`Sequence[Mapping[str, Any]]`, *optional*): Tool definitions, passed to every format.
    """

    name = "auto"

    def __init__(self, *, tool_schemas: ToolSchemas | None = None) -> None:
        super().__init__(tool_schemas=tool_schemas)
        self.parsers = [PARSER_CLASSES[name](tool_schemas=tool_schemas) for name in AUTO_ORDER]

    def _parse(self, text: str, view: str) -> list[ToolCall]:
        for parser in self.parsers:
            calls = parser._parse(text, view)
            if calls:
                return calls
        return []
