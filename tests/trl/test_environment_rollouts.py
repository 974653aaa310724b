"""`rollout_func(environment_factory=...)` inside a real `GRPOTrainer`: TRL's environment contract, per rollout."""

from __future__ import annotations

import pytest
import torch
from environment_fixtures import CLOSED_DIR_ENV, Adder, Counter, GroupedAdder, Observed

from trl_inference_ext.errors import InvalidValueError
from trl_inference_ext.trl import rollout_func, tag_rows

datasets = pytest.importorskip("datasets")
trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
PAIRS = [(2, 3), (4, 1), (2, 3), (1, 1)]


def config(tmp_path, **overrides):
    # At temperature 0.5 the fitted tool model writes its fitted call with probability 0.997 per prompt (see
    # test_trl_grpo), so almost every rollout calls `add` at least once.
    settings = dict(
        output_dir=str(tmp_path / "out"), max_steps=1, beta=0.0, num_generations=2, per_device_train_batch_size=4,
        max_completion_length=64, temperature=0.5, learning_rate=5e-3, logging_steps=1, report_to="none",
        use_cpu=True, bf16=False, save_strategy="no", seed=0,
    )  # fmt: skip
    settings.update(overrides)
    return trl.GRPOConfig(**settings)


def chat(a: int, b: int) -> list[dict]:
    return [{"role": "user", "content": f"add {a} and {b}"}]


def train(model_dir, tmp_path, rf, dataset, **overrides):
    """One GRPO step; returns the log entries and what each rollout call returned (with its rewards)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    seen: list = []

    def recorded(prompts, trainer):
        out = rf(prompts, trainer)
        rewards = {f.__name__: list(f.pending) for f in rf.reward_funcs if hasattr(f, "cls")}
        seen.append({"prompts": prompts, "out": out, "rewards": rewards})
        return out

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    trainer = trl.GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
        reward_funcs=[*rf.reward_funcs],
        args=config(tmp_path, **overrides),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft.LoraConfig(**LORA),
        rollout_func=recorded,
    )
    trainer.train()
    return [e for e in trainer.state.log_history if "grad_norm" in e], seen, tokenizer


def test_each_rollout_gets_its_own_instance_reset_with_its_row(tool_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(CLOSED_DIR_ENV, str(tmp_path))
    offsets = [10, 20, 30, 40]
    dataset = datasets.Dataset.from_dict({"prompt": [chat(a, b) for a, b in PAIRS[:2]], "offset": offsets[:2]})
    rf = rollout_func(environment_factory=Adder, tool_parser="hermes", max_tool_turns=1)
    try:
        logs, seen, _ = train(tool_model_dir, tmp_path, rf, dataset)
    finally:
        rf.close()
    (call,) = seen
    calls = 0
    for i, (calls_made, results) in enumerate(zip(call["out"]["tool_calls"], call["out"]["tool_results"])):
        offset = {"add 2 and 3": 10, "add 4 and 1": 20}[call["prompts"][i][-1]["content"]]
        for c, r in zip(calls_made, results):
            if r["ok"]:  # the state its own reset set: the row's offset, nothing from another rollout
                calls += 1
                assert int(r["content"]) == c["arguments"]["a"] + c["arguments"]["b"] + offset
        expected = float(results[-1]["content"]) if results and results[-1]["ok"] else -1.0
        assert call["rewards"]["Adder"][i] == expected
    assert calls > 0, "the fitted model should call `add`"
    assert logs[0]["rewards/Adder/mean"] == pytest.approx(sum(call["rewards"]["Adder"]) / 4)
    closed = sorted(int(p.read_text()) for p in tmp_path.glob("adder-*"))
    assert len(closed) == 4 and sorted(set(closed)) == [10, 20]  # every instance closed, once


def test_the_observation_is_appended_and_rows_sharing_a_prompt_need_tags(tool_model_dir, tmp_path):
    rows = {"prompt": [chat(2, 3), chat(2, 3)], "offset": [1, 2]}
    rf = rollout_func(environment_factory=Observed, tool_parser="hermes", max_tool_turns=1)
    try:
        with pytest.raises(InvalidValueError, match="tag_rows"):
            train(tool_model_dir, tmp_path, rf, datasets.Dataset.from_dict(rows))
        _, seen, tokenizer = train(tool_model_dir, tmp_path, rf, tag_rows(datasets.Dataset.from_dict(rows)))
    finally:
        rf.close()
    (call,) = seen
    texts = [tokenizer.decode(ids) for ids in call["out"]["prompt_ids"]]
    offsets = [1 if "(offset 1)" in t else 2 if "(offset 2)" in t else None for t in texts]
    assert sorted(offsets) == [1, 1, 2, 2]  # each row's own reset, though the prompts are equal
    assert all("add 2 and 3 (offset" in t for t in texts)  # appended to the last user message, as TRL does


def test_dict_factories_pick_by_the_environment_column_and_show_only_its_tools(tool_model_dir, tmp_path):
    dataset = datasets.Dataset.from_dict(
        {"prompt": [chat(2, 3), chat(4, 1)], "environment": ["adder", "counter"], "offset": [0, 0]}
    )
    rf = rollout_func(environment_factory={"adder": Adder, "counter": Counter}, tool_parser="hermes", max_tool_turns=1)
    assert [f.__name__ for f in rf.reward_funcs] == ["Adder", "Counter"]
    try:
        _, seen, tokenizer = train(tool_model_dir, tmp_path, rf, dataset)
    finally:
        rf.close()
    (call,) = seen
    for prompt, ids in zip(call["prompts"], call["out"]["prompt_ids"]):
        text = tokenizer.decode(ids)
        if prompt[-1]["content"] == "add 2 and 3":
            assert "First number" in text and "amount" not in text and "crash" not in text
        else:
            assert "amount" in text and "crash" in text and "First number" not in text
            assert "close" not in text.split("<tools>")[-1].split("</tools>")[0]  # lifecycle, never a tool
    rewards = call["rewards"]
    assert [r is None for r in rewards["Adder"]] == [p[-1]["content"] != "add 2 and 3" for p in call["prompts"]]
    assert [r is None for r in rewards["Counter"]] == [p[-1]["content"] == "add 2 and 3" for p in call["prompts"]]


def test_reset_learns_its_group_and_member(tool_model_dir, tmp_path):
    dataset = datasets.Dataset.from_dict({"prompt": [chat(2, 3), chat(4, 1)]})
    rf = rollout_func(environment_factory=GroupedAdder, tool_parser="hermes", max_tool_turns=1)
    try:
        _, seen, _ = train(tool_model_dir, tmp_path, rf, dataset, max_steps=2)
    finally:
        rf.close()
    rewards = [r for call in seen for r in call["rewards"]["GroupedAdder"]]
    assert rewards == [0.0, 1.0, 100.0, 101.0, 200.0, 201.0, 300.0, 301.0]  # group * 100 + member, across steps


def test_an_environment_given_to_the_trainer_too_is_refused(tool_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rf = rollout_func(environment_factory=Adder, tool_parser="hermes")
    trainer = trl.GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tool_model_dir, dtype=torch.float32),
        reward_funcs=[*rf.reward_funcs],
        args=config(tmp_path),
        train_dataset=datasets.Dataset.from_dict({"prompt": [chat(2, 3), chat(4, 1)]}),
        processing_class=AutoTokenizer.from_pretrained(tool_model_dir),
        environment_factory=Adder,
        rollout_func=rf,
    )
    try:
        with pytest.raises(InvalidValueError, match=r"Pass it to `rollout_func\(environment_factory=\.\.\.\)` only"):
            trainer.train()
    finally:
        rf.close()
