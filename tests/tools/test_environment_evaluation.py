"""`batch_generate_with_tools(environment_factory=...)`: the training environments evaluate outside a trainer."""

from __future__ import annotations

import pytest
from environment_fixtures import CLOSED_DIR_ENV, Adder

from trl_inference_ext import InferenceModule
from trl_inference_ext.errors import InvalidTypeError
from trl_inference_ext.tools import ToolLoopConfig


@pytest.fixture(scope="module")
def tool_inference(tool_model_dir):
    return InferenceModule(tool_model_dir, tool_parser="hermes", device="cpu", dtype="float32")


@pytest.mark.parametrize("isolation", ["process", "thread"])
def test_each_prompt_runs_in_its_own_instance_and_gets_its_reward(tool_inference, tmp_path, monkeypatch, isolation):
    monkeypatch.setenv(CLOSED_DIR_ENV, str(tmp_path))
    prompts = [[{"role": "user", "content": "add 2 and 3"}], [{"role": "user", "content": "add 4 and 1"}]]
    result, calls = tool_inference.batch_generate_with_tools(
        prompts,
        max_new_tokens=64,
        environment_factory=Adder,
        environment_rows=[{"offset": 100}, {"offset": 200}],
        environment_isolation=isolation,
        tool_loop=ToolLoopConfig(max_tool_turns=1),
        do_sample=False,
    )
    assert len(result) == 2 and result.metadata["environment_errors"] == [None, None]
    for offset, results, made, reward, mask in zip(
        (100, 200), result.metadata["tool_results"], calls, result.metadata["rewards"], result.metadata["env_mask"]
    ):
        assert made, "the fitted model calls `add` greedily"
        ok = [r for r in results if r.ok]
        assert ok and all(int(r.content) > offset for r in ok)  # its own instance's offset, not the other's
        assert reward == float(ok[-1].content) and 0 in mask
    assert sorted(p.read_text() for p in tmp_path.iterdir()) == ["100", "200"]  # both closed before returning


def test_environment_options_need_an_environment(tool_inference):
    with pytest.raises(InvalidTypeError, match="need `environment_factory`"):
        tool_inference.batch_generate_with_tools(["hi"], environment_rows=[{}])


@pytest.mark.parametrize("scheduling", ["trajectory", "turn"])
def test_a_slow_tool_in_one_rollout_does_not_delay_the_others(tool_inference, tmp_path, monkeypatch, scheduling):
    """Rollout 0's call takes 4 s, rollout 1's none: with trajectory scheduling rollout 1's next turn is sampled
    while rollout 0's call still runs; turn by turn it waits for it."""
    import time

    from environment_fixtures import SlowAdder

    monkeypatch.setenv(CLOSED_DIR_ENV, str(tmp_path))
    starts: list[tuple[float, int]] = []
    generate = tool_inference.generate

    def timed(prompts, **kwargs):
        starts.append((time.time(), len(prompts) * kwargs.get("num_return_sequences", 1)))
        return generate(prompts, **kwargs)

    monkeypatch.setattr(tool_inference, "generate", timed)
    prompts = [[{"role": "user", "content": "add 2 and 3"}], [{"role": "user", "content": "add 4 and 1"}]]
    _, calls = tool_inference.batch_generate_with_tools(
        prompts,
        max_new_tokens=64,
        environment_factory=SlowAdder,
        environment_rows=[{"delay": 4.0}, {"delay": 0.0}],
        tool_loop=ToolLoopConfig(max_tool_turns=1, tool_timeout=30, scheduling=scheduling),
        do_sample=False,
    )
    assert all(calls), "the fitted model calls `add` greedily"
    slow_done = max(float(p.name.split("-")[2]) for p in tmp_path.glob("call-4.0-*"))
    second = starts[1][0]  # the first generation after the first turn
    if scheduling == "trajectory":
        assert second < slow_done and starts[1][1] == 1  # rollout 1 alone, before rollout 0's call returned
    else:
        assert second >= slow_done and starts[1][1] == 2
