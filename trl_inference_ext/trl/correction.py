"""The train/inference mismatch correction for rollouts sampled by another engine than the trainer's model.

TRL's `GRPOTrainer` corrects for the difference between the engine that sampled a rollout (vLLM: other kernels,
other precision, possibly weights a step behind) and the model it trains, but only on its own vLLM path
(`use_vllm=True`). A `rollout_func` runs with `use_vllm=False`, where TRL ignores the returned `logprobs`. This module
applies the same correction to the rollouts of `rollout_func(inference=...)`, driven by the same `GRPOConfig` fields
(`vllm_importance_sampling_correction`, `vllm_importance_sampling_mode`, `vllm_importance_sampling_clip_min`,
`vllm_importance_sampling_clip_max`) and logged under the same metric names.

Which log-probabilities the ratio compares. The sampler reports the log-probability of each sampled token under the
distribution it sampled from: after the repetition penalty, the temperature, top-k, top-p and min-p
(`logprobs_mode="processed_logprobs"`). The trainer's model is scored here under the *same* processing
(`InferenceModule.get_logprobs` with the sampling settings), so the ratio `exp(trainer - sampler)` measures only what
differs between the two engines, and is 1 where they agree. Comparing the trainer's full-vocabulary log-probability
with the sampler's processed one instead (what TRL's vLLM path does) makes every ratio of a top-p or top-k rollout
smaller than 1 even with identical engines, since truncation renormalises the kept tokens upwards; a sequence's
ratio, a product over its tokens, then falls out of the mask's bounds for long completions (TRL issue #6789). Under
the definition here, a token the sampler could draw but the trainer's truncated distribution excludes (a near-tie at
the truncation boundary) has ratio 0 and is masked.

What reaches TRL's loss. A `rollout_func` can hand TRL's loss one per-token factor: `env_mask`, which TRL multiplies
into the loss mask (`GRPOTrainer._generate` takes it as its tool mask). It is a mask: TRL also uses it to count
completion lengths and the loss normaliser of `dapo`/`bnpo`/`grpo`, so a fractional value there would not weight a
token but rescale its sequence's normaliser. Hence:

- `sequence_mask` (TRL's default) and `token_mask`: a sequence (or token) whose ratio falls outside
  `[clip_min, clip_max]` gets `env_mask` 0, exactly as TRL drops it. TRL also multiplies each kept token's loss by its
  ratio (a value inside the bounds); that weight cannot pass through a mask, so kept tokens count with weight 1. The
  ratios are logged, so how far the kept ones are from 1 is visible.
- `sequence_truncate` and `token_truncate` only weight (clip the ratio, drop nothing): refused with a message
  pointing to the `*_mask` modes, rather than silently trained uncorrected.

`tests/trl/test_mismatch_correction.py` pins the TRL behaviour this relies on (a zero in `env_mask` removes the token
from the loss), so a TRL release that changes it fails loudly.

Metrics (averaged over each logging step by TRL, like its own): `sampling/sampling_logp_difference/{mean,max}` and
`sampling/importance_sampling_ratio/{min,mean,max}` with TRL's definitions (the ratio after masking, 0 where masked),
plus `sampling/raw_importance_sampling_ratio/{min,mean,max}` (before masking) and
`sampling/importance_sampling_masked_fraction` (of model tokens in token modes, of sequences in sequence modes).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config_checks import Check, check_bool, check_fields, is_real, one_of
from ..errors import InvalidValueError, UnsupportedError
from ..types import SamplingConfig

IMPORTANCE_SAMPLING_MODES = ("sequence_mask", "token_mask", "sequence_truncate", "token_truncate")
"""The values of TRL's `vllm_importance_sampling_mode`."""
MASK_MODES = ("sequence_mask", "token_mask")
"""The modes a `rollout_func` can apply (see the module docstring)."""

_BOUND = Check("a float >= 0 or None", lambda v: is_real(v) and v >= 0, convert=float).or_none()


@dataclass(frozen=True, kw_only=True)
class MismatchCorrection:
    """How rollouts from another engine are corrected: the fields of TRL's `GRPOConfig`, without their prefix."""

    enabled: bool = field(
        default=True,
        metadata={"help": "`vllm_importance_sampling_correction`: apply the correction.", "check": check_bool},
    )
    mode: str = field(
        default="sequence_mask",
        metadata={
            "help": "`vllm_importance_sampling_mode`: per token or per sequence, mask or truncate.",
            "check": one_of(IMPORTANCE_SAMPLING_MODES),
        },
    )
    clip_min: float | None = field(
        default=None,
        metadata={"help": "`vllm_importance_sampling_clip_min`: lower bound (None: none).", "check": _BOUND},
    )
    clip_max: float | None = field(
        default=3.0,
        metadata={"help": "`vllm_importance_sampling_clip_max`: upper bound (None: none).", "check": _BOUND},
    )

    def __post_init__(self) -> None:
        check_fields(self)

    @classmethod
    def from_trl_args(cls, args: Any) -> MismatchCorrection:
        """Reads the correction settings of a `trl.GRPOConfig` (TRL's defaults for missing attributes).

        Args:
            args: A `trl.GRPOConfig` or any object with its `vllm_importance_sampling_*` attributes.
        """
        defaults = cls()
        try:
            return cls(
                enabled=getattr(args, "vllm_importance_sampling_correction", defaults.enabled),
                mode=getattr(args, "vllm_importance_sampling_mode", defaults.mode),
                clip_min=getattr(args, "vllm_importance_sampling_clip_min", defaults.clip_min),
                clip_max=getattr(args, "vllm_importance_sampling_clip_max", defaults.clip_max),
            )
        except InvalidValueError as error:  # name the config's field, not ours
            message = str(error).replace("`enabled`", "`correction`", 1)
            raise InvalidValueError(message.replace("`", "`vllm_importance_sampling_", 1)) from None

    @property
    def per_sequence(self) -> bool:
        """Whether one ratio covers a whole sequence (the product of its tokens' ratios)."""
        return self.mode.startswith("sequence")

    def check_applicable(self) -> None:
        """Refuses the truncate modes, which weight tokens and so cannot pass through `env_mask`.

        Raises:
            UnsupportedError: For `sequence_truncate` and `token_truncate` with the correction enabled.
        """
        if self.enabled and self.mode not in MASK_MODES:
            raise UnsupportedError(
                f"`vllm_importance_sampling_mode={self.mode!r}` weights each token by its clipped ratio, and a "
                "`rollout_func` can pass TRL's loss only a 0/1 mask (`env_mask`). With `rollout_func(inference=...)` "
                "use 'sequence_mask' (TRL's default) or 'token_mask', or set "
                "`vllm_importance_sampling_correction=False`."
            )


@dataclass
class CorrectionResult:
    """The correction of one batch of rollouts.

    Attributes:
        keep (`torch.Tensor`): `[B, T]` bool, the model tokens that stay in the loss.
        raw_ratio (`torch.Tensor`): `[B, 1]` (sequence modes) or `[B, T]` (token modes) ratio before masking.
        ratio (`torch.Tensor`): The same after masking (0 where masked), as TRL computes it.
        metrics (`dict[str, torch.Tensor]`): This process's statistics (NaN where there was nothing to measure),
            before they are combined across processes by `combine_metrics`.
    """

    keep: torch.Tensor
    raw_ratio: torch.Tensor
    ratio: torch.Tensor
    metrics: dict[str, torch.Tensor]


def correct(
    trainer_logps: torch.Tensor,
    sampler_logps: torch.Tensor,
    model_tokens: torch.Tensor,
    correction: MismatchCorrection,
) -> CorrectionResult:
    """Computes the importance ratios trainer/sampler and the tokens the correction keeps.

    Args:
        trainer_logps (`torch.Tensor`): `[B, T]` log-probabilities of the sampled tokens under the trainer's model,
            with the sampling's processing (may hold `-inf` for a token the trainer's truncation excludes).
        sampler_logps (`torch.Tensor`): `[B, T]` log-probabilities the sampler reported (NaN where it reported none).
        model_tokens (`torch.Tensor`): `[B, T]` bool, the tokens the model sampled (not padding, not tool output).
        correction (`MismatchCorrection`): The settings; `mode` must be one of `MASK_MODES`.

    Returns:
        `CorrectionResult`: what to keep, both ratios and the statistics.
    """
    correction.check_applicable()
    diff = trainer_logps.double() - sampler_logps.double()
    usable = model_tokens & ~torch.isnan(diff)  # a token the sampler reported no log-prob for is not corrected
    diff = torch.where(usable, diff, torch.zeros_like(diff))
    if correction.per_sequence:
        raw = torch.exp(diff.sum(dim=-1, keepdim=True))
        units = model_tokens.any(dim=-1, keepdim=True)
    else:
        raw = torch.exp(diff)
        units = model_tokens
    low = -math.inf if correction.clip_min is None else correction.clip_min
    high = math.inf if correction.clip_max is None else correction.clip_max
    outside = (raw < low) | (raw > high)
    ratio = raw.masked_fill(outside, 0.0)
    masked = outside | (raw == 0)  # TRL's product with a zero ratio drops the token as well
    keep = model_tokens & ~masked.expand_as(model_tokens)
    delta = (trainer_logps.double() - sampler_logps.double()).abs()[usable]
    delta = delta[torch.isfinite(delta)]
    metrics = {
        "sampling/sampling_logp_difference/mean": _stat(delta, torch.mean),
        "sampling/sampling_logp_difference/max": _stat(delta, torch.max),
        "sampling/importance_sampling_ratio/min": _stat(ratio[units], torch.min),
        "sampling/importance_sampling_ratio/mean": _stat(ratio[units], torch.mean),
        "sampling/importance_sampling_ratio/max": _stat(ratio[units], torch.max),
        "sampling/raw_importance_sampling_ratio/min": _stat(raw[units], torch.min),
        "sampling/raw_importance_sampling_ratio/mean": _stat(raw[units], torch.mean),
        "sampling/raw_importance_sampling_ratio/max": _stat(raw[units], torch.max),
        "sampling/importance_sampling_masked_fraction": _stat(masked[units].double(), torch.mean),
    }
    return CorrectionResult(keep=keep, raw_ratio=raw.float(), ratio=ratio.float(), metrics=metrics)


def _stat(values: torch.Tensor, reduce: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    return reduce(values).double() if values.numel() else torch.tensor(math.nan, dtype=torch.float64)


_COMBINE = {"min": torch.min, "max": torch.max}


def combine_metrics(
    metrics: dict[str, torch.Tensor], gather: Callable[[torch.Tensor], torch.Tensor]
) -> dict[str, float]:
    """Combines per-process statistics as TRL does: minimum of minima, maximum of maxima, mean of means.

    Args:
        metrics (`dict[str, torch.Tensor]`): This process's statistics (scalars, NaN where empty).
        gather (`Callable`): Concatenates a 1-D tensor over processes (`accelerator.gather`); every process calls it.

    Returns:
        `dict[str, float]`: The same names, the same value on every process (NaN when no process measured any).
    """
    names = sorted(metrics)
    gathered = gather(torch.stack([metrics[n] for n in names]).unsqueeze(0)).reshape(-1, len(names)).double()
    combined: dict[str, float] = {}
    for column, name in enumerate(names):
        values = gathered[:, column]
        values = values[~torch.isnan(values)]
        if not values.numel():
            combined[name] = math.nan
            continue
        reduce = _COMBINE.get(name.rsplit("/", 1)[-1], torch.mean)
        combined[name] = float(reduce(values))
    return combined


def padded(rows: Sequence[Sequence[float]], width: int, fill: float = 0.0) -> torch.Tensor:
    """`[len(rows), width]` float64 tensor of right-padded rows."""
    out = torch.full((len(rows), width), fill, dtype=torch.float64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor([math.nan if v is None else float(v) for v in row], dtype=torch.float64)
    return out


def scoring_settings(sampling: dict[str, Any]) -> dict[str, Any]:
    """The `get_logprobs` arguments that score tokens under the distribution `generate(**sampling)` sampled from
    (`SamplingConfig.scoring_settings`: greedy decoding reports log-probabilities at temperature 1, untruncated)."""
    return SamplingConfig.from_kwargs(**sampling).scoring_settings()


class SamplingMetrics:
    """A reward function that logs the mismatch correction's metrics and scores nothing.

    TRL lets reward functions log scalars through the `log_metric` keyword argument; that is how the metrics the
    rollout function computed reach TRL's logs, averaged over each logging step with TRL's own. It returns `None` for
    every completion, which TRL skips (its `rewards/sampling_metrics/*` columns stay empty), so it needs no weight:
    any value in `GRPOConfig.reward_weights` at its position leaves the rewards unchanged.
    """

    __name__ = "sampling_metrics"

    def __init__(self) -> None:
        self.pending: dict[str, float] = {}
        """The metrics of the latest rollouts, logged by the next call."""

    def __call__(
        self, completions: list[Any], log_metric: Callable[[str, float], None] | None = None, **kwargs: Any
    ) -> list[float | None]:
        """Logs the pending metrics (skipping NaN: nothing measured) and returns one `None` per completion."""
        if log_metric is not None:
            for name, value in sorted(self.pending.items()):
                if not math.isnan(value):
                    log_metric(name, value)
        self.pending = {}
        return [None] * len(completions)
