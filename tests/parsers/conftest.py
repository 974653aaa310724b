"""Helpers shared by the tool-call parser tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from trl_inference_ext.tools.parsers import ToolParser, get_parser
from trl_inference_ext.types import TOOL_CALL_STATUSES, ToolCall


def check_calls(text: str, calls: list[ToolCall]) -> list[ToolCall]:
    """Asserts the invariants every parser guarantees and returns the calls."""
    assert isinstance(calls, list)
    previous = -1
    for call in calls:
        assert isinstance(call, ToolCall)
        assert text[call.start_pos : call.end_pos] == call.raw_text
        assert 0 <= call.start_pos <= call.end_pos <= len(text)
        assert call.start_pos >= previous, "calls must be sorted by position"
        previous = call.start_pos
        assert call.status in TOOL_CALL_STATUSES
        assert isinstance(call.arguments, dict)
        if call.ok:
            assert isinstance(call.name, str) and call.name
            assert call.error is None
        else:
            assert call.error
    return calls


@pytest.fixture
def parse() -> Callable[..., list[ToolCall]]:
    """`parse(parser_or_name, text, **get_parser_kwargs)`: parses and checks the invariants."""

    def _parse(parser: str | ToolParser, text: str, **kwargs: object) -> list[ToolCall]:
        tool_parser = get_parser(parser, **kwargs) if isinstance(parser, str) else parser  # type: ignore[arg-type]
        return check_calls(text, tool_parser.parse(text))

    return _parse
