"""The `mistral` format: `[TOOL_CALLS][...]` lists and `[TOOL_CALLS]name{...}` calls."""

from __future__ import annotations


def test_list_form(parse):
    text = '[TOOL_CALLS][{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}]'
    a, b = parse("mistral", text)
    assert (a.name, a.arguments, b.name) == ("a", {"x": 1}, "b")
    assert a.raw_text == '{"name": "a", "arguments": {"x": 1}}'


def test_name_form_and_repeated_markers(parse):
    text = '[TOOL_CALLS]search{"query": "x"}[TOOL_CALLS]clock{}'
    a, b = parse("mistral", text)
    assert (a.name, a.arguments, a.raw_text) == ("search", {"query": "x"}, 'search{"query": "x"}')
    assert (b.name, b.arguments) == ("clock", {})


def test_args_and_call_id_tokens(parse):
    text = '[TOOL_CALLS]search[CALL_ID]a1B2c3D4e[ARGS]{"query": "x"} [TOOL_CALLS]clock[ARGS]{}'
    assert [(c.name, c.arguments) for c in parse("mistral", text)] == [("search", {"query": "x"}), ("clock", {})]


def test_several_name_calls_after_one_marker(parse):
    text = '[TOOL_CALLS]a{"x": 1} b{"y": 2}'
    assert [(c.name, c.arguments) for c in parse("mistral", text)] == [("a", {"x": 1}), ("b", {"y": 2})]


def test_text_after_the_calls_is_ignored(parse):
    text = '[TOOL_CALLS][{"name": "a", "arguments": {}}] I have called {"name": "x"}'
    assert [c.name for c in parse("mistral", text)] == ["a"]
    text = '[TOOL_CALLS]a{"x": 1} I am done.'
    assert [c.name for c in parse("mistral", text)] == ["a"]


def test_malformed_element_keeps_siblings(parse):
    text = '[TOOL_CALLS][{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"x": }}, {"name": "c", "arguments": {}}]'
    assert [(c.name, c.status) for c in parse("mistral", text)] == [("a", "ok"), ("b", "invalid_json"), ("c", "ok")]


def test_invalid_json_in_name_form(parse):
    text = '[TOOL_CALLS]a{"x": tru}[TOOL_CALLS]b{"y": 1}'
    assert [(c.name, c.status) for c in parse("mistral", text)] == [("a", "invalid_json"), ("b", "ok")]


def test_arguments_that_are_not_an_object(parse):
    (call,) = parse("mistral", '[TOOL_CALLS][{"name": "a", "arguments": [1]}]')
    assert call.status == "invalid_arguments"
    ok, bad = parse("mistral", '[TOOL_CALLS][{"name": "a", "arguments": {}}, 7]')
    assert ok.ok and bad.status == "invalid_json" and bad.raw_text == "7"


def test_unclosed_list_and_unclosed_name_form(parse):
    calls = parse("mistral", '[TOOL_CALLS][{"name": "a", "arguments": {}}, {"name": "b", "argu')
    assert [(c.name, c.status) for c in calls] == [("a", "ok"), ("b", "unclosed")]
    (call,) = parse("mistral", '[TOOL_CALLS]search{"query": "Pyth')
    assert call.status == "unclosed" and call.name == "search"
    (call,) = parse("mistral", "[TOOL_CALLS]search")
    assert call.status == "unclosed"
    (call,) = parse("mistral", "Done. [TOOL_CALLS]")
    assert call.status == "unclosed" and call.raw_text == "[TOOL_CALLS]"


def test_missing_name(parse):
    (call,) = parse("mistral", '[TOOL_CALLS][{"arguments": {"x": 1}}]')
    assert call.status == "missing_name"
    (call,) = parse("mistral", "[TOOL_CALLS] 123 nonsense")
    assert call.status == "missing_name"


def test_garbage_list(parse):
    (call,) = parse("mistral", "[TOOL_CALLS][oops]")
    assert call.status == "invalid_json"


def test_arguments_string_is_decoded(parse):
    (call,) = parse("mistral", '[TOOL_CALLS][{"name": "a", "arguments": "{\\"x\\": 1}"}]')
    assert call.ok and call.arguments == {"x": 1}


def test_markers_inside_json_strings_do_not_split_calls(parse):
    text = '[TOOL_CALLS][{"name": "a", "arguments": {"s": "[TOOL_CALLS]x"}}][TOOL_CALLS]b{"t": "[TOOL_CALLS]"}'
    assert [(c.name, c.arguments) for c in parse("mistral", text)] == [
        ("a", {"s": "[TOOL_CALLS]x"}),
        ("b", {"t": "[TOOL_CALLS]"}),
    ]


def test_prose_between_the_marker_and_the_list_is_skipped(parse):
    calls_json = '[{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}]'
    for prose in (" Calling them now: ", "\nSure, here are the calls:\n", " I'll use two tools (a and b) -> "):
        text = f"[TOOL_CALLS]{prose}{calls_json}"
        calls = parse("mistral", text)
        assert [(c.name, c.arguments, c.status) for c in calls] == [("a", {"x": 1}, "ok"), ("b", {}, "ok")]
        assert calls[0].start_pos == text.index('{"name": "a"')


def test_prose_before_a_single_call_object_is_skipped(parse):
    (call,) = parse("mistral", '[TOOL_CALLS] Here you go: {"name": "search", "arguments": {"query": "x"}} done')
    assert (call.name, call.arguments, call.status) == ("search", {"query": "x"}, "ok")


def test_prose_then_a_list_then_another_marker(parse):
    text = '[TOOL_CALLS] Now: [{"name": "a", "arguments": {"s": "[TOOL_CALLS]"}}] [TOOL_CALLS]b{"y": 2}'
    assert [(c.name, c.arguments) for c in parse("mistral", text)] == [("a", {"s": "[TOOL_CALLS]"}), ("b", {"y": 2})]


def test_prose_without_json_after_the_marker_is_still_missing_its_call(parse):
    (call,) = parse("mistral", "[TOOL_CALLS] Calling them now, stand by.")
    assert not call.ok and call.arguments == {}
    (call,) = parse("mistral", "[TOOL_CALLS] Now: [link](url)")
    assert not call.ok
