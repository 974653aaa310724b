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

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
# Which steps count as updates. A group of two identical completions with opposite advantages cancels to a rounding
# residue, not always to 0 (measured: grad_norm 9e-8 with every group's completions copied), and Adam, normalising
# per weight, would still move the weights on it. Distinct completions give grad_norm 0.1-2 on these models (measured
# over 8 runs of the tests below), and any gradient above this bound makes Adam move each LoRA weight by about lr.
UPDATE_GRAD_NORM = 1e-3


def correct_answer(completions, answer, **kwargs):
    """1 when the final text contains the expected sum."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [float(str(a) in t.split("</tool_response>")[-1]) for t, a in zip(texts, answer)]


def alternating_reward(completions, **kwargs):
    """1, 0, 1, 0, ... by position: TRL passes each group's completions contiguously, so every group gets both."""
    return [float(i % 2 == 0) for i in range(len(completions))]


def lora_weights(model) -> dict[str, torch.Tensor]:
    """Copies of a PEFT model's LoRA parameters.

    Args:
        model (`torch.nn.Module`): A PEFT-wrapped model.

    Returns:
        `dict[str, torch.Tensor]`: Parameter name to a detached copy.
    """
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def recording(rollout, seen: list):
    """Wraps a `rollout_func` so that each call's prompts and output are appended to `seen`.

    Args:
        rollout (`Callable`): A TRL `rollout_func(prompts, trainer)`.
        seen (`list`): Receives `(prompts, output)` per call.

    Returns:
        `Callable`: The wrapped rollout function.
    """

    def wrapped(prompts, trainer):
        out = rollout(prompts, trainer)
        seen.append((prompts, out))
        return out

    return wrapped


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
    """Tool rollouts through TRL: calls run, tool tokens are out of the loss, KL starts at 0 and follows updates."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    grpo_config.max_steps = 3
    # At temperature 0.5 the fitted model writes its whole fitted first turn (the call and EOS) with probability
    # 0.997 for each of these prompts (measured with get_logprobs; 0.97 at 0.7, 0.09 at 1.6), so a step of 4
    # completions without any call has probability below (3e-3)^4 = 8e-11. Other samples mostly call too.
    grpo_config.temperature = 0.5
    model = AutoModelForCausalLM.from_pretrained(tool_model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tool_model_dir)
    dataset = datasets.Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": f"add {a} and {b}"}] for a, b in [(2, 3), (4, 1), (2, 3), (1, 1)]],
            "answer": [5, 5, 5, 2],
        }
    )
    seen: list = []
    trainer = trl.GRPOTrainer(
        model=model,
        reward_funcs=[correct_answer, tool_call_reward(tools=[add]), tool_success_reward()],
        args=grpo_config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft.LoraConfig(**LORA),
        rollout_func=recording(rollout_func(tools=[add], tool_parser="hermes", max_tool_turns=2), seen),
    )
    before = lora_weights(trainer.model)
    trainer.train()

    logs = [entry for entry in trainer.state.log_history if "kl" in entry]
    assert len(logs) == 3 and len(seen) == 3
    assert all(torch.isfinite(torch.tensor(e["kl"])) for e in logs)
    assert logs[0]["kl"] == 0  # LoRA starts as the identity: policy == adapter-off reference
    # Whether a step updates depends on whether its sampled completions differ; once one did, the policy has left
    # the reference and every later KL is positive. Without any gradient, Adam leaves the weights as they were.
    updated = [e["grad_norm"] > UPDATE_GRAD_NORM for e in logs]
    for i, entry in enumerate(logs):
        assert not any(updated[:i]) or entry["kl"] > 0, (i, logs)
    after = lora_weights(trainer.model)
    if any(updated):
        assert any(not torch.equal(before[n], after[n]) for n in before), "LoRA weights did not change"
    if all(e["grad_norm"] == 0 for e in logs):
        assert all(torch.equal(before[n], after[n]) for n in before)

    for (prompts, out), entry in zip(seen, logs):
        assert len(prompts) == len(out["completion_ids"]) == 4
        # TRL counts only env_mask == 1 tokens in the completion length: the tool tokens are out of the loss.
        model_tokens = [sum(m) for m in out["env_mask"]]
        assert entry["completions/mean_length"] == pytest.approx(sum(model_tokens) / len(model_tokens))
        assert any(calls for calls in out["tool_calls"]), "the fitted model should call the tool"
        for ids, lps, mask, results in zip(
            out["completion_ids"], out["logprobs"], out["env_mask"], out["tool_results"]
        ):
            assert len(ids) == len(lps) == len(mask)
            assert all(lp == 0.0 for lp, m in zip(lps, mask) if m == 0)  # tool tokens have no sampling log-prob
            if 0 in mask and len(ids) < grpo_config.max_completion_length:  # not cut by the budget
                tool_text = tokenizer.decode([t for t, m in zip(ids, mask) if m == 0])
                assert "<tool_response>" in tool_text and all(r["content"] in tool_text for r in results)
        assert any(0 in mask for mask in out["env_mask"])  # at least one call's result was shown to the model
    assert "rewards/tool_call_format/mean" in logs[0] and "rewards/tool_success/mean" in logs[0]
    assert "rewards/correct_answer/mean" in logs[0]


def test_grpo_update_moves_the_policy_from_the_reference(tiny_model_dir, grpo_config):
    """Every group has a 1 and a 0 reward and distinct completions, so every step updates and KL grows from 0."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    grpo_config.max_steps = 3
    grpo_config.max_completion_length = 16
    grpo_config.temperature = 1.0
    # The random-init model spreads its next-token probability: two 16-token samples of one of these prompts at
    # temperature 1 coincide with probability below 2e-7 (p(EOS first)^2 plus a Monte Carlo estimate of the rest
    # from 4000 samples each). A step updates as soon as one of its two groups has distinct completions, so a step
    # without an update has probability below 2e-7 even if its groups were not independent.
    prompts = ["what is", "compute the sum", "name a number", "please add"]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    seen: list = []
    trainer = trl.GRPOTrainer(
        model=model,
        reward_funcs=[alternating_reward],
        args=grpo_config,
        train_dataset=datasets.Dataset.from_dict({"prompt": prompts}),
        processing_class=tokenizer,
        peft_config=peft.LoraConfig(**LORA),
        rollout_func=recording(rollout_func(), seen),
    )
    before = lora_weights(trainer.model)
    trainer.train()

    for batch, out in seen:  # the construction: groups are contiguous pairs of one prompt ...
        assert batch[0] == batch[1] and batch[2] == batch[3] and batch[0] != batch[2]
        assert out["prompt_ids"][0] == out["prompt_ids"][1] != out["prompt_ids"][2]  # ... each with its own sample
        assert len(out["completion_ids"]) == 4 and all(len(c) <= 16 for c in out["completion_ids"])
        assert all(len(lp) == len(c) for lp, c in zip(out["logprobs"], out["completion_ids"]))
    logs = [entry for entry in trainer.state.log_history if "kl" in entry]
    assert len(logs) == 3
    assert all(e["grad_norm"] > UPDATE_GRAD_NORM for e in logs), logs
    assert logs[0]["kl"] == 0  # LoRA B starts at 0: the first step scores the reference itself
    assert all(e["kl"] > 0 and torch.isfinite(torch.tensor(e["kl"])) for e in logs[1:]), logs
    after = lora_weights(trainer.model)
    assert any(not torch.equal(before[n], after[n]) for n in before if "lora_B" in n)


def test_sampling_from_trl_args(grpo_config):
    grpo_config.top_k = 0
    grpo_config.generation_kwargs = {"seed": 3}
    sampling = sampling_from_trl_args(grpo_config, {"top_p": 0.9})
    assert sampling == {"temperature": 0.7, "top_p": 0.9, "top_k": -1, "max_new_tokens": 64, "seed": 3}
    grpo_config.generation_kwargs = {"min_length": 3}  # not a setting of vLLM's SamplingParams
    with pytest.raises(ValueError, match=r"min_length.*valid names.*min_tokens"):
        sampling_from_trl_args(grpo_config)
    grpo_config.generation_kwargs = {"logprobs": 5}
    with pytest.raises(ValueError, match=r"logprobs.*requested by trl_inference_ext"):
        sampling_from_trl_args(grpo_config)
    grpo_config.generation_kwargs = {"max_tokens": 8, "min_tokens": 2, "presence_penalty": 0.5}
    sampling = sampling_from_trl_args(grpo_config)
    assert sampling["max_new_tokens"] == 8
    assert sampling["engine_options"] == {"min_tokens": 2, "presence_penalty": 0.5}
    grpo_config.generation_kwargs = None
    grpo_config.repetition_penalty = 1.2
    grpo_config.min_p = 0.05
    sampling = sampling_from_trl_args(grpo_config)
    assert sampling["repetition_penalty"] == 1.2 and sampling["min_p"] == 0.05


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


def test_rollout_func_decoding_options_are_checked_and_kept():
    rollout = rollout_func(tools=[add], tool_isolation="thread", reuse_kv=False, fold_lora=False)
    assert rollout.reuse_kv is False and rollout.fold_lora is False
    assert rollout_func().reuse_kv is True and rollout_func().fold_lora == "auto"
    with pytest.raises(TypeError, match="reuse_kv"):
        rollout_func(reuse_kv="yes")
    for bad in ("sometimes", 1):  # the same rule as the backend's (`lora_fold.check_fold_mode`)
        with pytest.raises(ValueError, match="fold_lora"):
            rollout_func(fold_lora=bad)


def test_given_inference_renders_prompts_with_the_trainers_chat_template(tiny_model_dir, grpo_config):
    """A module passed as `inference=` loaded its own tokenizer: prompts still render as the trainer renders them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_inference_ext import InferenceModule

    grpo_config.max_steps = 1
    grpo_config.max_completion_length = 4
    grpo_config.beta = 0.0
    trainer_tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    trainer_tokenizer.chat_template = (  # the user's own template on the trainer's tokenizer
        "{% for m in messages %}{{ 'turn ' + m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'turn assistant: ' }}{% endif %}"
    )
    policy = peft.get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), peft.LoraConfig(**LORA)
    )
    inference = InferenceModule.from_model(policy, AutoTokenizer.from_pretrained(tiny_model_dir), cache_size=0)
    assert inference.tokenizer.chat_template != trainer_tokenizer.chat_template
    prompts = [[{"role": "user", "content": "what is two plus two"}], [{"role": "user", "content": "add one"}]]
    seen: list = []
    trainer = trl.GRPOTrainer(
        model=policy,
        reward_funcs=[alternating_reward],
        args=grpo_config,
        train_dataset=datasets.Dataset.from_dict({"prompt": prompts}),
        processing_class=trainer_tokenizer,
        rollout_func=recording(rollout_func(inference=inference), seen),
    )
    trainer.train()

    assert seen
    for batch, out in seen:
        expected = [
            trainer_tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)[
                "input_ids"
            ]
            for p in batch
        ]
        assert out["prompt_ids"] == expected
    assert inference.tokenizer.chat_template == trainer_tokenizer.chat_template
