"""Sampling settings in, completions out: what the in-process engine and the server client share.

vLLM supports a narrower range of settings than the Hugging Face backend (no per-step logits, temperatures 0 or
0.01 to 2, no `n > 1` with greedy decoding); the checks here turn those limits into clear errors before a request
is sent, the helpers build the same sampler settings for both ways of reaching vLLM, and `finish_reason` reads
vLLM's answer back the same way for both.
"""

from __future__ import annotations

from typing import Any

import torch

from ...errors import InvalidValueError, OperationError, UnsupportedError
from ...types import SamplingConfig
from ..base import ScoringConfig

MAX_TEMPERATURE = 2.0
"""vLLM rejects sampling temperatures above this."""
MIN_TEMPERATURE = 1e-2
"""vLLM silently raises positive temperatures below this to it, which would desynchronise the reported log-probs."""

Completion = tuple[list[int], str, torch.Tensor | None]
"""One generated completion: token ids, finish reason (`"stop"` or `"length"`), sampled-token log-probs if asked."""


def check_sampling(sampling: SamplingConfig) -> None:
    """Rejects sampling settings vLLM cannot honour exactly.

    Args:
        sampling (`SamplingConfig`): The requested settings.

    Raises:
        NotImplementedError: If `sampling.return_logits` is set (vLLM does not expose per-step logits).
        ValueError: If sampling (not greedy) with a temperature outside what vLLM supports.
    """
    if sampling.return_logits:
        raise UnsupportedError(
            "The vLLM backend cannot return per-step logits. Use `return_logprobs=True`, or the huggingface backend "
            "for `return_logits=True`."
        )
    if not sampling.greedy:
        check_temperature(sampling.temperature)


def check_temperature(temperature: float) -> None:
    """Rejects a sampling temperature outside `[MIN_TEMPERATURE, MAX_TEMPERATURE]`.

    Args:
        temperature (`float`): A positive sampling temperature (greedy decoding is not checked here).

    Raises:
        ValueError: If vLLM would reject the temperature, or clamp it and so report wrong log-probs.
    """
    if temperature > MAX_TEMPERATURE:
        raise InvalidValueError(f"`temperature` must be <= {MAX_TEMPERATURE} with the vLLM backend, got {temperature}.")
    if temperature < MIN_TEMPERATURE:
        raise InvalidValueError(
            f"`temperature` must be 0 (greedy) or >= {MIN_TEMPERATURE} with the vLLM backend (vLLM clamps smaller "
            f"values, which would make the reported log-probs wrong), got {temperature}."
        )


def needs_processing(scoring: ScoringConfig) -> bool:
    """Whether scoring must apply temperature or truncation, so vLLM's raw prompt log-probs cannot be used."""
    return scoring.temperature != 1.0 or scoring.top_k > 0 or scoring.top_p < 1.0


def request_plan(prompt_ids: list[list[int]], sampling: SamplingConfig) -> tuple[list[list[int]], int, list[int]]:
    """Requests to send: vLLM refuses `n > 1` with greedy decoding, so greedy prompts are repeated instead.

    Args:
        prompt_ids (`list[list[int]]`): The prompts, as token ids.
        sampling (`SamplingConfig`): The requested settings.

    Returns:
        The prompt of each request, the `n` of each request, and a per-request seed offset (`seed + i` keeps two
        identical prompts in one seeded batch from producing identical samples).
    """
    n = sampling.num_return_sequences
    if sampling.greedy and n > 1:
        return [p for p in prompt_ids for _ in range(n)], 1, list(range(len(prompt_ids) * n))
    return list(prompt_ids), n, list(range(len(prompt_ids)))


def request_seed(sampling: SamplingConfig, offset: int) -> int | None:
    """The seed of one request: `sampling.seed + offset`, or `None` when unseeded or greedy.

    Args:
        sampling (`SamplingConfig`): The requested settings.
        offset (`int`): The request's seed offset from `request_plan`.

    Returns:
        `int` or `None`: A seed in `[0, 2**63)`, or `None`.
    """
    if sampling.seed is None or sampling.greedy:
        return None
    return (sampling.seed + offset) % (2**63)


def sampler_settings(sampling: SamplingConfig) -> dict[str, Any]:
    """vLLM's `temperature`, `top_p` and `top_k` for `sampling`: greedy is temperature 0 without truncation.

    Args:
        sampling (`SamplingConfig`): The requested settings.

    Returns:
        `dict`: The three settings, under the names both `vllm.SamplingParams` and the server's API use.
    """
    greedy = sampling.greedy
    return {
        "temperature": 0.0 if greedy else float(sampling.temperature),
        "top_p": 1.0 if greedy else float(sampling.top_p),
        "top_k": 0 if greedy or sampling.top_k < 0 else sampling.top_k,
    }


def finish_reason(reason: str | None) -> str:
    """Normalises vLLM's `finish_reason` to `"stop"` or `"length"`.

    Args:
        reason (`str`, *optional*): What vLLM reported (`None` counts as `"stop"`).

    Returns:
        `str`: `"stop"` or `"length"`.

    Raises:
        RuntimeError: If the request was aborted or failed (any other reason).
    """
    if reason == "length":
        return "length"
    if reason in ("stop", None):
        return "stop"
    raise OperationError(f"vLLM ended a sequence with finish_reason={reason!r} (the request was aborted or failed).")
