"""Inference backends behind one small protocol (see `base.Backend`)."""

from __future__ import annotations

from typing import Any

from .base import Backend, ScoringConfig, SequenceOutput

BACKEND_NAMES = ("huggingface", "vllm")


def backend_option_names(name: str) -> frozenset[str]:
    """The options backend `name` accepts without importing its engine (for vLLM: its own, plus any engine argument
    when vLLM is installed).

    Raises:
        ValueError: If `name` is not a known backend.
    """
    if name == "huggingface":
        from .huggingface import HuggingFaceBackend

        return HuggingFaceBackend.option_names()
    if name == "vllm":
        from .vllm import backend_option_names as vllm_options
        from .vllm import engine_option_names, is_vllm_usable

        return vllm_options() | (engine_option_names() if is_vllm_usable() else frozenset())
    raise ValueError(f"`backend` must be one of {list(BACKEND_NAMES)} or 'auto', got {name!r}.")


def create_backend(name: str, model_name: str, **kwargs: Any) -> Backend:
    """Instantiates a backend by name; heavy imports happen here, not at package import.

    Raises:
        ValueError: If `name` is not a known backend.
        ImportError: If the backend's library is not installed (the message gives the install command).
    """
    if name == "huggingface":
        from .huggingface import HuggingFaceBackend

        return HuggingFaceBackend.from_pretrained(model_name, **kwargs)
    if name == "vllm":
        from .vllm import VLLMBackend

        return VLLMBackend(model_name, **kwargs)
    raise ValueError(f"`backend` must be one of {list(BACKEND_NAMES)} or 'auto', got {name!r}.")


__all__ = ["BACKEND_NAMES", "Backend", "ScoringConfig", "SequenceOutput", "backend_option_names", "create_backend"]
