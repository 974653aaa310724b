"""Sampling loop for Hugging Face causal LMs, written for RL rollouts.

Compared with `model.generate` on repeated prompts (what GRPO does), this loop:

- prefills each distinct prompt once and shares its KV cache across the `n` samples, bucketing prompts by length
  so that little padding is computed;
- drops finished rows from the batch and the cache, so late steps only compute live sequences;
- given a `TurnCache` (multi-turn rollouts), starts a prompt that extends a row of the previous call from that row's
  kept keys and values, running only the appended tokens, and keeps the rows that stop for the next call;
- reports the log-prob of each sampled token from the same logits it was sampled from (no second forward pass);
- on CPU, attends with grouped key/value heads instead of copying the KV cache per query head, and multiplies
  few-row activations weight-major (`cpu_decoding`).

Log-probs are those of the processed distribution (repetition penalty, temperature, min-p, top-k, top-p, in vLLM's
order), matching `scoring.process_logits`. For the repetition penalty, each live row keeps a `[V]` mask of the ids
of its prompt and of the tokens sampled so far.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from ...scoring import process_logits, process_with
from ...types import SamplingConfig
from ..adapters import base_model
from ..base import SequenceOutput
from .cpu_kernels import cpu_decoding, project_to_vocab
from .turn_cache import TurnCache, TurnEntry

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


def uses_plain_dynamic_cache(model: Any) -> bool:
    """Whether the model's default cache is made of plain `DynamicLayer`s (no sliding window, no hybrid layers)."""
    try:
        layers = DynamicCache(config=base_model(model).config).layers
    except Exception:  # a config that DynamicCache cannot read: keep the padded prefill
        return False
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def _prefill(
    model: Any, spec: DecodeSpec, prompt_ids: list[list[int]], reused: list[TurnEntry | None] | None = None
) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """Runs the prompts, returns (KV cache, last-position logits, attention mask), all left-padded to one width.

    Prompts are prefilled per length bucket and the buckets' caches right-aligned into one cache, when the model's
    cache is made of plain `DynamicLayer`s (no sliding window); otherwise in one padded batch. Prompts with an entry
    in `reused` (keys and values of their first tokens, kept from the previous call) run only their tokens after it,
    as one more group.
    """
    if reused is None or all(entry is None for entry in reused):
        reused = None
        if len(length_buckets([len(p) for p in prompt_ids])) == 1:
            return _prefill_padded(model, spec, prompt_ids)
    if not uses_plain_dynamic_cache(model):
        return _prefill_padded(model, spec, prompt_ids)
    fresh = [i for i in range(len(prompt_ids)) if reused is None or reused[i] is None]
    groups = [[fresh[i] for i in b] for b in length_buckets([len(prompt_ids[i]) for i in fresh])]
    parts = []
    for bucket in groups:
        cache, logits, mask = _prefill_padded(model, spec, [prompt_ids[i] for i in bucket])
        if not all(type(layer) is DynamicLayer for layer in getattr(cache, "layers", [None])):
            return _prefill_padded(model, spec, prompt_ids)
        parts.append((bucket, cache, logits, mask))
    if len(fresh) < len(prompt_ids):
        assert reused is not None
        rows = sorted(set(range(len(prompt_ids))) - set(fresh))
        entries = [entry for entry in (reused[i] for i in rows) if entry is not None]
        cache, logits, mask = _prefill_reused(
            model, spec, entries, [prompt_ids[i][e.length :] for i, e in zip(rows, entries)]
        )
        parts.append((rows, cache, logits, mask))
    return _merge(parts, len(prompt_ids))


def _prefill_reused(
    model: Any, spec: DecodeSpec, entries: list[TurnEntry], new_ids: list[list[int]]
) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """Runs only `new_ids` after each row's stored keys and values (right-aligned, left-padded to one width).

    The attention mask covers the padding before each stored part and before each new part; positions are its
    cumulative sum, as in a prefill from the start, so each token gets the position it would have had there.
    """
    past = max(entry.length for entry in entries)
    layers = []
    for layer_index in range(len(entries[0].keys)):
        merged = []
        for states in ([e.keys[layer_index] for e in entries], [e.values[layer_index] for e in entries]):
            full = states[0].new_zeros((len(entries), states[0].shape[0], past, states[0].shape[2]))
            for row, part in enumerate(states):
                full[row, :, past - part.shape[1] :] = part
            merged.append(full)
        layers.append((merged[0], merged[1]))
    input_ids, new_mask = _left_pad(new_ids, spec.pad_token_id, spec.device)
    past_mask = torch.zeros((len(entries), past), dtype=torch.long)
    for row, entry in enumerate(entries):
        past_mask[row, past - entry.length :] = 1
    mask = torch.cat([past_mask.to(spec.device), new_mask], dim=-1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, past:]
    extra = {"logits_to_keep": 1} if spec.hidden_path is None and _accepts_logits_to_keep(model) else {}
    cache, logits = _forward(
        model,
        spec,
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=positions,
        past_key_values=DynamicCache(ddp_cache_data=layers),
        use_cache=True,
        **extra,
    )
    return cache, logits, mask


def _merge(
    parts: list[tuple[list[int], Any, torch.Tensor, torch.Tensor]], rows: int
) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """Right-aligns the caches and masks of groups of rows (`(rows, cache, logits, mask)`) into one batch."""
    width = max(mask.shape[1] for _, _, _, mask in parts)
    layers = []
    for layer_index in range(len(parts[0][1].layers)):
        merged = []
        for name in ("keys", "values"):
            first = getattr(parts[0][1].layers[layer_index], name)
            full = first.new_zeros((rows, first.shape[1], width, first.shape[3]))
            for indices, cache, _, _ in parts:
                states = getattr(cache.layers[layer_index], name)
                full[torch.tensor(indices, device=full.device), :, width - states.shape[2] :] = states
            merged.append(full)
        layers.append((merged[0], merged[1]))
    first_logits, first_mask = parts[0][2], parts[0][3]
    logits = first_logits.new_empty((rows, first_logits.shape[-1]))
    mask = first_mask.new_zeros((rows, width))
    for indices, _, part_logits, part_mask in parts:
        index = torch.tensor(indices, device=logits.device)
        logits[index] = part_logits
        mask[index.to(mask.device), width - part_mask.shape[1] :] = part_mask
    return DynamicCache(ddp_cache_data=layers), logits, mask


def _keep_turn(turn_cache: TurnCache, token_ids: list[int], cache: Any, mask: torch.Tensor, row: int) -> None:
    """Copies one batch row's keys and values at its unpadded positions into `turn_cache`, when they fit."""
    valid = mask[row].bool()
    length = int(valid.sum())
    layers = getattr(cache, "layers", None)
    if length != len(token_ids) or not layers or not all(type(layer) is DynamicLayer for layer in layers):
        return
    nbytes = sum(2 * layer.keys[row, :, :1].numel() * length * layer.keys.element_size() for layer in layers)
    if not turn_cache.fits(nbytes):
        return
    turn_cache.store(
        token_ids, [layer.keys[row][:, valid] for layer in layers], [layer.values[row][:, valid] for layer in layers]
    )


def sample(
    model: Any,
    prompt_ids: list[list[int]],
    sampling: SamplingConfig,
    spec: DecodeSpec,
    turn_cache: TurnCache | None = None,
    state_key: Any = None,
) -> list[SequenceOutput]:
    """Generates `sampling.num_return_sequences` completions per prompt.

    Args:
        model (`torch.nn.Module`): A causal LM (plain, PEFT-wrapped or DDP-unwrapped).
        prompt_ids (`list[list[int]]`): Non-empty prompts as token ids.
        sampling (`SamplingConfig`): Validated sampling settings.
        spec (`DecodeSpec`): EOS ids, pad id, device, context length, stop-string checker.
        turn_cache (`TurnCache`, *optional*): Per-row KV caches kept from the previous call: prompts that extend one
            run only their new tokens, and the rows that stop are stored for the next call.
        state_key (`Any`, *optional*): The weights and adapter state, with which `turn_cache` entries must agree.

    Returns:
        `list[SequenceOutput]`: Prompt-major completions (`n` consecutive entries per prompt).
    """
    decoder = spec.hidden_path[0] if spec.hidden_path is not None else model
    with torch.no_grad(), cpu_decoding(model, linear_scope=decoder):
        return _sample(model, prompt_ids, sampling, spec, turn_cache, state_key)


def _forward(model: Any, spec: DecodeSpec, **inputs: Any) -> tuple[Any, torch.Tensor]:
    """One model call; returns the KV cache and the logits of each row's last position."""
    if spec.hidden_path is None:
        out = model(**inputs)
        return out.past_key_values, out.logits[:, -1, :]
    decoder, head = spec.hidden_path
    inputs.pop("logits_to_keep", None)
    out = decoder(**inputs)
    return out.past_key_values, project_to_vocab(out.last_hidden_state[:, -1, :], head)


@dataclass
class _Completions:
    """What `_sample` gathers for each row (prompt-major, `n` rows per prompt) while it decodes.

    Attributes:
        budgets (`list[int]`): Most tokens each row may generate.
        tokens (`list[list[int]]`): Tokens sampled so far.
        logprobs (`list[list[torch.Tensor]]`): Their log-probs (0-d CPU tensors), with `return_logprobs`.
        logits (`list[list[torch.Tensor]]`): The processed logits they were sampled from (CPU), with `return_logits`.
        finish (`list[str]`): `"stop"` once a row stopped, else `"length"`.
    """

    budgets: list[int]
    tokens: list[list[int]] = field(init=False)
    logprobs: list[list[torch.Tensor]] = field(init=False)
    logits: list[list[torch.Tensor]] = field(init=False)
    finish: list[str] = field(init=False)

    def __post_init__(self) -> None:
        rows = len(self.budgets)
        self.tokens = [[] for _ in range(rows)]
        self.logprobs = [[] for _ in range(rows)]
        self.logits = [[] for _ in range(rows)]
        self.finish = ["length"] * rows

    def outputs(self, n: int, sampling: SamplingConfig) -> list[SequenceOutput]:
        """The completions, prompt-major; a row without tokens gets empty log-probs (with `return_logprobs`).

        Args:
            n (`int`): Rows per prompt.
            sampling (`SamplingConfig`): Says whether log-probs and logits are returned.
        """
        outputs = []
        for row, (tokens, logprobs, logits) in enumerate(zip(self.tokens, self.logprobs, self.logits)):
            if sampling.return_logprobs:
                row_logprobs: torch.Tensor | None = torch.stack(logprobs) if logprobs else torch.zeros(0)
            else:
                row_logprobs = None
            outputs.append(
                SequenceOutput(
                    prompt_index=row // n,
                    token_ids=tokens,
                    finish_reason=self.finish[row],
                    logprobs=row_logprobs,
                    logits=torch.stack(logits) if sampling.return_logits and logits else None,
                )
            )
        return outputs


def _token_budgets(prompt_ids: list[list[int]], sampling: SamplingConfig, spec: DecodeSpec) -> list[int]:
    """Each row's token budget (`n` rows per prompt): `max_new_tokens`, cut to the room left in the context."""
    n = sampling.num_return_sequences
    if spec.max_context_length is None:
        return [sampling.max_new_tokens] * (len(prompt_ids) * n)
    limit = spec.max_context_length
    return [max(0, min(sampling.max_new_tokens, limit - len(p))) for p in prompt_ids for _ in range(n)]


def _prefill_rows(
    model: Any,
    spec: DecodeSpec,
    prompt_ids: list[list[int]],
    budgets: list[int],
    n: int,
    turn_cache: TurnCache | None,
    state_key: Any,
) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prefills each prompt once, repeats the result for its `n` rows and keeps the rows that may generate.

    Args:
        model (`torch.nn.Module`): The causal LM.
        spec (`DecodeSpec`): Model-level facts.
        prompt_ids (`list[list[int]]`): The prompts.
        budgets (`list[int]`): Token budget of each row (`n` per prompt); rows without any are dropped.
        n (`int`): Rows per prompt.
        turn_cache (`TurnCache`, *optional*): Entries to start prompts from (taken out of it).
        state_key (`Any`): The weights and adapter state, with which `turn_cache` entries must agree.

    Returns:
        `tuple`: For the kept rows, in row order: the KV cache, the last-position logits, the attention mask, the
        position of the next token, and the row indices (CPU).
    """
    reused = turn_cache.take(prompt_ids, state_key) if turn_cache is not None else None
    cache, logits, mask = _prefill(model, spec, prompt_ids, reused)
    del reused
    next_pos = mask.sum(-1)
    if n > 1:
        cache.batch_repeat_interleave(n)
        logits, mask, next_pos = (t.repeat_interleave(n, dim=0) for t in (logits, mask, next_pos))
    rows = torch.arange(len(budgets))
    alive = [r for r in range(len(budgets)) if budgets[r] > 0]
    if len(alive) < len(budgets):
        keep = torch.tensor(alive, dtype=torch.long)
        cache.batch_select_indices(keep.to(spec.device))
        rows, logits, mask, next_pos = rows[keep], logits[keep.to(logits.device)], mask[keep], next_pos[keep]
    return cache, logits, mask, next_pos, rows


def seen_mask(sequences: list[list[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """`[rows, V]` boolean mask of the ids that occur in each row's tokens (what the repetition penalty acts on).

    Args:
        sequences (`list[list[int]]`): Each row's tokens so far (prompt, then completion).
        vocab_size (`int`): Number of logits per row.
        device (`torch.device`): Where the mask lives.
    """
    mask = torch.zeros((len(sequences), vocab_size), dtype=torch.bool)
    for row, ids in enumerate(sequences):
        if ids:
            mask[row, torch.tensor(ids, dtype=torch.long)] = True
    return mask.to(device)


def _choose_tokens(
    logits: torch.Tensor,
    sampling: SamplingConfig,
    generator: torch.Generator | None,
    seen: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Picks each live row's next token from its logits (greedy, or sampled from the processed distribution).

    Greedy decoding takes the argmax after the repetition penalty (as vLLM does); sampling processes the logits with
    the penalty, temperature, min-p, top-k and top-p (`scoring.process_logits`).

    Args:
        logits (`torch.Tensor`): `[rows, V]` raw last-position logits.
        sampling (`SamplingConfig`): Validated sampling settings.
        generator (`torch.Generator`, *optional*): Source of randomness, for seeded sampling.
        seen (`torch.Tensor`, *optional*): `[rows, V]` mask of the ids each row holds so far, with a repetition
            penalty.

    Returns:
        `tuple`: The `[rows]` tokens (on the logits' device); their `[rows]` log-probs on CPU (`None` without
        `return_logprobs`); the `[rows, V]` processed logits on CPU (`None` without `return_logits`).
    """
    if sampling.greedy:
        processed = process_logits(logits, repetition_penalty=sampling.repetition_penalty, seen=seen)
        next_tokens = processed.argmax(dim=-1)
    else:
        processed = process_with(logits, sampling, seen)
        next_tokens = sample_from_logits(processed, generator)
    step_lp = None
    if sampling.return_logprobs:
        step_lp = processed.gather(-1, next_tokens[:, None]).squeeze(1) - torch.logsumexp(processed, dim=-1)
        step_lp = step_lp.cpu()
    step_logits = processed.cpu() if sampling.return_logits else None
    return next_tokens, step_lp, step_logits


def _record_step(
    done: _Completions,
    rows: list[int],
    next_tokens: list[int],
    step_lp: torch.Tensor | None,
    step_logits: torch.Tensor | None,
    spec: DecodeSpec,
    on_stop: Callable[[int, int], None] | None,
) -> list[int]:
    """Appends one token to each live row and settles which rows go on.

    A row stops at an EOS token or when `spec.stop_checker` accepts its tokens, and ends once its budget is spent.

    Args:
        done (`_Completions`): Where the tokens, log-probs and logits go.
        rows (`list[int]`): The row of each batch entry.
        next_tokens (`list[int]`): The token of each batch entry.
        step_lp (`torch.Tensor`, *optional*): Their log-probs (with `return_logprobs`).
        step_logits (`torch.Tensor`, *optional*): Their processed logits (with `return_logits`).
        spec (`DecodeSpec`): EOS ids and stop-string checker.
        on_stop (`Callable[[int, int], None]`, *optional*): Called with `(row, batch entry)` when a row stops.

    Returns:
        `list[int]`: The batch entries whose rows go on.
    """
    tokens, logprobs, logits, finish, budgets = done.tokens, done.logprobs, done.logits, done.finish, done.budgets
    eos_token_ids, stop_checker = spec.eos_token_ids, spec.stop_checker
    keep_local: list[int] = []
    for j, (row, token) in enumerate(zip(rows, next_tokens)):
        tokens[row].append(token)
        if step_lp is not None:
            logprobs[row].append(step_lp[j])
        if step_logits is not None:
            logits[row].append(step_logits[j])
        if token in eos_token_ids or (stop_checker is not None and stop_checker(tokens[row])):
            finish[row] = "stop"
            if on_stop is not None:
                on_stop(row, j)
        elif len(tokens[row]) < budgets[row]:
            keep_local.append(j)
    return keep_local


def _sample(
    model: Any,
    prompt_ids: list[list[int]],
    sampling: SamplingConfig,
    spec: DecodeSpec,
    turn_cache: TurnCache | None,
    state_key: Any,
) -> list[SequenceOutput]:
    """`sample` without its no-grad and CPU-kernel context: a prefill, then per step tokens, bookkeeping, a forward."""
    n = sampling.num_return_sequences
    done = _Completions(_token_budgets(prompt_ids, sampling, spec))
    generator = None
    if sampling.seed is not None and not sampling.greedy:
        generator = torch.Generator(device=spec.device).manual_seed(sampling.seed)
    cache, logits, mask, next_pos, rows = _prefill_rows(model, spec, prompt_ids, done.budgets, n, turn_cache, state_key)

    def keep_turn(row: int, j: int) -> None:
        """Stores a stopped row in `turn_cache` from the current `cache` and `mask` (read when called)."""
        assert turn_cache is not None
        # its last token was never run: the cache covers all before it
        _keep_turn(turn_cache, prompt_ids[row // n] + done.tokens[row][:-1], cache, mask, j)

    on_stop = keep_turn if turn_cache is not None else None
    seen = None
    if sampling.repetition_penalty != 1.0:
        seen = seen_mask([prompt_ids[int(r) // n] for r in rows], logits.shape[-1], logits.device)
    while len(rows) > 0:
        next_tokens, step_lp, step_logits = _choose_tokens(logits, sampling, generator, seen)
        keep_local = _record_step(done, rows.tolist(), next_tokens.tolist(), step_lp, step_logits, spec, on_stop)
        if not keep_local:
            break
        if seen is not None:
            seen[torch.arange(seen.shape[0], device=seen.device), next_tokens.to(seen.device)] = True
        if len(keep_local) < len(rows):
            keep = torch.tensor(keep_local, dtype=torch.long)
            keep_dev = keep.to(spec.device)
            cache.batch_select_indices(keep_dev)
            rows, mask, next_pos, next_tokens = rows[keep], mask[keep_dev], next_pos[keep_dev], next_tokens[keep_dev]
            if seen is not None:
                seen = seen[keep.to(seen.device)]
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
    return done.outputs(n, sampling)
