"""Helpers shared by the tool-call parser tests.

Parsers swallow their own exceptions in `ToolParser.parse` (logged, no calls returned), which would let a crashing
parser pass every test that expects no calls. So the `parse` fixture parses with `strict=True`, and an autouse
fixture fails any test during which a parser logged that it failed (tests that provoke it on purpose request
`parser_failure_expected`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import pytest

from trl_inference_ext.tools.parsers import ToolParser, base, get_parser
from trl_inference_ext.types import TOOL_CALL_STATUSES, ToolCall

FAILURE_MESSAGE = "tool parser failed"
"""Part of the warning `ToolParser.parse` logs when a parser raised."""


def parser_failures(records: list[logging.LogRecord]) -> list[logging.LogRecord]:
    """The records of `records` that report a parser exception."""
    return [r for r in records if r.name == base.logger.name and FAILURE_MESSAGE in r.getMessage()]


@pytest.fixture
def parser_failure_expected() -> bool:
    """Requested by a test that makes a parser fail on purpose, to turn off `_fail_on_parser_failure`."""
    return True


@pytest.fixture(autouse=True)
def _fail_on_parser_failure(request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    yield
    if "parser_failure_expected" in request.fixturenames:
        return
    failures = parser_failures(caplog.get_records("call"))
    if failures:
        pytest.fail(f"a tool parser raised: {failures[0].getMessage()}", pytrace=False)


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
    """`parse(parser_or_name, text, **get_parser_kwargs)`: parses strictly (exceptions propagate), checks invariants."""

    def _parse(parser: str | ToolParser, text: str, **kwargs: object) -> list[ToolCall]:
        tool_parser = get_parser(parser, **kwargs) if isinstance(parser, str) else parser  # type: ignore[arg-type]
        return check_calls(text, tool_parser.parse(text, strict=True))

    return _parse
