"""Keeping an `InferenceModule` in step with a model that a `transformers.Trainer` is training."""

from __future__ import annotations

from typing import Any

import torch
from transformers import TrainerCallback

from ..backends.capabilities import SupportsWeightPush
from ..errors import InvalidTypeError, InvalidValueError
from ..module import InferenceModule


class InferenceSyncCallback(TrainerCallback):
    """After every optimizer step, pushes the trained weights to `inference` and invalidates its cache.

    For a vLLM backend the weights (LoRA merged for the push) are loaded into the engine; for a Hugging Face backend
    that wraps the trained model itself only the cache is invalidated, since it already sees the new weights. Use it
    when generating outside `rollout_func` (evaluation hooks, custom loops); `rollout_func` syncs by itself.

    Args:
        inference (`InferenceModule`): The module to keep in sync.
        every_n_steps (`int`, *optional*, defaults to 1): Sync every this many optimizer steps.
    """

    def __init__(self, inference: InferenceModule, every_n_steps: int = 1) -> None:
        if not isinstance(inference, InferenceModule):
            raise InvalidTypeError(f"`inference` must be an InferenceModule, got {type(inference).__name__}.")
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise InvalidValueError(f"`every_n_steps` must be an int >= 1, got {every_n_steps!r}.")
        self.inference = inference
        self.every_n_steps = every_n_steps
        self.syncs = 0

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        """Syncs when `state.global_step` is a multiple of `every_n_steps`."""
        if state.global_step % self.every_n_steps:
            return
        backend = self.inference.backend
        if model is not None and isinstance(backend, SupportsWeightPush):
            # Servers are shared by every training process: the first one pushes, the others wait for it.
            if not backend.server_mode or state.is_world_process_zero:
                backend.load_weights_from_model(model)
            if backend.server_mode and torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.barrier()
        self.inference.mark_weights_updated()
        self.syncs += 1
