"""The interface every tool-call parser implements, and the guards they all share.

Parsers run on untrusted model output, so `ToolParser.parse` never raises: it caps the input size, hides reasoning
(`<think>...</think>`) from the format-specific `_parse`, sorts the calls by position, caps their number, and turns
any unexpected exception into an empty result (logged). `parse(text, strict=True)` does the same but lets such an
exception propagate: tests and benchmarks use it, so that a parser bug fails them instead of passing as "no calls".
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import ClassVar

from ...types import ToolCall
from ._scan import blank_think
from ._schema import ToolSchemas, index_tool_schemas

logger = logging.getLogger(__name__)

MAX_INPUT_CHARS = 4 * 1024 * 1024
"""Longest text parsed (4 Mi characters); anything beyond is ignored, as if the output had been truncated there."""

MAX_CALLS = 4096
"""Most calls returned for one text; later ones are ignored. Bounds the work an adversarial output can cause."""


class ToolParser(ABC):
    """Finds the tool calls of one format in model output.

    Subclasses set `name` and implement `_parse`, which receives the original text and a copy where reasoning is
    blanked with spaces (same length, so offsets agree) and returns the calls in any order.

    Args:
        tool_schemas (`Sequence[Mapping[str, Any]]`, *optional*): Tool definitions (OpenAI-style
            `{"type": "function", "function": {...}}` or bare `{"name": ..., "parameters": ...}` dicts). Parsers
            that need them use the names (to tell calls from prose) or the parameter types (to convert text values).
    """

    name: ClassVar[str] = ""

    def __init__(self, *, tool_schemas: ToolSchemas | None = None) -> None:
        self.tool_properties = index_tool_schemas(tool_schemas)

    def parse(self, text: str, *, strict: bool = False) -> list[ToolCall]:
        """Returns every tool call in `text`, in order of position.

        Malformed calls are included with their `status` and `error`; valid calls next to them are kept. Text
        inside `<think>...</think>` is ignored, and so is text past `MAX_INPUT_CHARS`.

        Args:
            text (`str`): The model output (anything else gives no calls).
            strict (`bool`, *optional*, defaults to `False`): Let an exception raised inside the parser propagate.
                By default it is logged as a warning and no calls are returned, so that a parser bug can never stop
                a training run; tests and benchmarks pass `strict=True` so that such a bug fails them.

        Returns:
            `list[ToolCall]`: The calls, with `text[call.start_pos:call.end_pos] == call.raw_text`.

        Raises:
            Exception: Only with `strict=True`, whatever the parser raised (never on well-behaved code: malformed
                model output is reported through the calls' `status`, not by raising).
        """
        if not isinstance(text, str) or not text:
            return []
        text = text[:MAX_INPUT_CHARS]
        if strict:
            calls = self._parse(text, blank_think(text))
        else:
            try:
                calls = self._parse(text, blank_think(text))
            except Exception:
                logger.warning("The %r tool parser failed; returning no calls.", self.name, exc_info=True)
                return []
        calls.sort(key=lambda call: call.start_pos)
        return calls[:MAX_CALLS]

    @abstractmethod
    def _parse(self, text: str, view: str) -> list[ToolCall]:
        """Finds the calls of this format.

        Args:
            text (`str`): The original text (slice `raw_text` from it).
            view (`str`): The same text with reasoning regions replaced by spaces (scan this one).

        Returns:
            `list[ToolCall]`: The calls found, in any order.
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
