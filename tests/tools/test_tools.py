"""Tool definitions, prompting, execution and the multi-turn loop on a real (tiny, fitted) model."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from tool_fixtures import add, broken_add, tool_conversation

from trl_inference_ext import InferenceModule, ToolCall
from trl_inference_ext.tools.execution import ToolExecutor
from trl_inference_ext.tools.loop import run_tool_loop
from trl_inference_ext.tools.prompting import build_tool_prompt, template_renders_tools, tool_preamble
from trl_inference_ext.tools.schema import normalize_tools, tool_functions

SEED_TOOL = {"name": "search", "description": "Search the web", "parameters": {"query": "string"}}


def test_normalize_seed_dict_openai_dict_and_callable():
    seed, openai, fn = normalize_tools(
        [
            SEED_TOOL,
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}},
            add,
        ]
    )
    assert seed["function"]["parameters"] == {
        "type": "object",
        "properties": {"query": {"type": "string"}},
        "required": ["query"],
    }
    assert openai["function"]["name"] == "f"
    assert fn["function"]["name"] == "add"
    assert fn["function"]["parameters"]["properties"]["a"]["type"] == "integer"
    assert tool_functions([SEED_TOOL, add]) == {"add": add}


@pytest.mark.parametrize(
    ("tools", "error", "match"),
    [
        ({"name": "x"}, TypeError, "available_tools"),
        ([{"description": "no name"}], ValueError, r"available_tools\[0\]"),
        ([{"name": "x", "parameters": {"q": "text"}}], ValueError, "unknown type"),
        ([SEED_TOOL, SEED_TOOL], ValueError, "duplicate"),
        ([42], TypeError, r"available_tools\[0\]"),
    ],
)
def test_bad_tool_definitions(tools, error, match):
    with pytest.raises(error, match=match):
        normalize_tools(tools)


def test_prompting_uses_chat_template_when_it_renders_tools(inference):
    tok = inference.tokenizer
    assert template_renders_tools(tok)
    schemas = normalize_tools([SEED_TOOL])
    ids = build_tool_prompt(tok, [{"role": "user", "content": "find news"}], schemas, "hermes")
    text = tok.decode(ids)
    assert '"name": "search"' in text and "<tools>" in text and text.rstrip().endswith("assistant")
    plain = build_tool_prompt(tok, "find news", schemas, "xml")
    assert plain.startswith(tool_preamble(schemas, "xml")) and "<function_calls>" in plain


def test_prompting_preamble_without_tool_template(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    assert not template_renders_tools(tok)
    messages = build_tool_prompt(tok, [{"role": "user", "content": "hi"}], normalize_tools([SEED_TOOL]), "function")
    assert messages[0]["role"] == "system" and "search" in messages[0]["content"]
    assert "(<argument>=" in messages[0]["content"]
    with pytest.raises(TypeError, match="token ids"):
        build_tool_prompt(tok, [1, 2, 3], normalize_tools([SEED_TOOL]), "json")


def test_executor_outcomes():
    async def slow_async(x: int) -> int:
        await asyncio.sleep(60)
        return x

    async def fast_async(x: int) -> int:
        return x * 2

    def boom() -> None:
        raise RuntimeError("bad input")

    functions = {"add": add, "slow": slow_async, "fast": fast_async, "boom": boom}  # closures: threads only
    executor = ToolExecutor(functions, timeout=0.5, isolation="thread")
    calls = [
        ToolCall("add", {"a": 1, "b": 2}, "", 0, 0),
        ToolCall("fast", {"x": 4}, "", 0, 0),
        ToolCall("slow", {"x": 1}, "", 0, 0),
        ToolCall("boom", {}, "", 0, 0),
        ToolCall("nope", {}, "", 0, 0),
        ToolCall("add", {}, "", 0, 0, status="invalid_json", error="bad"),
        ToolCall("add", {"c": 1}, "", 0, 0),
    ]
    start = time.perf_counter()
    results = executor.run(calls)
    executor.close()
    # The slow tool would take 60 s: returning well before shows the 0.5 s deadline held (generous on a busy machine).
    assert time.perf_counter() - start < 30
    assert [r.ok for r in results] == [True, True, False, False, False, False, False]
    assert results[0].content == "3" and results[1].content == "8"
    assert [r.error for r in results[2:]] == ["timeout", "exception", "unknown_tool", "invalid_call", "exception"]
    assert "bad input" in results[3].content and "Available tools" in results[4].content
    with pytest.raises(ValueError, match="tool_timeout"):
        ToolExecutor({}, timeout=0)


@pytest.fixture(scope="module")
def tool_inference(tool_model_dir):
    return InferenceModule(tool_model_dir, device="cpu", dtype="float32", tool_parser="hermes")


def test_batch_generate_with_tools_parses_real_model_output(tool_inference):
    prompt = [{"role": "user", "content": "add 2 and 3"}]
    result, calls = tool_inference.batch_generate_with_tools(
        [prompt, prompt], available_tools=[add], max_new_tokens=40, do_sample=False
    )
    assert len(calls) == 2
    for seq_calls in calls:
        assert [(c.name, c.arguments) for c in seq_calls] == [("add", {"a": 2, "b": 3})]
    assert result.metadata["invalid_tool_calls"] == [[], []]
    call = calls[0][0]
    assert result.texts[0][call.start_pos : call.end_pos] == call.raw_text


def test_tool_loop_end_to_end(tool_inference):
    prompt = [{"role": "user", "content": "add 2 and 3"}]
    (rollout,) = run_tool_loop(tool_inference, [prompt], tools=[add], do_sample=False, max_new_tokens=120)
    assert [(c.name, c.arguments) for c in rollout.tool_calls] == [("add", {"a": 2, "b": 3})]
    assert [r.content for r in rollout.tool_results] == ["5"] and rollout.num_failed_calls == 0
    assert rollout.finish_reason == "stop"
    assert rollout.text.endswith("the answer is 5")
    n = len(rollout.completion_ids)
    assert len(rollout.logprobs) == len(rollout.env_mask) == n
    # The ids are exactly the chat template's rendering of the whole conversation (no re-tokenisation drift) ...
    tok = tool_inference.tokenizer
    full = tok.apply_chat_template(
        tool_conversation(2, 3), tools=normalize_tools([add]), tokenize=True, return_dict=True
    )["input_ids"]
    assert rollout.prompt_ids + rollout.completion_ids == full[: len(rollout.prompt_ids) + n]
    # ... and env_mask zeroes exactly the tool message tokens.
    env = [t for t, m in zip(rollout.completion_ids, rollout.env_mask) if m == 0]
    env_text = tok.decode(env)
    assert "<tool_response>\n5\n</tool_response>" in env_text and "the answer" not in env_text
    assert rollout.env_mask[0] == 1 and rollout.env_mask[-1] == 1
    # Model-token log-probs equal scoring on the final context.
    with torch.no_grad():
        scored = tool_inference.get_logprobs([rollout.prompt_ids], [rollout.completion_ids])[0]
    mask = torch.tensor(rollout.env_mask, dtype=torch.bool)
    torch.testing.assert_close(scored[mask], torch.tensor(rollout.logprobs)[mask], atol=1e-4, rtol=0)
    assert torch.all(torch.tensor(rollout.logprobs)[~mask] == 0)


def test_tool_loop_limits_and_failures(tool_inference):
    prompt = [{"role": "user", "content": "add 2 and 3"}]
    (no_turns,) = run_tool_loop(tool_inference, [prompt], tools=[add], do_sample=False, max_tool_turns=0)
    assert no_turns.finish_reason == "max_tool_turns" and all(no_turns.env_mask)
    (stop,) = run_tool_loop(tool_inference, [prompt], tools=[add], do_sample=False, stop_tools=["add"])
    assert stop.finish_reason == "stop_tool" and stop.tool_results[0].content == "5"
    (short,) = run_tool_loop(tool_inference, [prompt], tools=[add], do_sample=False, max_new_tokens=5)
    assert short.finish_reason == "length" and len(short.completion_ids) == 5

    (failed,) = run_tool_loop(
        tool_inference, [prompt], tools=[broken_add], do_sample=False, max_new_tokens=120, tool_isolation="thread"
    )
    # The first call is the one the model was fitted on; what it writes after an error it never saw in training
    # differs between CPUs (an answer, or another call, well-formed or not), so only the first result is certain.
    first = failed.tool_results[0]
    assert (first.ok, first.error) == (False, "exception") and "overflow" in first.content
    assert failed.num_failed_calls >= 1
    with pytest.raises(ValueError, match="max_tool_turns"):
        run_tool_loop(tool_inference, [prompt], max_tool_turns=-1)
    with pytest.raises(TypeError, match="num_return_sequences"):
        run_tool_loop(tool_inference, [prompt], num_return_sequences=2)


def test_repeated_prompts_share_the_first_turn(tool_inference):
    from trl_inference_ext.tools.loop import repeat_group_size

    assert repeat_group_size(["a", "a", "b", "b"]) == 2
    assert repeat_group_size(["a", "a", "b"]) == 1
    assert repeat_group_size(["a", "b"]) == 1
    prompt = [{"role": "user", "content": "add 2 and 3"}]
    rollouts = run_tool_loop(tool_inference, [prompt, prompt], tools=[add], do_sample=False, max_new_tokens=120)
    assert rollouts[0].completion_ids == rollouts[1].completion_ids
    assert rollouts[0].tool_results[0].content == "5" and rollouts[1].finish_reason == "stop"
