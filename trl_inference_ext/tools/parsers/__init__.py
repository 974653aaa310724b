"""Tool-call parsers: one module per output format behind the `ToolParser` interface.

```python
from trl_inference_ext.tools.parsers import get_parser

parser = get_parser("hermes")
for call in parser.parse(completion):
    if call.ok:
        run_tool(call.name, call.arguments)
```

Formats: `function` (`search(query="x")`), `hermes` (`<tool_call>{json}</tool_call>`, Qwen2.5/Qwen3), `json`
(bare `{"tool": ..., "arguments": ...}` objects), `llama3_json` (`<|python_tag|>{"name": ..., "parameters": ...}`),
`mistral` (`[TOOL_CALLS]...`), `qwen3_xml` (`<tool_call><function=...>`, Qwen3-Coder) and `xml`
(`<invoke>...</invoke>`). `auto` picks the format from the chat template when it can, else tries them all.
Each format is a `ToolFormat` (parser, renderer, prompt instruction, template markers, special tokens) listed once
in `registry.FORMATS`; `get_format(name).render(calls)` writes calls the way its parser reads them.

Every parser returns all calls in order of position, malformed ones included (see `TOOL_CALL_STATUSES`), never
raises, ignores `<think>...</think>` reasoning, runs in linear time, and ignores input past `MAX_INPUT_CHARS`.

May import `...types` and `...errors` only: parsers read untrusted text and nothing else.
"""

from __future__ import annotations

from ._format import Call, ToolFormat
from ._schema import ToolSchemas
from .auto import AUTO_ORDER, PARSER_CLASSES, AutoParser
from .base import MAX_CALLS, MAX_INPUT_CHARS, ToolParser
from .registry import FORMATS, PARSER_NAMES, detect_format, get_format, normalize_name


def detect_parser_from_template(chat_template: str | None) -> str | None:
    """Recognises the tool-call format a chat template teaches the model.

    Each format of `registry.FORMATS` is checked in order by its template markers: `<tool_call>` with `<function=`
    → `"qwen3_xml"`; `<tool_call>` → `"hermes"`; `[TOOL_CALLS]` → `"mistral"`; `<|python_tag|>` → `"llama3_json"`;
    `<function_calls>` with `<invoke` → `"xml"`.

    Args:
        chat_template (`str`, *optional*): The tokenizer's chat template (Jinja source).

    Returns:
        `str | None`: The parser name, or `None` when the template is missing or not recognised.
    """
    detected = detect_format(chat_template)
    return detected.name if detected is not None else None


def get_parser(name: str, *, chat_template: str | None = None, tool_schemas: ToolSchemas | None = None) -> ToolParser:
    """Builds a tool-call parser by name.

    Args:
        name (`str`): One of `PARSER_NAMES` (case-insensitive, `-` accepted for `_`). With `"auto"`, the format is
            detected from `chat_template` when possible, otherwise an `AutoParser` tries every format in the order
            of `AUTO_ORDER`.
        chat_template (`str`, *optional*): The tokenizer's chat template, used by `"auto"`.
        tool_schemas (`Sequence[Mapping[str, Any]]`, *optional*): Tool definitions, OpenAI-style
            `{"type": "function", "function": {"name": ..., "parameters": {...}}}` or bare
            `{"name": ..., "parameters": {...}}` dicts. `qwen3_xml` and `xml` convert text values with the parameter
            types; `function` only accepts calls to these names.

    Returns:
        `ToolParser`: The parser.

    Raises:
        ValueError: If `name` is not a known parser name.
        TypeError: If `tool_schemas` is not a list of dicts.
    """
    key = normalize_name(name)
    if key == "auto":
        detected = detect_format(chat_template)
        if detected is None:
            return AutoParser(tool_schemas=tool_schemas)
        return detected.parser(tool_schemas=tool_schemas)
    return PARSER_CLASSES[key](tool_schemas=tool_schemas)


__all__ = [
    "AUTO_ORDER",
    "FORMATS",
    "MAX_CALLS",
    "MAX_INPUT_CHARS",
    "PARSER_CLASSES",
    "PARSER_NAMES",
    "AutoParser",
    "Call",
    "ToolFormat",
    "ToolParser",
    "detect_parser_from_template",
    "get_format",
    "get_parser",
]
