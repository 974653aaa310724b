"""Whether the sampler and the trainer run the model in the same dtype.

vLLM's `dtype="auto"` serves a float32 checkpoint in bfloat16 on the CPU build and on GPUs with bfloat16 (see
`VLLMBackend.engine_dtype`). A float32 trainer then learns from samples of a bfloat16 policy: every sampled log-prob
differs from the trainer's by the rounding, which TRL's mismatch metrics show. `engine_dtype_note` says so once, in
one line, so the gap is not mistaken for a bug.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..backends.capabilities import ReportsEngineDtype
from ..backends.hf.backend import parameter_dtype

if TYPE_CHECKING:
    from ..module import InferenceModule

MISMATCH_METRICS = ("sampling/importance_sampling_ratio/*", "sampling/sampling_logp_difference/*")
"""TRL's metrics of the sampler/trainer mismatch, where a dtype gap shows."""


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def engine_dtype_note(inference: InferenceModule, trainer_model: torch.nn.Module) -> str | None:
    """A one-line message when the inference engine runs the model in another dtype than the trainer's parameters.

    Args:
        inference (`InferenceModule`): The module that samples the rollouts; its backend reports its dtype
            (`backends.capabilities.ReportsEngineDtype`).
        trainer_model (`torch.nn.Module`): The model being trained (possibly PEFT-, DDP- or DeepSpeed-wrapped); its
            dtype is the one most of its floating-point parameters have.

    Returns:
        `str`, *optional*: The message, naming both dtypes and the metrics to watch (`MISMATCH_METRICS`); `None` when
        the dtypes agree or either is unknown.

    Example:
        ```python
        note = engine_dtype_note(inference, trainer.model)
        if note is not None:
            logger.warning(note)
        ```
    """
    backend = inference.backend
    engine = backend.engine_dtype if isinstance(backend, ReportsEngineDtype) else None
    trainer = parameter_dtype(trainer_model)
    if engine is None or trainer is None or engine == trainer:
        return None
    return (
        f"The sampler ({backend.name}) runs the model in {_name(engine)} but the trainer's parameters are "
        f"{_name(trainer)}: sampled log-probs differ from the trainer's by the rounding; watch "
        f"`{MISMATCH_METRICS[0]}` and `{MISMATCH_METRICS[1]}`, or run the sampler in {_name(trainer)} "
        f'(`dtype="{_name(trainer)}"`, `trl-inference serve --dtype {_name(trainer)}`).'
    )


__all__ = ["MISMATCH_METRICS", "engine_dtype_note"]
