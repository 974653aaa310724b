"""Guards against quadratic or recursive behaviour: every parser handles 1 MB adversarial inputs quickly.

The bound is generous (2 s, for slow CI machines) while every input parses in well under a second on a laptop; a
quadratic algorithm would take minutes.
"""

from __future__ import annotations

import time

import pytest

from trl_inference_ext.tools.parsers import PARSER_NAMES, get_parser

MB = 1 << 20
LIMIT_S = 2.0

_QWEN3_VALUE = "<tool_call>\n<function=f>\n<parameter=x>\n"

ADVERSARIAL = {
    "open_braces": lambda: "{" * MB,
    "open_brackets": lambda: "[" * MB,
    "deep_nesting": lambda: "[" * (MB // 2) + "]" * (MB // 2),
    "tool_call_openings": lambda: "<tool_call>" * (MB // 11),
    "f_openings": lambda: "f(" * (MB // 2),
    "f_keyword_openings": lambda: "f(a=" * (MB // 4),
    "long_string": lambda: '{"name": "a", "arguments": {"x": "' + "a" * MB,
    "escaped_quotes": lambda: '<tool_call>{"name": "a", "arguments": {"x": "' + '\\"' * (MB // 2),
    "quotes": lambda: "{" + '"' * MB,
    "empty_objects": lambda: "{}" * (MB // 2),
    "unclosed_calls": lambda: '{"name":"a",' * (MB // 12),
    "name_key_flood": lambda: '{"name": 1, "x": 2}' * (MB // 19),
    "mistral_names": lambda: "[TOOL_CALLS]" + "a{" * (MB // 2),
    "invoke_openings": lambda: '<invoke name="a"><parameter name="x">' * (MB // 37),
    "qwen3_openings": lambda: "<tool_call><function=a><parameter=b>" * (MB // 36),
    "think_openings": lambda: "<think>" * (MB // 7),
    "qwen3_value_parameters": lambda: _QWEN3_VALUE + "<parameter=a>" * (MB // 13),
    "qwen3_value_closes": lambda: _QWEN3_VALUE + "</parameter> x" * (MB // 14),
    "qwen3_value_quoted_tags": lambda: _QWEN3_VALUE + '"<parameter=a>"' * (MB // 15),
    "qwen3_value_regions": lambda: _QWEN3_VALUE + "<function=a><tool_call>" * (MB // 46) + "</function>" * (MB // 22),
    "qwen3_unclosed_values": lambda: "<tool_call><function=f><parameter=a>1<parameter=b>2</function>" * (MB // 62),
}


@pytest.fixture(scope="module", params=list(ADVERSARIAL))
def adversarial_text(request: pytest.FixtureRequest) -> str:
    return ADVERSARIAL[request.param]()


@pytest.mark.parametrize("name", PARSER_NAMES)
def test_one_megabyte_adversarial_input_is_fast(name, adversarial_text):
    parser = get_parser(name)
    start = time.perf_counter()
    calls = parser.parse(adversarial_text, strict=True)
    elapsed = time.perf_counter() - start
    assert isinstance(calls, list)
    assert elapsed < LIMIT_S, f"{name} took {elapsed:.2f}s on a 1 MB adversarial input"
