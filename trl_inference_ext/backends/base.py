"""The backend protocol: token ids in, token ids (and log-probs) out.

`InferenceModule` does validation, caching, tokenisation and tool handling; a backend only runs the model. Keeping
the protocol this small is what lets the Hugging Face and vLLM backends return identical structures.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from ..types import SamplingConfig


@dataclass
class SequenceOutput:
    """One generated completion.

    Attributes:
        prompt_index (`int`): Index of the prompt this completion belongs to.
        token_ids (`list[int]`): Completion token ids (EOS included when the model emitted it).
        finish_reason (`str`): `"stop"` or `"length"`.
        logprobs (`torch.Tensor`, *optional*): `[T]` float32 log-probs of the sampled tokens under the processed
            distribution (repetition penalty, temperature, min-p, top-k, top-p).
        logits (`torch.Tensor`, *optional*): `[T, V]` processed logits.
    """

    prompt_index: int
    token_ids: list[int]
    finish_reason: str
    logprobs: torch.Tensor | None = None
    logits: torch.Tensor | None = None


@dataclass
class ScoringConfig:
    """How responses are scored: the same processing as sampling, so ratios are 1 on-policy.

    Applied in the sampler's order (see `scoring.process_logits`): the repetition penalty on the ids of the prompt and
    of the response before each position, then temperature, min-p, top-k and top-p.
    """

    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0


@runtime_checkable
class Backend(Protocol):
    """Everything `InferenceModule` needs from an inference engine.

    Optional abilities (weight pushes, adapter toggling, per-turn KV caches) are the protocols of `capabilities`;
    callers check for them with `isinstance`, never by probing attribute names.
    """

    name: str
    """The backend's name in `BACKENDS` (`"huggingface"`, `"vllm"`)."""
    model_name: str
    """The model's folder or identifier, reported in result metadata."""
    tokenizer: Any
    """The tokenizer whose ids the backend takes and returns."""

    @property
    def vocab_size(self) -> int:
        """Number of token ids the model accepts (may exceed the tokenizer's length when the head is padded)."""
        ...

    @property
    def weights_version(self) -> int:
        """Monotonic counter, bumped on every weight change."""
        ...

    @property
    def state_key(self) -> tuple[Any, ...]:
        """Hashable description of everything a generation depends on besides the request (the weights version,
        the active adapters); part of every cache key."""
        ...

    @property
    def max_context_length(self) -> int | None:
        """Longest prompt + completion the model accepts, or `None` when unknown."""
        ...

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig) -> list[SequenceOutput]:
        """Generates `sampling.num_return_sequences` completions per prompt, prompt-major."""
        ...

    def score_logprobs(
        self, prompt_ids: list[list[int]], response_ids: list[list[int]], scoring: ScoringConfig
    ) -> torch.Tensor:
        """Returns `[B, T_max]` float32 log-probs of the response tokens, right-padded with 0."""
        ...

    def score_logits(
        self, prompt_ids: list[list[int]], response_ids: list[list[int]], scoring: ScoringConfig
    ) -> torch.Tensor:
        """Returns `[B, T_max, V]` processed logits at the positions that predict each response token."""
        ...

    def mark_weights_updated(self) -> None:
        """Bumps `weights_version` after the weights changed outside the backend's knowledge."""
        ...
