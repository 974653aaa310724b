"""PPO with a LoRA policy and a value head; rollouts, exact scoring and the adapter-off reference by `InferenceModule`.

TRL removed its `PPOTrainer`; this script rebuilds the classic loop from `trl_inference_ext.ppo`: sample with
`generate(..., return_logprobs=True)`, score the reference with the adapters disabled, KL-penalised per-token
rewards, GAE, whitened advantages, then several epochs of clipped PPO updates on each batch. The toy task rewards
digits: the score of a completion is the fraction of its non-space characters that are digits.

    python recipes/ppo.py --model tiny                           # builds a tiny local model, runs anywhere
    python recipes/ppo.py --model path/to/causal-lm --output_dir ppo-digits --kl_estimator k3
    python recipes/ppo.py --config ppo.yaml                       # YAML keys are the argument names below

The device comes from Accelerate (`accelerate launch recipes/ppo.py ...` also works: the policy and value head are
wrapped together, so their gradients are synchronised).
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from torch.nn.utils.rnn import pad_sequence
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import TrlParser

from trl_inference_ext import InferenceModule
from trl_inference_ext.ppo import PolicyWithValueHead, PPOConfig, compute_gae, ppo_losses, token_rewards, whiten
from trl_inference_ext.scoring import kl_penalty
from trl_inference_ext.testing import build_tiny_model

PROMPTS = [
    "count to ten:",
    "my phone number is",
    "the year was",
    "add 12 and 30:",
    "numbers: 4 8 15",
    "what is two plus three",
    "the answer is",
    "tell me a number",
]


@dataclass
class ScriptArguments:
    """Arguments of the recipe (the PPO hyper-parameters are `trl_inference_ext.ppo.PPOConfig`).

    Args:
        model (`str`, *optional*, defaults to `"tiny"`): A local causal LM folder, or `"tiny"` to build a tiny one.
        output_dir (`str`, *optional*, defaults to `"ppo-digits"`): Where the adapter and value head are saved.
        num_updates (`int`, *optional*, defaults to 40): Rollout + optimisation rounds.
        batch_size (`int`, *optional*, defaults to 32): Completions per rollout.
        max_new_tokens (`int`, *optional*, defaults to 8): Completion length budget.
        temperature (`float`, *optional*, defaults to 1.0): Sampling temperature (scoring uses the same).
        learning_rate (`float`, *optional*, defaults to 2e-3): AdamW learning rate for the adapter and value head.
        lora_r (`int`, *optional*, defaults to 8): LoRA rank.
        lora_alpha (`int`, *optional*, defaults to 16): LoRA scaling.
        lora_lm_head (`bool`, *optional*, defaults to `True`): Adapt the LM head too, besides every other linear
            layer. A random tiny model has no "digit" feature to amplify, so it learns the task far faster with it;
            pass `--no_lora_lm_head` for large-vocabulary models with tied embeddings.
        dtype (`str`, *optional*, defaults to `"float32"`): Model weights dtype, e.g. `"bfloat16"` on a GPU.
        seed (`int`, *optional*, defaults to 0): Seed.
    """

    model: str = "tiny"
    output_dir: str = "ppo-digits"
    num_updates: int = 40
    batch_size: int = 32
    max_new_tokens: int = 8
    temperature: float = 1.0
    learning_rate: float = 2e-3
    lora_r: int = 8
    lora_alpha: int = 16
    lora_lm_head: bool = True
    dtype: str = "float32"
    seed: int = 0


def digit_reward(texts: list[str]) -> list[float]:
    """Fraction of each text's non-space characters that are digits (0 for an empty text)."""
    chars = [[c for c in text if not c.isspace()] for text in texts]
    return [sum(c.isdigit() for c in cs) / len(cs) if cs else 0.0 for cs in chars]


def load_policy(args: ScriptArguments, device: torch.device) -> tuple[PolicyWithValueHead, Any]:
    """Loads the model (building the tiny one if asked), adds a LoRA adapter and a value head."""
    model_dir: str | Path = args.model
    if args.model == "tiny":
        model_dir = Path(args.output_dir) / "tiny-model"
        if not (model_dir / "config.json").exists():
            build_tiny_model(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=args.dtype)
    base.to(device)
    targets: str | list[str] = "all-linear"  # every linear layer but the LM head
    if args.lora_lm_head:
        targets = sorted({name.split(".")[-1] for name, m in base.named_modules() if isinstance(m, torch.nn.Linear)})
    # No LoRA dropout: the first PPO epoch then sees exactly the rollout's policy (ratio 1).
    lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0, target_modules=targets)
    policy = PolicyWithValueHead(get_peft_model(base, lora), pad_token_id=tokenizer.pad_token_id or 0)
    return policy, tokenizer


@torch.no_grad()
def rollout(
    inference: InferenceModule, policy: PolicyWithValueHead, prompts: list[str], args: ScriptArguments, ppo: PPOConfig
) -> dict[str, Any]:
    """Samples completions and computes everything PPO needs from them: old log-probs, values, advantages, returns."""
    result = inference.generate(
        prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature, return_logprobs=True
    )
    assert result.metadata is not None and result.logprobs is not None and result.token_ids is not None
    prompt_ids, response_ids = result.metadata["prompt_token_ids"], result.token_ids
    ref_logprobs, mask = inference.reference().get_logprobs(
        prompt_ids, response_ids, temperature=args.temperature, return_mask=True
    )
    logprobs = pad_sequence(result.logprobs, batch_first=True).to(mask.device)
    scored_logprobs, values = policy(prompt_ids, response_ids, args.temperature)
    scores = torch.tensor(digit_reward(result.texts), device=mask.device)
    kl = kl_penalty(logprobs, ref_logprobs, ppo.kl_estimator, mask)
    advantages, returns = compute_gae(token_rewards(scores, kl, mask, ppo.kl_coef), values, mask, ppo.gamma, ppo.lam)
    return {
        "prompt_ids": prompt_ids,
        "response_ids": response_ids,
        "logprobs": logprobs,
        "values": values,
        "advantages": whiten(advantages, mask),
        "returns": returns,
        "mask": mask,
        "score": scores.mean().item(),
        "kl": kl.sum(dim=1).mean().item(),
        # sampling and scoring log-probs must agree, or the first PPO ratio is not 1
        "logprob_gap": (scored_logprobs - logprobs).abs().max().item(),
    }


def ppo_update(
    policy: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    accelerator: Accelerator,
    batch: dict[str, Any],
    args: ScriptArguments,
    ppo: PPOConfig,
) -> dict[str, float]:
    """Runs `ppo.num_ppo_epochs` passes of mini-batch PPO steps over one rollout; returns the mean losses."""
    totals: dict[str, float] = defaultdict(float)
    steps = 0
    for _ in range(ppo.num_ppo_epochs):
        for chunk in torch.randperm(len(batch["response_ids"])).chunk(ppo.num_mini_batches):
            rows = chunk.tolist()
            logprobs, values = policy(
                [batch["prompt_ids"][i] for i in rows], [batch["response_ids"][i] for i in rows], args.temperature
            )
            old = {k: batch[k][rows, : logprobs.shape[1]] for k in ("logprobs", "values", "advantages", "returns")}
            stats = ppo_losses(
                logprobs,
                old["logprobs"],
                old["advantages"],
                values,
                old["values"],
                old["returns"],
                batch["mask"][rows, : logprobs.shape[1]],
                clip_range=ppo.clip_range,
                clip_range_value=ppo.clip_range_value,
                vf_coef=ppo.vf_coef,
            )
            accelerator.backward(stats["loss"])
            accelerator.clip_grad_norm_(policy.parameters(), ppo.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
            for key, value in stats.items():
                totals[key] += value.item()
            steps += 1
    return {key: value / steps for key, value in totals.items()}


def train(
    args: ScriptArguments, ppo: PPOConfig, policy: PolicyWithValueHead | None = None, tokenizer: Any = None
) -> list[dict[str, float]]:
    """Trains the policy and value head with PPO, prints per-update metrics and saves both to `args.output_dir`.

    Args:
        args (`ScriptArguments`): Recipe arguments.
        ppo (`PPOConfig`): PPO hyper-parameters.
        policy (`PolicyWithValueHead`, *optional*): A policy to train in place (with `tokenizer`); loaded from
            `args.model` when not given.
        tokenizer (*optional*): The policy's tokenizer.

    Returns:
        `list[dict[str, float]]`: The metrics of each update.
    """
    accelerator = Accelerator()
    set_seed(args.seed, device_specific=True)
    if policy is None:
        with accelerator.main_process_first():  # the main process builds the tiny model, the others reuse it
            policy, tokenizer = load_policy(args, accelerator.device)
    inference = InferenceModule.from_model(policy.model, tokenizer)  # rollouts from the same weights, no copy
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=args.learning_rate)
    wrapped, optimizer = accelerator.prepare(policy, optimizer)
    rng = random.Random(args.seed + accelerator.process_index)
    history = []
    for update in range(args.num_updates):
        batch = rollout(inference, policy, rng.choices(PROMPTS, k=args.batch_size), args, ppo)
        losses = ppo_update(wrapped, optimizer, accelerator, batch, args, ppo)
        metrics = {key: batch[key] for key in ("score", "kl", "logprob_gap")} | losses
        history.append(metrics)
        accelerator.print(
            f"update {update + 1}/{args.num_updates} " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
        )
    if accelerator.is_main_process:
        policy.model.save_pretrained(args.output_dir, save_embedding_layers=False)  # the LoRA adapter only
        save_file(policy.value_head.state_dict(), str(Path(args.output_dir) / "value_head.safetensors"))
        tokenizer.save_pretrained(args.output_dir)
        accelerator.print(f"saved the adapter and value head to {args.output_dir}")
    return history


if __name__ == "__main__":
    script_args, ppo_config = TrlParser((ScriptArguments, PPOConfig)).parse_args_and_config()
    train(script_args, ppo_config)
