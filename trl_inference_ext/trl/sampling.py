"""Reading TRL's generation settings (`GRPOConfig`) as `InferenceModule.generate` arguments."""

from __future__ import annotations

from typing import Any

from ..backends.vllm.sampling import GENERATE_ARGUMENTS, check_engine_options

_PASSTHROUGH = (
    "max_new_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "do_sample",
    "stop",
    "seed",
)
"""`generation_kwargs` keys that are `generate` arguments, passed on under their own name."""


def sampling_from_trl_args(args: Any, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Maps `GRPOConfig` generation fields to `generate` keyword arguments.

    `temperature`, `top_p`, `top_k` (TRL's 0 = disabled becomes -1), `min_p` (`None` = disabled), `repetition_penalty`
    and `max_completion_length` are read, then `generation_kwargs`, then `overrides`. `min_p` and `repetition_penalty`
    are set only when they are active, so the defaults give the same arguments as before.

    A `generation_kwargs` key that is a `generate` argument (`max_new_tokens`, `temperature`, `top_p`, `top_k`,
    `min_p`, `repetition_penalty`, `do_sample`, `stop`, `seed`; vLLM's `max_tokens` is read as `max_new_tokens`) is
    passed as that argument. Any other setting of `vllm.SamplingParams` (`presence_penalty`, `frequency_penalty`,
    `min_tokens`, `ignore_eos`, ...) goes into `engine_options`, which only the vLLM backend accepts (the Hugging
    Face backend refuses it at `generate` with a `NotImplementedError` naming it). Keys that would break what
    `generate` returns (`n`, `logprobs`, `detokenize`, `logits_processors`, ...) and unknown keys raise.

    Args:
        args: A `trl.GRPOConfig` (or any object with the same attributes).
        overrides (`dict`, *optional*): Explicit `generate` arguments that win over the config.

    Raises:
        ValueError: For a refused `generation_kwargs` key (the message says why) or an unknown one (the message lists
            the valid ones).
    """
    top_k = getattr(args, "top_k", None)
    sampling: dict[str, Any] = {
        "temperature": float(getattr(args, "temperature", 1.0)),
        "top_p": float(getattr(args, "top_p", 1.0) or 1.0),
        "top_k": int(top_k) if top_k and top_k > 0 else -1,
    }
    min_p = getattr(args, "min_p", None)
    if min_p:
        sampling["min_p"] = float(min_p)
    repetition_penalty = getattr(args, "repetition_penalty", None)
    if repetition_penalty is not None and repetition_penalty != 1.0:
        sampling["repetition_penalty"] = float(repetition_penalty)
    if getattr(args, "max_completion_length", None):
        sampling["max_new_tokens"] = int(args.max_completion_length)
    extra, engine_options = _split_generation_kwargs(dict(getattr(args, "generation_kwargs", None) or {}))
    sampling.update(extra)
    if engine_options:
        sampling["engine_options"] = engine_options
    sampling.update(overrides or {})
    return sampling


def _split_generation_kwargs(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """`(generate arguments, engine options)` from `GRPOConfig.generation_kwargs`, in vLLM's conventions.

    Raises:
        ValueError: For a refused or unknown key.
    """
    arguments: dict[str, Any] = {}
    engine: dict[str, Any] = {}
    for name, value in kwargs.items():
        if name in _PASSTHROUGH or name in GENERATE_ARGUMENTS:
            arguments[GENERATE_ARGUMENTS.get(name, name)] = value
        else:
            engine[name] = value
    # vLLM's "off" values, as TRL's vLLM path passes them through, in this package's terms
    if arguments.get("top_k") in (0, -1):
        arguments["top_k"] = -1
    if "min_p" in arguments and arguments["min_p"] is None:
        arguments["min_p"] = 0.0
    if "repetition_penalty" in arguments and arguments["repetition_penalty"] is None:
        arguments["repetition_penalty"] = 1.0
    try:
        check_engine_options(engine)
    except ValueError as err:  # same message, naming the config field it came from
        raise type(err)(f"`generation_kwargs`: {err}") from None
    return arguments, engine
