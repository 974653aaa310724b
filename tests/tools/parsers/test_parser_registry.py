"""`get_parser`, `detect_parser_from_template`, `PARSER_NAMES` and the `auto` parser's fallback order."""

from __future__ import annotations

import pytest

from trl_inference_ext.tools.parsers import (
    AUTO_ORDER,
    PARSER_NAMES,
    AutoParser,
    ToolParser,
    detect_parser_from_template,
    get_parser,
)

QWEN3_TEMPLATE = "{% for tool in tools %}...<tool_call>\n<function=example_function_name>\n...{% endfor %}"
HERMES_TEMPLATE = (
    '<tools>{{ tools }}</tools> ... <tool_call>\n{"name": <function-name>, "arguments": <args>}\n</tool_call>'
)
MISTRAL_TEMPLATE = "{%- if message.tool_calls %}[TOOL_CALLS][{%- for tool_call in message.tool_calls %}..."
LLAMA3_TEMPLATE = "<|start_header_id|>assistant<|end_header_id|>\n\n<|python_tag|>{{ tool_call.name }}.call("
XML_TEMPLATE = 'Use <function_calls><invoke name="$FUNCTION_NAME">...</invoke></function_calls>'


@pytest.mark.parametrize("name", [name for name in PARSER_NAMES if name != "auto"])
def test_each_name(name):
    parser = get_parser(name)
    assert isinstance(parser, ToolParser) and parser.name == name
    assert parser.parse("") == []


def test_auto_without_template_is_the_auto_parser():
    parser = get_parser("auto")
    assert isinstance(parser, AutoParser) and parser.name == "auto"
    assert [p.name for p in parser.parsers] == list(AUTO_ORDER)


def test_names_are_normalised():
    assert get_parser(" Qwen3-XML ").name == "qwen3_xml"
    assert get_parser("HERMES").name == "hermes"


@pytest.mark.parametrize("name", ["nope", "", "tool_call", None, 3])
def test_unknown_name(name):
    with pytest.raises(ValueError) as info:
        get_parser(name)  # type: ignore[arg-type]
    message = str(info.value)
    assert "tool_parser" in message
    for known in PARSER_NAMES:
        assert known in message


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        (QWEN3_TEMPLATE, "qwen3_xml"),
        (HERMES_TEMPLATE, "hermes"),
        (MISTRAL_TEMPLATE, "mistral"),
        (LLAMA3_TEMPLATE, "llama3_json"),
        (XML_TEMPLATE, "xml"),
        ("{{ messages }}", None),
        ("", None),
        (None, None),
    ],
)
def test_detect_parser_from_template(template, expected):
    assert detect_parser_from_template(template) == expected
    parser = get_parser("auto", chat_template=template)
    assert parser.name == (expected or "auto")


def test_auto_order_prefers_markup_over_bare_json_and_python_calls(parse):
    text = 'search(query="py") {"name": "json_call", "arguments": {}} <tool_call>{"name": "tagged", "arguments": {}}</tool_call>'
    assert [c.name for c in parse("auto", text)] == ["tagged"]
    text = 'search(query="py") [TOOL_CALLS]mistral_call{}'
    assert [c.name for c in parse("auto", text)] == ["mistral_call"]
    text = 'search(query="py") {"name": "json_call", "arguments": {}}'
    assert [c.name for c in parse("auto", text)] == ["json_call"]
    assert [c.name for c in parse("auto", 'search(query="py")')] == ["search"]


def test_auto_stops_at_the_first_format_with_a_malformed_call(parse):
    text = '<tool_call>{"name": "broken", "arguments": {</tool_call> {"name": "bare", "arguments": {}}'
    (call,) = parse("auto", text)
    assert call.name == "broken" and call.status == "invalid_json"


def test_auto_passes_tool_schemas_to_every_format(parse):
    schemas = [{"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "string"}}}}]
    (call,) = parse(
        "auto", "<tool_call><function=f><parameter=x>5</parameter></function></tool_call>", tool_schemas=schemas
    )
    assert call.arguments == {"x": "5"}
    assert parse("auto", "g(x=1)", tool_schemas=schemas) == []
