"""Property-based tests of the tool-call parsers: random text built from fragments of every format.

Whatever the input, every parser returns a list of `ToolCall`s in order, with `text[start:end] == raw_text`, known
statuses, and a non-empty name and a dict of arguments for every `ok` call; JSON arguments round-trip exactly. Every
parse is strict (`parse(text, strict=True)`), so a parser that raises fails these tests instead of returning no calls.
"""

from __future__ import annotations

import json
import keyword
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trl_inference_ext.tools.parsers import PARSER_NAMES, get_format, get_parser
from trl_inference_ext.types import TOOL_CALL_STATUSES, ToolCall

FRAGMENTS = [
    "{", "}", "[", "]", "(", ")", '"', "'", "\\", "=", ":", ",", ";", " ", "\n", "<", ">", "/",
    "<tool_call>", "</tool_call>", "<function=", "<function=f>", "</function>", "<parameter=", "<parameter=x>",
    "</parameter>", "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]", "<think>", "</think>", "<|python_tag|>",
    "<invoke", '<invoke name="f">', "<invoke>", "</invoke>", '<parameter name="x">', "<parameters>", "</parameters>",
    "<tool_name>", "</tool_name>", "<function_calls>", "<![CDATA[", "]]>", "&amp;", "&#x41;",
    '"name"', '"tool"', '"arguments"', '"parameters"', '"function"', '"x"', '\\"', "search", "f", "a=", "a.b",
    "true", "false", "null", "None", "1", "-2.5", "1e5", "NaN", "{}", "[]", "()", "é", "☕", "\x00", "```json\n",
]  # fmt: skip

fragment_text = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=4)), max_size=80).map("".join)

SCHEMAS = [{"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}]
PARSERS = {name: get_parser(name) for name in PARSER_NAMES}
PARSERS_WITH_SCHEMAS = {name: get_parser(name, tool_schemas=SCHEMAS) for name in PARSER_NAMES}


def check(text: str, calls: list[ToolCall]) -> None:
    assert isinstance(calls, list)
    previous = -1
    for call in calls:
        assert isinstance(call, ToolCall)
        assert text[call.start_pos : call.end_pos] == call.raw_text
        assert call.start_pos >= previous
        previous = call.start_pos
        assert call.status in TOOL_CALL_STATUSES
        assert isinstance(call.arguments, dict)
        if call.ok:
            assert isinstance(call.name, str) and call.name
        else:
            assert isinstance(call.error, str) and call.error


@pytest.mark.parametrize("name", PARSER_NAMES)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=fragment_text)
def test_fragment_soup_never_breaks_a_parser(name, text):
    check(text, PARSERS[name].parse(text, strict=True))
    check(text, PARSERS_WITH_SCHEMAS[name].parse(text, strict=True))


@pytest.mark.parametrize("name", PARSER_NAMES)
@settings(max_examples=100, deadline=None)
@given(text=st.text(max_size=300))
def test_arbitrary_text_never_breaks_a_parser(name, text):
    check(text, PARSERS[name].parse(text, strict=True))


# Argument strings may hold the formats' own markup; only reasoning tags are left out (they are blanked everywhere).
json_strings = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=12),
    st.sampled_from(["</tool_call>", "<tool_call>", "[TOOL_CALLS]", '"}]', "\\", "f(x=1)", "{", "]"]),
).filter(lambda value: "think>" not in value)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**12), 10**12)
    | st.floats(allow_nan=False, allow_infinity=False)
    | json_strings,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(json_strings, children, max_size=4),
    max_leaves=8,
)
identifiers = st.from_regex(r"[a-z_][a-z0-9_]{0,10}", fullmatch=True).filter(lambda name: not keyword.iskeyword(name))
arguments = st.dictionaries(identifiers, json_values, max_size=5)
calls = st.lists(st.tuples(identifiers, arguments), min_size=1, max_size=3)


def render(fmt: str, parsed: list[tuple[str, dict[str, Any]]]) -> str:
    """The format's own renderer; `mistral_v11` is Mistral's other layout, `[TOOL_CALLS]name[ARGS]{...}` per call."""
    if fmt == "mistral_v11":
        return "".join(f"[TOOL_CALLS]{n}[ARGS]{json.dumps(a)}" for n, a in parsed)
    return get_format(fmt).render(parsed)


@pytest.mark.parametrize("fmt", ["hermes", "json", "llama3_json", "mistral", "mistral_v11", "function"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(parsed=calls, prefix=st.sampled_from(["", "Sure! ", "Let me check (quickly).\n"]))
def test_rendered_calls_round_trip(fmt, parsed, prefix):
    text = prefix + render(fmt, parsed)
    result = PARSERS[fmt.split("_v")[0]].parse(text, strict=True)
    check(text, result)
    assert [(call.name, call.arguments, call.status) for call in result] == [(n, a, "ok") for n, a in parsed]
