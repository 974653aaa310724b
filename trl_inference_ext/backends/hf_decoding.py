"""Sampling loop for Hugging Face causal LMs, written for RL rollouts.

Compared with `model.generate` on repeated prompts (what GRPO does), this loop:

- prefills each distinct prompt once and shares its KV cache across the `n` samples, bucketing prompts by length
  so that little padding is computed;
- drops finished rows from the batch and the cache, so late steps only compute live sequences;
- reports the log-prob of each sampled token from the same logits it was sampled from (no second forward pass);
- on CPU, attends with grouped key/value heads instead of copying the KV cache per query head, and multiplies
  few-row activations weight-major (`cpu_decoding`).

Log-probs are those of the processed distribution (temperature, top-k, top-p), matching `scoring.process_logits`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from ..scoring import process_logits
from ..types import SamplingConfig
from .adapters import base_model
from .base import SequenceOutput
from .cpu_decoding import cpu_decoding, project_to_vocab

BUCKET_RATIO = 0.8


@dataclass
class DecodeSpec:
    """Model-level facts the loop needs."""

    eos_token_ids: frozenset[int]
    pad_token_id: int
    device: torch.device
    max_context_length: int | None = None
    stop_checker: Callable[[list[int]], bool] | None = None
    hidden_path: tuple[Any, Any] | None = None  # (decoder, lm_head) when logits are exactly lm_head(decoder(...))


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
    return "logits_to_keep" in inspect.signature(base_model(model).forward).parameters


def _left_pad(prompt_ids: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompt_ids)
    input_ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for i, ids in enumerate(prompt_ids):
        input_ids[i, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        mask[i, width - len(ids) :] = 1
    return input_ids.to(device), mask.to(device)


def _prefill_padded(
    model: Any, spec: DecodeSpec, prompt_ids: list[list[int]]
) -> tuple[Any, torch.Tensor, torch.Tensor]:
    input_ids, mask = _left_pad(prompt_ids, spec.pad_token_id, spec.device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    extra = {"logits_to_keep": 1} if spec.hidden_path is None and _accepts_logits_to_keep(model) else {}
    cache, logits = _forward(
        model, spec, input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, **extra
    )
    return cache, logits, mask


def length_buckets(lengths: list[int], ratio: float = BUCKET_RATIO) -> list[list[int]]:
    """Groups indices by length, longest first: a bucket takes lengths of at least `ratio` times its longest.

    Prefilling bucket by bucket bounds the padding computed to `1 - ratio` of each bucket (mixed GRPO prompts of
    64-512 tokens padded to 512 compute about twice their tokens).
    """
    buckets: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if buckets and lengths[i] >= ratio * lengths[buckets[-1][0]]:
            buckets[-1].append(i)
        else:
            buckets.append([i])
    return buckets


def _uses_plain_dynamic_cache(model: Any) -> bool:
    """Whether the model's default cache is made of plain `DynamicLayer`s (no sliding window, no hybrid layers)."""
    try:
        layers = DynamicCache(config=base_model(model).config).layers
    except Exception:  # a config that DynamicCache cannot read: keep the padded prefill
        return False
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def _prefill(model: Any, spec: DecodeSpec, prompt_ids: list[list[int]]) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """Runs the prompts, returns (KV cache, last-position logits, attention mask), all left-padded to one width.

    Prompts are prefilled per length bucket and the buckets' caches right-aligned into one cache, when the model's
    cache is made of plain `DynamicLayer`s (no sliding window); otherwise in one padded batch.
    """
    buckets = length_buckets([len(p) for p in prompt_ids])
    if len(buckets) == 1 or not _uses_plain_dynamic_cache(model):
        return _prefill_padded(model, spec, prompt_ids)
    parts = []
    for bucket in buckets:
        cache, logits, _ = _prefill_padded(model, spec, [prompt_ids[i] for i in bucket])
        if not all(type(layer) is DynamicLayer for layer in getattr(cache, "layers", [None])):
            return _prefill_padded(model, spec, prompt_ids)
        parts.append((bucket, cache, logits))
    _, mask = _left_pad(prompt_ids, spec.pad_token_id, spec.device)
    width = mask.shape[1]
    layers = []
    for layer_index in range(len(parts[0][1].layers)):
        merged = []
        for name in ("keys", "values"):
            first = getattr(parts[0][1].layers[layer_index], name)
            full = first.new_zeros((len(prompt_ids), first.shape[1], width, first.shape[3]))
            for bucket, cache, _ in parts:
                states = getattr(cache.layers[layer_index], name)
                full[torch.tensor(bucket, device=full.device), :, width - states.shape[2] :] = states
            merged.append(full)
        layers.append((merged[0], merged[1]))
    logits = parts[0][2].new_empty((len(prompt_ids), parts[0][2].shape[-1]))
    for bucket, _, part_logits in parts:
        logits[torch.tensor(bucket, device=logits.device)] = part_logits
    return DynamicCache(ddp_cache_data=layers), logits, mask


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
    decoder = spec.hidden_path[0] if spec.hidden_path is not None else model
    with torch.no_grad(), cpu_decoding(model, linear_scope=decoder):
        return _sample(model, prompt_ids, sampling, spec)


def _forward(model: Any, spec: DecodeSpec, **inputs: Any) -> tuple[Any, torch.Tensor]:
    """One model call; returns the KV cache and the logits of each row's last position."""
    if spec.hidden_path is None:
        out = model(**inputs)
        return out.past_key_values, out.logits[:, -1, :]
    decoder, head = spec.hidden_path
    inputs.pop("logits_to_keep", None)
    out = decoder(**inputs)
    return out.past_key_values, project_to_vocab(out.last_hidden_state[:, -1, :], head)


def _sample(
    model: Any, prompt_ids: list[list[int]], sampling: SamplingConfig, spec: DecodeSpec
) -> list[SequenceOutput]:
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

    cache, logits, mask = _prefill(model, spec, prompt_ids)
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
        cache, logits = _forward(
            model,
            spec,
            input_ids=next_tokens[:, None],
            attention_mask=mask,
            position_ids=next_pos[:, None],
            past_key_values=cache,
            use_cache=True,
        )
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
