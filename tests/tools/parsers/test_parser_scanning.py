"""Shared guards and scanners: reasoning blanking, input caps, JSON span scanning, bracket matching."""

from __future__ import annotations

from trl_inference_ext.tools.parsers import MAX_CALLS, MAX_INPUT_CHARS, get_parser
from trl_inference_ext.tools.parsers._scan import ParenMatcher, blank_think, iter_blocks, scan_json


def test_blank_think_keeps_offsets():
    text = "a<think>x</think>b<think>y</think>c"
    blanked = blank_think(text)
    assert len(blanked) == len(text)
    assert blanked.replace(" ", "") == "abc"
    assert blank_think("no reasoning") == "no reasoning"


def test_blank_think_unclosed_and_orphan_close():
    assert blank_think("a<think>b c").rstrip() == "a"
    assert blank_think("reasoning</think>answer").lstrip() == "answer"
    assert len(blank_think("r</think>a<think>b")) == len("r</think>a<think>b")


def test_input_past_the_cap_is_ignored():
    call = '{"name": "f", "arguments": {}}'
    assert get_parser("json").parse(" " * MAX_INPUT_CHARS + call) == []
    (cut,) = get_parser("json").parse(" " * (MAX_INPUT_CHARS - 10) + call)
    assert cut.status == "unclosed" and cut.end_pos == MAX_INPUT_CHARS
    assert len(get_parser("json").parse(call + " " * (MAX_INPUT_CHARS + 10))) == 1


def test_number_of_calls_is_capped():
    text = "<tool_call>{}</tool_call>" * (MAX_CALLS + 10)
    assert len(get_parser("hermes").parse(text)) == MAX_CALLS


def test_scan_json_spans_skip_strings_and_prose():
    text = 'x {"a": "}{", "b": [1, {"c": "\\"]"}]} y [the docs](url) {z} {"d": 1'
    nodes = list(scan_json(text))
    first = nodes[0]
    assert text[first[0] : first[1]] == '{"a": "}{", "b": [1, {"c": "\\"]"}]}'
    assert (first[2] or []) and text[first[2][0][0] : first[2][0][1]] == '[1, {"c": "\\"]"}]'
    assert nodes[-1] == (text.rindex("{"), -1, None)


def test_scan_json_ignores_mismatched_closers_and_reports_nested_unclosed():
    text = '{"a": ] 1} [ {"b": 2}'
    nodes = list(scan_json(text))
    assert nodes[0] == (0, len('{"a": ] 1}'), None)
    unclosed, inner = nodes[1], nodes[2]
    assert unclosed[1] == -1 and text[inner[0] : inner[1]] == '{"b": 2}'


def test_scan_json_decoded_values():
    decoded: dict[int, object] = {}
    text = 'a {"k": [1, 2]} b'
    ((start, end, _),) = list(scan_json(text, decoded=decoded))
    assert decoded == {start: {"k": [1, 2]}} and text[start:end] == '{"k": [1, 2]}'


def test_paren_matcher():
    text = 'f(a=\')\', b="(") g(h(1), [2)]) k("x\n)'
    matcher = ParenMatcher(text)
    assert text[: matcher.close_of(1)] == "f(a=')', b=\"(\")"
    g = text.index("g(") + 1
    end = matcher.close_of(g)
    assert end is not None and text[g - 1 : end] == "g(h(1), [2)])"
    k = text.index("k(") + 1
    assert text[k - 1 : matcher.close_of(k)] == 'k("x\n)'
    unclosed = ParenMatcher("f(a=1, g(b=2)")
    assert unclosed.close_of(1) is None and unclosed.is_unclosed(1)


def test_iter_blocks():
    text = "<a>1</a><a>2<a>3</a></a><a>4"
    blocks = list(iter_blocks(text, "<a>", "</a>"))
    assert [(text[b.body_start : b.body_end], b.closed) for b in blocks] == [
        ("1", True),
        ("2", False),
        ("3", True),
        ("4", False),
    ]
