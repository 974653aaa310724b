"""The `xml` format: `<invoke>` elements with `<tool_name>`/`<parameters>` children or `name` attributes."""

from __future__ import annotations

SCHEMAS = [
    {
        "type": "function",
        "function": {
            "name": "search",
            "parameters": {
                "type": "object",
                "properties": {"query": {"type": "string"}, "max_results": {"type": "integer"}},
            },
        },
    }
]


def test_tool_name_and_parameters_children(parse):
    text = (
        "<function_calls><invoke><tool_name>search</tool_name><parameters><query>Python tutorials</query>"
        "<max_results>5</max_results></parameters></invoke></function_calls>"
    )
    (call,) = parse("xml", text)
    assert call.ok and call.name == "search"
    assert call.arguments == {"query": "Python tutorials", "max_results": 5}
    assert call.raw_text.startswith("<invoke>") and call.raw_text.endswith("</invoke>")


def test_name_attributes_and_several_invokes(parse):
    text = (
        '<function_calls>\n<invoke name="search">\n<parameter name="query">x</parameter>\n</invoke>\n'
        "<invoke name='clock'></invoke>\n</function_calls>"
    )
    a, b = parse("xml", text)
    assert (a.name, a.arguments, b.name, b.arguments) == ("search", {"query": "x"}, "clock", {})


def test_values_are_json_decoded_when_possible(parse):
    text = (
        '<invoke name="f"><parameter name="n">5</parameter><parameter name="b">true</parameter>'
        '<parameter name="l">[1, 2]</parameter><parameter name="o">{"a": null}</parameter>'
        '<parameter name="s">5 apples</parameter><parameter name="nan">NaN</parameter></invoke>'
    )
    (call,) = parse("xml", text)
    assert call.arguments == {"n": 5, "b": True, "l": [1, 2], "o": {"a": None}, "s": "5 apples", "nan": "NaN"}


def test_entities_and_cdata(parse):
    text = (
        '<invoke name="f"><parameter name="a">x &lt; y &amp;&amp; &quot;z&quot; &#233;</parameter>'
        '<parameter name="b"><![CDATA[if a < b && c > d: "&amp;"]]></parameter></invoke>'
    )
    (call,) = parse("xml", text)
    assert call.arguments == {"a": 'x < y && "z" é', "b": 'if a < b && c > d: "&amp;"'}


def test_one_layout_newline_is_trimmed(parse):
    text = '<invoke name="f"><parameter name="code">\n\nprint(1)\n\n</parameter></invoke>'
    (call,) = parse("xml", text)
    assert call.arguments == {"code": "\nprint(1)\n"}


def test_schema_keeps_strings_and_converts_numbers(parse):
    text = '<invoke name="search"><parameter name="query">42</parameter><parameter name="max_results">7</parameter></invoke>'
    (call,) = parse("xml", text, tool_schemas=SCHEMAS)
    assert call.arguments == {"query": "42", "max_results": 7}


def test_missing_name(parse):
    (call,) = parse("xml", "<invoke><parameters><q>1</q></parameters></invoke>")
    assert call.status == "missing_name" and call.arguments == {"q": 1}


def test_malformed_parameters_keep_valid_sibling(parse):
    text = (
        '<invoke name="bad"><parameter name="q">x</invoke>'
        '<invoke name="good"><parameter name="q">y</parameter></invoke>'
        "<invoke><tool_name>bad2</tool_name><parameters><a>1</b></parameters></invoke>"
    )
    calls = parse("xml", text)
    assert [(c.name, c.status) for c in calls] == [
        ("bad", "invalid_arguments"),
        ("good", "ok"),
        ("bad2", "invalid_arguments"),
    ]


def test_unclosed_invoke(parse):
    text = '<invoke name="a"><parameter name="q">1</parameter></invoke>\n<invoke name="search"><parameter name="q">Pyth'
    ok, unclosed = parse("xml", text)
    assert ok.ok and unclosed.status == "unclosed" and unclosed.name == "search"
    (call,) = parse("xml", '<invoke name="sea')
    assert call.status == "unclosed"


def test_self_closing_invoke_and_other_tags(parse):
    (call,) = parse("xml", '<invoked name="x"></invoked> <invoke name="ping"/>')
    assert call.ok and call.name == "ping" and call.arguments == {}
