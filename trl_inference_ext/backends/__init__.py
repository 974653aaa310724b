"""Inference engines behind one protocol (`base.Backend`): `hf/` (transformers) and `vllm/` (in-process or servers).

May import `..types`, `..scoring` and `..errors`; never `..module`, `..tools` or `..trl` (they import backends).
`BACKENDS` maps a backend's name to how it is built; heavy imports happen only when one is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidValueError
from .base import Backend, ScoringConfig, SequenceOutput


def _huggingface_options() -> frozenset[str]:
    from .hf.backend import HuggingFaceBackend

    return HuggingFaceBackend.option_names()


def _huggingface(model_name: str, **kwargs: Any) -> Backend:
    from .hf.backend import HuggingFaceBackend

    return HuggingFaceBackend.from_pretrained(model_name, **kwargs)


def _vllm_options() -> frozenset[str]:
    from .vllm.backend import backend_option_names, engine_option_names, is_vllm_usable

    return backend_option_names() | (engine_option_names() if is_vllm_usable() else frozenset())


def _vllm(model_name: str, **kwargs: Any) -> Backend:
    from .vllm.backend import VLLMBackend

    return VLLMBackend(model_name, **kwargs)


@dataclass(frozen=True)
class BackendEntry:
    """How one backend is built, without importing its engine until then.

    Attributes:
        build (`Callable[..., Backend]`): `build(model_name, **options)` loads the model and returns the backend.
        option_names (`Callable[[], frozenset[str]]`): The options `build` accepts (for vLLM: its own, plus any
            engine argument when vLLM is installed).
    """

    build: Callable[..., Backend]
    option_names: Callable[[], frozenset[str]]


BACKENDS: dict[str, BackendEntry] = {
    "huggingface": BackendEntry(build=_huggingface, option_names=_huggingface_options),
    "vllm": BackendEntry(build=_vllm, option_names=_vllm_options),
}
"""The backends `InferenceModule(backend=...)` builds, by name."""

BACKEND_NAMES = tuple(BACKENDS)


def _entry(name: str) -> BackendEntry:
    if name not in BACKENDS:
        raise InvalidValueError(f"`backend` must be one of {list(BACKEND_NAMES)} or 'auto', got {name!r}.")
    return BACKENDS[name]


def backend_option_names(name: str) -> frozenset[str]:
    """The options backend `name` accepts without importing its engine (for vLLM: its own, plus any engine argument
    when vLLM is installed).

    Raises:
        InvalidValueError: If `name` is not a known backend.
    """
    return _entry(name).option_names()


def create_backend(name: str, model_name: str, **kwargs: Any) -> Backend:
    """Instantiates a backend by name; heavy imports happen here, not at package import.

    Raises:
        InvalidValueError: If `name` is not a known backend.
        ImportError: If the backend's library is not installed (the message gives the install command).
    """
    return _entry(name).build(model_name, **kwargs)


__all__ = [
    "BACKENDS",
    "BACKEND_NAMES",
    "Backend",
    "BackendEntry",
    "ScoringConfig",
    "SequenceOutput",
    "backend_option_names",
    "create_backend",
]
