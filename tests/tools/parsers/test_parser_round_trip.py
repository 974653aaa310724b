"""Every format's renderer is the inverse of its parser: `parse(render(calls))` gives the calls back, status `ok`.

Hypothesis draws calls from each format's domain (the names and values the format can write, see each renderer's
docstring), including argument text that holds the markup of every format.
"""

from __future__ import annotations

import json
from keyword import iskeyword
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trl_inference_ext.tools.parsers import FORMATS, get_parser

MARKUP = [
    "<tool_call>", "</tool_call>", "[TOOL_CALLS]", "[ARGS]", "<|python_tag|>", "<function=f>", "</function>",
    "<parameter=x>", "</parameter>", '<invoke name="f">', "</invoke>", "<![CDATA[", "&amp;", '"}]', "\\", "{", "]",
    "f(x=1)", "(", "'",
]  # fmt: skip
"""Markup of every format, written inside argument values (reasoning tags are left out: they are blanked everywhere)."""

QWEN3_LITERALS = [
    "a </parameter> b",
    'print("<parameter=x>")',
    "`<parameter=y>`",
    "stop = '</function>'",
    "end: '</tool_call>'",
    "Write <parameter=k>v</parameter> here",
    "(<function=f><parameter=p>1</parameter></function>)",
    "[<tool_call>\n<function=g>\n<parameter=q>\n2\n</parameter>\n</function>\n</tool_call>]",
    '"<tool_call>"',
    'f"<tool_call>{body}"',
    "See <parameter=mode> below",
    "a </function> b",
    '{"tag": "<a>", "n": 5}',
    "0",
]
"""Tag text that stays literal inside a `qwen3_xml` value wherever it is placed (see the module's rules)."""


def _no_reasoning(value: str) -> bool:
    return "think>" not in value


def _not_json(value: str) -> bool:
    """Whether a text value stays a string when a format decodes values that are valid JSON."""
    try:
        json.loads(value, strict=False)
    except ValueError:
        return True
    return False


any_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
json_strings = st.one_of(any_text, st.sampled_from(MARKUP)).filter(_no_reasoning)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**12), 10**12)
    | st.floats(allow_nan=False, allow_infinity=False)
    | json_strings,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(json_strings, children, max_size=3),
    max_leaves=8,
)
json_names = st.one_of(any_text, st.sampled_from(MARKUP)).filter(
    lambda n: bool(n) and n == n.strip() and _no_reasoning(n)
)


def _calls(names: st.SearchStrategy[str], keys: st.SearchStrategy[str], values: st.SearchStrategy[Any]):
    return st.lists(st.tuples(names, st.dictionaries(keys, values, max_size=4)), max_size=3)


identifiers = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,12}", fullmatch=True).filter(lambda n: not iskeyword(n))
dotted_names = st.lists(identifiers, min_size=1, max_size=3).map(".".join)

tag_free_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="<"), max_size=10)
qwen3_strings = st.lists(st.one_of(tag_free_text, st.sampled_from(QWEN3_LITERALS)), max_size=4).map("".join)
qwen3_names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_.:-]{0,12}", fullmatch=True)
json_containers = json_values.filter(lambda v: not isinstance(v, str))
"""Values written as JSON (strings are written as they are, so they come from a format's own string domain)."""
xml_names = any_text.filter(lambda n: bool(n) and n == n.strip() and len(n) <= 40)
text_values = st.one_of(json_strings.filter(_not_json), json_values.filter(lambda v: not isinstance(v, str)))

DOMAINS = {
    "hermes": _calls(json_names, json_strings, json_values),
    "json": _calls(json_names, json_strings, json_values),
    "llama3_json": _calls(json_names, json_strings, json_values),
    "mistral": _calls(json_names, json_strings, json_values),
    "function": _calls(dotted_names, identifiers, json_values),
    "qwen3_xml": st.lists(
        st.tuples(qwen3_names, st.dictionaries(qwen3_names, st.one_of(qwen3_strings, json_containers), max_size=4)),
        max_size=3,
        unique_by=lambda call: call[0],
    ),
    "xml": _calls(xml_names, xml_names, text_values),
}
"""The calls each format can write, by format name."""


TYPED_BY_SCHEMA = {"qwen3_xml"}
"""Formats that carry values as text and read them with their declared type only (the string written otherwise)."""
_JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}


def _schemas(calls: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Tool schemas declaring the type of every argument (each name occurs once in a `TYPED_BY_SCHEMA` domain)."""
    return [
        {
            "name": name,
            "parameters": {
                "type": "object",
                "properties": {key: {"type": _JSON_TYPES.get(type(v), "null")} for key, v in arguments.items()},
            },
        }
        for name, arguments in calls
    ]


def test_every_registered_format_has_a_domain():
    assert set(DOMAINS) == {tool_format.name for tool_format in FORMATS}


@pytest.mark.parametrize("tool_format", FORMATS, ids=lambda f: f.name)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), prefix=st.sampled_from(["", "Sure! ", "Let me check (quickly).\n"]))
def test_parse_of_render_gives_the_calls_back(tool_format, data, prefix):
    calls = data.draw(DOMAINS[tool_format.name], label="calls")
    text = prefix + tool_format.render(calls)
    schemas = _schemas(calls) if tool_format.name in TYPED_BY_SCHEMA else None
    parsed = get_parser(tool_format.name, tool_schemas=schemas).parse(text, strict=True)
    assert [(c.name, c.arguments, c.status) for c in parsed] == [(n, a, "ok") for n, a in calls]
    for call in parsed:
        assert text[call.start_pos : call.end_pos] == call.raw_text


@pytest.mark.parametrize(
    ("name", "bad_name"),
    [
        ("function", "not a name"),
        ("function", "if"),
        ("qwen3_xml", "a<b"),
        ("qwen3_xml", " padded"),
        ("qwen3_xml", "{{ tc.name }}"),
        ("qwen3_xml", "1st"),
        ("xml", ""),
    ],
)
def test_names_a_format_cannot_write_are_refused(name, bad_name):
    from trl_inference_ext.tools.parsers import get_format

    with pytest.raises(ValueError):
        get_format(name).render([(bad_name, {})])
