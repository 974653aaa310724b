"""The registry of tool-call formats: every `ToolFormat`, listed once, and the look-ups built on it.

Prompts (`tools.prompting`), the worked examples of the tasks, the tokens kept when decoding completions
(`tokenization.TOOL_MARKERS`), `get_parser`, the tests and the parsing benchmark all read the formats from here, so
a new format is added by writing its module (parser, renderer, instruction, markers) and listing it in `FORMATS`.
"""

from __future__ import annotations

from ...errors import InvalidValueError
from . import function, hermes, json_format, llama3_json, mistral, qwen3_xml, xml_format
from ._format import ToolFormat
from ._scan import THINK_CLOSE, THINK_OPEN

FORMATS: tuple[ToolFormat, ...] = (
    qwen3_xml.FORMAT,
    hermes.FORMAT,
    mistral.FORMAT,
    llama3_json.FORMAT,
    xml_format.FORMAT,
    json_format.FORMAT,
    function.FORMAT,
)
"""Every format, in the order chat templates are matched against their markers: a format whose markers include
another's comes first (`qwen3_xml` needs `<tool_call>` and `<function=`, `hermes` only `<tool_call>`)."""

FORMATS_BY_NAME: dict[str, ToolFormat] = {tool_format.name: tool_format for tool_format in FORMATS}

AUTO = "auto"
DEFAULT_FORMAT = "hermes"
"""The format `auto` prompts with when the chat template names none (the `auto` parser reads it)."""

PARSER_NAMES: tuple[str, ...] = (AUTO, *sorted(FORMATS_BY_NAME))
"""Every name `get_parser` accepts: `"auto"` and the name of each format."""

REASONING_TOKENS = (THINK_OPEN, THINK_CLOSE)
"""Reasoning markers: not part of any call format, but parsers skip what they enclose, so decoding keeps them."""


def normalize_name(name: str) -> str:
    """Returns the registered spelling of a parser name (case-insensitive, `-` accepted for `_`).

    Args:
        name (`str`): A name from `PARSER_NAMES`, in any case.

    Raises:
        ValueError: If `name` is not a known parser name.
    """
    key = name.strip().lower().replace("-", "_") if isinstance(name, str) else None
    if key not in PARSER_NAMES:
        raise InvalidValueError(f"Unknown `tool_parser` {name!r}; expected one of: {', '.join(PARSER_NAMES)}.")
    return key


def detect_format(chat_template: str | None) -> ToolFormat | None:
    """The format whose markers all occur in a chat template, checked in the order of `FORMATS`.

    Args:
        chat_template (`str`, *optional*): The tokenizer's chat template (Jinja source).

    Returns:
        `ToolFormat | None`: The format, or `None` when the template is missing or not recognised.
    """
    if not isinstance(chat_template, str) or not chat_template:
        return None
    for tool_format in FORMATS:
        markers = tool_format.template_markers
        if markers and all(marker in chat_template for marker in markers):
            return tool_format
    return None


def get_format(name: str, *, chat_template: str | None = None) -> ToolFormat:
    """The format a parser name stands for; `"auto"` is the chat template's format, else `DEFAULT_FORMAT`.

    Args:
        name (`str`): A name from `PARSER_NAMES` (normalised as `normalize_name` does).
        chat_template (`str`, *optional*): The tokenizer's chat template, used for `"auto"`.

    Returns:
        `ToolFormat`: The format.

    Raises:
        ValueError: If `name` is not a known parser name.
    """
    key = normalize_name(name)
    if key == AUTO:
        return detect_format(chat_template) or FORMATS_BY_NAME[DEFAULT_FORMAT]
    return FORMATS_BY_NAME[key]


def marker_tokens() -> frozenset[str]:
    """The special tokens of every format, and the reasoning markers: the tokens decoding must keep."""
    return frozenset(token for tool_format in FORMATS for token in tool_format.special_tokens) | frozenset(
        REASONING_TOKENS
    )
