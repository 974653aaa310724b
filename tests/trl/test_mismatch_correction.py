"""The sampler/trainer mismatch correction: the ratio's definition, its masks, and the TRL behaviour it relies on.

The vLLM side (a real engine inside a real `GRPOTrainer`) is in `tests/vllm/test_vllm_mismatch_correction.py`.
"""

from __future__ import annotations

import math

import pytest
import torch

from trl_inference_ext import InferenceModule
from trl_inference_ext.errors import InvalidValueError, UnsupportedError
from trl_inference_ext.trl.correction import (
    MismatchCorrection,
    SamplingMetrics,
    combine_metrics,
    correct,
    scoring_settings,
)

datasets = pytest.importorskip("datasets")
trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")

PROMPTS = ["what is", "compute the sum", "name a number", "please add", "tell me", "the weather", "one two", "say"]


def _rollouts(inference: InferenceModule, **sampling):
    """16-token samples of PROMPTS, 4 each, with their reported log-probs, and the mask of real tokens."""
    result = inference.generate(
        PROMPTS, max_new_tokens=16, num_return_sequences=4, return_logprobs=True, use_cache=False, seed=1, **sampling
    )
    prompt_ids = [result.metadata["prompt_token_ids"][i // 4] for i in range(len(result.token_ids))]
    width = max(len(ids) for ids in result.token_ids)
    sampled = torch.zeros(len(result.token_ids), width, dtype=torch.float64)
    mask = torch.zeros(len(result.token_ids), width, dtype=torch.bool)
    for i, lp in enumerate(result.logprobs):
        sampled[i, : len(lp)] = lp.double()
        mask[i, : len(lp)] = True
    return prompt_ids, result.token_ids, sampled, mask


@pytest.fixture(scope="module")
def trainer_copy(tiny_model_dir):
    """A second, separately loaded copy of the model, scored the way the rollout function scores the trainer's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return InferenceModule.from_model(model, AutoTokenizer.from_pretrained(tiny_model_dir), cache_size=0)


def _scored(scorer: InferenceModule, prompt_ids, completion_ids, width: int, **sampling) -> torch.Tensor:
    logps = scorer.get_logprobs(prompt_ids, completion_ids, **scoring_settings(sampling))
    out = torch.zeros(len(completion_ids), width, dtype=torch.float64)
    out[:, : logps.shape[1]] = logps.double()
    return out


def test_ratio_is_one_per_token_without_truncation(inference, trainer_copy):
    """Same weights on both sides, top-p 1, top-k off, min-p 0: every token's ratio is 1 within 1e-3."""
    sampling = {"temperature": 0.8, "top_p": 1.0, "top_k": -1}
    prompt_ids, completion_ids, sampled, mask = _rollouts(inference, **sampling)
    trainer = _scored(trainer_copy, prompt_ids, completion_ids, sampled.shape[1], **sampling)
    for mode in ("token_mask", "sequence_mask"):
        result = correct(trainer, sampled, mask, MismatchCorrection(mode=mode))
        assert result.keep.equal(mask)
        assert result.metrics["sampling/importance_sampling_masked_fraction"] == 0
    token_ratio = correct(trainer, sampled, mask, MismatchCorrection(mode="token_mask")).raw_ratio[mask]
    assert token_ratio.numel() > 100
    assert (token_ratio - 1).abs().max() < 1e-3


def test_top_p_ratio_has_no_systematic_bias_under_the_processed_definition(inference, trainer_copy):
    """Under top-p 0.9 both sides are processed alike, so the mean log-ratio is 0; against the trainer's full
    vocabulary (the definition of TRL issue #6789) it is the log of the kept mass, below 0 at every step."""
    sampling = {"temperature": 1.0, "top_p": 0.9, "top_k": -1}
    prompt_ids, completion_ids, sampled, mask = _rollouts(inference, **sampling)
    processed = _scored(trainer_copy, prompt_ids, completion_ids, sampled.shape[1], **sampling)
    full = _scored(trainer_copy, prompt_ids, completion_ids, sampled.shape[1], temperature=1.0)
    result = correct(processed, sampled, mask, MismatchCorrection(mode="token_mask"))
    kept = result.keep
    # A token is masked only where the two sides' kept sets differ (a float near-tie at the 0.9 boundary): rare.
    assert kept.sum() >= 0.99 * mask.sum()
    log_ratio = (processed - sampled)[kept]
    assert log_ratio.abs().mean() < 1e-4
    # The full-vocabulary ratio is p(x) / (p(x) / kept mass) = kept mass <= 1: biased low, by up to log 0.9 a token.
    full_log_ratio = (full - sampled)[mask]
    assert full_log_ratio.max() < 1e-4 and full_log_ratio.min() > math.log(0.9) - 1e-3
    assert full_log_ratio.mean() < -1e-3


def test_mask_modes_follow_trls_bounds():
    """Ratios built by construction: exp(+0.5) per token for row 0, exp(-2) once in row 1, row 2 unscorable."""
    sampler = torch.zeros(3, 4, dtype=torch.float64)
    trainer = torch.tensor([[0.5, 0.5, 0.5, 0.0], [0.0, -2.0, 0.0, 0.0], [0.0, -math.inf, 0.0, 0.0]]).double()
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]]).bool()
    sequence = correct(trainer, sampler, mask, MismatchCorrection(mode="sequence_mask", clip_max=3.0))
    # Row 0: exp(1.5) = 4.48 > 3, masked; row 1: exp(-2) kept (no lower bound); row 2: ratio 0 (-inf), masked.
    assert sequence.raw_ratio.flatten().tolist() == pytest.approx([math.exp(1.5), math.exp(-2), 0.0])
    assert sequence.keep.tolist() == [[False] * 4, [True] * 4, [False] * 4]
    assert sequence.ratio.flatten().tolist() == pytest.approx([0.0, math.exp(-2), 0.0])
    assert sequence.metrics["sampling/importance_sampling_masked_fraction"] == pytest.approx(2 / 3)
    assert sequence.metrics["sampling/raw_importance_sampling_ratio/max"] == pytest.approx(math.exp(1.5))
    assert sequence.metrics["sampling/importance_sampling_ratio/max"] == pytest.approx(math.exp(-2))

    token = correct(trainer, sampler, mask, MismatchCorrection(mode="token_mask", clip_min=0.5, clip_max=3.0))
    assert token.keep.tolist() == [[True, True, True, False], [True, False, True, True], [True, False, False, False]]
    assert token.metrics["sampling/importance_sampling_masked_fraction"] == pytest.approx(2 / 9)
    assert token.metrics["sampling/sampling_logp_difference/max"] == pytest.approx(2.0)  # -inf is not averaged

    unbounded = correct(trainer, sampler, mask, MismatchCorrection(mode="sequence_mask", clip_max=None))
    assert unbounded.keep[0].equal(mask[0]) and not unbounded.keep[2].any()  # a zero ratio drops the row in any case


def test_a_token_without_a_sampler_logprob_is_not_corrected():
    sampler = torch.tensor([[float("nan"), 0.0]], dtype=torch.float64)
    trainer = torch.tensor([[-5.0, 0.0]], dtype=torch.float64)
    result = correct(trainer, sampler, torch.ones(1, 2, dtype=torch.bool), MismatchCorrection(mode="token_mask"))
    assert result.raw_ratio.tolist() == [[1.0, 1.0]] and result.keep.all()


def test_settings_come_from_grpo_config_and_truncation_is_refused(tmp_path):
    args = trl.GRPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    default = MismatchCorrection.from_trl_args(args)
    assert (default.enabled, default.mode, default.clip_min, default.clip_max) == (True, "sequence_mask", None, 3.0)
    for mode in ("sequence_truncate", "token_truncate"):
        args.vllm_importance_sampling_mode = mode
        with pytest.raises(UnsupportedError, match="sequence_mask"):
            MismatchCorrection.from_trl_args(args).check_applicable()
    args.vllm_importance_sampling_correction = False
    MismatchCorrection.from_trl_args(args).check_applicable()  # off: nothing to apply
    args.vllm_importance_sampling_mode = "per_token"
    with pytest.raises(InvalidValueError, match="vllm_importance_sampling_mode"):
        MismatchCorrection.from_trl_args(args)
    args.vllm_importance_sampling_mode, args.vllm_importance_sampling_clip_max = "token_mask", -1.0
    with pytest.raises(InvalidValueError, match="vllm_importance_sampling_clip_max"):
        MismatchCorrection.from_trl_args(args)


def test_metrics_combine_across_processes_as_trl_does():
    local = {
        "sampling/importance_sampling_ratio/min": torch.tensor(0.5, dtype=torch.float64),
        "sampling/importance_sampling_ratio/mean": torch.tensor(1.0, dtype=torch.float64),
        "sampling/importance_sampling_ratio/max": torch.tensor(2.0, dtype=torch.float64),
        "sampling/policy_lag/max": torch.tensor(math.nan, dtype=torch.float64),
    }

    def two_processes(t: torch.Tensor) -> torch.Tensor:  # the other process measured twice these values
        return torch.cat([t, t * 2])

    combined = combine_metrics(local, two_processes)
    assert combined["sampling/importance_sampling_ratio/min"] == 0.5
    assert combined["sampling/importance_sampling_ratio/max"] == 4.0
    assert combined["sampling/importance_sampling_ratio/mean"] == 1.5
    assert math.isnan(combined["sampling/policy_lag/max"])

    logged: list = []
    metrics = SamplingMetrics()
    metrics.pending = combined
    assert metrics(["a", "b"], log_metric=lambda name, value: logged.append(name)) == [None, None]
    assert "sampling/policy_lag/max" not in logged and len(logged) == 3
    assert metrics.pending == {}


def test_a_zero_env_mask_removes_tokens_from_trls_loss(tiny_model_dir, tmp_path):
    """Pins what the correction relies on: TRL multiplies the loss mask by `env_mask`, so rollouts whose mask is all 0
    leave the policy where it was (grad norm 0), while the same rollouts with mask 1 move it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_inference_ext.trl import rollout_func

    def alternating_reward(completions, **kwargs):
        return [float(i % 2 == 0) for i in range(len(completions))]

    norms = {}
    for keep in (0, 1):
        inner = rollout_func()

        def masked(prompts, trainer, inner=inner, keep=keep):
            out = inner(prompts, trainer)
            out["env_mask"] = [[keep] * len(ids) for ids in out["completion_ids"]]
            return out

        args = trl.GRPOConfig(
            output_dir=str(tmp_path / str(keep)), max_steps=1, beta=0.0, num_generations=2,
            per_device_train_batch_size=4, max_completion_length=16, temperature=1.0, learning_rate=5e-3,
            logging_steps=1, report_to="none", use_cpu=True, bf16=False, save_strategy="no", seed=0,
        )  # fmt: skip
        trainer = trl.GRPOTrainer(
            model=AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
            reward_funcs=[alternating_reward],
            args=args,
            train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS[:4]}),
            processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
            peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
            rollout_func=masked,
        )
        trainer.train()
        norms[keep] = next(e["grad_norm"] for e in trainer.state.log_history if "grad_norm" in e)
    assert norms[0] == 0.0
    assert norms[1] > 1e-3  # distinct completions with alternating rewards (see test_trl_grpo's UPDATE_GRAD_NORM)


def test_greedy_rollouts_are_scored_as_their_log_probs_were_reported():
    """Greedy decoding reports log-probs at temperature 1 without truncation: the trainer scores them the same way."""
    greedy = scoring_settings({"temperature": 0.0, "top_p": 0.9, "top_k": 5, "min_p": 0.1, "repetition_penalty": 1.2})
    assert greedy == {"temperature": 1.0, "top_k": -1, "top_p": 1.0, "min_p": 0.0, "repetition_penalty": 1.2}
    sampled = scoring_settings({"temperature": 0.7, "top_p": 0.9, "top_k": 5, "max_new_tokens": 8})
    assert sampled == {"temperature": 0.7, "top_k": 5, "top_p": 0.9, "min_p": 0.0, "repetition_penalty": 1.0}
