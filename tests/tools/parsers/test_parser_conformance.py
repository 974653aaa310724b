"""Behaviour every registered format shares, checked by rendering the same calls with each format's renderer."""

from __future__ import annotations

from typing import Any

import pytest

from trl_inference_ext.tools.parsers import FORMATS, get_format, get_parser

FORMAT_NAMES = [tool_format.name for tool_format in FORMATS]

ALL_TYPES = {
    "query": "Python tutorials",
    "max_results": 5,
    "temperature": 0.7,
    "negative": -3,
    "verbose": True,
    "strict": False,
    "cursor": None,
    "tags": ["a", 1, False],
    "filters": {"lang": "en", "years": [2020, 2024]},
}
NESTED = {"config": {"search": {"engine": "web", "limits": {"depth": 2, "domains": ["a.org", "b.org"]}}}}
ESCAPED = {"text": 'say "hi" to C:\\temp\\new and a {brace} [bracket] (paren) </tag>'}
UNICODE = {"text": "naïve café ☕ 日本語 — ünïcødé"}


def render(fmt: str, calls: list[tuple[str, dict[str, Any]]]) -> str:
    """Writes calls the way a model would in format `fmt` (the format's own renderer)."""
    return get_format(fmt).render(calls)


_JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}


def schemas_for(calls: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Tool schemas declaring the type of every argument of `calls`.

    Formats that carry values as text (`qwen3_xml`) read them as the string written unless a schema gives a type.
    """
    properties: dict[str, dict[str, Any]] = {}
    for name, arguments in calls:
        types = {key: {"type": _JSON_TYPES.get(type(value), "null")} for key, value in arguments.items()}
        properties.setdefault(name, {}).update(types)
    return [{"name": name, "parameters": {"type": "object", "properties": p}} for name, p in properties.items()]


def _named(calls: list[Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(call.name, call.arguments) for call in calls]


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_no_call(parse, fmt):
    assert parse(fmt, "") == []
    assert parse(fmt, "The answer is 4. No tool is needed (really) — see [docs](https://x.y) or {this}.") == []


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_one_call(parse, fmt):
    text = render(fmt, [("search", {"query": "Python tutorials"})])
    calls = parse(fmt, text)
    assert _named(calls) == [("search", {"query": "Python tutorials"})]
    assert calls[0].ok and calls[0].error is None


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_parallel_calls(parse, fmt):
    expected = [("search", {"query": "a"}), ("get_weather", {"city": "Paris"}), ("clock", {})]
    calls = parse(fmt, render(fmt, expected))
    assert _named(calls) == expected
    assert all(call.ok for call in calls)
    assert calls[0].end_pos <= calls[1].start_pos and calls[1].end_pos <= calls[2].start_pos


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
@pytest.mark.parametrize(
    "arguments", [ALL_TYPES, NESTED, ESCAPED, UNICODE, {}], ids=["types", "nested", "escaped", "unicode", "empty"]
)
def test_argument_values_round_trip(parse, fmt, arguments):
    calls = parse(fmt, render(fmt, [("tool", arguments)]), tool_schemas=schemas_for([("tool", arguments)]))
    assert _named(calls) == [("tool", arguments)]


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_value_types_are_preserved(parse, fmt):
    (call,) = parse(fmt, render(fmt, [("tool", ALL_TYPES)]), tool_schemas=schemas_for([("tool", ALL_TYPES)]))
    for key, value in ALL_TYPES.items():
        assert type(call.arguments[key]) is type(value), key


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_surrounding_text(parse, fmt):
    call_text = render(fmt, [("search", {"query": "x"})])
    text = f"Let me look that up (it's quick).\n\n{call_text}\n\nI'll wait for the result: done."
    (call,) = parse(fmt, text)
    assert call.name == "search" and call.arguments == {"query": "x"}
    assert text.index(call.raw_text) == call.start_pos


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_calls_inside_think_are_ignored(parse, fmt):
    draft = render(fmt, [("draft", {"query": "ignored"})])
    final = render(fmt, [("search", {"query": "kept"})])
    text = f"<think>\nMaybe {draft}?\n</think>\n{final}"
    calls = parse(fmt, text)
    assert _named(calls) == [("search", {"query": "kept"})]
    assert calls[0].start_pos > text.index("</think>")


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_unclosed_think_hides_the_rest(parse, fmt):
    text = "<think>\n" + render(fmt, [("search", {"query": "x"})])
    assert parse(fmt, text) == []


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_offsets_with_think_and_unicode_before_calls(parse, fmt):
    prefix = "日本語 ☕ <think>draft</think> naïve\n"
    calls = render(fmt, [("a", {"x": "é"}), ("b", {"y": 2})])
    text = prefix + calls + "\n☕"
    parsed = parse(fmt, text)
    assert [call.name for call in parsed] == ["a", "b"]
    for call in parsed:
        assert text[call.start_pos : call.end_pos] == call.raw_text
        assert call.start_pos >= len(prefix)


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_auto_parser_reads_every_format(parse, fmt):
    expected = [("search", {"query": "a", "n": 2}), ("clock", {})]
    calls = parse("auto", render(fmt, expected), tool_schemas=schemas_for(expected))
    assert _named(calls) == expected


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_parse_never_raises_on_odd_input(fmt):
    parser = get_parser(fmt)
    for text in (None, 5, b"bytes", "\x00", "<", "{", "(", "[TOOL_CALLS]", "<tool_call>", "<invoke", "\ud800"):
        assert isinstance(parser.parse(text, strict=True), list)  # type: ignore[arg-type]
