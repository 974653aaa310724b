"""Sampling loop for Hugging Face causal LMs, written for RL rollouts.

Compared with `model.generate` on repeated prompts (what GRPO does), this loop:

- prefills each distinct prompt once and shares its KV cache across the `n` samples;
- drops finished rows from the batch and the cache, so late steps only compute live sequences;
- reports the log-prob of each sampled token from the same logits it was sampled from (no second forward pass).

Log-probs are those of the processed distribution (temperature, top-k, top-p), matching `scoring.process_logits`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..scoring import process_logits
from ..types import SamplingConfig
from .base import SequenceOutput


@dataclass
class DecodeSpec:
    """Model-level facts the loop needs."""

    eos_token_ids: frozenset[int]
    pad_token_id: int
    device: torch.device
    max_context_length: int | None = None
    stop_checker: Callable[[list[int]], bool] | None = None


def sample_from_logits(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draws one token per row from `softmax(logits)` by inverse CDF: one uniform number per row.

    `torch.multinomial` draws a random number per vocabulary entry on CPU, which costs more than a decoder layer at a
    150k vocabulary; this costs a cumulative sum and a binary search. Tokens with zero probability (`-inf` logits)
    are never drawn: the uniform value lies in `(0, total]` and each token owns the interval `(cdf[i-1], cdf[i]]`.

    Args:
        logits (`torch.Tensor`): `[rows, V]` processed logits (float32).
        generator (`torch.Generator`, *optional*): Source of randomness, for seeded sampling.

    Returns:
        `torch.Tensor`: `[rows]` token ids.
    """
    cdf = logits.softmax(dim=-1).cumsum(dim=-1, dtype=torch.float64)
    total = cdf[:, -1:]
    uniform = 1.0 - torch.rand(total.shape, generator=generator, device=logits.device, dtype=torch.float64)
    return torch.searchsorted(cdf, uniform * total).squeeze(1).clamp_(max=logits.shape[-1] - 1)


def _accepts_logits_to_keep(model: Any) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def _left_pad(prompt_ids: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompt_ids)
    input_ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for i, ids in enumerate(prompt_ids):
        input_ids[i, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        mask[i, width - len(ids) :] = 1
    return input_ids.to(device), mask.to(device)


@torch.no_grad()
def sample(model: Any, prompt_ids: list[list[int]], sampling: SamplingConfig, spec: DecodeSpec) -> list[SequenceOutput]:
    """Generates `sampling.num_return_sequences` completions per prompt.

    Args:
        model (`torch.nn.Module`): A causal LM (plain, PEFT-wrapped or DDP-unwrapped).
        prompt_ids (`list[list[int]]`): Non-empty prompts as token ids.
        sampling (`SamplingConfig`): Validated sampling settings.
        spec (`DecodeSpec`): EOS ids, pad id, device, context length, stop-string checker.

    Returns:
        `list[SequenceOutput]`: Prompt-major completions (`n` consecutive entries per prompt).
    """
    n = sampling.num_return_sequences
    rows_total = len(prompt_ids) * n
    budgets = [
        sampling.max_new_tokens
        if spec.max_context_length is None
        else max(0, min(sampling.max_new_tokens, spec.max_context_length - len(p)))
        for p in prompt_ids
        for _ in range(n)
    ]
    tokens: list[list[int]] = [[] for _ in range(rows_total)]
    logprobs: list[list[torch.Tensor]] = [[] for _ in range(rows_total)]
    logits_out: list[list[torch.Tensor]] = [[] for _ in range(rows_total)]
    finish = ["length"] * rows_total
    generator = None
    if sampling.seed is not None and not sampling.greedy:
        generator = torch.Generator(device=spec.device).manual_seed(sampling.seed)

    input_ids, mask = _left_pad(prompt_ids, spec.pad_token_id, spec.device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    extra = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, **extra)
    cache, logits = out.past_key_values, out.logits[:, -1, :]
    next_pos = mask.sum(-1)
    if n > 1:
        cache.batch_repeat_interleave(n)
        logits, mask, next_pos = (t.repeat_interleave(n, dim=0) for t in (logits, mask, next_pos))
    rows = torch.arange(rows_total)
    alive = [r for r in range(rows_total) if budgets[r] > 0]
    if len(alive) < rows_total:
        keep = torch.tensor(alive, dtype=torch.long)
        cache.batch_select_indices(keep.to(spec.device))
        rows, logits, mask, next_pos = rows[keep], logits[keep.to(logits.device)], mask[keep], next_pos[keep]

    while len(rows) > 0:
        processed = (
            logits.float()
            if sampling.greedy
            else process_logits(logits, sampling.temperature, sampling.top_k, sampling.top_p)
        )
        next_tokens = processed.argmax(dim=-1) if sampling.greedy else sample_from_logits(processed, generator)
        if sampling.return_logprobs:
            step_lp = processed.gather(-1, next_tokens[:, None]).squeeze(1) - torch.logsumexp(processed, dim=-1)
            step_lp = step_lp.cpu()
        step_logits = processed.cpu() if sampling.return_logits else None

        keep_local: list[int] = []
        for j, (row, token) in enumerate(zip(rows.tolist(), next_tokens.tolist())):
            tokens[row].append(token)
            if sampling.return_logprobs:
                logprobs[row].append(step_lp[j])
            if step_logits is not None:
                logits_out[row].append(step_logits[j])
            if token in spec.eos_token_ids or (spec.stop_checker is not None and spec.stop_checker(tokens[row])):
                finish[row] = "stop"
            elif len(tokens[row]) < budgets[row]:
                keep_local.append(j)
        if not keep_local:
            break
        if len(keep_local) < len(rows):
            keep = torch.tensor(keep_local, dtype=torch.long)
            keep_dev = keep.to(spec.device)
            cache.batch_select_indices(keep_dev)
            rows, mask, next_pos, next_tokens = rows[keep], mask[keep_dev], next_pos[keep_dev], next_tokens[keep_dev]
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
        out = model(
            input_ids=next_tokens[:, None],
            attention_mask=mask,
            position_ids=next_pos[:, None],
            past_key_values=cache,
            use_cache=True,
        )
        cache, logits = out.past_key_values, out.logits[:, -1, :]
        next_pos = next_pos + 1

    return [
        SequenceOutput(
            prompt_index=row // n,
            token_ids=tokens[row],
            finish_reason=finish[row],
            logprobs=torch.stack(logprobs[row])
            if sampling.return_logprobs and logprobs[row]
            else (torch.zeros(0) if sampling.return_logprobs else None),
            logits=torch.stack(logits_out[row]) if sampling.return_logits and logits_out[row] else None,
        )
        for row in range(rows_total)
    ]
