"""The vLLM backend: `VLLMBackend` on an in-process engine or on servers, their weight pushes and the server launcher.

May import `..base`, `..adapters`, `..options`, `...types` and `...errors`; never `..hf` (the two engines stay apart).
`vllm` itself is imported only when an engine starts. Names of `backend` are importable from here.
"""

from __future__ import annotations

import importlib
from typing import Any


def __getattr__(name: str) -> Any:
    """Names of `backend`, loaded on first use: a server's worker process imports `server.worker` without them."""
    if name.startswith("__"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(".backend", __name__)
    try:
        return getattr(module, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


__all__ = [
    "INSTALL_HINT",
    "MAX_TEMPERATURE",
    "MIN_TEMPERATURE",
    "WEIGHT_TRANSFERS",
    "NoServerLeftError",
    "VLLMBackend",
    "VLLMEngineStartError",
    "VLLMOptions",
    "VLLMServerError",
    "VLLMServerUnusableError",
    "WeightPushError",
    "backend_option_names",
    "checkpoint_name",
    "default_cpu_kv_cache_bytes",
    "engine_memory_settings",
    "engine_option_names",
    "is_vllm_usable",
]
