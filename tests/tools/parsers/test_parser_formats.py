"""The format registry: each format's facts are kept once, and prompts, worked examples and decoding read them."""

from __future__ import annotations

import pytest

from trl_inference_ext.tasks.arithmetic import calculator, make_problems, worked_example
from trl_inference_ext.tokenization import TOOL_MARKERS
from trl_inference_ext.tools.parsers import (
    AUTO_ORDER,
    FORMATS,
    PARSER_CLASSES,
    PARSER_NAMES,
    ToolFormat,
    detect_parser_from_template,
    get_format,
    get_parser,
)
from trl_inference_ext.tools.parsers.registry import DEFAULT_FORMAT, REASONING_TOKENS, marker_tokens
from trl_inference_ext.tools.prompting import build_tool_prompt, call_instruction, tool_preamble

NAMES = [tool_format.name for tool_format in FORMATS]
SCHEMAS = [{"type": "function", "function": {"name": "calculator", "description": "", "parameters": {}}}]


class PlainTokenizer:
    """A tokenizer without a chat template: prompts get the plain-text preamble."""

    chat_template = None


def test_each_format_is_registered_once_under_its_parser_name():
    assert len(set(NAMES)) == len(NAMES)
    assert all(isinstance(tool_format, ToolFormat) for tool_format in FORMATS)
    assert set(PARSER_NAMES) == {"auto", *NAMES} and len(PARSER_NAMES) == len(NAMES) + 1
    assert {tool_format.name: tool_format.parser for tool_format in FORMATS} == PARSER_CLASSES
    for tool_format in FORMATS:
        assert tool_format.parser.name == tool_format.name
        assert get_format(tool_format.name) is tool_format
        assert type(get_parser(tool_format.name)) is tool_format.parser


def test_auto_order_names_registered_formats():
    assert set(AUTO_ORDER) <= set(NAMES) and len(set(AUTO_ORDER)) == len(AUTO_ORDER)


@pytest.mark.parametrize("tool_format", [f for f in FORMATS if f.template_markers], ids=lambda f: f.name)
def test_a_template_with_exactly_a_formats_markers_is_detected_as_that_format(tool_format):
    template = "{% for tool in tools %}" + " ... ".join(tool_format.template_markers) + "{% endfor %}"
    assert detect_parser_from_template(template) == tool_format.name
    assert get_format("auto", chat_template=template) is tool_format
    assert get_parser("auto", chat_template=template).name == tool_format.name


def test_auto_prompts_with_the_default_format_without_a_known_template():
    for template in (None, "", "{{ messages }}"):
        assert get_format("auto", chat_template=template).name == DEFAULT_FORMAT
    assert call_instruction("auto") == get_format(DEFAULT_FORMAT).instruction


@pytest.mark.parametrize("name", ["nope", "", "tool_call", None, 3, "jsonn"])
def test_unknown_names_are_a_value_error_everywhere(name):
    for look_up in (get_format, get_parser, call_instruction, worked_example):
        with pytest.raises(ValueError, match="tool_parser"):
            look_up(name)
    with pytest.raises(ValueError, match="tool_parser"):
        tool_preamble(SCHEMAS, name)
    with pytest.raises(ValueError, match="tool_parser"):
        build_tool_prompt(PlainTokenizer(), "What is 3 * 14?", SCHEMAS, name)


@pytest.mark.parametrize("name", NAMES)
def test_the_preamble_shows_the_formats_own_instruction(name):
    tool_format = get_format(name)
    preamble = tool_preamble(SCHEMAS, name)
    assert tool_format.instruction in preamble and '"calculator"' in preamble
    prompt = build_tool_prompt(PlainTokenizer(), [{"role": "user", "content": "What is 3 * 14?"}], SCHEMAS, name)
    assert prompt[0]["role"] == "system" and tool_format.instruction in prompt[0]["content"]


def test_names_are_normalised_for_prompts_too():
    assert call_instruction(" Qwen3-XML ") == get_format("qwen3_xml").instruction


def test_decoding_keeps_every_formats_special_tokens_and_the_reasoning_markers():
    assert marker_tokens() == TOOL_MARKERS
    for tool_format in FORMATS:
        assert set(tool_format.special_tokens) <= TOOL_MARKERS
    assert set(REASONING_TOKENS) <= TOOL_MARKERS
    assert {"<tool_call>", "</tool_call>", "<|python_tag|>", "[TOOL_CALLS]"} <= TOOL_MARKERS


@pytest.mark.parametrize("name", PARSER_NAMES)
def test_the_worked_example_teaches_the_selected_format(name):
    messages = worked_example(name)
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant"]
    content = messages[1]["content"]
    assert content == get_format(name).render([("calculator", {"expression": "3 * 14"})])
    (call,) = get_parser(name).parse(content, strict=True)
    assert (call.name, call.arguments, call.status) == ("calculator", {"expression": "3 * 14"}, "ok")
    assert calculator(**call.arguments) == messages[2]["content"] == "42"


def test_worked_examples_differ_between_formats():
    contents = {name: worked_example(name)[1]["content"] for name in NAMES}
    assert len(set(contents.values())) == len(NAMES)
    assert "[TOOL_CALLS]" in contents["mistral"] and "<function=calculator>" in contents["qwen3_xml"]
    assert worked_example()[1]["content"] == contents["hermes"]


def test_few_shot_problems_use_the_selected_format():
    rows = make_problems(3, seed=1, few_shot=True, tool_parser="function")
    for row in rows:
        assert row["prompt"][1]["content"] == "calculator(expression='3 * 14')"
    assert make_problems(3, seed=1)[0]["prompt"][-1] == rows[0]["prompt"][-1]
    rows[0]["prompt"][1]["content"] = "changed"
    assert rows[1]["prompt"][1]["content"] == "calculator(expression='3 * 14')"
    with pytest.raises(ValueError, match="tool_parser"):
        make_problems(1, few_shot=True, tool_parser="nope")
