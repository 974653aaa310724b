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


def test_objects_without_parameters_are_data_not_calls(parse):
    for text in (
        'The user record is {"name": "Alice"} as requested.',
        'Found {"name": "Bob", "age": 41} and {"name": "Carol", "id": "c1", "type": "user"}.',
        '<|python_tag|>{"name": "get_time"}',
        'Broken data {"name": "Dan", "age": } here',
        'Truncated data {"name": "Eve", "age": 3',
    ):
        assert parse("llama3_json", text) == [], text


def test_object_with_parameters_or_arguments_next_to_data_is_a_call(parse):
    text = 'User {"name": "Alice"} -> {"name": "lookup", "parameters": {"user": "Alice"}}'
    (call,) = parse("llama3_json", text)
    assert (call.name, call.arguments, call.status) == ("lookup", {"user": "Alice"}, "ok")
    (call,) = parse("llama3_json", '{"name": "Alice"} {"name": "clock", "arguments": {}}')
    assert (call.name, call.arguments) == ("clock", {})


def test_malformed_call_with_parameters_is_still_reported(parse):
    (call,) = parse("llama3_json", 'Note {"name": "Alice"}. {"name": "f", "parameters": {"x": }}')
    assert (call.name, call.status) == ("f", "invalid_json")
    (call,) = parse("llama3_json", 'Note {"name": "Alice"}. {"name": "f", "parameters": {"x": "trunc')
    assert (call.name, call.status) == ("f", "unclosed")
