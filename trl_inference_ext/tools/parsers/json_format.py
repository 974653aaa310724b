"""The `json` format: bare JSON call objects anywhere in the output.

Accepted shapes (objects may sit in prose or in a ```json fenced block)::

    {"tool": "search", "arguments": {"query": "Python tutorials"}}
    {"name": "search", "arguments": {...}}          # or "parameters"
    [{"name": "a", "arguments": {}}, {"name": "b", "arguments": {}}]

A JSON object that names no tool and has no arguments is prose; one with arguments but no name is `missing_name`.
"""

from __future__ import annotations

from collections.abc import Sequence

from ...types import ToolCall
from ._format import Call, ToolFormat, dump_json
from ._json_calls import CallKeys, JsonCallExtractor
from ._scan import scan_json
from .base import MAX_CALLS, ToolParser

JSON_KEYS = CallKeys(names=("tool", "name"), arguments=("arguments", "parameters"))


class JsonParser(ToolParser):
    """Parses JSON call objects (`{"tool"|"name": ..., "arguments"|"parameters": {...}}`) and lists of them."""

    name = "json"
    keys = JSON_KEYS

    def _parse(self, text: str, view: str) -> list[ToolCall]:
        if "{" not in view:
            return []
        extractor = JsonCallExtractor(text, view, self.keys, standalone=True, max_calls=MAX_CALLS)
        if not extractor.may_hold_calls:
            return []
        extractor.add_nodes(scan_json(view, decoded=extractor.decoded))
        return extractor.finish()


def render_json(calls: Sequence[Call]) -> str:
    """Writes calls as bare `{"tool": ..., "arguments": ...}` objects, one per line.

    Domain: any non-blank name without surrounding white space, any JSON-compatible arguments.

    Args:
        calls (`Sequence[tuple[str, Mapping[str, Any]]]`): `(name, arguments)` pairs.
    """
    return "\n".join(dump_json({"tool": name, "arguments": dict(arguments)}) for name, arguments in calls)


FORMAT = ToolFormat(
    parser=JsonParser,
    render=render_json,
    instruction='{"tool": "<tool name>", "arguments": {"<argument>": <value>}}',
)
