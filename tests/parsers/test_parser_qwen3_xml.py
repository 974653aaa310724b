"""The `qwen3_xml` format (Qwen3-Coder): `<tool_call><function=...><parameter=...>` blocks."""

from __future__ import annotations

import pytest

SCHEMA = {
    "name": "f",
    "parameters": {
        "type": "object",
        "properties": {
            "s": {"type": "string"},
            "i": {"type": "integer"},
            "n": {"type": "number"},
            "b": {"type": "boolean"},
            "o": {"type": "object"},
            "a": {"type": "array"},
            "z": {"type": "null"},
            "opt": {"type": ["integer", "null"]},
            "any": {"anyOf": [{"type": "string"}, {"type": "number"}]},
        },
    },
}


def block(name: str, **params: str) -> str:
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params.items())
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


def test_basic_call(parse):
    text = block("search", query="Python tutorials", max_results="5")
    (call,) = parse("qwen3_xml", text)
    assert call.ok and call.raw_text == text
    assert call.arguments == {"query": "Python tutorials", "max_results": 5}


def test_only_one_newline_is_trimmed(parse):
    text = "<tool_call><function=f><parameter=code>\n\n  x = 1\n\n</parameter></function></tool_call>"
    (call,) = parse("qwen3_xml", text)
    assert call.arguments == {"code": "\n  x = 1\n"}


def test_schema_conversion(parse):
    text = block(
        "f", s="007", i="42", n="2.5", b="True", o='{"k": [1]}', a="[1, 'two']", z="null", opt="null", any="3.5"
    )
    (call,) = parse("qwen3_xml", text, tool_schemas=[{"type": "function", "function": SCHEMA}])
    assert call.arguments == {
        "s": "007",
        "i": 42,
        "n": 2.5,
        "b": True,
        "o": {"k": [1]},
        "a": [1, "two"],
        "z": None,
        "opt": None,
        "any": 3.5,
    }


def test_schema_conversion_falls_back_to_the_text(parse):
    (call,) = parse("qwen3_xml", block("f", i="many", b="yes"), tool_schemas=[SCHEMA])
    assert call.arguments == {"i": "many", "b": "yes"}


def test_without_schema_values_are_json_decoded(parse):
    (call,) = parse(
        "qwen3_xml", block("g", s="007x", i="42", l="[1, 2]", t="true", q='"quoted"'), tool_schemas=[SCHEMA]
    )
    assert call.arguments == {"s": "007x", "i": 42, "l": [1, 2], "t": True, "q": "quoted"}


def test_shorthand_schema(parse):
    (call,) = parse("qwen3_xml", block("h", q="12"), tool_schemas=[{"name": "h", "parameters": {"q": "string"}}])
    assert call.arguments == {"q": "12"}


def test_values_are_raw_text(parse):
    (call,) = parse("qwen3_xml", block("f", code='if a < b and "x" != \'y\':\n    print("</tag>")'))
    assert call.arguments == {"code": 'if a < b and "x" != \'y\':\n    print("</tag>")'}


def test_malformed_block_keeps_sibling(parse):
    bad = "<tool_call>\n<function=bad>\n<parameter=x>\n1\n</function>\n</tool_call>"
    text = f"{bad}\n{block('good', x='1')}"
    calls = parse("qwen3_xml", text)
    assert [(c.name, c.status) for c in calls] == [("bad", "invalid_arguments"), ("good", "ok")]


def test_missing_function(parse):
    calls = parse("qwen3_xml", "<tool_call>\nsearch for x\n</tool_call><tool_call><function=></function></tool_call>")
    assert [c.status for c in calls] == ["missing_name", "missing_name"]


def test_unclosed(parse):
    complete = "<tool_call>\n<function=f>\n<parameter=x>\n1\n</parameter>\n</function>\n"
    (call,) = parse("qwen3_xml", complete)
    assert call.ok and call.arguments == {"x": 1}
    (call,) = parse("qwen3_xml", "<tool_call>\n<function=f>\n<parameter=x>\n1\n</parameter>\n")
    assert call.status == "unclosed" and call.name == "f"
    (call,) = parse("qwen3_xml", "<tool_call>\n<function=f>\n<parameter=x>\n1")
    assert call.status == "unclosed"
    (call,) = parse("qwen3_xml", "<tool_call>\n<function=sea")
    assert call.status == "unclosed"


def test_json_payload_is_read_as_hermes(parse):
    (call,) = parse("qwen3_xml", '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>')
    assert call.ok and call.arguments == {"a": 1}


@pytest.mark.parametrize("schemas", ["nope", [1], [{"parameters": {}}], {"name": "x"}])
def test_invalid_schemas_are_rejected(schemas):
    from trl_inference_ext.tools.parsers import get_parser

    with pytest.raises((TypeError, ValueError)):
        get_parser("qwen3_xml", tool_schemas=schemas)
