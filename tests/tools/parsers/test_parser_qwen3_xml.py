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
    assert call.arguments == {"query": "Python tutorials", "max_results": "5"}
    schema = {"name": "search", "parameters": {"query": "string", "max_results": "int"}}
    (call,) = parse("qwen3_xml", text, tool_schemas=[schema])
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


def test_without_schema_values_stay_the_text_written(parse):
    values = {"s": "007", "i": "42", "l": "[1, 2]", "t": "true", "q": '"quoted"', "z": "null", "o": '{"a": 1}'}
    for schemas in (None, [SCHEMA]):  # `g` has no schema in SCHEMA either
        (call,) = parse("qwen3_xml", block("g", **values), tool_schemas=schemas)
        assert call.ok and call.arguments == values


def test_parameters_missing_from_the_schema_stay_the_text_written(parse):
    (call,) = parse("qwen3_xml", block("f", i="42", extra="42", untyped="7"), tool_schemas=[SCHEMA])
    assert call.arguments == {"i": 42, "extra": "42", "untyped": "7"}
    schema = {"name": "f", "parameters": {"type": "object", "properties": {"untyped": {"description": "a count"}}}}
    (call,) = parse("qwen3_xml", block("f", untyped="7"), tool_schemas=[schema])
    assert call.arguments == {"untyped": "7"}


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
    assert call.ok and call.arguments == {"x": "1"}
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


def call_block(body: str) -> str:
    """A `write` call around hand-written parameter markup."""
    return f"<tool_call>\n<function=write>\n{body}</function>\n</tool_call>"


# A parameter left open: its value runs on to the next closing position, is never split into parameters, and the call
# is never "ok".

LEFT_OPEN = {
    "layout": "<parameter=path>\nnotes.txt\n<parameter=mode>\nappend\n</parameter>\n",
    "inline": "<parameter=path>notes.txt<parameter=mode>append</parameter>",
    "misspelled_close": "<parameter=path>\nnotes.txt\n</parameter2>\n<parameter=mode>\nappend\n</parameter>\n",
    "cut_close": "<parameter=path>\nnotes.txt\n</parameter\n<parameter=mode>\nappend\n</parameter>\n",
    "short_close": "<parameter=path>\nnotes.txt</param>\n<parameter=mode>\nappend\n</parameter>\n",
    "whitespace_run": "<parameter=path>\nnotes.txt" + " \n\t" * 3000 + "<parameter=mode>\nappend\n</parameter>\n",
}


@pytest.mark.parametrize("body", LEFT_OPEN.values(), ids=LEFT_OPEN.keys())
def test_parameter_left_open_is_kept_whole_and_reported(parse, body):
    (call,) = parse("qwen3_xml", call_block(body))
    value = body[len("<parameter=path>") : body.rindex("</parameter>")].strip("\n")
    assert call.name == "write" and call.arguments == {"path": value}
    assert call.status == "invalid_arguments" and "never closed" in call.error


def test_last_parameter_left_open_is_ended_by_the_function_or_block_close(parse):
    for text in (
        "<tool_call>\n<function=f>\n<parameter=a>\n1\n</parameter>\n<parameter=b>\ntwo\n</function>\n</tool_call>",
        "<tool_call>\n<function=f>\n<parameter=a>\n1\n</parameter>\n<parameter=b>\ntwo\n</parameter2>\n</function>",
        "<tool_call>\n<function=f>\n<parameter=a>\n1\n</parameter>\n<parameter=b>\ntwo\n</tool_call>",
        "<tool_call>\n<function=f>\n<parameter=a>\n1\n</parameter>\n<parameter=b>\ntwo" + " " * 5000 + "</function>",
    ):
        (call,) = parse("qwen3_xml", text)
        assert call.arguments == {"a": "1", "b": "two"}, text
        assert call.status == "invalid_arguments" and "<parameter=b>" in call.error


def test_several_parameters_left_open_and_schema_conversion(parse):
    schemas = [{"name": "f", "parameters": {"type": "object", "properties": {"n": {"type": "integer"}}}}]
    text = "<tool_call><function=f><parameter=n>7<parameter=s>x<parameter=t>y</parameter></function></tool_call>"
    (call,) = parse("qwen3_xml", text, tool_schemas=schemas)
    assert call.arguments == {"n": "7<parameter=s>x<parameter=t>y"} and call.status == "invalid_arguments"


def test_parameter_left_open_keeps_the_next_call(parse):
    text = (
        "<tool_call>\n<function=a>\n<parameter=x>\n1\n<parameter=y>\n2\n</function>\n</tool_call>\n"
        "<tool_call>\n<function=b>\n<parameter=z>\n3\n</parameter>\n</function>\n</tool_call>"
    )
    a, b = parse("qwen3_xml", text)
    assert (a.name, a.status, a.arguments) == ("a", "invalid_arguments", {"x": "1\n<parameter=y>\n2"})
    assert (b.name, b.status, b.arguments) == ("b", "ok", {"z": "3"})
    assert a.end_pos <= b.start_pos


def test_missing_function_close_is_not_ok(parse):
    text = "<tool_call>\n<function=a>\n<parameter=x>\n1\n</parameter>\n</tool_call>\n<tool_call>\n<function=b>\n</function>\n</tool_call>"
    a, b = parse("qwen3_xml", text)
    assert (a.name, a.status, a.arguments) == ("a", "invalid_arguments", {"x": "1"})
    assert a.raw_text.endswith("</tool_call>") and b.ok
    text = "<tool_call>\n<function=a>\n<parameter=x>\n1\n</parameter>\n<tool_call>\n<function=b>\n</function>\n</tool_call>"
    a, b = parse("qwen3_xml", text)
    assert a.status == "invalid_arguments" and b.ok and b.name == "b"


# Tag text inside a value: kept as text when it is literal; a value that may hold more than was read is not "ok".

KEPT_WHOLE = {
    "close_tag_in_code": 'if tag == "</parameter>":\n    done = True',
    "close_tag_in_prose": "Close each value with </parameter> on its own line.",
    "close_tag_then_text": "a </parameter> b\n</parameter> c",
    "quoted_open_tag": 'print("<parameter=x>")',
    "single_quoted_tags": "stop = '</function>' or '</tool_call>' or '<parameter=y>'",
    "backquoted_tag": "Use `<parameter=name>` then the value.",
    "paired_fragment": "Write <parameter=x>value</parameter> for each argument.",
    "multiline_paired_fragment": 'TEXT = """\n<parameter=x>\n1\n</parameter>\n"""',
    "whole_call_fixture": (
        "<tool_call>\n<function=search>\n<parameter=query>\ncats\n</parameter>\n</function>\n</tool_call>"
    ),
    "escaped_fixture": 'T = "<tool_call>\\n<function=f>\\n<parameter=x>\\n1\\n</parameter>\\n</function>\\n</tool_call>"',
    "chat_template": (
        "{%- for call in message.tool_calls %}\n<tool_call>\n<function={{ call.name }}>\n"
        "{%- for k, v in call.arguments.items() %}\n<parameter={{ k }}>\n{{ v }}\n</parameter>\n{%- endfor %}\n"
        "</function>\n</tool_call>\n{%- endfor %}"
    ),
    "xml_document": "<root>\n  <function=legacy>\n    <item>1</item>\n  </function>\n</root>",
    "prose_open_tag": "See <parameter=mode> below",
    "prose_function_close": "a </function> b",
}


@pytest.mark.parametrize("content", KEPT_WHOLE.values(), ids=KEPT_WHOLE.keys())
def test_literal_tags_inside_a_value_are_text(parse, content):
    text = call_block(f"<parameter=path>\nfile.txt\n</parameter>\n<parameter=content>\n{content}\n</parameter>\n")
    (call,) = parse("qwen3_xml", text)
    assert call.ok, call.error
    assert call.name == "write" and call.arguments == {"path": "file.txt", "content": content}
    assert call.raw_text == text


@pytest.mark.parametrize("content", KEPT_WHOLE.values(), ids=KEPT_WHOLE.keys())
def test_literal_tags_inside_a_value_keep_the_sibling_calls(parse, content):
    first = call_block(f"<parameter=content>\n{content}\n</parameter>\n")
    second = "<tool_call>\n<function=clock>\n</function>\n</tool_call>"
    calls = parse("qwen3_xml", f"Writing it.\n{first}\n{second}\nDone.")
    assert [(c.name, c.status) for c in calls] == [("write", "ok"), ("clock", "ok")]
    assert calls[0].arguments == {"content": content}


def test_a_call_written_in_a_value_is_never_returned_as_a_call(parse):
    inner = "<tool_call>\n<function=delete_everything>\n<parameter=path>\n/\n</parameter>\n</function>\n</tool_call>"
    for text in (
        call_block(f"<parameter=content>\n{inner}\n</parameter>\n"),  # closed: the outer call, whole
        call_block(f"<parameter=content>\n{inner}\n"),  # the outer value is never closed
        f"<tool_call>\n<function=write>\n<parameter=content>\n{inner}",  # the output stops after it
        f"<tool_call>\n<function=write>\n<parameter=content>\n{inner}\n</parameter>",
    ):
        calls = parse("qwen3_xml", text)
        assert [c.name for c in calls] == ["write"], text
        assert all(c.name != "delete_everything" for c in calls)


def test_ambiguous_tag_text_is_never_ok(parse):
    for content in (
        "<parameter=x>\n1\n</parameter>\n</function>\n</tool_call>",  # reads as a shorter call plus stray tags
        "<parameter=x>\n1",  # a parameter tag on a line of its own, never closed: a forgotten </parameter>?
        "done\n</parameter>\n</function>\n</tool_call>\nmore",  # the tail of a call: the value is read shorter
    ):
        calls = parse("qwen3_xml", call_block(f"<parameter=content>\n{content}\n</parameter>\n"))
        assert calls[0].name == "write" and not calls[0].ok, content
