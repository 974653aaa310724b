"""`ToolLoopConfig`: the tool loop's settings, checked once, and the same loop whether given as a config or as the
keyword arguments of `rollout_func` / `run_tool_loop`."""

from __future__ import annotations

import dataclasses
import inspect
import math

import pytest
from tool_fixtures import add

import trl_inference_ext.tools as tools_package
import trl_inference_ext.trl as trl_package
from trl_inference_ext import InferenceModule
from trl_inference_ext.errors import InvalidTypeError, InvalidValueError
from trl_inference_ext.tools import ToolLoopConfig
from trl_inference_ext.tools.config import TOOL_LOOP_FIELDS
from trl_inference_ext.tools.execution import MAX_OUTPUT_CHARS
from trl_inference_ext.tools.loop import run_tool_loop
from trl_inference_ext.trl import RolloutFunction, rollout_func

PROMPT = [{"role": "user", "content": "add 2 and 3"}]
OTHER = [{"role": "user", "content": "add 4 and 1"}]


@pytest.fixture(scope="module")
def tool_inference(tool_model_dir):
    return InferenceModule(tool_model_dir, device="cpu", dtype="float32", tool_parser="hermes")


# ------------------------------------------------------------------------------------------------- the config
def test_exported_from_both_packages():
    assert tools_package.ToolLoopConfig is trl_package.ToolLoopConfig is ToolLoopConfig
    assert "ToolLoopConfig" in tools_package.__all__ and "ToolLoopConfig" in trl_package.__all__


def test_defaults_are_the_keyword_defaults_and_every_field_is_documented():
    config = ToolLoopConfig()
    assert dataclasses.astuple(config) == (3, (), 10.0, "process", None, MAX_OUTPUT_CHARS, True, "trajectory")
    for fn in (rollout_func, run_tool_loop):
        parameters = inspect.signature(fn).parameters
        assert (
            parameters["tool_loop"].default is None and parameters["tool_loop"].kind is inspect.Parameter.KEYWORD_ONLY
        )
        for name in TOOL_LOOP_FIELDS:
            assert parameters[name].default == getattr(config, name), (fn.__name__, name)
    for f in dataclasses.fields(ToolLoopConfig):
        assert f.metadata["help"] and f"{f.name} (`" in ToolLoopConfig.__doc__


def test_frozen_normalised_and_replace_checks_again():
    config = ToolLoopConfig(stop_tools=["answer"], tool_timeout=5)
    assert config.stop_tools == ("answer",) and config.tool_timeout == 5.0 and isinstance(config.tool_timeout, float)
    assert hash(config) == hash(ToolLoopConfig(stop_tools=("answer",), tool_timeout=5.0))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.max_tool_turns = 1
    assert dataclasses.replace(config, max_tool_turns=0).max_tool_turns == 0
    with pytest.raises(ValueError, match="max_tool_turns"):
        dataclasses.replace(config, max_tool_turns=-1)
    with pytest.raises(TypeError):
        ToolLoopConfig(3)  # keyword-only: no positional settings


BAD_VALUES = [
    # (field, value, error, the message names the field and what it allows)
    ("max_tool_turns", "3", InvalidValueError, r"`max_tool_turns` must be an int >= 0, got '3'"),
    ("max_tool_turns", 2.0, InvalidValueError, r"`max_tool_turns` must be an int >= 0"),
    ("max_tool_turns", True, InvalidValueError, r"`max_tool_turns` must be an int >= 0"),
    ("max_tool_turns", -1, InvalidValueError, r"`max_tool_turns` must be an int >= 0, got -1"),
    ("stop_tools", "add", InvalidTypeError, r"`stop_tools` must be a sequence of tool names \(strings\)"),
    ("stop_tools", 3, InvalidTypeError, r"`stop_tools` must be a sequence of tool names"),
    ("stop_tools", ["add", None], InvalidTypeError, r"`stop_tools` must be a sequence of tool names"),
    ("tool_timeout", "10", InvalidValueError, r"`tool_timeout` must be a number of seconds > 0"),
    ("tool_timeout", True, InvalidValueError, r"`tool_timeout` must be a number of seconds > 0"),
    ("tool_timeout", 0, InvalidValueError, r"`tool_timeout` must be a number of seconds > 0, got 0"),
    ("tool_timeout", -1.5, InvalidValueError, r"`tool_timeout` must be a number of seconds > 0"),
    ("tool_timeout", math.nan, InvalidValueError, r"`tool_timeout` must be a number of seconds > 0"),
    ("tool_isolation", 1, InvalidValueError, r"`tool_isolation` must be one of \['process', 'thread'\], got 1"),
    ("tool_isolation", "fork", InvalidValueError, r"`tool_isolation` must be one of \['process', 'thread'\]"),
    ("tool_memory_limit", 1.5, InvalidValueError, r"`tool_memory_limit` must be None or a positive number of bytes"),
    ("tool_memory_limit", 0, InvalidValueError, r"`tool_memory_limit` must be None or .*int >= 1\), got 0"),
    ("max_tool_output_chars", "100", InvalidValueError, r"`max_tool_output_chars` must be an int >= 1"),
    ("max_tool_output_chars", 0, InvalidValueError, r"`max_tool_output_chars` must be an int >= 1, got 0"),
    ("reuse_kv", "yes", InvalidTypeError, r"`reuse_kv` must be a bool, got str"),
    ("reuse_kv", 1, InvalidTypeError, r"`reuse_kv` must be a bool, got int"),
    ("scheduling", "async", InvalidValueError, r"`scheduling` must be one of \['trajectory', 'turn'\]"),
]


@pytest.mark.parametrize(("name", "value", "error", "match"), BAD_VALUES, ids=lambda v: repr(v)[:24])
def test_each_field_is_checked_when_built(name, value, error, match):
    with pytest.raises(error, match=match):
        ToolLoopConfig(**{name: value})


def test_every_field_has_a_bad_value_above():
    assert {name for name, *_ in BAD_VALUES} == set(TOOL_LOOP_FIELDS)


def test_memory_limit_needs_worker_processes():
    with pytest.raises(InvalidValueError, match=r"`tool_memory_limit` needs `tool_isolation='process'`.*'thread'"):
        ToolLoopConfig(tool_memory_limit=2**20, tool_isolation="thread")
    assert ToolLoopConfig(tool_memory_limit=2**20).tool_memory_limit == 2**20


@pytest.mark.parametrize(("name", "value", "error", "match"), BAD_VALUES, ids=lambda v: repr(v)[:24])
def test_the_keywords_raise_the_same_errors(inference, name, value, error, match):
    """The keyword arguments build a `ToolLoopConfig`: the same error, whichever entry point, before any model work
    (and `rollout_func` checks them with or without tools)."""
    with pytest.raises(error, match=match):
        rollout_func(**{name: value})
    with pytest.raises(error, match=match):
        rollout_func(tools=[add], **{name: value})
    with pytest.raises(error, match=match):
        run_tool_loop(inference, ["hi"], **{name: value})


# ---------------------------------------------------------------------------------- config or keywords, not both
def test_config_and_keywords_together_are_refused(inference):
    config = ToolLoopConfig(max_tool_turns=1, tool_isolation="thread")
    with pytest.raises(InvalidTypeError, match=r"`max_tool_turns` and `tool_loop` were both given"):
        rollout_func(tool_loop=config, max_tool_turns=1)
    with pytest.raises(TypeError, match=r"`max_tool_turns`, `reuse_kv` and `tool_loop`"):
        rollout_func(None, None, "auto", 3, reuse_kv=True, tool_loop=config)  # by position, and equal to the default
    with pytest.raises(TypeError, match=r"`stop_tools` and `tool_loop`.*dataclasses\.replace\(tool_loop, stop_tools="):
        run_tool_loop(inference, ["hi"], tool_loop=config, stop_tools=())
    with pytest.raises(InvalidTypeError, match="`tool_loop` must be a ToolLoopConfig or None, got dict"):
        run_tool_loop(inference, ["hi"], tool_loop={"max_tool_turns": 1})
    with pytest.raises(InvalidTypeError, match="`tool_loop` must be a ToolLoopConfig"):
        rollout_func(tool_loop=dataclasses.asdict(config))
    # Settings that are not the config's go with it; `tool_loop=None` means "use the keywords".
    fn = rollout_func(tools=[add], tool_parser="hermes", fold_lora=False, tool_loop=config, temperature=0.5)
    assert fn.tool_loop is config and fn.sampling == {"temperature": 0.5} and fn.tool_executor.isolation == "thread"
    assert rollout_func(tool_loop=None, max_tool_turns=1, tool_isolation="thread").tool_loop == config


def test_rollout_function_keeps_its_setting_attributes():
    fn = rollout_func(max_tool_turns=2, stop_tools=["add"], reuse_kv=False)
    assert isinstance(fn, RolloutFunction)
    assert (fn.max_tool_turns, fn.stop_tools, fn.reuse_kv) == (2, ("add",), False)
    fn.reuse_kv = True  # replaces the config with a checked copy
    assert fn.tool_loop == ToolLoopConfig(max_tool_turns=2, stop_tools=("add",), reuse_kv=True)
    with pytest.raises(ValueError, match="max_tool_turns"):
        fn.max_tool_turns = -1
    assert fn.max_tool_turns == 2


def test_executor_is_built_from_the_config():
    config = ToolLoopConfig(tool_timeout=2.5, tool_isolation="thread", max_tool_output_chars=50)
    fn = rollout_func(tools=[add], tool_loop=config)
    executor = fn.tool_executor
    assert (executor.timeout, executor.isolation, executor.memory_limit, executor.max_output_chars) == (
        2.5,
        "thread",
        None,
        50,
    )
    assert set(executor.functions) == {"add"}
    assert rollout_func(tool_loop=config).tool_executor is None  # no tools, no executor


# ------------------------------------------------------------------------------- the same rollouts either way
def _as_tuple(rollout):
    return (
        rollout.prompt_ids,
        rollout.completion_ids,
        rollout.logprobs,
        rollout.env_mask,
        rollout.finish_reason,
        [(c.name, c.arguments, c.status) for c in rollout.tool_calls],
        [(r.content, r.ok, r.error) for r in rollout.tool_results],
        rollout.text,
    )


SETTINGS = {"max_tool_turns": 2, "stop_tools": ["done"], "tool_isolation": "thread", "max_tool_output_chars": 64}


@pytest.mark.parametrize(
    "sampling",
    [pytest.param({"do_sample": False}, id="greedy"), pytest.param({"temperature": 1.0, "seed": 3}, id="seeded")],
)
@pytest.mark.parametrize("reuse_kv", [True, False])
def test_run_tool_loop_gives_the_same_rollouts_from_a_config(tool_inference, sampling, reuse_kv):
    prompts = [PROMPT, PROMPT, OTHER]
    keywords = run_tool_loop(
        tool_inference, prompts, [add], max_new_tokens=120, reuse_kv=reuse_kv, **SETTINGS, **sampling
    )
    config = ToolLoopConfig(reuse_kv=reuse_kv, **SETTINGS)
    configured = run_tool_loop(tool_inference, prompts, [add], max_new_tokens=120, tool_loop=config, **sampling)
    assert [_as_tuple(r) for r in configured] == [_as_tuple(r) for r in keywords]
    assert any(r.tool_calls for r in keywords)  # the fitted model calls `add`: tool turns were exercised
    if "seed" not in sampling:
        assert [r.tool_results[0].content for r in keywords[:2]] == ["5", "5"]


def test_max_tool_turns_and_stop_tools_act_the_same_from_a_config(tool_inference):
    for settings, reason in (({"max_tool_turns": 0}, "max_tool_turns"), ({"stop_tools": ["add"]}, "stop_tool")):
        settings = {"tool_isolation": "thread", **settings}
        (keywords,) = run_tool_loop(tool_inference, [PROMPT], [add], do_sample=False, **settings)
        (configured,) = run_tool_loop(
            tool_inference, [PROMPT], [add], do_sample=False, tool_loop=ToolLoopConfig(**settings)
        )
        assert configured.finish_reason == keywords.finish_reason == reason
        assert _as_tuple(configured) == _as_tuple(keywords)


@pytest.mark.parametrize(
    "sampling",
    [pytest.param({"do_sample": False}, id="greedy"), pytest.param({"temperature": 1.0, "seed": 5}, id="seeded")],
)
def test_rollout_func_gives_the_same_output_from_a_config(tool_inference, sampling):
    settings = {"max_tool_turns": 2, "tool_isolation": "thread", "tool_timeout": 5.0, "reuse_kv": True}
    by_keywords = rollout_func(tools=[add], tool_parser="hermes", **settings)
    by_config = rollout_func(tools=[add], tool_parser="hermes", tool_loop=ToolLoopConfig(**settings))
    assert by_config.tool_loop == by_keywords.tool_loop
    prompts = [PROMPT, PROMPT, OTHER, OTHER]
    try:
        outputs = [
            fn._rollouts(tool_inference, prompts, {"max_new_tokens": 120, **sampling})
            for fn in (by_keywords, by_config)
        ]
    finally:
        by_keywords.close()
        by_config.close()
    assert outputs[0] == outputs[1]
    assert set(outputs[0]) == {"prompt_ids", "completion_ids", "logprobs", "env_mask", "tool_calls", "tool_results"}
    assert any(outputs[0]["tool_calls"])
