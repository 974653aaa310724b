"""The original InferenceModule documentation's training loops, run as written on a tiny local model.

The loops below are copied from the original documentation (`ORIGINAL_API.md`, "RL Training Integration"); only the
import and the model name differ, plus one documented change in the GRPO loop: `get_logprobs` returns `[B, T]`
per-token log-probs, so a per-sequence weight needs `[:, None]` to broadcast (see the README, "Coming from the
original InferenceModule"). They score `result.texts`; the property checked is that this scores exactly the sampled
tokens, final EOS included, so the log-probs equal those computed from `result.token_ids`.
"""

from __future__ import annotations

import textwrap

import pytest
import torch

from trl_inference_ext import InferenceModule
from trl_inference_ext.tokenization import encode_response

PPO_LOOP = """
from trl_inference_ext import InferenceModule
import torch.nn.functional as F

# Initialize
policy = InferenceModule(MODEL, backend="huggingface")
reference = InferenceModule(MODEL, backend="huggingface")
# Freeze reference model
reference.backend.model.requires_grad_(False)

# Training loop
for batch in dataloader:
    # Generate responses
    result = policy.generate(
        batch['prompts'],
        max_new_tokens=128,
        temperature=0.8
    )

    # Compute rewards (task-specific)
    rewards = compute_rewards(batch['prompts'], result.texts)

    # Get log probabilities
    logprobs = policy.get_logprobs(batch['prompts'], result.texts)

    # Compute KL penalty
    policy_logits = policy.get_logits(batch['prompts'], result.texts)
    ref_logits = reference.get_logits(batch['prompts'], result.texts)
    kl_div = F.kl_div(
        F.log_softmax(policy_logits, dim=-1),
        F.softmax(ref_logits, dim=-1),
        reduction='batchmean'
    )

    # Compute loss
    advantages = compute_advantages(rewards)
    policy_loss = -(logprobs * advantages).mean()
    total_loss = policy_loss + 0.1 * kl_div

    # Update
    total_loss.backward()
    optimizer.step()
    optimizer.zero_grad()
"""

GRPO_LOOP = """
# GRPO doesn't need value function, just relative rewards
for batch in dataloader:
    # Generate multiple responses per prompt
    results = []
    for prompt in batch['prompts']:
        result = policy.generate(
            [prompt] * 8,  # 8 samples per prompt
            max_new_tokens=128,
            temperature=0.8
        )
        results.append(result)

    # Compute relative rewards (rank-based)
    all_rewards = compute_rewards_batch(results)
    relative_rewards = rank_normalize(all_rewards)

    # Update on better-than-average samples
    for prompt, responses, rel_rewards in zip(
        batch['prompts'], results, relative_rewards
    ):
        # Filter good samples
        good_mask = rel_rewards > 0
        good_responses = [r for r, m in zip(responses, good_mask) if m]
        good_rewards = rel_rewards[good_mask]

        # Compute loss
        logprobs = policy.get_logprobs(
            [prompt] * len(good_responses),
            good_responses
        )
        loss = -(logprobs * good_rewards[:, None]).mean()

        loss.backward()

    optimizer.step()
    optimizer.zero_grad()
"""

PROMPTS = ["what is the answer to one plus two", "tell me about the weather"]


class FrozenStepOptimizer(torch.optim.SGD):
    """SGD with learning rate 0 that records each step: the loop runs in full, the weights stay comparable."""

    def __init__(self, params, on_step) -> None:
        super().__init__(params, lr=0.0)
        self.on_step = on_step

    def step(self, closure=None):
        self.on_step()
        return super().step(closure)


def _check_texts_scored_exactly(module: InferenceModule, prompts, result, logprobs, temperature: float = 1.0):
    exact = module.get_logprobs(prompts, result.token_ids, temperature=temperature)
    assert logprobs.shape == exact.shape == (len(result.token_ids), max(len(t) for t in result.token_ids))
    torch.testing.assert_close(logprobs.detach(), exact.detach(), atol=1e-5, rtol=0)


def test_ppo_loop(tiny_model_dir):
    checks: list[int] = []
    namespace: dict = {
        "MODEL": tiny_model_dir,
        "dataloader": [{"prompts": PROMPTS}, {"prompts": PROMPTS[::-1]}],
        "compute_rewards": lambda prompts, texts: torch.tensor([float(len(t)) for t in texts]),
        "compute_advantages": lambda rewards: ((rewards - rewards.mean()) / (rewards.std() + 1e-6))[:, None],
    }

    def on_step():
        ns = namespace
        _check_texts_scored_exactly(ns["policy"], ns["batch"]["prompts"], ns["result"], ns["logprobs"])
        assert ns["policy_logits"].shape == ns["ref_logits"].shape  # both modules scored the sampled ids
        assert torch.isfinite(ns["total_loss"])
        checks.append(1)

    setup, loop = PPO_LOOP.split("# Training loop", 1)
    exec(compile(setup, "ORIGINAL_API.md:ppo", "exec"), namespace)  # our own test code, not model output
    namespace["optimizer"] = FrozenStepOptimizer(namespace["policy"].backend.model.parameters(), on_step)
    exec(compile(loop, "ORIGINAL_API.md:ppo", "exec"), namespace)
    assert len(checks) == 2


def test_grpo_loop(tiny_model_dir):
    policy = InferenceModule(tiny_model_dir, backend="huggingface")
    scored: list[tuple] = []
    real_get_logprobs = policy.get_logprobs

    def recording_get_logprobs(prompts, responses, **kwargs):
        out = real_get_logprobs(prompts, responses, **kwargs)
        scored.append((prompts, list(responses), out))
        return out

    policy.get_logprobs = recording_get_logprobs
    namespace: dict = {
        "policy": policy,
        "dataloader": [{"prompts": PROMPTS}],
        # Alternating ranks: half of each group is "good", whatever was sampled.
        "compute_rewards_batch": lambda results: [torch.arange(len(r), dtype=torch.float32) for r in results],
        "rank_normalize": lambda rewards: [r - r.mean() for r in rewards],
        "optimizer": FrozenStepOptimizer(policy.backend.model.parameters(), lambda: None),
    }
    exec(compile(textwrap.dedent(GRPO_LOOP), "ORIGINAL_API.md:grpo", "exec"), namespace)
    assert len(scored) == len(PROMPTS)
    results = namespace["results"]
    for (prompts, texts, logprobs), result in zip(scored, results):
        ids = [result.token_ids[i] for i in range(4, 8)]  # ranks 4..7 are above the mean
        assert texts == result.texts[4:]
        exact = real_get_logprobs(prompts, ids)
        assert logprobs.shape == exact.shape
        torch.testing.assert_close(logprobs.detach(), exact.detach(), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def eos_model_dir(tmp_path_factory) -> str:
    """A tiny model fitted to answer every prompt with nothing: its greedy completion is the EOS token alone."""
    from trl_inference_ext.testing import build_tiny_model, fit_conversations

    folder = build_tiny_model(tmp_path_factory.mktemp("eos") / "model", seed=2)
    conversations = [
        [{"role": "user", "content": p}, {"role": "assistant", "content": ""}] for p in (*PROMPTS, "hello", "city")
    ]
    return str(fit_conversations(folder, conversations, steps=80))


def test_greedy_eos_answer_scores_its_one_token(eos_model_dir, caplog):
    module = InferenceModule(eos_model_dir, device="cpu", dtype="float32")
    prompts = [[{"role": "user", "content": p}] for p in PROMPTS]
    result = module.generate(prompts, max_new_tokens=4, do_sample=False, return_logprobs=True)
    eos = module.tokenizer.eos_token_id
    assert result.token_ids == [[eos], [eos]] and result.texts == ["", ""]  # the fitted answer
    # Re-tokenising the text would score nothing: this is the case the lookup exists for.
    assert encode_response(module.tokenizer, result.texts[0], "r", vocab_size=module.vocab_size) == []
    with caplog.at_level("WARNING", logger="trl_inference_ext"):
        logprobs = module.get_logprobs(prompts, result.texts)
    assert logprobs.shape == (2, 1)
    torch.testing.assert_close(logprobs[:, 0], torch.stack([lp[0] for lp in result.logprobs]), atol=1e-5, rtol=0)
    assert "re-tokenised" not in caplog.text
    # A second module with the same tokenizer (a reference model, as in the PPO loop) finds the same ids.
    other = InferenceModule(eos_model_dir, device="cpu", dtype="float32")
    assert other.get_logprobs(prompts, result.texts).shape == (2, 1)


def test_text_not_generated_here_is_tokenised_with_one_warning(tiny_model_dir, caplog):
    module = InferenceModule(tiny_model_dir, device="cpu", dtype="float32")  # its own: the warning is once per module
    with caplog.at_level("WARNING", logger="trl_inference_ext"):
        first = module.get_logprobs(["one plus two"], ["a reply nobody sampled"])
        module.get_logprobs(["one plus two"], ["another reply nobody sampled"])
    ids = encode_response(module.tokenizer, "a reply nobody sampled", "r", vocab_size=module.vocab_size)
    assert first.shape == (1, len(ids))
    assert len([r for r in caplog.records if "result.token_ids" in r.getMessage()]) == 1


def test_sampled_texts_score_like_their_ids(inference):
    """Whatever was sampled, scoring the texts equals scoring the ids (shapes included)."""
    result = inference.generate(
        PROMPTS, max_new_tokens=12, temperature=1.0, num_return_sequences=4, return_logprobs=True
    )
    prompts = [p for p in PROMPTS for _ in range(4)]
    by_text = inference.get_logprobs(prompts, result.texts)
    by_ids = inference.get_logprobs(prompts, result.token_ids)
    torch.testing.assert_close(by_text, by_ids, atol=0, rtol=0)
    sampled = torch.nn.utils.rnn.pad_sequence(result.logprobs, batch_first=True)
    torch.testing.assert_close(by_text, sampled, atol=1e-5, rtol=0)
