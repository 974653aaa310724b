"""Memory-efficient log-probabilities, logits processing and KL estimators.

The straightforward `log_softmax(logits).gather(...)` materialises a float32 `[B, T, V]` tensor to keep one value per
position. Everything here works on chunks of positions instead, so peak memory is bounded by `chunk × V`, not `T × V`;
`logprobs_from_hidden` goes further and never builds the full logits either, applying the LM head chunk by chunk
(recomputed in the backward pass when gradients are needed).

Processing follows the sampling order of vLLM's sampler, which both backends apply: the repetition penalty (on every
id of the prompt and of the completion before the position: a positive logit is divided by the penalty, a negative
one multiplied by it), then temperature, then min-p (tokens whose probability is below `min_p` times the largest are
dropped), then top-k, then top-p (tokens whose ascending cumulative probability is `<= 1 - top_p` are dropped, at
least one is kept); dropped tokens get `-inf`, so log-probs are renormalised over the kept tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch.utils.checkpoint import checkpoint

from .errors import InvalidValueError

DEFAULT_CHUNK_BYTES = 128 * 1024 * 1024
"""Budget for one chunk of float32 logits; the number of positions per chunk is derived from it and the vocab size."""

NEVER = 2**31 - 1
"""`TokenHistory.first` value of an id that does not occur in a sequence."""


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Applies a repetition penalty as vLLM and transformers do: for the ids in `seen`, a positive logit is divided by
    `penalty`, a negative (or zero) one multiplied by it.

    The formula is vLLM's (`logits * where(logits > 0, 1 / penalty, penalty)`), in float32, so both backends compute
    the same values.

    Args:
        logits (`torch.Tensor`): `[..., V]` float32 logits.
        seen (`torch.Tensor`): Boolean mask broadcastable to `logits`: the ids that occurred before the position.
        penalty (`float`): The penalty, > 0 (1.0 leaves the logits unchanged).

    Returns:
        `torch.Tensor`: The penalised logits (a new tensor).
    """
    value = torch.tensor(penalty, dtype=logits.dtype, device=logits.device)
    one = torch.ones((), dtype=logits.dtype, device=logits.device)
    penalties = torch.where(seen, value, one)
    return logits * torch.where(logits > 0, 1.0 / penalties, penalties)


class ProcessingSettings(Protocol):
    """The sampling settings that shape a distribution: `ScoringConfig`, `SamplingConfig` and the scorers here."""

    @property
    def temperature(self) -> float: ...
    @property
    def top_k(self) -> int: ...
    @property
    def top_p(self) -> float: ...
    @property
    def min_p(self) -> float: ...
    @property
    def repetition_penalty(self) -> float: ...


def process_with(logits: torch.Tensor, settings: ProcessingSettings, seen: torch.Tensor | None = None) -> torch.Tensor:
    """`process_logits` with every setting taken from `settings` (one place that lists them)."""
    return process_logits(
        logits,
        settings.temperature,
        settings.top_k,
        settings.top_p,
        min_p=settings.min_p,
        repetition_penalty=settings.repetition_penalty,
        seen=seen,
    )


def process_logits(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = -1,
    top_p: float = 1.0,
    *,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """Applies the repetition penalty, temperature, min-p, top-k and top-p to logits, in that order, in float32.

    Args:
        logits (`torch.Tensor`): `[..., V]` logits in any floating dtype.
        temperature (`float`, *optional*, defaults to 1.0): Divides the logits; must be > 0.
        top_k (`int`, *optional*, defaults to -1): Keep the `top_k` largest logits; -1 disables.
        top_p (`float`, *optional*, defaults to 1.0): Keep the smallest set of tokens whose probability mass reaches
            `top_p`; 1.0 disables.
        min_p (`float`, *optional*, defaults to 0.0): Drop the tokens whose probability (after temperature) is below
            `min_p` times the largest; 0.0 disables.
        repetition_penalty (`float`, *optional*, defaults to 1.0): Penalty on the ids of `seen`; 1.0 disables.
        seen (`torch.Tensor`, *optional*): Boolean mask broadcastable to `logits` of the ids that occurred before each
            position (prompt and completion so far); needed when `repetition_penalty != 1`.

    Returns:
        `torch.Tensor`: float32 processed logits of the same shape, `-inf` where a token was dropped.
    """
    if temperature <= 0:
        raise InvalidValueError(f"`temperature` must be > 0 for scoring, got {temperature}.")
    out = logits.float()
    if repetition_penalty != 1.0:
        if seen is None:
            raise InvalidValueError(
                "`seen` (the ids before each position) is needed to apply a `repetition_penalty` other than 1."
            )
        out = apply_repetition_penalty(out, seen, repetition_penalty)
    if temperature != 1.0:
        out = out / temperature
    if min_p > 0.0:
        probs = out.softmax(dim=-1)
        threshold = probs.amax(dim=-1, keepdim=True) * min_p
        out = out.masked_fill(probs < threshold, float("-inf"))
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


@dataclass
class TokenHistory:
    """The ids that precede each scored position, for the repetition penalty, without a `[positions, V]` mask.

    Each sequence (prompt + response) is stored as the first index at which every id occurs in it, so the mask of the
    ids seen before a position is built one chunk of positions at a time: id `v` occurs before a position with `n`
    tokens of context in sequence `s` exactly when `first[s, v] < n`. Memory is `S × V` int32, independent of the
    number of positions.

    Attributes:
        first (`torch.Tensor`): `[S, V]` int32, the first index of each id in each sequence (`NEVER` where absent).
        sequence (`torch.Tensor`): The sequence of each scored position (shape of the scored index tensor).
        length (`torch.Tensor`): The number of tokens before each scored position (same shape).
    """

    first: torch.Tensor
    sequence: torch.Tensor
    length: torch.Tensor

    @classmethod
    def from_sequences(
        cls,
        sequences: Sequence[Sequence[int]],
        vocab_size: int,
        sequence: torch.Tensor,
        length: torch.Tensor,
    ) -> TokenHistory:
        """Builds the history of `sequences` for scored positions given by their sequence and context length.

        Args:
            sequences (`list[list[int]]`): Each sequence's token ids (prompt + response).
            vocab_size (`int`): Number of logits per position.
            sequence (`torch.Tensor`): The sequence of each scored position.
            length (`torch.Tensor`): The number of tokens of `sequences[s]` before each scored position.

        Returns:
            `TokenHistory`: On the device of `sequence`.
        """
        device = sequence.device
        width = max((len(ids) for ids in sequences), default=0)
        ids = torch.zeros((len(sequences), max(1, width)), dtype=torch.long)
        index = torch.full((len(sequences), max(1, width)), NEVER, dtype=torch.int32)
        for s, row in enumerate(sequences):
            if row:
                ids[s, : len(row)] = torch.tensor(list(row), dtype=torch.long)
                index[s, : len(row)] = torch.arange(len(row), dtype=torch.int32)
        first = torch.full((len(sequences), vocab_size), NEVER, dtype=torch.int32)
        first.scatter_reduce_(1, ids, index, reduce="amin")
        return cls(first=first.to(device), sequence=sequence.to(device), length=length.to(device))

    def seen(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The `[stop - start, V]` mask of ids that occur before the flattened scored positions `start:stop`."""
        sequence = self.sequence.reshape(-1)[start:stop]
        length = self.length.reshape(-1)[start:stop]
        return self.first[sequence] < length.to(torch.int32)[:, None]

    def seen_all(self) -> torch.Tensor:
        """The mask of ids seen before every scored position, `[*sequence.shape, V]` (builds it whole)."""
        return self.seen().reshape(*self.sequence.shape, self.first.shape[-1])


def _chunk_rows(vocab_size: int, chunk_bytes: int) -> int:
    return max(1, chunk_bytes // (4 * max(1, vocab_size)))


@dataclass(frozen=True)
class _Processing:
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    repetition_penalty: float
    history: TokenHistory | None

    def __post_init__(self) -> None:
        if self.repetition_penalty != 1.0 and self.history is None:
            raise InvalidValueError(
                "`history` (the ids before each position) is needed to apply a `repetition_penalty` other than 1."
            )

    def select(self, logits: torch.Tensor, index: torch.Tensor, start: int) -> torch.Tensor:
        """Log-probs of `index` for the flattened positions `start : start + len(index)`."""
        seen = None
        if self.repetition_penalty != 1.0:
            assert self.history is not None
            seen = self.history.seen(start, start + index.shape[0])
        processed = process_with(logits, self, seen)
        picked = processed.gather(-1, index.unsqueeze(-1)).squeeze(-1)
        return picked - torch.logsumexp(processed, dim=-1)


def selective_logprobs(
    logits: torch.Tensor,
    index: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = -1,
    top_p: float = 1.0,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    *,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    history: TokenHistory | None = None,
) -> torch.Tensor:
    """Log-probability of `index` under the processed distribution, chunked over positions.

    Args:
        logits (`torch.Tensor`): `[..., V]` logits.
        index (`torch.Tensor`): `[...]` token ids.
        temperature (`float`, *optional*, defaults to 1.0): Sampling temperature.
        top_k (`int`, *optional*, defaults to -1): Top-k truncation, -1 disables.
        top_p (`float`, *optional*, defaults to 1.0): Top-p truncation, 1.0 disables.
        chunk_bytes (`int`, *optional*): Memory budget for one chunk of float32 logits.
        min_p (`float`, *optional*, defaults to 0.0): Min-p truncation, 0.0 disables.
        repetition_penalty (`float`, *optional*, defaults to 1.0): Repetition penalty, 1.0 disables.
        history (`TokenHistory`, *optional*): The ids before each position of `index`; needed for the penalty.

    Returns:
        `torch.Tensor`: float32 log-probs with the shape of `index`.
    """
    processing = _Processing(temperature, top_k, top_p, min_p, repetition_penalty, history)
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_index = index.reshape(-1)
    rows = _chunk_rows(logits.shape[-1], chunk_bytes)
    parts = [
        processing.select(flat_logits[i : i + rows], flat_index[i : i + rows], i)
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
    *,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    history: TokenHistory | None = None,
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
        min_p (`float`, *optional*, defaults to 0.0): Min-p truncation, 0.0 disables.
        repetition_penalty (`float`, *optional*, defaults to 1.0): Repetition penalty, 1.0 disables.
        history (`TokenHistory`, *optional*): The ids before each position of `index`; needed for the penalty.

    Returns:
        `torch.Tensor`: float32 log-probs with the shape of `index`.
    """
    processing = _Processing(temperature, top_k, top_p, min_p, repetition_penalty, history)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_index = index.reshape(-1)
    if flat_hidden.shape[0] == 0:
        return flat_hidden.new_zeros(index.shape, dtype=torch.float32)
    if vocab_size is None:
        with torch.no_grad():
            vocab_size = lm_head(flat_hidden[:1]).shape[-1]
    rows = _chunk_rows(vocab_size, chunk_bytes)

    def chunk_fn(h: torch.Tensor, idx: torch.Tensor, start: int) -> torch.Tensor:
        return processing.select(lm_head(h), idx, start)

    use_checkpoint = torch.is_grad_enabled() and flat_hidden.requires_grad
    parts = []
    for i in range(0, flat_hidden.shape[0], rows):
        h, idx = flat_hidden[i : i + rows], flat_index[i : i + rows]
        parts.append(checkpoint(chunk_fn, h, idx, i, use_reentrant=False) if use_checkpoint else chunk_fn(h, idx, i))
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
