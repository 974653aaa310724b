"""PPO building blocks (GAE, whitening, rewards, clipped losses, value head) and two real updates of the recipe."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_inference_ext import InferenceModule
from trl_inference_ext.ppo import (
    PolicyWithValueHead,
    PPOConfig,
    ValueHead,
    compute_gae,
    ppo_losses,
    token_rewards,
    whiten,
)

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "ppo.py"


@pytest.fixture(scope="module")
def recipe():
    spec = importlib.util.spec_from_file_location("ppo_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


# ----------------------------------------------------------------------------------------------------- GAE
def test_gae_hand_computed():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [1.0, 1.0, 5.0]])  # 5.0 sits on a padded position: ignored
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    advantages, returns = compute_gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 0: deltas 0.04, 0.03, 0.3 -> A2 = 0.3, A1 = 0.03 + 0.72 * 0.3, A0 = 0.04 + 0.72 * A1
    # row 1: the state after token 1 is terminal: A1 = 2 - 1 = 1, A0 = (0.9 * 1 - 1) + 0.72 * 1
    expected = torch.tensor([[0.21712, 0.246, 0.3], [0.62, 1.0, 0.0]])
    torch.testing.assert_close(advantages, expected)
    torch.testing.assert_close(returns, torch.tensor([[0.71712, 0.846, 1.0], [1.62, 2.0, 0.0]]))


def naive_gae(rewards, values, lengths, gamma, lam):
    advantages = torch.zeros_like(values)
    for b, n in enumerate(lengths):
        v = [*values[b, :n].tolist(), 0.0]  # terminal state after the last token
        deltas = [rewards[b, t].item() + gamma * v[t + 1] - v[t] for t in range(n)]
        for t in range(n):
            advantages[b, t] = sum((gamma * lam) ** k * deltas[t + k] for k in range(n - t))
    return advantages


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.9, 0.5), (0.99, 1.0)])
def test_gae_matches_naive_reference(gamma, lam):
    torch.manual_seed(0)
    lengths = [7, 1, 4, 6, 3]
    mask = torch.arange(7)[None, :] < torch.tensor(lengths)[:, None]
    rewards, values = torch.randn(5, 7) * mask, torch.randn(5, 7)
    advantages, returns = compute_gae(rewards, values, mask, gamma=gamma, lam=lam)
    expected = naive_gae(rewards, values, lengths, gamma, lam)
    torch.testing.assert_close(advantages, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(returns, (expected + values) * mask, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------- whitening and rewards
def test_whiten_uses_only_masked_positions():
    torch.manual_seed(0)
    values = torch.randn(3, 5) * 3 + 2
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    out = whiten(values.masked_fill(~mask, 1e6), mask)  # padding must not leak into the statistics
    real = out[mask]
    torch.testing.assert_close(real.mean(), torch.tensor(0.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(real.std(), torch.tensor(1.0), atol=1e-5, rtol=0)
    assert (out[~mask] == 0).all()
    torch.testing.assert_close(real, (values[mask] - values[mask].mean()) / values[mask].std())
    kept = whiten(values, mask, shift_mean=False)[mask]
    torch.testing.assert_close(kept.mean(), values[mask].mean(), atol=1e-5, rtol=0)


def test_token_rewards():
    kl = torch.tensor([[0.1, 0.2, 0.3, 9.0], [0.5, 9.0, 9.0, 9.0]])  # 9.0 on padding
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    rewards = token_rewards(torch.tensor([1.0, -2.0]), kl, mask, kl_coef=0.1)
    expected = torch.tensor([[-0.01, -0.02, 0.97, 0.0], [-2.05, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(rewards, expected)
    with pytest.raises(ValueError, match="at least one token"):
        token_rewards(torch.tensor([1.0]), kl[:1], torch.zeros(1, 4, dtype=torch.bool), kl_coef=0.1)


# --------------------------------------------------------------------------------------------------- losses
def policy_grad(advantage, log_ratio, clip_range=0.2):
    old = torch.zeros(1, 1)
    logprobs = torch.full((1, 1), log_ratio, requires_grad=True)
    zeros, mask = torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool)
    stats = ppo_losses(logprobs, old, torch.full((1, 1), advantage), zeros, zeros, zeros, mask, clip_range=clip_range)
    stats["policy_loss"].backward()
    return logprobs.grad.item(), stats


@pytest.mark.parametrize(
    ("advantage", "ratio", "clipped"),
    [(1.0, 1.5, True), (1.0, 1.1, False), (1.0, 0.5, False), (-1.0, 0.5, True), (-1.0, 0.9, False), (-1.0, 1.5, False)],
)
def test_policy_loss_clipping(advantage, ratio, clipped):
    grad, stats = policy_grad(advantage, float(torch.tensor(ratio).log()))
    if clipped:  # moving further would only improve an already-clipped objective: no gradient
        assert grad == 0.0
        assert stats["clip_fraction"].item() == 1.0
    else:
        torch.testing.assert_close(torch.tensor(grad), torch.tensor(-advantage * ratio))  # d(-A r)/d log r
        assert stats["clip_fraction"].item() == 0.0


@pytest.mark.parametrize(("value", "clipped"), [(0.5, True), (-0.5, False), (0.1, False)])
def test_value_loss_clipping(value, clipped):
    values = torch.full((1, 1), value, requires_grad=True)
    zeros, ones = torch.zeros(1, 1), torch.ones(1, 1)
    stats = ppo_losses(zeros, zeros, zeros, values, zeros, ones, ones.bool(), clip_range_value=0.2, vf_coef=0.5)
    stats["loss"].backward()
    # old value 0, return 1: moving past +0.2 towards the return is clipped, moving away never is
    assert (values.grad.item() == 0.0) == clipped
    clipped_value = min(max(value, -0.2), 0.2)
    expected = 0.5 * max((value - 1) ** 2, (clipped_value - 1) ** 2)
    torch.testing.assert_close(stats["value_loss"], torch.tensor(expected))
    torch.testing.assert_close(stats["loss"], 0.5 * stats["value_loss"])


def test_loss_statistics_are_masked_means():
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    old = torch.randn(2, 3)
    stats = ppo_losses(old.clone(), old, torch.randn(2, 3), *torch.randn(3, 2, 3), mask)
    assert stats["approx_kl"].item() == 0.0 and stats["clip_fraction"].item() == 0.0  # on-policy: ratio 1
    garbage = torch.where(mask, old, torch.tensor(50.0))  # padded positions never count
    torch.testing.assert_close(ppo_losses(garbage, old, *[torch.ones(2, 3)] * 4, mask)["approx_kl"], torch.tensor(0.0))


# ------------------------------------------------------------------------------------------ model + value head
def test_policy_with_value_head_matches_get_logprobs(tiny_model_dir):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    model = get_peft_model(
        base, LoraConfig(r=4, target_modules=["q_proj", "down_proj", "lm_head"], init_lora_weights=False)
    )
    policy = PolicyWithValueHead(model, pad_token_id=tokenizer.pad_token_id)
    assert policy.value_head.summary.in_features == base.config.hidden_size
    with torch.no_grad():
        policy.value_head.summary.weight.normal_()
    inference = InferenceModule.from_model(model, tokenizer)
    prompts = [tokenizer("what is two plus three")["input_ids"], tokenizer("the city")["input_ids"]]
    responses = [tokenizer(" the answer is five")["input_ids"], tokenizer(" weather")["input_ids"]]
    logprobs, values = policy(prompts, responses, temperature=0.7)
    expected, mask = inference.get_logprobs(prompts, responses, temperature=0.7, return_mask=True)
    torch.testing.assert_close(logprobs, expected, atol=1e-4, rtol=0)  # two code paths, float32
    assert values.shape == logprobs.shape and (values[~mask] == 0).all() and (values[mask] != 0).all()
    (logprobs.sum() + values.sum()).backward()  # one forward, gradients to both the adapter and the value head
    assert policy.value_head.summary.weight.grad.abs().sum() > 0
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)
    assert ValueHead.for_model(model).summary.in_features == base.config.hidden_size
    base.config.logit_scale = 2.0  # a logit transform: scored from the full logits instead (Llama ignores it)
    with torch.no_grad():
        full_logprobs, full_values = policy(prompts, responses, temperature=0.7)
    torch.testing.assert_close(full_logprobs, logprobs.detach(), atol=1e-4, rtol=0)
    torch.testing.assert_close(full_values, values.detach(), atol=1e-4, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------- recipe
def test_recipe_two_ppo_updates(recipe, tiny_model_dir, tmp_path):
    # The value head and LoRA B start at 0: without a digit in any completion (all scores 0), only float noise
    # between the sampled and the reference log-probs, whitened, would drive the first update, and where the two agree
    # bitwise nothing would move. An 8-token completion of a recipe prompt has no digit with probability at most
    # 0.087 (measured over 4000 samples per prompt), so a batch of 8 without any has probability below 3e-9.
    args = recipe.ScriptArguments(
        model=tiny_model_dir, output_dir=str(tmp_path), num_updates=2, batch_size=8, max_new_tokens=8
    )
    ppo = PPOConfig(num_ppo_epochs=2, num_mini_batches=2, kl_estimator="k3")
    policy, tokenizer = recipe.load_policy(args, torch.device("cpu"))
    trainable = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable) and any(n.startswith("value_head.") for n in trainable)

    history = recipe.train(args, ppo, policy, tokenizer)

    assert len(history) == 2
    for metrics in history:
        assert set(metrics) >= {"score", "kl", "policy_loss", "value_loss", "loss", "approx_kl", "clip_fraction"}
        assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values()), metrics
        assert metrics["logprob_gap"] < 1e-4  # sampled log-probs == scored log-probs: the first ratio is exactly 1
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # untrained LoRA (B = 0) is the reference
    assert history[1]["kl"] != 0.0
    params = dict(policy.named_parameters())
    changed = {n for n, before in trainable.items() if not torch.equal(params[n].detach(), before)}
    assert any("lora_B" in n for n in changed) and {"value_head.summary.weight", "value_head.summary.bias"} <= changed
    # the saved adapter + value head reproduce the trained policy on a fresh copy of the base model
    from peft import PeftModel
    from safetensors.torch import load_file

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    reloaded = PolicyWithValueHead(PeftModel.from_pretrained(base, tmp_path), pad_token_id=tokenizer.pad_token_id)
    reloaded.value_head.load_state_dict(load_file(tmp_path / "value_head.safetensors"))
    prompts, responses = [tokenizer("the year was")["input_ids"]], [tokenizer(" 1 2 3")["input_ids"]]
    with torch.no_grad():
        for expected, actual in zip(policy(prompts, responses), reloaded(prompts, responses)):
            torch.testing.assert_close(actual, expected)


def test_recipe_arguments_from_yaml(recipe, tmp_path):
    from trl import TrlParser

    config = tmp_path / "ppo.yaml"
    config.write_text("model: tiny\nnum_updates: 3\nkl_estimator: k3\nlam: 0.9\n")
    args, ppo = TrlParser((recipe.ScriptArguments, PPOConfig)).parse_args_and_config(
        ["--config", str(config), "--num_updates", "5"]
    )
    assert (args.model, args.num_updates, ppo.kl_estimator, ppo.lam) == ("tiny", 5, "k3", 0.9)
