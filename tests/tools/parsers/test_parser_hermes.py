"""The `hermes` format: `<tool_call>{json}</tool_call>` blocks (Hermes, Qwen2.5, Qwen3)."""

from __future__ import annotations

BLOCK = '<tool_call>\n{"name": "search", "arguments": {"query": "x"}}\n</tool_call>'


def test_block_is_the_raw_text(parse):
    (call,) = parse("hermes", f"Let me check.\n{BLOCK}")
    assert call.raw_text == BLOCK and call.ok


def test_malformed_block_keeps_valid_siblings(parse):
    text = f'{BLOCK}\n<tool_call>\n{{"name": "bad", "arguments": {{oops}}}}\n</tool_call>\n{BLOCK}'
    calls = parse("hermes", text)
    assert [(c.name, c.status) for c in calls] == [("search", "ok"), ("bad", "invalid_json"), ("search", "ok")]
    assert calls[1].raw_text.startswith("<tool_call>") and calls[1].raw_text.endswith("</tool_call>")


def test_unclosed_final_block_with_complete_json_is_ok(parse):
    text = '<tool_call>\n{"name": "search", "arguments": {"query": "x"}}\n'
    (call,) = parse("hermes", text)
    assert call.ok and call.arguments == {"query": "x"}
    assert call.raw_text == text.rstrip()


def test_unclosed_final_block_with_incomplete_json(parse):
    text = f'{BLOCK}\n<tool_call>\n{{"name": "search", "arguments": {{"query": "Pyt'
    ok, unclosed = parse("hermes", text)
    assert ok.ok
    assert unclosed.status == "unclosed" and unclosed.name == "search" and unclosed.error


def test_unclosed_block_followed_by_another_block(parse):
    text = '<tool_call>{"name": "a", "arguments": {}}\n<tool_call>{"name": "b", "arguments": {}}</tool_call>'
    a, b = parse("hermes", text)
    assert a.ok and b.ok and a.end_pos <= b.start_pos


def test_empty_and_non_json_blocks(parse):
    empty, prose, unclosed = parse("hermes", "<tool_call>\n</tool_call> <tool_call>call search</tool_call> <tool_call>")
    assert empty.status == "invalid_json" and prose.status == "invalid_json"
    assert unclosed.status == "unclosed" and unclosed.raw_text == "<tool_call>"


def test_missing_name_and_bad_arguments(parse):
    text = (
        '<tool_call>{"arguments": {"q": 1}}</tool_call><tool_call>{"name": "f", "arguments": 3}</tool_call>'
        "<tool_call>{}</tool_call><tool_call>[1]</tool_call>"
    )
    calls = parse("hermes", text)
    assert [c.status for c in calls] == ["missing_name", "invalid_arguments", "missing_name", "invalid_json"]


def test_arguments_string_is_decoded(parse):
    (call,) = parse("hermes", '<tool_call>{"name": "f", "arguments": "{\\"a\\": [1, 2]}"}</tool_call>')
    assert call.ok and call.arguments == {"a": [1, 2]}


def test_list_and_several_objects_in_one_block(parse):
    text = (
        '<tool_call>[{"name": "a", "arguments": {}}, {"name": "b", "arguments": {}}]</tool_call>\n'
        '<tool_call>{"name": "c", "arguments": {}}\n{"name": "d", "arguments": {}}</tool_call>'
    )
    assert [c.name for c in parse("hermes", text)] == ["a", "b", "c", "d"]


def test_fenced_json_inside_block(parse):
    (call,) = parse("hermes", '<tool_call>\n```json\n{"name": "f", "arguments": {"a": 1}}\n```\n</tool_call>')
    assert call.ok and call.arguments == {"a": 1}


def test_stray_closing_tag_and_bare_json_are_ignored(parse):
    assert parse("hermes", '</tool_call> {"name": "f", "arguments": {}}') == []


def test_think_marker_inside_a_value_hides_the_rest(parse):
    # Documented limitation: reasoning is blanked before parsing, even inside values, so an unclosed `<think>`
    # written in an argument hides the rest of the output.
    text = '<tool_call>{"name": "f", "arguments": {"a": "<think>"}}</tool_call>'
    (call,) = parse("hermes", text)
    assert call.status == "unclosed"


def test_tags_inside_json_strings_do_not_end_the_block(parse):
    text = '<tool_call>{"name": "write", "arguments": {"text": "a </tool_call> b <tool_call> c"}}</tool_call> tail'
    (call,) = parse("hermes", text)
    assert call.ok and call.arguments == {"text": "a </tool_call> b <tool_call> c"}
    assert call.raw_text.endswith("}}</tool_call>")
