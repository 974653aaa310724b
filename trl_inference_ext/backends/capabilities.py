"""Optional backend capabilities, as small protocols checked at run time (`isinstance(backend, SupportsWeightPush)`).

The `Backend` protocol (`base.py`) is what every backend does. These are what only some do; callers check for the
capability they need instead of probing attribute names, and a new backend gains a feature by implementing the
methods, nothing else.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class SupportsWeightPush(Protocol):
    """A backend whose engine holds its own copy of the weights, updated by pushing new ones (vLLM, in-process or
    servers). A backend without it runs the trained model itself and sees new weights as they are made."""

    @property
    def server_mode(self) -> bool:
        """Whether the weights live on servers, which every training process shares (one push per step is enough)."""
        ...

    def load_weights(self, named_tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> int:
        """Loads weights given under their checkpoint names; returns the new `weights_version`."""
        ...

    def load_weights_from_model(self, model: torch.nn.Module) -> int:
        """Pushes a transformers model's weights (a LoRA adapter alone when it can); returns the new version."""
        ...

    def mark_weights_updated(self) -> None:
        """Declares that the served weights changed elsewhere (another process pushed them)."""
        ...


@runtime_checkable
class RunsLocalModel(Protocol):
    """A backend that runs a `torch.nn.Module` of this process (Hugging Face): weight changes made to that module
    (an optimizer step) are seen by the next call without any push."""

    @property
    def model(self) -> torch.nn.Module:
        """The module that generates and scores (PEFT-wrapped when the user's model is)."""
        ...


@runtime_checkable
class SupportsAdapterToggling(Protocol):
    """A backend that can score with a PEFT model's adapters turned off (or another adapter on), for the reference
    policy without a second copy of the model."""

    def check_reference(self, adapter_name: str | None = None) -> None:
        """Raises `InvalidValueError` unless `reference_context(adapter_name)` can run (the model has adapters, and
        `adapter_name` is one of them)."""
        ...

    def reference_context(self, adapter_name: str | None = None) -> AbstractContextManager[None]:
        """A context in which the backend runs the reference policy."""
        ...


@runtime_checkable
class SupportsTurnCaches(Protocol):
    """A backend that can keep each rollout's KV cache from one `generate` call to the next (multi-turn rollouts), so
    a turn runs only the tokens appended since the model's last one (Hugging Face)."""

    def keep_turn_caches(self, max_bytes: int | None = None) -> AbstractContextManager[Any]:
        """A context in which consecutive `generate` calls reuse the KV caches of the rows their prompts extend."""
        ...


@runtime_checkable
class SleepsBetweenRollouts(Protocol):
    """A backend whose engine can free its device memory between rollouts (vLLM's sleep mode), so a trainer on the
    same device can use it for its passes. `trl.colocate.awake_for_rollout` wakes it for a rollout and puts it back
    to sleep after."""

    @property
    def sleeps(self) -> bool:
        """Whether sleep mode is on (otherwise `sleep` and `wake_up` do nothing)."""
        ...

    @property
    def weights_lost(self) -> bool:
        """Whether the engine discarded its weights while asleep, so a weight push must come before any request."""
        ...

    def sleep(self) -> None:
        """Frees the engine's device memory (a no-op when already asleep)."""
        ...

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """Takes the memory back: all of it, or the parts named (`"weights"`, `"kv_cache"`)."""
        ...


@runtime_checkable
class ReportsEngineDtype(Protocol):
    """A backend that can say in which dtype its engine holds the weights and computes: a sampler in another dtype
    than the trainer samples from a slightly different policy (see `trl.engine_dtype.engine_dtype_note`)."""

    @property
    def engine_dtype(self) -> torch.dtype | None:
        """The dtype the engine runs the model in, or `None` when it cannot be known."""
        ...


__all__ = [
    "ReportsEngineDtype",
    "RunsLocalModel",
    "SleepsBetweenRollouts",
    "SupportsAdapterToggling",
    "SupportsTurnCaches",
    "SupportsWeightPush",
]
