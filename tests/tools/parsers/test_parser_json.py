"""The `json` format: bare JSON call objects in prose."""

from __future__ import annotations

import json


def test_seed_form(parse):
    text = 'I will search. {"tool": "search", "arguments": {"query": "Python tutorials", "max_results": 5}} Done.'
    (call,) = parse("json", text)
    assert call.ok and call.name == "search"
    assert call.arguments == {"query": "Python tutorials", "max_results": 5}
    assert call.raw_text == '{"tool": "search", "arguments": {"query": "Python tutorials", "max_results": 5}}'


def test_name_and_parameters_keys(parse):
    (a, b) = parse("json", '{"name": "a", "arguments": {"x": 1}}\n{"name": "b", "parameters": {"y": 2}}')
    assert (a.name, a.arguments, b.name, b.arguments) == ("a", {"x": 1}, "b", {"y": 2})


def test_list_of_calls_gets_one_span_per_call(parse):
    text = '[{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"q": [1, {"z": null}]}}]'
    a, b = parse("json", text)
    assert a.raw_text == '{"name": "a", "arguments": {}}'
    assert b.raw_text == '{"name": "b", "arguments": {"q": [1, {"z": null}]}}'
    assert b.arguments == {"q": [1, {"z": None}]}


def test_fenced_block(parse):
    text = 'Calling:\n```json\n{"name": "search", "arguments": {"query": "x"}}\n```\nthen wait.'
    (call,) = parse("json", text)
    assert call.ok and call.arguments == {"query": "x"}


def test_objects_that_are_not_calls_are_prose(parse):
    text = (
        'Config: {"retries": 3, "mode": "fast"}; person {"name": "John", "age": 30}; '
        'schema {"name": "search", "description": "Search", "parameters": {"type": "object"}}; [1, 2, {"a": [3]}]'
    )
    assert parse("json", text) == []


def test_name_only_object_is_a_call_without_arguments(parse):
    (call,) = parse("json", 'Now {"name": "get_time"} please')
    assert call.ok and call.name == "get_time" and call.arguments == {}


def test_arguments_without_name_is_missing_name(parse):
    (call,) = parse("json", 'x {"arguments": {"q": 1}} y')
    assert call.status == "missing_name" and call.name == "" and call.error


def test_non_string_name_is_missing_name(parse):
    (call,) = parse("json", '{"name": 42, "arguments": {}}')
    assert call.status == "missing_name"


def test_arguments_as_json_string_are_decoded(parse):
    (call,) = parse("json", json.dumps({"name": "f", "arguments": json.dumps({"a": 1, "b": [True]})}))
    assert call.ok and call.arguments == {"a": 1, "b": [True]}


def test_blank_or_null_arguments_are_empty(parse):
    a, b = parse("json", '{"name": "a", "arguments": ""} {"name": "b", "arguments": null}')
    assert a.ok and b.ok and a.arguments == {} == b.arguments


def test_arguments_that_are_not_an_object(parse):
    calls = parse(
        "json",
        '{"name": "a", "arguments": [1]} {"name": "b", "arguments": "not json"} {"name": "c", "arguments": "[1]"}',
    )
    assert [c.status for c in calls] == ["invalid_arguments"] * 3
    assert [c.name for c in calls] == ["a", "b", "c"]


def test_invalid_json_is_reported_and_valid_sibling_kept(parse):
    text = '{"name": "bad", "arguments": {"x": 1,}}\n{"name": "good", "arguments": {"y": 2}}'
    bad, good = parse("json", text)
    assert bad.status == "invalid_json" and bad.name == "bad" and bad.arguments == {}
    assert good.ok and good.arguments == {"y": 2}


def test_list_with_a_broken_call_keeps_the_others(parse):
    text = '[{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"x": tru}}, {"name": "c", "arguments": {}}]'
    calls = parse("json", text)
    assert [(c.name, c.status) for c in calls] == [("a", "ok"), ("b", "invalid_json"), ("c", "ok")]


def test_unclosed_call_at_the_end(parse):
    text = 'Sure {"name": "ok", "arguments": {}} and {"name": "search", "arguments": {"query": "Pyth'
    ok, unclosed = parse("json", text)
    assert ok.ok
    assert unclosed.status == "unclosed" and unclosed.name == "search"
    assert unclosed.raw_text == '{"name": "search", "arguments": {"query": "Pyth'


def test_stray_brace_in_prose_does_not_hide_a_call(parse):
    text = 'Use { for blocks. {"name": "f", "arguments": {"a": "}"}}'
    (call,) = parse("json", text)
    assert call.ok and call.arguments == {"a": "}"}


def test_unmatched_closers_and_quotes_in_prose(parse):
    text = 'He said "hi} ] and left. It\'s {"name": "f", "arguments": {"s": "a\\"b"}} ok'
    (call,) = parse("json", text)
    assert call.arguments == {"s": 'a"b'}


def test_openai_style_function_object(parse):
    text = '{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\\"a\\": 1}"}}'
    (call,) = parse("json", text)
    assert call.ok and call.name == "f" and call.arguments == {"a": 1}


def test_call_nested_in_prose_brackets_is_found(parse):
    (call,) = parse("json", 'Options [see {"name": "f", "arguments": {}} here] end')
    assert call.name == "f" and call.ok


def test_nan_is_not_json(parse):
    (call,) = parse("json", '{"name": "f", "arguments": {"x": NaN}}')
    assert call.status == "invalid_json"


def test_deep_nesting_is_invalid_not_a_crash(parse):
    text = '{"name": "f", "arguments": {"x": ' + "[" * 5000 + "]" * 5000 + "}}"
    (call,) = parse("json", text)
    assert call.status == "invalid_json" and call.name == "f"
