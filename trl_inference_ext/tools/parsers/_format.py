"""`ToolFormat`: everything the package knows about one tool-call format, defined next to the format's parser."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .base import ToolParser

Call = tuple[str, Mapping[str, Any]]
"""A tool call to render: `(name, arguments)`."""


@dataclass(frozen=True)
class ToolFormat:
    """One tool-call format: its parser, how prompts describe it, how to write calls in it, how to recognise it.

    Each format module defines one (`FORMAT`) and `registry.FORMATS` lists them all; prompts, the worked examples of
    the tasks, the tokens kept when decoding, the tests and the parsing benchmark all read them from there.

    Attributes:
        parser (`type[ToolParser]`): The parser class; its `name` is the format's name.
        render (`Callable[[Sequence[tuple[str, Mapping[str, Any]]]], str]`): Writes calls as a model would in this
            format. It is the inverse of the parser: `parse(render(calls))` gives back the same names and arguments,
            with status `ok`, for every call in the format's domain (see each renderer); it raises `ValueError` for a
            name the format cannot write.
        instruction (`str`): The call layout shown to a model in a prompt, with placeholders in angle brackets.
        template_markers (`tuple[str, ...]`): Strings that all occur in a chat template that teaches this format
            (empty: never detected from a template).
        special_tokens (`tuple[str, ...]`): Tokens of the format that tokenizers may mark special and that decoding
            must keep, since the parser needs them.
    """

    parser: type[ToolParser]
    render: Callable[[Sequence[Call]], str]
    instruction: str
    template_markers: tuple[str, ...] = ()
    special_tokens: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """The format's name, as `get_parser` and `tool_parser=` accept it."""
        return self.parser.name


def dump_json(value: Any) -> str:
    """JSON text of `value` as the renderers write it (non-ASCII characters kept as they are).

    Args:
        value (`Any`): A JSON-compatible value.
    """
    return json.dumps(value, ensure_ascii=False)
