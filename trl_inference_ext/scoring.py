"""Memory-efficient log-probabilities, logits processing and KL estimators.

The straightforward `log_softmax(logits).gather(...)` materialises a float32 `[B, T, V]` tensor to keep one value per
position. Everything here works on chunks of positions instead, so peak memory is bounded by `chunk × V`, not `T × V`;
`logprobs_from_hidden` goes further and never builds the full logits either, applying the LM head chunk by chunk
(recomputed in the backward pass when gradients are needed).

Processing follows the sampling order used by both backends: temperature, then top-k, then top-p (tokens whose
ascending cumulative probability is `<= 1 - top_p` are dropped, at least one is kept); dropped tokens get `-inf`,
so log-probs are renormalised over the kept tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

from .errors import InvalidValueError

DEFAULT_CHUNK_BYTES = 128 * 1024 * 1024
"""Budget for one chunk of float32 logits; the number of positions per chunk is derived from it and the vocab size."""


def process_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = -1, top_p: float = 1.0) -> torch.Tensor:
    """Applies temperature, top-k and top-p to logits, in float32.

    Args:
        logits (`torch.Tensor`): `[..., V]` logits in any floating dtype.
        temperature (`float`, *optional*, defaults to 1.0): Divides the logits; must be > 0.
        top_k (`int`, *optional*, defaults to -1): Keep the `top_k` largest logits; -1 disables.
        top_p (`float`, *optional*, defaults to 1.0): Keep the smallest set of tokens whose probability mass reaches
            `top_p`; 1.0 disables.

    Returns:
        `torch.Tensor`: float32 processed logits of the same shape, `-inf` where a token was dropped.
    """
    if temperature <= 0:
        raise InvalidValueError(f"`temperature` must be > 0 for scoring, got {temperature}.")
    out = logits.float()
    if temperature != 1.0:
        out = out / temperature
    vocab = out.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(out, top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(out, dim=-1, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= (1.0 - top_p)
        drop_sorted[..., -1] = False
        drop = drop_sorted.scatter(-1, sorted_idx, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def _chunk_rows(vocab_size: int, chunk_bytes: int) -> int:
    return max(1, chunk_bytes // (4 * max(1, vocab_size)))


def _select(logits: torch.Tensor, index: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    processed = process_logits(logits, temperature, top_k, top_p)
    picked = processed.gather(-1, index.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(processed, dim=-1)


def selective_logprobs(
    logits: torch.Tensor,
    index: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = -1,
    top_p: float = 1.0,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> torch.Tensor:
    """Log-probability of `index` under the processed distribution, chunked over positions.

    Args:
        logits (`torch.Tensor`): `[..., V]` logits.
        index (`torch.Tensor`): `[...]` token ids.
        temperature (`float`, *optional*, defaults to 1.0): Sampling temperature.
        top_k (`int`, *optional*, defaults to -1): Top-k truncation, -1 disables.
        top_p (`float`, *optional*, defaults to 1.0): Top-p truncation, 1.0 disables.
        chunk_bytes (`int`, *optional*): Memory budget for one chunk of float32 logits.

    Returns:
        `torch.Tensor`: float32 log-probs with the shape of `index`.
    """
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_index = index.reshape(-1)
    rows = _chunk_rows(logits.shape[-1], chunk_bytes)
    parts = [
        _select(flat_logits[i : i + rows], flat_index[i : i + rows], temperature, top_k, top_p)
        for i in range(0, flat_logits.shape[0], rows)
    ]
    out = torch.cat(parts) if parts else flat_logits.new_zeros(0, dtype=torch.float32)
    return out.reshape(index.shape)


def logprobs_from_hidden(
    hidden: torch.Tensor,
    lm_head: Callable[[torch.Tensor], torch.Tensor],
    index: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = -1,
    top_p: float = 1.0,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Log-probabilities from final hidden states, applying the LM head one chunk of positions at a time.

    With gradients enabled each chunk is checkpointed, so the backward pass recomputes the chunk's logits instead of
    keeping all of them alive: peak memory stays `chunk × V` in both passes.

    Args:
        hidden (`torch.Tensor`): `[N, H]` (or `[..., H]`) final hidden states, after the final norm.
        lm_head (`Callable`): Maps hidden states to logits (the model's output embedding).
        index (`torch.Tensor`): Token ids, shape `hidden.shape[:-1]`.
        temperature (`float`, *optional*, defaults to 1.0): Sampling temperature.
        top_k (`int`, *optional*, defaults to -1): Top-k truncation, -1 disables.
        top_p (`float`, *optional*, defaults to 1.0): Top-p truncation, 1.0 disables.
        chunk_bytes (`int`, *optional*): Memory budget for one chunk of float32 logits.
        vocab_size (`int`, *optional*): Used to size chunks; probed from one row when not given.

    Returns:
        `torch.Tensor`: float32 log-probs with the shape of `index`.
    """
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_index = index.reshape(-1)
    if flat_hidden.shape[0] == 0:
        return flat_hidden.new_zeros(index.shape, dtype=torch.float32)
    if vocab_size is None:
        with torch.no_grad():
            vocab_size = lm_head(flat_hidden[:1]).shape[-1]
    rows = _chunk_rows(vocab_size, chunk_bytes)

    def chunk_fn(h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return _select(lm_head(h), idx, temperature, top_k, top_p)

    use_checkpoint = torch.is_grad_enabled() and flat_hidden.requires_grad
    parts = []
    for i in range(0, flat_hidden.shape[0], rows):
        h, idx = flat_hidden[i : i + rows], flat_index[i : i + rows]
        parts.append(checkpoint(chunk_fn, h, idx, use_reentrant=False) if use_checkpoint else chunk_fn(h, idx))
    return torch.cat(parts).reshape(index.shape)


def kl_penalty(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k3", mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from sampled-token log-probs.

    Args:
        logprobs (`torch.Tensor`): Policy log-probs of the sampled tokens.
        ref_logprobs (`torch.Tensor`): Reference log-probs of the same tokens.
        estimator (`str`, *optional*, defaults to `"k3"`): `"k1"` (`log r`, unbiased, high variance), `"k2"`
            (`(log r)^2 / 2`) or `"k3"` (`r - 1 - log r` with `r = p_ref / p`, unbiased and non-negative).
        mask (`torch.Tensor`, *optional*): Zeroes padded positions.

    Returns:
        `torch.Tensor`: Per-token KL estimates, same shape as `logprobs`.
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        kl = log_ratio
    elif estimator == "k2":
        kl = 0.5 * log_ratio.pow(2)
    elif estimator == "k3":
        kl = torch.expm1(-log_ratio) + log_ratio
    else:
        raise InvalidValueError(f"`estimator` must be one of 'k1', 'k2', 'k3', got {estimator!r}.")
    return kl * mask if mask is not None else kl
