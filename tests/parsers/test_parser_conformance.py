"""Behaviour every format shares, checked by rendering the same calls in each format and parsing them back."""

from __future__ import annotations

import json
from typing import Any

import pytest

from trl_inference_ext.tools.parsers import get_parser

FORMATS = ("function", "hermes", "json", "llama3_json", "mistral", "qwen3_xml", "xml")

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


def _xml_text(value: Any) -> str:
    raw = value if isinstance(value, str) else json.dumps(value)
    return raw.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def render(fmt: str, calls: list[tuple[str, dict[str, Any]]]) -> str:
    """Writes calls the way a model would in format `fmt`."""
    if fmt == "hermes":
        return "\n".join(
            f"<tool_call>\n{json.dumps({'name': n, 'arguments': a}, ensure_ascii=False)}\n</tool_call>"
            for n, a in calls
        )
    if fmt == "json":
        return "\n".join(json.dumps({"tool": n, "arguments": a}, ensure_ascii=False) for n, a in calls)
    if fmt == "llama3_json":
        return "<|python_tag|>" + "; ".join(json.dumps({"name": n, "parameters": a}) for n, a in calls)
    if fmt == "mistral":
        return "[TOOL_CALLS]" + json.dumps([{"name": n, "arguments": a} for n, a in calls], ensure_ascii=False)
    if fmt == "qwen3_xml":
        blocks = []
        for name, arguments in calls:
            params = "".join(
                f"<parameter={k}>\n{v if isinstance(v, str) else json.dumps(v)}\n</parameter>\n"
                for k, v in arguments.items()
            )
            blocks.append(f"<tool_call>\n<function={name}>\n{params}</function>\n</tool_call>")
        return "\n".join(blocks)
    if fmt == "xml":
        invokes = "".join(
            f'<invoke name="{n}">'
            + "".join(f'<parameter name="{k}">{_xml_text(v)}</parameter>' for k, v in a.items())
            + "</invoke>"
            for n, a in calls
        )
        return f"<function_calls>\n{invokes}\n</function_calls>"
    if fmt == "function":
        return "[" + ", ".join(f"{n}({', '.join(f'{k}={v!r}' for k, v in a.items())})" for n, a in calls) + "]"
    raise ValueError(fmt)


def _named(calls: list[Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(call.name, call.arguments) for call in calls]


@pytest.mark.parametrize("fmt", FORMATS)
def test_no_call(parse, fmt):
    assert parse(fmt, "") == []
    assert parse(fmt, "The answer is 4. No tool is needed (really) — see [docs](https://x.y) or {this}.") == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_one_call(parse, fmt):
    text = render(fmt, [("search", {"query": "Python tutorials"})])
    calls = parse(fmt, text)
    assert _named(calls) == [("search", {"query": "Python tutorials"})]
    assert calls[0].ok and calls[0].error is None


@pytest.mark.parametrize("fmt", FORMATS)
def test_parallel_calls(parse, fmt):
    expected = [("search", {"query": "a"}), ("get_weather", {"city": "Paris"}), ("clock", {})]
    calls = parse(fmt, render(fmt, expected))
    assert _named(calls) == expected
    assert all(call.ok for call in calls)
    assert calls[0].end_pos <= calls[1].start_pos and calls[1].end_pos <= calls[2].start_pos


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    "arguments", [ALL_TYPES, NESTED, ESCAPED, UNICODE, {}], ids=["types", "nested", "escaped", "unicode", "empty"]
)
def test_argument_values_round_trip(parse, fmt, arguments):
    calls = parse(fmt, render(fmt, [("tool", arguments)]))
    assert _named(calls) == [("tool", arguments)]


@pytest.mark.parametrize("fmt", FORMATS)
def test_value_types_are_preserved(parse, fmt):
    (call,) = parse(fmt, render(fmt, [("tool", ALL_TYPES)]))
    for key, value in ALL_TYPES.items():
        assert type(call.arguments[key]) is type(value), key


@pytest.mark.parametrize("fmt", FORMATS)
def test_surrounding_text(parse, fmt):
    call_text = render(fmt, [("search", {"query": "x"})])
    text = f"Let me look that up (it's quick).\n\n{call_text}\n\nI'll wait for the result: done."
    (call,) = parse(fmt, text)
    assert call.name == "search" and call.arguments == {"query": "x"}
    assert text.index(call.raw_text) == call.start_pos


@pytest.mark.parametrize("fmt", FORMATS)
def test_calls_inside_think_are_ignored(parse, fmt):
    draft = render(fmt, [("draft", {"query": "ignored"})])
    final = render(fmt, [("search", {"query": "kept"})])
    text = f"<think>\nMaybe {draft}?\n</think>\n{final}"
    calls = parse(fmt, text)
    assert _named(calls) == [("search", {"query": "kept"})]
    assert calls[0].start_pos > text.index("</think>")


@pytest.mark.parametrize("fmt", FORMATS)
def test_unclosed_think_hides_the_rest(parse, fmt):
    text = "<think>\n" + render(fmt, [("search", {"query": "x"})])
    assert parse(fmt, text) == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_offsets_with_think_and_unicode_before_calls(parse, fmt):
    prefix = "日本語 ☕ <think>draft</think> naïve\n"
    calls = render(fmt, [("a", {"x": "é"}), ("b", {"y": 2})])
    text = prefix + calls + "\n☕"
    parsed = parse(fmt, text)
    assert [call.name for call in parsed] == ["a", "b"]
    for call in parsed:
        assert text[call.start_pos : call.end_pos] == call.raw_text
        assert call.start_pos >= len(prefix)


@pytest.mark.parametrize("fmt", FORMATS)
def test_auto_parser_reads_every_format(parse, fmt):
    expected = [("search", {"query": "a", "n": 2}), ("clock", {})]
    calls = parse("auto", render(fmt, expected))
    assert _named(calls) == expected


@pytest.mark.parametrize("fmt", FORMATS)
def test_parse_never_raises_on_odd_input(fmt):
    parser = get_parser(fmt)
    for text in (None, 5, b"bytes", "\x00", "<", "{", "(", "[TOOL_CALLS]", "<tool_call>", "<invoke", "\ud800"):
        assert isinstance(parser.parse(text, strict=True), list)  # type: ignore[arg-type]
