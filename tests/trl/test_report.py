"""The training report: reward rise against the combined standard error, tool-use rates, and the plot."""

from __future__ import annotations

import pytest

from trl_inference_ext.trl import RolloutRecorder, RolloutStep
from trl_inference_ext.trl.report import format_report, plot_rewards, training_report


def recorder_with(steps: list[RolloutStep]) -> RolloutRecorder:
    recorder = RolloutRecorder(rollout=lambda prompts, trainer: {})
    recorder.steps = steps
    return recorder


def step(i: int, with_call: int, valid: int, ran: int = 0) -> RolloutStep:
    return RolloutStep(
        step=i,
        completions=4,
        model_tokens=100,
        seconds=2.0,
        with_call=with_call,
        calls=4,
        valid_calls=valid,
        successful_calls=ran,
    )


def test_rise_is_significant_only_beyond_the_combined_error(tmp_path):
    steps = [step(i, 1, 1) for i in range(3)] + [step(i, 4, 4) for i in range(3, 6)]
    rising = [{"reward": r, "kl": 0.01} for r in (0.1, 0.2, 0.15, 0.8, 0.9, 0.85)]
    report = training_report(rising, recorder_with(steps), window=3)
    assert report["reward_rise_significant"]
    assert report["reward_start"][0] == pytest.approx(0.15) and report["reward_end"][0] == pytest.approx(0.85)
    assert report["call_rate_start"] == 0.25 and report["call_rate_end"] == 1.0
    assert report["validity_end"] == 1.0 and report["tokens_per_second"] == 50.0
    noisy = [{"reward": r} for r in (0.1, 0.9, 0.5, 0.2, 0.95, 0.6)]
    assert not training_report(noisy, recorder_with(steps), window=3)["reward_rise_significant"]
    text = format_report(report, tmp_path, tmp_path / "curve.png")
    assert "rose" in text and "0.150" in text and "curve.png" in text
    png = plot_rewards([{**e, "rewards/x/mean": e["reward"]} for e in rising], tmp_path / "curve.png", title="t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_default_window_is_a_quarter_of_the_steps():
    steps = [step(i, 4, 4, ran=i % 5) for i in range(20)]
    history = [{"reward": 0.1 * (i // 5)} for i in range(20)]  # 0.0 x5, 0.1 x5, 0.2 x5, 0.3 x5
    report = training_report(history, recorder_with(steps))
    assert report["window"] == 5
    assert report["reward_start"][0] == pytest.approx(0.0) and report["reward_end"][0] == pytest.approx(0.3)
    assert report["success_start"] == pytest.approx(sum(i % 5 for i in range(5)) / 20)
    assert training_report(history[:3], recorder_with(steps[:3]))["window"] == 1


def test_recorder_counts_calls_that_ran():
    class State:
        global_step = 7

    class Trainer:
        state = State()

    out = {
        "completion_ids": [[1, 2, 3], [4, 5]],
        "env_mask": [[1, 1, 0], [1, 1]],
        "tool_calls": [[{"status": "ok"}, {"status": "invalid_json"}], []],
        "tool_results": [[{"ok": True}, {"ok": False}], []],
    }
    recorder = RolloutRecorder(rollout=lambda prompts, trainer: out)
    assert recorder(["p", "q"], Trainer()) is out
    (recorded,) = recorder.steps
    assert (recorded.step, recorded.model_tokens, recorded.with_call, recorded.calls) == (7, 4, 1, 2)
    assert recorded.validity == 0.5 and recorded.success == 0.5 and recorded.call_rate == 0.5
