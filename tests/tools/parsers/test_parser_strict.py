"""The strict entry point: `parse(text, strict=True)` lets a parser's exception through, `parse(text)` does not."""

from __future__ import annotations

import logging

import pytest

from trl_inference_ext.tools.parsers import ToolParser, base
from trl_inference_ext.types import ToolCall


class RaisingParser(ToolParser):
    """A deliberately broken parser: `_parse` raises on every input."""

    name = "raising"

    def _parse(self, text: str, view: str) -> list[ToolCall]:
        raise RuntimeError(f"broken parser on {len(text)} characters")


def test_strict_parse_raises():
    with pytest.raises(RuntimeError, match="broken parser"):
        RaisingParser().parse("any text", strict=True)


def test_default_parse_returns_no_calls_and_logs(caplog, parser_failure_expected):
    with caplog.at_level(logging.WARNING):
        assert RaisingParser().parse("any text") == []
    (record,) = [r for r in caplog.records if r.name == base.logger.name]
    assert "tool parser failed" in record.getMessage()
    assert record.levelno == logging.WARNING and "'raising'" in record.getMessage()
    assert record.exc_info is not None and isinstance(record.exc_info[1], RuntimeError)


def test_non_text_input_gives_no_calls_even_when_strict():
    parser = RaisingParser()
    for value in (None, "", 5, b"bytes"):
        assert parser.parse(value, strict=True) == []  # type: ignore[arg-type]


def test_strict_parse_of_a_real_parser_matches_the_default():
    from trl_inference_ext.tools.parsers import get_parser

    parser = get_parser("hermes")
    text = '<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>'
    assert parser.parse(text, strict=True) == parser.parse(text)
