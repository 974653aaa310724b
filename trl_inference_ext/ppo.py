"""PPO building blocks on top of `InferenceModule`: rewards, GAE, whitening, a value head and the clipped losses.

TRL removed its `PPOTrainer`; these pieces rebuild the classic RLHF recipe (see `recipes/ppo.py`). All per-token
tensors are `[B, T]` response tensors, right-padded, with a mask of real tokens: the layout `get_logprobs` returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .backends.hf.backend import hidden_path
from .errors import InvalidValueError
from .scoring import kl_penalty, logprobs_from_hidden, selective_logprobs


@dataclass
class PPOConfig:
    """PPO hyper-parameters.

    Args:
        gamma (`float`, *optional*, defaults to 1.0): Discount factor.
        lam (`float`, *optional*, defaults to 0.95): GAE lambda.
        kl_coef (`float`, *optional*, defaults to 0.05): Weight of the per-token KL penalty against the reference.
        kl_estimator (`str`, *optional*, defaults to `"k1"`): `"k1"`, `"k2"` or `"k3"`, see `scoring.kl_penalty`.
        clip_range (`float`, *optional*, defaults to 0.2): Policy ratio clipping.
        clip_range_value (`float`, *optional*, defaults to 0.2): Value clipping around the rollout's values.
        vf_coef (`float`, *optional*, defaults to 0.1): Weight of the value loss.
        num_ppo_epochs (`int`, *optional*, defaults to 4): Optimisation passes over each rollout batch.
        num_mini_batches (`int`, *optional*, defaults to 1): Mini-batches per pass.
        max_grad_norm (`float`, *optional*, defaults to 1.0): Gradient clipping.
    """

    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = 0.05
    kl_estimator: str = "k1"
    clip_range: float = 0.2
    clip_range_value: float = 0.2
    vf_coef: float = 0.1
    num_ppo_epochs: int = 4
    num_mini_batches: int = 1
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        if self.kl_estimator not in ("k1", "k2", "k3"):
            raise InvalidValueError(f"`kl_estimator` must be one of 'k1', 'k2', 'k3', got {self.kl_estimator!r}.")
        for name in ("num_ppo_epochs", "num_mini_batches"):
            if getattr(self, name) < 1:
                raise InvalidValueError(f"`{name}` must be >= 1, got {getattr(self, name)}.")


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over the positions where `mask` is true (or non-zero)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalises `values` to unit variance (and zero mean) using statistics over the masked positions only.

    Args:
        values (`torch.Tensor`): `[B, T]` values, e.g. advantages.
        mask (`torch.Tensor`): `[B, T]` mask of real tokens.
        shift_mean (`bool`, *optional*, defaults to `True`): Subtract the mean; `False` keeps it (only rescales).
        eps (`float`, *optional*, defaults to 1e-8): Added to the variance.

    Returns:
        `torch.Tensor`: Whitened values, 0 at padded positions.
    """
    mean, count = masked_mean(values, mask), mask.sum()
    var = masked_mean((values - mean) ** 2, mask) * (count / (count - 1) if count > 1 else 1.0)  # unbiased
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(values.dtype)


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards: `-kl_coef * kl` on every token, plus each sequence's score on its last real token.

    Args:
        scores (`torch.Tensor`): `[B]` sequence-level rewards.
        kl (`torch.Tensor`): `[B, T]` per-token KL estimates (see `scoring.kl_penalty`).
        mask (`torch.Tensor`): `[B, T]` right-padded mask of real tokens; every row needs at least one.
        kl_coef (`float`): KL penalty weight.

    Returns:
        `torch.Tensor`: `[B, T]` rewards, 0 at padded positions.
    """
    lengths = mask.long().sum(dim=1)
    if bool((lengths == 0).any()):
        raise InvalidValueError("`mask` has a row without real tokens; every response needs at least one token.")
    rewards = -kl_coef * kl * mask.to(kl.dtype)
    last = (torch.arange(rewards.shape[0], device=rewards.device), lengths - 1)
    return rewards.index_put(last, scores.to(rewards.dtype), accumulate=True)


@torch.no_grad()
def compute_gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised Advantage Estimation over right-padded token sequences.

    `values[:, t]` is the value of the state before token `t`; the state after the last real token is terminal.

    Args:
        rewards (`torch.Tensor`): `[B, T]` per-token rewards (see `token_rewards`).
        values (`torch.Tensor`): `[B, T]` value estimates from the rollout.
        mask (`torch.Tensor`): `[B, T]` right-padded mask of real tokens.
        gamma (`float`, *optional*, defaults to 1.0): Discount factor.
        lam (`float`, *optional*, defaults to 0.95): GAE lambda.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: Advantages and returns (`advantages + values`), both `[B, T]`, 0 at
        padded positions.
    """
    mask = mask.to(values.dtype)
    values = values * mask
    advantages = torch.zeros_like(values)
    next_value = next_advantage = values.new_zeros(values.shape[0])
    for t in reversed(range(values.shape[1])):
        # past a row's last real token both carries are 0: the state after it is terminal
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        next_value = values[:, t]
        advantages[:, t] = next_advantage
    return advantages, advantages + values


class ValueHead(nn.Module):
    """A linear value head on a causal LM's final hidden states; starts at zero (all values 0).

    Args:
        hidden_size (`int`): The policy's hidden size, e.g. `ValueHead.for_model(model)` reads it from the config.
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.summary.weight)
        nn.init.zeros_(self.summary.bias)

    @classmethod
    def for_model(cls, model: Any) -> ValueHead:
        """A value head sized from `model.config` (works on PEFT-wrapped models)."""
        return cls(model.config.get_text_config().hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`[..., H]` hidden states to `[...]` float32 values."""
        return self.summary(hidden_states.to(self.summary.weight.dtype)).squeeze(-1).float()


class PolicyWithValueHead(nn.Module):
    """A (PEFT) causal LM plus a `ValueHead`: one decoder pass gives per-token log-probs and values.

    Log-probs come from the hidden states via `logprobs_from_hidden` (no `[B, T, V]` logits) and equal
    `InferenceModule.get_logprobs` on the same tokens. Wrap this module, not the bare model, with DDP.

    Args:
        model (`nn.Module`): A causal LM, typically a `peft.PeftModel` whose adapters are the trainable policy.
        value_head (`ValueHead`, *optional*): Defaults to `ValueHead.for_model(model)`, on the model's device.
        pad_token_id (`int`, *optional*, defaults to 0): Filler for padded positions (never attended to).
    """

    def __init__(self, model: nn.Module, value_head: ValueHead | None = None, pad_token_id: int = 0) -> None:
        super().__init__()
        self.model: Any = model
        device = next(model.parameters()).device
        self.value_head = value_head if value_head is not None else ValueHead.for_model(model).to(device)
        self.pad_token_id = pad_token_id

    def _pack(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> tuple[torch.Tensor, ...]:
        lengths = [len(p) + len(r) for p, r in zip(prompt_ids, response_ids)]
        batch, width, resp_width = len(lengths), max(lengths), max(len(r) for r in response_ids)
        input_ids = torch.full((batch, width), self.pad_token_id, dtype=torch.long)
        targets = torch.zeros((batch, resp_width), dtype=torch.long)
        positions = torch.zeros((batch, resp_width), dtype=torch.long)  # hidden state predicting each target
        for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
            input_ids[i, : lengths[i]] = torch.tensor(p + r, dtype=torch.long)
            targets[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            positions[i, : len(r)] = torch.arange(len(r)) + len(p) - 1
        attention = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
        response_mask = torch.arange(resp_width)[None, :] < torch.tensor([len(r) for r in response_ids])[:, None]
        device = self.value_head.summary.weight.device
        return tuple(t.to(device) for t in (input_ids, attention.long(), positions, targets, response_mask))

    def forward(
        self, prompt_ids: list[list[int]], response_ids: list[list[int]], temperature: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores responses and estimates values, in one forward pass.

        Args:
            prompt_ids (`list[list[int]]`): Prompt token ids, one list per sequence.
            response_ids (`list[list[int]]`): Response token ids (e.g. `GenerationResult.token_ids`).
            temperature (`float`, *optional*, defaults to 1.0): The sampling temperature, as in `get_logprobs`.

        Returns:
            `tuple[torch.Tensor, torch.Tensor]`: `[B, T]` float32 log-probs of the response tokens and `[B, T]` values
            of the states before each of them, both right-padded with 0.
        """
        input_ids, attention, positions, targets, mask = self._pack(prompt_ids, response_ids)
        path = hidden_path(self.model)
        if path is None:
            # logits are not `lm_head(hidden)` (soft-capping, scaling): score from the model's own logits
            out = self.model(input_ids=input_ids, attention_mask=attention, output_hidden_states=True)
            hidden = _gather(out.hidden_states[-1], positions)
            logprobs = selective_logprobs(_gather(out.logits, positions), targets, temperature)
        else:
            decoder, head = path
            hidden = decoder(input_ids=input_ids, attention_mask=attention).last_hidden_state
            hidden = _gather(hidden, positions)
            logprobs = logprobs_from_hidden(hidden, head, targets, temperature, vocab_size=head.weight.shape[0])
        return logprobs.masked_fill(~mask, 0.0), self.value_head(hidden).masked_fill(~mask, 0.0)


def _gather(states: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return states.gather(1, positions.unsqueeze(-1).expand(-1, -1, states.shape[-1]))


def ppo_losses(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float = 0.2,
    clip_range_value: float = 0.2,
    vf_coef: float = 0.1,
) -> dict[str, torch.Tensor]:
    """The PPO objective: clipped surrogate policy loss plus clipped value loss, as token-level masked means.

    Args:
        logprobs (`torch.Tensor`): `[B, T]` log-probs under the current policy (with gradients).
        old_logprobs (`torch.Tensor`): `[B, T]` log-probs at rollout time.
        advantages (`torch.Tensor`): `[B, T]` advantages (usually whitened).
        values (`torch.Tensor`): `[B, T]` current value estimates (with gradients).
        old_values (`torch.Tensor`): `[B, T]` value estimates at rollout time.
        returns (`torch.Tensor`): `[B, T]` value targets.
        mask (`torch.Tensor`): `[B, T]` mask of real tokens.
        clip_range (`float`, *optional*, defaults to 0.2): Ratios are clipped to `[1 - clip_range, 1 + clip_range]`.
        clip_range_value (`float`, *optional*, defaults to 0.2): Values may move this far from `old_values`.
        vf_coef (`float`, *optional*, defaults to 0.1): Weight of the value loss in `loss`.

    Returns:
        `dict[str, torch.Tensor]`: `loss` (to backpropagate), `policy_loss`, `value_loss`, and detached
        diagnostics `approx_kl` (k3 estimate of KL(old || new)), `clip_fraction` and `value_clip_fraction`.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    policy_loss = masked_mean(torch.maximum(unclipped, clipped), mask)

    values_clipped = old_values + (values - old_values).clamp(-clip_range_value, clip_range_value)
    value_errors = (values - returns) ** 2
    clipped_errors = (values_clipped - returns) ** 2
    value_loss = 0.5 * masked_mean(torch.maximum(value_errors, clipped_errors), mask)
    return {
        "loss": policy_loss + vf_coef * value_loss,
        "policy_loss": policy_loss,
        "value_loss": value_loss,
        "approx_kl": masked_mean(kl_penalty(old_logprobs, logprobs.detach(), "k3"), mask),
        "clip_fraction": masked_mean((clipped > unclipped).float(), mask),
        "value_clip_fraction": masked_mean((clipped_errors > value_errors).float(), mask),
    }
