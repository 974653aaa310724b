"""The tool loop's parts: public encode/decode on `InferenceModule`, the `ToolRollout` record, and the loop's tokens.

The loop's outputs on the fitted tool model are pinned to what the loop produced before it was rewritten around
`ToolRollout` (recorded then, for every token budget): the chat template's rendering of the fitted conversation, cut
at the budget, with the finish reasons and call outcomes listed below.
"""

from __future__ import annotations

import pytest
import torch
from tool_fixtures import add, broken_add, tool_conversation

from trl_inference_ext import InferenceModule, ToolCall
from trl_inference_ext.testing import greedy_margin
from trl_inference_ext.tools.execution import ToolResult
from trl_inference_ext.tools.loop import FINISH_REASONS, ToolRollout, run_tool_loop
from trl_inference_ext.tools.prompting import build_tool_prompt
from trl_inference_ext.tools.schema import normalize_tools

PROMPT = [{"role": "user", "content": "add 2 and 3"}]


# ------------------------------------------------------------------------------------------ encode_prompts / decode
def test_encode_prompts_matches_generate(inference):
    messages = [{"role": "user", "content": "what is one plus two"}]
    ids = inference.encode_prompts(["the answer is", messages, [5, 6, 7]])
    result = inference.generate(["the answer is", messages, [5, 6, 7]], max_new_tokens=2, do_sample=False)
    assert ids == result.metadata["prompt_token_ids"]
    assert ids[2] == [5, 6, 7]
    assert inference.encode_prompts("the answer is") == ids[:1]  # a single prompt is a batch of one
    assert inference.encode_prompts(messages) == ids[1:2]
    with_tools = inference.encode_prompts(messages, tools=normalize_tools([add]))[0]
    assert '"name": "add"' in inference.tokenizer.decode(with_tools) and len(with_tools) > len(ids[1])


@pytest.mark.parametrize(
    ("prompts", "tools", "error", "match"),
    [
        ([], None, ValueError, "prompts"),
        ([3.5], None, TypeError, r"prompts\[0\]"),
        (["ok", [1, 10**9]], None, ValueError, r"prompts\[1\].*outside"),
        ([[]], None, ValueError, r"prompts\[0\]. is empty"),
        ("ok", {"name": "add"}, TypeError, "tools"),
        ("ok", ["add"], TypeError, "tools"),
    ],
)
def test_encode_prompts_rejects_bad_arguments(inference, prompts, tools, error, match):
    with pytest.raises(error, match=match):
        inference.encode_prompts(prompts, tools=tools)


def test_decode_matches_generated_texts_and_keeps_tool_markers(inference):
    result = inference.generate(["the answer is", "tell me about"], max_new_tokens=8, temperature=1.0, seed=0)
    assert [inference.decode(ids) for ids in result.token_ids] == result.texts
    tok = inference.tokenizer
    call, eos = tok.convert_tokens_to_ids("<tool_call>"), tok.eos_token_id
    word = tok("answer", add_special_tokens=False)["input_ids"]
    assert inference.decode([call, *word, eos]) == "<tool_call>answer"  # markers kept, EOS dropped
    assert inference.decode(()) == ""
    with pytest.raises(ValueError, match=r"token_ids.*outside"):
        inference.decode([1, inference.vocab_size])


@pytest.mark.parametrize("token_ids", ["abc", torch.tensor([1, 2]), [1, 2.0], [True], None])
def test_decode_rejects_what_is_not_token_ids(inference, token_ids):
    with pytest.raises(TypeError, match="token_ids"):
        inference.decode(token_ids)


# ---------------------------------------------------------------------------------------------------- ToolRollout
def test_rollout_records_turns_within_its_budget():
    rollout = ToolRollout(prompt_ids=[1, 2], max_new_tokens=6)
    assert (rollout.remaining_tokens, rollout.finished, rollout.context_ids) == (6, False, [1, 2])
    assert rollout.add_model_turn([10, 11], [-0.5, -0.25]) == [10, 11]
    call = ToolCall("add", {"a": 1, "b": 2}, "", 0, 0)
    rollout.add_tool_calls([call], [ToolResult("add", {"a": 1, "b": 2}, "3", True)])
    rollout.add_environment_turn([20, 21])
    assert rollout.context_ids == [1, 2, 10, 11, 20, 21] and rollout.remaining_tokens == 2
    assert rollout.add_model_turn([12, 13, 14], [-1.0, -2.0, -3.0]) == [12, 13]  # cut at the budget
    assert rollout.completion_ids == [10, 11, 20, 21, 12, 13]
    assert rollout.logprobs == [-0.5, -0.25, 0.0, 0.0, -1.0, -2.0]
    assert rollout.env_mask == [1, 1, 0, 0, 1, 1]
    assert (rollout.num_calls, rollout.num_failed_calls, rollout.remaining_tokens) == (1, 0, 0)
    assert not rollout.finished  # a model turn that fills the budget still has its calls to run
    rollout.finish("length")
    assert rollout.finished and rollout.finish_reason == "length"
    with pytest.raises(RuntimeError, match="already finished"):
        rollout.add_model_turn([1], [0.0])
    with pytest.raises(RuntimeError, match="already finished"):
        rollout.finish("stop")


def test_rollout_environment_turn_that_spends_the_budget_finishes_it():
    rollout = ToolRollout(prompt_ids=[1], max_new_tokens=3)
    rollout.add_model_turn([10], [-0.1])
    rollout.add_environment_turn([20, 21, 22])
    assert rollout.completion_ids == [10, 20, 21] and rollout.env_mask == [1, 0, 0]
    assert rollout.finished and rollout.finish_reason == "length"


def test_rollout_rejects_misaligned_turns_and_unknown_reasons():
    rollout = ToolRollout(prompt_ids=[1])
    with pytest.raises(ValueError, match="aligned"):
        rollout.add_model_turn([1, 2], [0.0])
    with pytest.raises(ValueError, match="aligned"):
        rollout.add_tool_calls([ToolCall("add", {}, "", 0, 0)], [])
    with pytest.raises(ValueError, match="reason"):
        rollout.finish("done")
    assert FINISH_REASONS == ("stop", "length", "max_tool_turns", "stop_tool")
    assert not rollout.finished and rollout.completion_ids == []


# ---------------------------------------------------------------------------------- the loop's tokens, pinned
@pytest.fixture(scope="module")
def tool_inference(tool_model_dir):
    return InferenceModule(tool_model_dir, device="cpu", dtype="float32", tool_parser="hermes")


@pytest.fixture(scope="module")
def greedy(tool_inference):
    """The greedy rollout and where its turns are: the fitted conversation, as the chat template renders it."""
    (rollout,) = run_tool_loop(tool_inference, [PROMPT], tools=[add], do_sample=False, tool_isolation="thread")
    tok = tool_inference.tokenizer
    schemas = normalize_tools([add])
    full = tok.apply_chat_template(tool_conversation(2, 3), tools=schemas, tokenize=True, return_dict=True)
    prompt_len = len(rollout.prompt_ids)
    first_turn = rollout.completion_ids.index(tok.eos_token_id) + 1  # the call, through its end-of-turn token
    shown = tok.apply_chat_template(
        tool_conversation(2, 3)[:3], tools=schemas, tokenize=True, return_dict=True, add_generation_prompt=True
    )
    answer_start = len(shown["input_ids"]) - prompt_len
    completion = rollout.completion_ids
    # The margin is over the model's own tokens; the tool message was never the model's choice.
    margin = greedy_margin(
        tool_inference,
        [rollout.prompt_ids, rollout.prompt_ids + completion[:answer_start]],
        [completion[:first_turn], completion[answer_start:]],
    )
    assert margin > 1e-3  # no greedy choice a float error could flip, on any machine
    return rollout, full["input_ids"], first_turn, answer_start


def test_greedy_rollout_is_the_fitted_conversation(tool_inference, greedy):
    rollout, full, first_turn, answer_start = greedy
    n = len(rollout.completion_ids)
    assert (
        rollout.prompt_ids
        == tool_inference.encode_prompts(
            build_tool_prompt(tool_inference.tokenizer, PROMPT, normalize_tools([add]), "hermes")
        )[0]
    )
    assert rollout.prompt_ids + rollout.completion_ids == full[: len(rollout.prompt_ids) + n]
    assert (first_turn, answer_start - first_turn, n - answer_start) == (24, 14, 5)  # call, tool message, answer
    assert rollout.env_mask == [1] * first_turn + [0] * (answer_start - first_turn) + [1] * (n - answer_start)
    assert rollout.finish_reason == "stop" and rollout.text.endswith("the answer is 5")
    assert [(c.name, c.arguments, c.status) for c in rollout.tool_calls] == [("add", {"a": 2, "b": 3}, "ok")]
    assert [(r.content, r.ok) for r in rollout.tool_results] == [("5", True)]
    assert rollout.remaining_tokens == 512 - n and rollout.finished


def test_a_token_budget_cuts_the_same_rollout(tool_inference, greedy):
    """Budgets on each side of every boundary: in the call, at its end-of-turn token, in the tool message, the answer.

    (All 45 budgets from 1 to 45 gave these outcomes when the loop's tokens were recorded.)
    """
    rollout, _, first_turn, answer_start = greedy
    n = len(rollout.completion_ids)
    tok = tool_inference.tokenizer
    # The parser takes a call whose JSON is complete even when its closing tag was cut.
    json_end = next(k for k in range(n) if '"b": 3}}' in tok.decode(rollout.completion_ids[:k]))
    assert json_end < first_turn - 1  # before `</tool_call>` and the end-of-turn token
    boundaries = (1, json_end, first_turn, answer_start, n)
    for budget in sorted({b + d for b in boundaries for d in (-1, 0, 1)} - {0}):
        (cut,) = run_tool_loop(
            tool_inference, [PROMPT], tools=[add], do_sample=False, max_new_tokens=budget, tool_isolation="thread"
        )
        assert cut.completion_ids == rollout.completion_ids[:budget], budget
        assert cut.env_mask == rollout.env_mask[:budget], budget
        torch.testing.assert_close(cut.logprobs, rollout.logprobs[:budget], atol=1e-5, rtol=0)
        assert cut.finish_reason == ("stop" if budget >= n else "length"), budget
        ok = budget >= json_end  # a cut call is still run when it parses (its result shown only if it was whole)
        assert [c.status for c in cut.tool_calls] == ["ok" if ok else "unclosed"], budget
        assert [r.error for r in cut.tool_results] == [None if ok else "invalid_call"], budget
        assert cut.text == tool_inference.decode(cut.completion_ids)


def test_turn_limit_stop_tool_and_batches(tool_inference, greedy):
    rollout, _, first_turn, _ = greedy
    call_turn = rollout.completion_ids[:first_turn]
    kwargs = {"tools": [add], "do_sample": False, "tool_isolation": "thread"}
    (no_turns,) = run_tool_loop(tool_inference, [PROMPT], max_tool_turns=0, **kwargs)
    (stop,) = run_tool_loop(tool_inference, [PROMPT], stop_tools=["add"], **kwargs)
    for ended, reason in ((no_turns, "max_tool_turns"), (stop, "stop_tool")):
        assert ended.completion_ids == call_turn and ended.env_mask == [1] * first_turn
        assert ended.finish_reason == reason and [r.content for r in ended.tool_results] == ["5"]  # run, not shown

    # GRPO's repeats (one shared first turn) and a batch mixing chat and text prompts: each chat rollout is the greedy
    # one; the text prompt (no chat template, a tool preamble) ends however it ends without disturbing the others.
    repeated = run_tool_loop(tool_inference, [PROMPT, PROMPT], tools=[add], do_sample=False, tool_isolation="thread")
    mixed = run_tool_loop(
        tool_inference,
        [PROMPT, "add 2 and 3", PROMPT],
        tools=[add],
        do_sample=False,
        max_tool_turns=2,
        tool_isolation="thread",
    )
    for other in (*repeated, mixed[0], mixed[2]):
        assert other.completion_ids == rollout.completion_ids and other.env_mask == rollout.env_mask
        assert other.finish_reason == "stop" and [r.content for r in other.tool_results] == ["5"]
    text = mixed[1]
    assert text.finish_reason in FINISH_REASONS
    assert len(text.completion_ids) == len(text.logprobs) == len(text.env_mask) <= 512
    assert run_tool_loop(tool_inference, [], tools=[add]) == []


def test_failing_tool_result_is_shown_and_the_rollout_goes_on(tool_inference, greedy):
    rollout, _, first_turn, _ = greedy

    (failed,) = run_tool_loop(
        tool_inference, [PROMPT], tools=[broken_add], do_sample=False, max_new_tokens=120, tool_isolation="thread"
    )
    assert failed.completion_ids[:first_turn] == rollout.completion_ids[:first_turn]
    # After an error it never saw in training, the fitted model may answer or call again (well-formed or not,
    # depending on the CPU's rounding): only the first result is certain.
    assert (failed.tool_results[0].ok, failed.tool_results[0].error) == (False, "exception")
    shown = [t for t, m in zip(failed.completion_ids, failed.env_mask) if m == 0]
    assert "Error: ValueError: overflow" in tool_inference.tokenizer.decode(shown)
    assert failed.env_mask[first_turn] == 0 and failed.env_mask[-1] == 1  # the model answered after the error
