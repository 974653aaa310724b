"""Inference backends behind one small protocol (see `base.Backend`)."""

from __future__ import annotations

from typing import Any

from .base import Backend, ScoringConfig, SequenceOutput

BACKEND_NAMES = ("huggingface", "vllm")


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


__all__ = ["BACKEND_NAMES", "Backend", "ScoringConfig", "SequenceOutput", "create_backend"]
