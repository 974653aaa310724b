"""One default per setting: the original documentation's where it states one, one shared value elsewhere."""

from __future__ import annotations

import inspect

from trl_inference_ext import InferenceModule, SamplingConfig
from trl_inference_ext.tools.loop import run_tool_loop
from trl_inference_ext.trl import rollout_func, tool_call_reward


def _default(fn, name):
    return inspect.signature(fn).parameters[name].default


def test_original_documentation_defaults():
    assert _default(InferenceModule, "tool_parser") == "json"
    assert _default(InferenceModule.from_model, "tool_parser") == "json"
    assert _default(InferenceModule, "backend") == "huggingface" and _default(InferenceModule, "cache_size") == 1000
    assert SamplingConfig().max_new_tokens == 256  # generate()
    assert _default(InferenceModule.batch_generate_with_tools, "max_new_tokens") == 512


def test_one_value_elsewhere():
    from trl_inference_ext.cli import build_parser

    parsers = {
        "rollout_func": _default(rollout_func, "tool_parser"),
        "tool_call_reward": _default(tool_call_reward, "tool_parser"),
    }
    cli = build_parser()
    generate = cli._subparsers._group_actions[0].choices["generate"]
    parsers["cli"] = generate.get_default("tool_parser")
    assert set(parsers.values()) == {"auto"}, parsers
    # The multi-turn loop is `batch_generate_with_tools` over several turns: the same token budget.
    assert _default(run_tool_loop, "max_new_tokens") == 512
    assert generate.get_default("max_new_tokens") == SamplingConfig().max_new_tokens
