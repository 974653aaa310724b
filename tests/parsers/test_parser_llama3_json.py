"""The `llama3_json` format: `<|python_tag|>` and `{"name": ..., "parameters": ...}` objects."""

from __future__ import annotations


def test_python_tag_and_semicolons(parse):
    text = '<|python_tag|>{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {"y": "z"}}'
    a, b = parse("llama3_json", text)
    assert (a.name, a.arguments, b.name, b.arguments) == ("a", {"x": 1}, "b", {"y": "z"})
    assert a.raw_text == '{"name": "a", "parameters": {"x": 1}}'


def test_newline_separated_without_tag(parse):
    text = '{"name": "a", "parameters": {}}\n{"name": "b", "arguments": {"k": [1, 2]}}'
    assert [(c.name, c.arguments) for c in parse("llama3_json", text)] == [("a", {}), ("b", {"k": [1, 2]})]


def test_tool_key_is_not_a_name(parse):
    (call,) = parse("llama3_json", '{"tool": "a", "parameters": {}}')
    assert call.status == "missing_name"


def test_unclosed_first_call_does_not_hide_the_second(parse):
    text = '{"name": "a", "parameters": {"x": 1} ; {"name": "b", "parameters": {}}'
    calls = parse("llama3_json", text)
    assert [(c.name, c.status) for c in calls] == [("a", "unclosed"), ("b", "ok")]
    assert calls[0].end_pos <= calls[1].start_pos


def test_malformed_sibling(parse):
    text = '<|python_tag|>{"name": "a", "parameters": {"x": }}; {"name": "b", "parameters": {}}'
    assert [(c.name, c.status) for c in parse("llama3_json", text)] == [("a", "invalid_json"), ("b", "ok")]
