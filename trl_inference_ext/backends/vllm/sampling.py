"""Sampling settings in, completions out: what the in-process engine and the server client share.

vLLM supports a narrower range of settings than the Hugging Face backend (no per-step logits, temperatures 0 or
0.01 to 2, no `n > 1` with greedy decoding); the checks here turn those limits into clear errors before a request
is sent, the helpers build the same sampler settings for both ways of reaching vLLM, and `finish_reason` reads
vLLM's answer back the same way for both.

vLLM's sampler (`vllm/v1/sample/sampler.py`, 0.32) processes the logits in this order, which `scoring.process_logits`
and the Hugging Face sampling loop follow: float32 cast, then the penalties (`apply_penalties`: repetition, then
frequency and presence), then, for sampled requests, temperature, the argmax-invariant logits processors (min-p),
top-k and top-p (`TopKTopPSampler`), where processed log-probs are taken (`log_softmax` of the truncated logits).
Greedy requests take the argmax after the penalties, and their processed log-probs are the `log_softmax` there.

`engine_options` are the other settings of `vllm.SamplingParams`, passed on as they are (`check_engine_options`
says which): both ways of reaching vLLM merge them into the request (`merged_engine_options`).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import torch

from ...errors import InvalidTypeError, InvalidValueError, OperationError, UnsupportedError
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
    """Whether scoring applies a penalty, temperature or truncation, so vLLM's raw prompt log-probs cannot be used."""
    return (
        scoring.temperature != 1.0
        or scoring.top_k > 0
        or scoring.top_p < 1.0
        or scoring.min_p > 0.0
        or scoring.repetition_penalty != 1.0
    )


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
    """vLLM's `temperature`, `top_p`, `top_k`, `min_p` and `repetition_penalty` for `sampling`.

    Greedy is temperature 0 without truncation; the repetition penalty applies to greedy decoding too (vLLM applies
    it before the argmax).

    Args:
        sampling (`SamplingConfig`): The requested settings.

    Returns:
        `dict`: The five settings, under the names both `vllm.SamplingParams` and the server's API use.
    """
    greedy = sampling.greedy
    return {
        "temperature": 0.0 if greedy else float(sampling.temperature),
        "top_p": 1.0 if greedy else float(sampling.top_p),
        "top_k": 0 if greedy or sampling.top_k < 0 else sampling.top_k,
        "min_p": 0.0 if greedy else float(sampling.min_p),
        "repetition_penalty": float(sampling.repetition_penalty),
    }


# ------------------------------------------------------------------------------------------ engine options
SAMPLING_PARAMS_FIELDS = (
    "n",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "temperature",
    "watermarking",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "max_tokens",
    "min_tokens",
    "logprobs",
    "prompt_logprobs",
    "prompt_logprob_token_ids",
    "prompt_logprob_start",
    "logprob_token_ids",
    "flat_logprobs",
    "detokenize",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "include_stop_str_in_output",
    "output_kind",
    "stream_interval",
    "skip_clone",
    "output_text_buffer_length",
    "structured_outputs",
    "logit_bias",
    "allowed_token_ids",
    "extra_args",
    "bad_words",
    "skip_reading_prefix_cache",
    "thinking_token_budget",
    "repetition_detection",
    "routed_experts_prompt_start",
    "trace_decode_token_ids",
)
"""The public fields of vLLM 0.32's `SamplingParams`, used when vLLM is not loaded in this process."""

GENERATE_ARGUMENTS = {
    "max_tokens": "max_new_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "seed": "seed",
    "stop": "stop",
}
"""`SamplingParams` fields that are `generate` arguments (value: the argument's name); they are not engine options."""

_LOGPROBS_REASON = (
    "log-probs are requested by trl_inference_ext itself (`return_logprobs=True`, `get_logprobs`), as processed "
    "log-probs of the sampled tokens"
)
_OUTPUT_REASON = "texts are decoded by trl_inference_ext from the sampled token ids, so the output format is fixed"
REFUSED_ENGINE_OPTIONS: dict[str, str] = {
    "n": "the number of completions per prompt is `num_return_sequences` (TRL: `num_generations`)",
    "num_return_sequences": "the number of completions per prompt is set by the caller (TRL: `num_generations`)",
    "logprobs": _LOGPROBS_REASON,
    "prompt_logprobs": _LOGPROBS_REASON,
    "prompt_logprob_token_ids": _LOGPROBS_REASON,
    "prompt_logprob_start": _LOGPROBS_REASON,
    "logprob_token_ids": _LOGPROBS_REASON,
    "flat_logprobs": _LOGPROBS_REASON,
    "detokenize": _OUTPUT_REASON,
    "skip_special_tokens": _OUTPUT_REASON,
    "spaces_between_special_tokens": _OUTPUT_REASON,
    "include_stop_str_in_output": _OUTPUT_REASON,
    "output_kind": _OUTPUT_REASON,
    "stream_interval": _OUTPUT_REASON,
    "skip_clone": "it is an internal flag of vLLM",
    "output_text_buffer_length": "it is an internal field of vLLM",
    "logits_processors": (
        "custom logits processors change the sampled distribution in ways `get_logprobs` cannot reproduce, so the "
        "reported log-probs would not be those of the scored distribution"
    ),
    "trace_decode_token_ids": (
        "it forces tokens instead of sampling them; score given token ids with `get_logprobs` instead"
    ),
}
"""Settings of `SamplingParams` that would break what `generate` returns, with the reason each is refused."""

DISTRIBUTION_OPTIONS = (
    "presence_penalty",
    "frequency_penalty",
    "min_tokens",
    "logit_bias",
    "allowed_token_ids",
    "bad_words",
    "structured_outputs",
    "thinking_token_budget",
    "watermarking",
)
"""Engine options that change the sampled distribution: vLLM's reported log-probs include them, `get_logprobs`
does not apply them."""


def sampling_params_fields() -> tuple[str, ...]:
    """The public field names of `vllm.SamplingParams`.

    Read from the class when vLLM is loaded in this process (an engine or a server client started it, or the caller
    imported it); otherwise `SAMPLING_PARAMS_FIELDS`, so that checking options never imports vLLM.
    """
    if "vllm" in sys.modules:
        try:
            from vllm import SamplingParams

            fields = getattr(SamplingParams, "__struct_fields__", None)
        except Exception:  # a broken install: the static list still checks the names
            fields = None
        if fields:
            return tuple(f for f in fields if not f.startswith("_") and f != "output_text_buffer_length")
    return tuple(f for f in SAMPLING_PARAMS_FIELDS if f != "output_text_buffer_length")


def accepted_engine_options() -> tuple[str, ...]:
    """The names `engine_options` accepts: the fields of `vllm.SamplingParams` that are neither `generate` arguments
    nor refused (`REFUSED_ENGINE_OPTIONS`), sorted."""
    return tuple(
        sorted(f for f in sampling_params_fields() if f not in GENERATE_ARGUMENTS and f not in REFUSED_ENGINE_OPTIONS)
    )


def check_engine_options(options: Mapping[str, Any]) -> None:
    """Checks the names of vLLM-only sampling settings (their values are checked by vLLM itself).

    Args:
        options (`Mapping[str, Any]`): Settings of `vllm.SamplingParams` to pass on, e.g. `{"min_tokens": 4}`.

    Raises:
        TypeError: If a name is not a string.
        ValueError: If a name is a `generate` argument (the message names it), would break what `generate` returns
            (the message says why), or is not a field of `vllm.SamplingParams` (the message lists the valid names).
    """
    valid = accepted_engine_options()
    for name in options:
        if not isinstance(name, str):
            raise InvalidTypeError(f"`engine_options` names must be strings, got {name!r}.")
        if name in GENERATE_ARGUMENTS:
            raise InvalidValueError(
                f"`engine_options[{name!r}]`: pass it as the `generate` argument `{GENERATE_ARGUMENTS[name]}`, "
                "which both backends implement."
            )
        if name in REFUSED_ENGINE_OPTIONS:
            raise InvalidValueError(f"`engine_options[{name!r}]` is not accepted: {REFUSED_ENGINE_OPTIONS[name]}.")
        if name not in valid:
            raise InvalidValueError(
                f"`engine_options[{name!r}]` is not a setting of `vllm.SamplingParams`; valid names: {list(valid)}."
            )


def merged_engine_options(settings: dict[str, Any], sampling: SamplingConfig) -> dict[str, Any]:
    """`settings` (a request's sampler settings) with `sampling.engine_options` added; the options win.

    Args:
        settings (`dict`): The settings this package sets on a request.
        sampling (`SamplingConfig`): The requested settings, whose `engine_options` are passed on.

    Returns:
        `dict`: A new dict.
    """
    return {**settings, **sampling.engine_options}


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
