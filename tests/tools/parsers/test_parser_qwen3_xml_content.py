"""`qwen3_xml` values that hold markup: the files a coding agent writes, read by the rules of the parser's docstring.

Each file below is written the way a model writes it (the Qwen3-Coder template layout), alone and next to other
parameters and calls; it must come back whole, as the string written, with status `ok`. Then the cases the rules
report instead of guessing (cut outputs, forgotten closing tags, template placeholders), and the work a parse does
on adversarial values, counted rather than timed.
"""

from __future__ import annotations

import itertools

import pytest

from trl_inference_ext.tools.parsers import _qwen3_values, get_parser, qwen3_xml

PYTHON_RENDERER = '''"""Writes tool calls in the Qwen3-Coder layout."""

PREFIX = "<tool_call>\\n<function=write_file>\\n<parameter=path>\\n"
OPEN, CLOSE = "<parameter=", "</parameter>"


def render(name: str, arguments: dict[str, str]) -> str:
    body = "".join(f"<parameter={key}>\\n{value}\\n</parameter>\\n" for key, value in arguments.items())
    return f"<tool_call>\\n<function={name}>\\n{body}</function>\\n</tool_call>"


def is_call(text: str) -> bool:
    return text.startswith("<tool_call>") and text.rstrip().endswith("</tool_call>")
'''

PYTHON_TESTS = '''from renderer import render

EXPECTED = """<tool_call>
<function=search>
<parameter=query>
cats
</parameter>
<parameter=limit>
5
</parameter>
</function>
</tool_call>"""


def test_render():
    assert render("search", {"query": "cats", "limit": "5"}) == EXPECTED
'''

HTML_PAGE = """<!DOCTYPE html>
<html>
<body>
  <object data="movie.swf">
    <param name="autoplay" value="true">
  </object>
  <form id="sizes">
    <parameter=width>100</parameter>
    <parameter name="height">200</parameter>
  </form>
  <p>Write <parameter=NAME> before each value and </parameter> after it.</p>
</body>
</html>"""

XML_CONFIG = """<?xml version="1.0"?>
<config>
  <parameter name="timeout">
    30
  </parameter>
  <parameter name="retries" type="int">3</parameter>
  <parameter name="verbose"/>
  <function=legacy>
    <parameter=level>2</parameter>
  </function>
</config>"""

JSON_CONFIG = """{
  "tag": "<a>",
  "template": "<tool_call>\\n<function={name}>\\n</function>\\n</tool_call>",
  "close": "</parameter>",
  "retries": 0
}"""

MIDLINE_CLOSE = """for line in lines:
    if line.strip() == "</parameter>":  # a value ends at </parameter> on its own line
        break
    print("a </parameter> b", '</function>', end="")
# </parameter> here is text, and so is </tool_call>"""

MARKDOWN_FORMAT = """# Tool calls in the Qwen3-Coder format

A call names the function, then each parameter:

```
<tool_call>
<function=search>
<parameter=query>
cats
</parameter>
<parameter=limit>
5
</parameter>
</function>
</tool_call>
```

Parameters alone look like this:

<parameter=path>
notes.txt
</parameter>
<parameter=mode>
append
</parameter>

Two calls in a row:

<tool_call>
<function=clock>
</function>
</tool_call>
<tool_call>
<function=delete_everything>
<parameter=path>
/
</parameter>
</function>
</tool_call>

Each `<parameter=NAME>` value ends at its own `</parameter>`; a value may hold </parameter> or </function> as text.
See <parameter=mode> in the example above."""

CHAT_TEMPLATE = """{%- for tool_call in message.tool_calls %}
{{- '\\n<tool_call>\\n<function=' + tool_call.name + '>\\n' }}
{%- for args_name, args_value in tool_call.arguments|items %}
{{- '<parameter=' + args_name + '>\\n' }}
{{- args_value }}
{{- '\\n</parameter>\\n' }}
{%- endfor %}
{{- '</function>\\n</tool_call>' }}
{%- endfor %}
<tool_call>
<function={{ call.name }}>
{%- for k, v in call.arguments.items() %}
<parameter={{ k }}>
{{ v }}
</parameter>
{%- endfor %}
</function>
</tool_call>"""

FILES = {
    "python_renderer": PYTHON_RENDERER,
    "python_tests": PYTHON_TESTS,
    "html_page": HTML_PAGE,
    "xml_config": XML_CONFIG,
    "json_config": JSON_CONFIG,
    "midline_close": MIDLINE_CLOSE,
    "markdown_format": MARKDOWN_FORMAT,
    "chat_template": CHAT_TEMPLATE,
}
"""File contents a coding agent writes, each holding the format's tags (or other markup) as text."""

WRITE_SCHEMA = {
    "name": "write_file",
    "parameters": {
        "type": "object",
        "properties": {"path": {"type": "string"}, "content": {"type": "string"}, "mode": {"type": "string"}},
    },
}


def call(name: str, *parameters: tuple[str, str]) -> str:
    """A call in the chat template's layout."""
    body = "".join(f"<parameter={key}>\n{value}\n</parameter>\n" for key, value in parameters)
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


def read(parse, text: str, **kwargs: object) -> list[tuple[str, dict[str, object], str]]:
    return [(c.name, c.arguments, c.status) for c in parse("qwen3_xml", text, **kwargs)]


POSITIONS = {
    "alone": lambda content: [("content", content)],
    "first": lambda content: [("content", content), ("path", "a.txt"), ("mode", "w")],
    "middle": lambda content: [("path", "a.txt"), ("content", content), ("mode", "w")],
    "last": lambda content: [("path", "a.txt"), ("mode", "w"), ("content", content)],
}


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("content", FILES.values(), ids=FILES.keys())
def test_a_file_comes_back_whole_wherever_its_parameter_is(parse, content, position):
    parameters = POSITIONS[position](content)
    text = call("write_file", *parameters)
    for schemas in (None, [WRITE_SCHEMA]):
        assert read(parse, text, tool_schemas=schemas) == [("write_file", dict(parameters), "ok")]


@pytest.mark.parametrize("content", FILES.values(), ids=FILES.keys())
def test_a_file_keeps_the_calls_around_it(parse, content):
    before = call("read_file", ("path", "a.txt"))
    after = call("run", ("command", "pytest -q"), ("timeout", "60"))
    text = f"I'll write the file, then run the tests.\n{before}\n{call('write_file', ('content', content))}\n{after}"
    assert read(parse, text) == [
        ("read_file", {"path": "a.txt"}, "ok"),
        ("write_file", {"content": content}, "ok"),
        ("run", {"command": "pytest -q", "timeout": "60"}, "ok"),
    ]


def test_a_completion_with_several_files_and_calls(parse):
    calls = [
        ("write_file", [("path", "renderer.py"), ("content", PYTHON_RENDERER)]),
        ("write_file", [("path", "docs/format.md"), ("content", MARKDOWN_FORMAT), ("mode", "w")]),
        ("str_replace", [("path", "page.html"), ("old_str", HTML_PAGE), ("new_str", XML_CONFIG)]),
        ("write_file", [("path", "config.json"), ("content", JSON_CONFIG)]),
        ("run", [("command", "python -m pytest tests/")]),
    ]
    text = "Here are the changes.\n\n" + "\n".join(call(name, *parameters) for name, parameters in calls)
    parsed = parse("qwen3_xml", text)
    assert [(c.name, c.arguments, c.status) for c in parsed] == [(n, dict(p), "ok") for n, p in calls]
    assert all(a.end_pos <= b.start_pos for a, b in itertools.pairwise(parsed))
    assert "delete_everything" not in {c.name for c in parsed}


def test_a_json_file_is_a_string_unless_the_schema_says_otherwise(parse):
    text = call("write_file", ("path", "config.json"), ("content", JSON_CONFIG), ("mode", "0"))
    (call_,) = parse("qwen3_xml", text)
    assert call_.arguments == {"path": "config.json", "content": JSON_CONFIG, "mode": "0"}
    schema = {"name": "write_file", "parameters": {"content": "dict", "mode": "int"}}
    (call_,) = parse("qwen3_xml", text, tool_schemas=[schema])
    assert call_.arguments["content"]["tag"] == "<a>" and call_.arguments["mode"] == 0


def test_name_attribute_spelling(parse):
    text = (
        '<tool_call>\n<function name="write_file">\n<parameter name="path">\na.txt\n</parameter>\n'
        "<parameter name='content'>\nx = '<tag>'\n</parameter>\n</function>\n</tool_call>"
    )
    assert read(parse, text) == [("write_file", {"path": "a.txt", "content": "x = '<tag>'"}, "ok")]
    text = '<tool_call><function name = "f" ><parameter  name="a">1</parameter><parameter=b>2</parameter></function></tool_call>'
    assert read(parse, text) == [("f", {"a": "1", "b": "2"}, "ok")]


def test_a_value_may_end_before_a_parameter_in_the_other_spelling(parse):
    text = call_text = (
        "<tool_call>\n<function=f>\n<parameter=a>\nx </parameter> y\n</parameter>\n"
        '<parameter name="b">\n2\n</parameter>\n</function>\n</tool_call>'
    )
    assert call_text == text and read(parse, text) == [("f", {"a": "x </parameter> y", "b": "2"}, "ok")]


@pytest.mark.parametrize("name", ["{{ tc.name }}", "{{tool_call.name}}", "", " ", "get weather", "1st", "<x", "a/b"])
def test_a_function_name_that_is_not_an_identifier_is_not_a_call(parse, name):
    text = call("placeholder", ("{{ k }}", "{{ v }}")).replace("placeholder", name)
    (placeholder, clock) = parse("qwen3_xml", f"{text}\n{call('clock')}")
    assert placeholder.status == "missing_name" and placeholder.name == "" and placeholder.arguments == {}
    assert clock.ok and clock.name == "clock"


@pytest.mark.parametrize(
    "name", ["search", "_private", "get-weather", "functions.search", "mcp__github__issue", "获取"]
)
def test_identifiers(parse, name):
    assert read(parse, call(name, ("q", "x"))) == [(name, {"q": "x"}, "ok")]


@pytest.mark.parametrize("tag", ["<parameter={{ k }}>", "<parameter=>", '<parameter name="k" type="int">'])
def test_a_parameter_tag_with_no_identifier_name_is_reported_and_left_out(parse, tag):
    text = call("write_file", ("path", "a.txt"), ("KEY", "{{ v }}"), ("mode", "w")).replace("<parameter=KEY>", tag)
    (c,) = parse("qwen3_xml", text)
    assert (c.name, c.arguments, c.status) == ("write_file", {"path": "a.txt", "mode": "w"}, "invalid_arguments")


def test_a_parameter_given_twice_is_reported(parse):
    (c,) = parse("qwen3_xml", call("f", ("a", "1"), ("a", "2")))
    assert c.status == "invalid_arguments" and "twice" in c.error


# Cut outputs: the call being written is `unclosed`; the calls before it are kept; nothing else is ever `ok`.

COMPLETION = "\n".join(
    [
        call("read_file", ("path", "docs/format.md")),
        call("write_file", ("path", "docs/format.md"), ("content", MARKDOWN_FORMAT)),
        call("write_file", ("path", "renderer.py"), ("content", PYTHON_RENDERER), ("mode", "w")),
    ]
)


def test_every_cut_of_a_completion_keeps_the_calls_before_it_and_no_other_call_is_ok(parse):
    full = parse("qwen3_xml", COMPLETION)
    assert [c.status for c in full] == ["ok"] * 3
    parser = get_parser("qwen3_xml")
    for cut in range(len(COMPLETION)):
        calls = parser.parse(COMPLETION[:cut], strict=True)
        finished = sum(c.end_pos <= cut for c in full)
        assert finished <= len(calls) <= finished + 1, cut
        for parsed, expected in zip(calls, full):
            if parsed.ok:  # a finished call, or one cut after its `</function>`
                assert (parsed.name, parsed.arguments) == (expected.name, expected.arguments), cut
        assert all(c.ok for c in calls[:finished]), cut
        assert all(c.ok or c.status in ("unclosed", "invalid_arguments") for c in calls[finished:]), cut


def test_a_cut_call_is_unclosed(parse):
    text = call("write_file", ("path", "a.txt"), ("content", PYTHON_RENDERER))
    for cut in ("\n</function>\n</tool_call>", "\n</parameter>\n</function>\n</tool_call>", "\ndef is_call"):
        (c,) = parse("qwen3_xml", text[: text.rindex(cut)])
        assert c.name == "write_file" and c.status == "unclosed" and c.arguments == {}


def test_an_output_stopped_at_the_end_of_a_call_written_in_a_value_is_unclosed(parse):
    fixture = call("delete_everything", ("path", "/"))
    text = call("write_file", ("path", "notes.md"), ("content", f"Example:\n{fixture}\nThat is all."))
    for stop in ("</tool_call>", "</function>\n"):  # a stop string, kept in the output or not
        cut = text[: text.index(stop, text.index("delete_everything")) + len(stop)]
        assert read(parse, cut) == [("write_file", {}, "unclosed")]


def test_a_value_with_a_cut_call_written_in_it(parse):
    """The fixture's tags hold on to the value's real `</parameter>`; only a call-end layout frees it (rule 4)."""
    prefix = 'PREFIX = """<function=write_file>\n<parameter=path>\n"""'
    assert read(parse, call("write_file", ("content", prefix))) == [("write_file", {"content": prefix}, "ok")]
    cut_fixture = 'CUT = """<tool_call>\n<function=f>\n<parameter=x>\n1"""'
    assert read(parse, call("write_file", ("content", cut_fixture))) == [("write_file", {}, "unclosed")]


# Forgotten closing tags: the value is read to its closing position, never split into parameters, and reported.


def test_a_forgotten_close_is_reported_and_never_split(parse):
    forgotten = "a.txt\n<parameter=content>\nhello\n</parameter>\n<parameter=mode>\nw"  # path's </parameter> is missing
    (c,) = parse("qwen3_xml", call("write_file", ("path", forgotten)))
    assert c.status == "invalid_arguments" and "never closed" in c.error
    assert c.arguments == {"path": forgotten}


def test_the_tail_of_a_call_in_a_value_is_reported(parse):
    content = 'TAIL = """\n</parameter>\n</function>\n</tool_call>\n"""\nprint(TAIL)'
    (c,) = parse("qwen3_xml", call("write_file", ("path", "t.py"), ("content", content)))
    assert c.status == "invalid_arguments" and "after the end of the call" in c.error


# The work is linear: count the characters the tag scanner reads instead of timing.


class CountingPattern:
    """Wraps the tag regex and counts the characters each search reads."""

    def __init__(self, pattern) -> None:
        self.pattern = pattern
        self.chars = 0

    def search(self, text: str, pos: int = 0, endpos: int | None = None):
        endpos = len(text) if endpos is None else endpos
        match = self.pattern.search(text, pos, endpos)
        self.chars += (match.end() if match else endpos) - pos
        return match


MB = 1 << 20
_HEAD = "<tool_call>\n<function=f>\n<parameter=a>\n"
_FALL_BACK = "<parameter=a>\n<function=x>\n</parameter>\n"  # each value falls back past all the others (rule 4)
WORK = {
    "closes": lambda: _HEAD + "</parameter> x" * (MB // 14),
    "closes_on_lines": lambda: _HEAD + "</parameter>\n" * (MB // 13),
    "closes_then_parameters": lambda: _HEAD + "</parameter>\n<parameter=b>\n" * (MB // 26),
    "layout_openings": lambda: _HEAD + "<function=a>\n<parameter=b>\n" * (MB // 26),
    "inline_openings": lambda: _HEAD + "<parameter=a>x<tool_call>\n" * (MB // 26),
    "quoted_tags": lambda: _HEAD + '"<function=a>""</parameter>"\n' * (MB // 29),
    "placeholders": lambda: _HEAD + "<function={{ x }}>\n</function>\n" * (MB // 31),
    "unclosed_values": lambda: "<tool_call><function=f><parameter=a>1<parameter=b>2</function>" * (MB // 62),
    "falling_back": lambda: "<tool_call>\n<function=f>\n" + _FALL_BACK * (MB // 40) + "</function>\n</tool_call>",
    "many_calls": lambda: (call("f", ("a", MARKDOWN_FORMAT)) + "\n") * (MB // 900),
}


@pytest.mark.parametrize("make", WORK.values(), ids=WORK.keys())
def test_the_tag_scanner_reads_a_bounded_multiple_of_the_text(monkeypatch, make):
    text = make()
    counting = CountingPattern(_qwen3_values.TAG)
    monkeypatch.setattr(_qwen3_values, "TAG", counting)
    monkeypatch.setattr(qwen3_xml, "TAG", counting)
    calls = get_parser("qwen3_xml").parse(text, strict=True)
    assert calls
    bound = 2 * len(text) + 2 * len(text) + _qwen3_values.MIN_BUDGET_CHARS  # one pass, stray checks, the budget
    assert counting.chars <= bound, f"read {counting.chars / len(text):.1f} times the text"


@pytest.mark.parametrize("count", [10, 100, 1000, 10000])
def test_falling_back_is_what_the_budget_bounds(monkeypatch, count):
    text = "<tool_call>\n<function=f>\n" + _FALL_BACK * count + "</function>\n</tool_call>"
    counting = CountingPattern(_qwen3_values.TAG)
    monkeypatch.setattr(_qwen3_values, "TAG", counting)
    monkeypatch.setattr(qwen3_xml, "TAG", counting)
    (c,) = get_parser("qwen3_xml").parse(text, strict=True)
    assert counting.chars <= 4 * len(text) + _qwen3_values.MIN_BUDGET_CHARS
    assert not c.ok  # `a` is given many times; past the budget the call is cut
    if count == 10:
        assert counting.chars > count * len(text) / 4  # without the budget the reading grows with the square
