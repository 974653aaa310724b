"""The `llama3_json` format (Llama 3.1 / 3.2 / 3.3 JSON tool calling).

The model writes an optional `<|python_tag|>`, then one or more call objects separated by `;` or newlines::

    <|python_tag|>{"name": "search", "parameters": {"query": "x"}}; {"name": "clock", "parameters": {}}

`"arguments"` is accepted in place of `"parameters"`. Objects may be surrounded by prose, so an object is a call only
when it has a `"parameters"` or `"arguments"` key: `The user record is {"name": "Alice"}` holds no call (the `json`
format, whose calls may omit their arguments, would read a call to `Alice` there). The built-in
`<|python_tag|>tool.call(...)` form of Llama's code tools is not parsed (use the `function` parser for it).
"""

from __future__ import annotations

from collections.abc import Sequence

from ._format import Call, ToolFormat, dump_json
from ._json_calls import CallKeys
from .json_format import JsonParser

PYTHON_TAG = "<|python_tag|>"
LLAMA3_KEYS = CallKeys(names=("name",), arguments=("parameters", "arguments"), require_arguments=True)


class Llama3JsonParser(JsonParser):
    """Parses Llama 3 JSON calls: `{"name": ..., "parameters": {...}}`, several separated by `;` or newlines."""

    name = "llama3_json"
    keys = LLAMA3_KEYS


def render_llama3_json(calls: Sequence[Call]) -> str:
    """Writes calls after `<|python_tag|>` as `{"name": ..., "parameters": ...}` objects separated by `; `.

    Domain: any non-blank name without surrounding white space, any JSON-compatible arguments.

    Args:
        calls (`Sequence[tuple[str, Mapping[str, Any]]]`): `(name, arguments)` pairs.
    """
    if not calls:
        return ""
    return PYTHON_TAG + "; ".join(dump_json({"name": name, "parameters": dict(arguments)}) for name, arguments in calls)


FORMAT = ToolFormat(
    parser=Llama3JsonParser,
    render=render_llama3_json,
    instruction='{"name": "<tool name>", "parameters": {"<argument>": <value>}}',
    template_markers=(PYTHON_TAG,),
    special_tokens=(PYTHON_TAG,),
)
