"""Reading TRL's generation settings (`GRPOConfig`) as `InferenceModule.generate` arguments."""

from __future__ import annotations

from typing import Any

from ..errors import InvalidValueError

_PASSTHROUGH = ("max_new_tokens", "temperature", "top_p", "top_k", "do_sample", "stop", "seed")


def sampling_from_trl_args(args: Any, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Maps `GRPOConfig` generation fields to `generate` keyword arguments.

    `temperature`, `top_p`, `top_k` (TRL's 0 = disabled becomes -1) and `max_completion_length` are read, then
    `generation_kwargs`, then `overrides`. Settings this package's samplers do not implement raise instead of being
    silently ignored, since the reported log-probs must describe the distribution actually sampled from.

    Args:
        args: A `trl.GRPOConfig` (or any object with the same attributes).
        overrides (`dict`, *optional*): Explicit `generate` arguments that win over the config.

    Raises:
        ValueError: For `min_p`, `repetition_penalty != 1` or an unsupported `generation_kwargs` key.
    """
    if getattr(args, "min_p", None):
        raise InvalidValueError("`min_p` is not supported by trl_inference_ext's samplers; unset it in the config.")
    if getattr(args, "repetition_penalty", 1.0) not in (None, 1.0):
        raise InvalidValueError(
            "`repetition_penalty` is not supported by trl_inference_ext's samplers; keep it at 1.0."
        )
    top_k = getattr(args, "top_k", None)
    sampling: dict[str, Any] = {
        "temperature": float(getattr(args, "temperature", 1.0)),
        "top_p": float(getattr(args, "top_p", 1.0) or 1.0),
        "top_k": int(top_k) if top_k and top_k > 0 else -1,
    }
    if getattr(args, "max_completion_length", None):
        sampling["max_new_tokens"] = int(args.max_completion_length)
    extra = dict(getattr(args, "generation_kwargs", None) or {})
    unsupported = sorted(set(extra) - set(_PASSTHROUGH))
    if unsupported:
        raise InvalidValueError(
            f"`generation_kwargs` keys {unsupported} are not supported; allowed: {list(_PASSTHROUGH)}."
        )
    sampling.update(extra)
    sampling.update(overrides or {})
    return sampling
