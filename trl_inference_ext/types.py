"""Public data structures: generation results, tool calls and validated sampling settings."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import InvalidTypeError, InvalidValueError

if TYPE_CHECKING:  # torch is not needed at run time here: tool workers import this module without it
    import torch

FinishReason = str
"""Why a sequence ended: ``"stop"`` (EOS or a stop string) or ``"length"`` (token budget)."""

TOOL_CALL_STATUSES = (
    "ok",
    "invalid_json",
    "invalid_arguments",
    "missing_name",
    "unclosed",
)


@dataclass
class ToolCall:
    """One tool call found in model output.

    Attributes:
        name (`str`): The tool's name (`""` when the call has none).
        arguments (`dict[str, Any]`): Decoded arguments (`{}` when they could not be decoded).
        raw_text (`str`): The exact text of the call, `text[start_pos:end_pos]`.
        start_pos (`int`): Start offset of the call in the parsed text.
        end_pos (`int`): End offset (exclusive) of the call in the parsed text.
        status (`str`): `"ok"` for a well-formed call, else one of `TOOL_CALL_STATUSES`.
        error (`str`, *optional*): Human-readable reason when `status != "ok"`.
    """

    name: str
    arguments: dict[str, Any]
    raw_text: str
    start_pos: int
    end_pos: int
    status: str = "ok"
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the call is well formed and may be executed."""
        return self.status == "ok"


@dataclass
class GenerationResult:
    """Output of `InferenceModule.generate`.

    Sequences are grouped prompt-major: with `num_return_sequences=n`, entries `[i * n, (i + 1) * n)` belong to
    prompt `i`.

    Attributes:
        texts (`list[str]`): Decoded completions (special tokens skipped).
        token_ids (`list[list[int]]`, *optional*): Completion token ids, one list per sequence.
        logprobs (`list[torch.Tensor]`, *optional*): Per-token log-probabilities of the sampled tokens (1-D float32
            tensors, one per sequence) under the processed sampling distribution (repetition penalty, temperature,
            min-p, top-k, top-p applied).
        logits (`list[torch.Tensor]`, *optional*): Per-step processed logits, `[T_i, V]` tensors.
        metadata (`dict[str, Any]`, *optional*): At least `finish_reasons`, `prompt_lengths`, `prompt_token_ids`,
            `temperature`, `top_k`, `top_p`, `min_p`, `repetition_penalty`, `engine_options`, `num_return_sequences`,
            `model` and `weights_version`.
    """

    texts: list[str]
    token_ids: list[list[int]] | None = None
    logprobs: list[torch.Tensor] | None = None
    logits: list[torch.Tensor] | None = None
    metadata: dict[str, Any] | None = field(default_factory=dict)

    def __len__(self) -> int:
        """The number of sequences."""
        return len(self.texts)

    def __iter__(self) -> Iterator[str]:
        """Iterates over the texts, as the original documentation's GRPO loop does (`zip(result, mask)`).

        Scoring these texts with `get_logprobs` scores the sampled ids (see `InferenceModule.get_logprobs`).
        """
        return iter(self.texts)


@dataclass(frozen=True)
class SamplingConfig:
    """Validated generation settings, with the defaults of the original `InferenceModule.generate`.

    `top_k=-1` disables top-k, `min_p=0` disables min-p and `repetition_penalty=1` disables the repetition penalty.
    `temperature=0` or `do_sample=False` means greedy decoding (argmax of the logits after the repetition penalty).

    The processed distribution is built in vLLM's order: repetition penalty (on every id of the prompt and of the
    completion so far, a positive logit is divided by the penalty and a negative one multiplied by it), then
    temperature, then min-p (tokens whose probability is below `min_p` times the largest are dropped), then top-k,
    then top-p.

    `engine_options` holds settings of `vllm.SamplingParams` that this package passes on to the engine as they are
    (`presence_penalty`, `frequency_penalty`, `min_tokens`, `ignore_eos`, ...; see
    `backends.vllm.sampling.check_engine_options`). Only the vLLM backend accepts them.
    """

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    do_sample: bool = True
    num_return_sequences: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None
    return_logits: bool = False
    return_logprobs: bool = False
    engine_options: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        _check_int("max_new_tokens", self.max_new_tokens, minimum=1)
        _check_int("num_return_sequences", self.num_return_sequences, minimum=1)
        _check_int("top_k", self.top_k, minimum=-1)
        if self.top_k == 0:
            raise InvalidValueError("`top_k` must be -1 (disabled) or a positive integer, got 0.")
        _check_float("temperature", self.temperature)
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidValueError(f"`temperature` must be a finite float >= 0, got {self.temperature}.")
        _check_float("top_p", self.top_p)
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidValueError(f"`top_p` must be in (0, 1], got {self.top_p}.")
        _check_float("min_p", self.min_p)
        if not (0.0 <= self.min_p <= 1.0):
            raise InvalidValueError(f"`min_p` must be in [0, 1] (0 disables), got {self.min_p}.")
        _check_float("repetition_penalty", self.repetition_penalty)
        if not math.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise InvalidValueError(
                f"`repetition_penalty` must be a finite float > 0 (1 disables), got {self.repetition_penalty}."
            )
        if not isinstance(self.do_sample, bool):
            raise InvalidTypeError(f"`do_sample` must be a bool, got {type(self.do_sample).__name__}.")
        if self.seed is not None:
            _check_int("seed", self.seed, minimum=0)
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            raise InvalidTypeError("`stop` must be a string or a list of non-empty strings.")
        if not isinstance(self.engine_options, Mapping):
            raise InvalidTypeError(
                f"`engine_options` must be a dict of `vllm.SamplingParams` settings, got "
                f"{type(self.engine_options).__name__}."
            )
        options = dict(self.engine_options)
        if options:  # torch-free callers never get here: the check lives with the vLLM sampling settings
            from .backends.vllm.sampling import check_engine_options

            check_engine_options(options)
        object.__setattr__(self, "engine_options", options)

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> SamplingConfig:
        """Builds a config from `generate` keyword arguments, rejecting unknown names.

        Raises:
            TypeError: If an argument is unknown or has the wrong type.
            ValueError: If a value is out of range.
        """
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise InvalidTypeError(f"Unknown generation argument(s) {unknown}; allowed: {sorted(known)}.")
        stop = kwargs.get("stop")
        if stop is None:
            kwargs["stop"] = ()
        elif isinstance(stop, str):
            kwargs["stop"] = (stop,)
        elif isinstance(stop, Sequence):
            kwargs["stop"] = tuple(stop)
        if kwargs.get("engine_options", ()) is None:
            kwargs["engine_options"] = {}
        return cls(**kwargs)

    @property
    def greedy(self) -> bool:
        """Whether decoding is deterministic argmax."""
        return not self.do_sample or self.temperature == 0

    @property
    def effective_temperature(self) -> float:
        """The temperature the reported log-probs are computed at (1.0 for greedy decoding)."""
        return 1.0 if self.greedy else float(self.temperature)

    @property
    def effective_top_k(self) -> int:
        """The top-k the reported log-probs are truncated with (-1 for greedy decoding)."""
        return -1 if self.greedy else self.top_k

    @property
    def effective_top_p(self) -> float:
        """The top-p the reported log-probs are truncated with (1.0 for greedy decoding)."""
        return 1.0 if self.greedy else float(self.top_p)

    @property
    def effective_min_p(self) -> float:
        """The min-p the reported log-probs are truncated with (0.0 for greedy decoding)."""
        return 0.0 if self.greedy else float(self.min_p)

    @property
    def effective_repetition_penalty(self) -> float:
        """The repetition penalty the reported log-probs are computed with (greedy decoding applies it too)."""
        return float(self.repetition_penalty)

    def scoring_settings(self) -> dict[str, Any]:
        """The `get_logprobs` arguments that reproduce this config's reported log-probs (its effective settings)."""
        return {
            "temperature": self.effective_temperature,
            "top_k": self.effective_top_k,
            "top_p": self.effective_top_p,
            "min_p": self.effective_min_p,
            "repetition_penalty": self.effective_repetition_penalty,
        }

    @property
    def cacheable(self) -> bool:
        """Whether a result may be served from cache: greedy or seeded requests only."""
        return self.greedy or self.seed is not None


def _check_float(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidTypeError(f"`{name}` must be a float, got {type(value).__name__}.")


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidTypeError(f"`{name}` must be an int, got {type(value).__name__}.")
    if value < minimum:
        raise InvalidValueError(f"`{name}` must be >= {minimum}, got {value}.")
