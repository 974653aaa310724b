"""End to end with a real TRL GRPOTrainer: LoRA, beta > 0 (reference by adapter toggling), our rollout_func + tool."""

from __future__ import annotations

import pytest
import torch
from tool_fixtures import add

datasets = pytest.importorskip("datasets")
trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")

from trl_inference_ext.trl import (  # noqa: E402
    InferenceSyncCallback,
    rollout_func,
    sampling_from_trl_args,
    tool_call_reward,
    tool_success_reward,
)


def correct_answer(completions, answer, **kwargs):
    """1 when the final text contains the expected sum."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [float(str(a) in t.split("</tool_response>")[-1]) for t, a in zip(texts, answer)]


@pytest.fixture
def grpo_config(tmp_path):
    return trl.GRPOConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        beta=0.1,
        num_generations=2,
        per_device_train_batch_size=4,
        max_completion_length=64,
        temperature=0.7,
        learning_rate=5e-3,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        save_strategy="no",
        seed=0,
    )


def test_grpo_with_tools_lora_and_kl(tool_model_dir, grpo_config):
    grpo_config.max_steps = 3
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tool_model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tool_model_dir)
    dataset = datasets.Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": f"add {a} and {b}"}] for a, b in [(2, 3), (4, 1), (2, 3), (1, 1)]],
            "answer": [5, 5, 5, 2],
        }
    )
    seen: list[dict] = []
    # A fitted model is nearly deterministic at temperature 1; sample hotter so a group's completions differ.
    inner = rollout_func(tools=[add], tool_parser="hermes", max_tool_turns=2, temperature=1.6)

    def recording_rollout(prompts, trainer):
        out = inner(prompts, trainer)
        seen.append(out)
        return out

    trainer = trl.GRPOTrainer(
        model=model,
        reward_funcs=[correct_answer, tool_call_reward(tools=[add]), tool_success_reward()],
        args=grpo_config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
        rollout_func=recording_rollout,
    )
    lora_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    trainer.train()

    lora_after = {n: p.detach() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    assert any(not torch.equal(lora_before[n], lora_after[n]) for n in lora_before), "LoRA weights did not change"
    logs = [entry for entry in trainer.state.log_history if "kl" in entry]
    assert len(logs) == 3 and all(torch.isfinite(torch.tensor(e["kl"])) for e in logs)
    assert logs[0]["kl"] == 0  # LoRA starts as the identity: policy == adapter-off reference
    first_update = next(i for i, e in enumerate(logs) if e["grad_norm"] > 0)
    assert all(e["kl"] > 0 for e in logs[first_update + 1 :])  # once updated, the policy moved from the reference
    assert first_update + 1 < len(logs)

    assert seen and all(len(o["completion_ids"]) == 4 for o in seen)
    calls = sum(len(c) for o in seen for c in o["tool_calls"])
    assert calls > 0, "the fitted model should call the tool"
    for out, entry in zip(seen, logs):
        # TRL counts only env_mask == 1 tokens in the completion length: the tool tokens are out of the loss.
        model_tokens = [sum(m) for m in out["env_mask"]]
        assert any(sum(m) < len(m) for m in out["env_mask"])
        assert entry["completions/mean_length"] == pytest.approx(sum(model_tokens) / len(model_tokens))
        for ids, lps, mask in zip(out["completion_ids"], out["logprobs"], out["env_mask"]):
            assert len(ids) == len(lps) == len(mask)
    assert "rewards/tool_call_format/mean" in logs[0] and "rewards/tool_success/mean" in logs[0]


def test_plain_rollout_shares_prompts_and_matches_trl_shapes(tiny_model_dir, grpo_config):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    dataset = datasets.Dataset.from_dict({"prompt": ["one plus two", "the city", "what is", "tell me"]})
    grpo_config.max_completion_length = 8

    def length_reward(completion_ids, **kwargs):
        return [float(len(c)) for c in completion_ids]

    seen = []
    inner = rollout_func()

    def recording_rollout(prompts, trainer):
        out = inner(prompts, trainer)
        seen.append((prompts, out))
        return out

    trainer = trl.GRPOTrainer(
        model=model,
        reward_funcs=[length_reward],
        args=grpo_config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
        rollout_func=recording_rollout,
    )
    trainer.train()
    prompts, out = seen[0]
    assert prompts[0] == prompts[1]  # TRL passes each prompt num_generations times ...
    assert out["prompt_ids"][0] == out["prompt_ids"][1]  # ... and each entry gets its own completion
    assert all(len(c) <= 8 for c in out["completion_ids"])
    assert all(len(lp) == len(c) for lp, c in zip(out["logprobs"], out["completion_ids"]))


def test_sampling_from_trl_args(grpo_config):
    grpo_config.top_k = 0
    grpo_config.generation_kwargs = {"seed": 3}
    sampling = sampling_from_trl_args(grpo_config, {"top_p": 0.9})
    assert sampling == {"temperature": 0.7, "top_p": 0.9, "top_k": -1, "max_new_tokens": 64, "seed": 3}
    grpo_config.generation_kwargs = {"min_length": 3}
    with pytest.raises(ValueError, match="min_length"):
        sampling_from_trl_args(grpo_config)
    grpo_config.generation_kwargs = None
    grpo_config.repetition_penalty = 1.2
    with pytest.raises(ValueError, match="repetition_penalty"):
        sampling_from_trl_args(grpo_config)


def test_reward_functions_without_rollout_fields():
    reward = tool_call_reward(tools=[add])
    completions = [
        '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>',
        '<tool_call>\n{"name": "add", "arguments": {"a": "x", "b": 2}}\n</tool_call>',
        '<tool_call>\n{"name": "mul", "arguments": {"a": 1, "b": 2}}\n</tool_call>',
        "no call here",
        [{"role": "assistant", "content": '<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>'}],
    ]
    assert reward(completions=completions) == [1.0, 0.0, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="tool_results"):
        tool_success_reward()(completions=completions)
    results = [[{"ok": True}, {"ok": False}], []]
    assert tool_success_reward()(completions=["a", "b"], tool_results=results) == [0.5, 0.0]


def test_sync_callback_invalidates(inference):
    from types import SimpleNamespace

    callback = InferenceSyncCallback(inference, every_n_steps=2)
    version = inference.weights_version
    callback.on_step_end(None, SimpleNamespace(global_step=1), None)
    assert inference.weights_version == version
    callback.on_step_end(None, SimpleNamespace(global_step=2), None)
    assert inference.weights_version == version + 1 and callback.syncs == 1
    with pytest.raises(ValueError, match="every_n_steps"):
        InferenceSyncCallback(inference, every_n_steps=0)
