"""PEFT helpers in one place: unwrapping, recognising PEFT models, and adapter toggling for the reference policy.

The reference policy is the same weights with adapters off (or a frozen named adapter): no second copy of the model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ..errors import InvalidValueError


def unwrap_model(model: Any) -> Any:
    """The model under DDP / DeepSpeed engine wrappers (`model` itself when it is not wrapped); PEFT wrappers stay."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def peft_model_class() -> type | None:
    """`peft.PeftModel`, or `None` when `peft` is not installed."""
    try:
        from peft import PeftModel
    except ImportError:
        return None
    return PeftModel


def is_peft_wrapper(model: Any) -> bool:
    """Whether `model` is a `peft.PeftModel` (not transformers' own adapter integration)."""
    peft_cls = peft_model_class()
    return peft_cls is not None and isinstance(model, peft_cls)


def is_peft_model(model: Any) -> bool:
    """Whether `model` is a `peft.PeftModel` or a transformers model with PEFT adapters loaded."""
    return is_peft_wrapper(model) or bool(getattr(model, "_hf_peft_config_loaded", False))


def base_model(model: Any) -> Any:
    """The transformers model under a PEFT wrapper (`model` itself when it is not wrapped)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def adapter_names(model: Any) -> list[str]:
    """Names of the adapters attached to `model` (empty for a plain model)."""
    config = getattr(model, "peft_config", None)
    return list(config) if isinstance(config, dict) else []


def adapter_state(model: Any) -> tuple[Any, ...]:
    """A hashable description of which adapters are active, used in cache keys."""
    if not is_peft_model(model):
        return ()
    for module in model.modules():
        if hasattr(module, "disable_adapters") and hasattr(module, "active_adapters") and hasattr(module, "merged"):
            active = module.active_adapters
            return (tuple(active) if isinstance(active, (list, tuple)) else (active,), bool(module.disable_adapters))
    return ()


def check_reference(model: Any, adapter_name: str | None = None) -> None:
    """Checks that `model` has adapters to toggle and that `adapter_name` (if given) is one of them.

    Raises:
        ValueError: If `model` has no adapters (the reference would be the policy itself) or `adapter_name` is
            unknown.
    """
    if not is_peft_model(model):
        raise InvalidValueError(
            "`reference()` needs a PEFT model: without adapters the reference would be the policy itself. Wrap the "
            "model with a LoRA adapter (`peft_config=`), or score with a separate frozen `InferenceModule`."
        )
    names = adapter_names(model)
    if adapter_name is not None and adapter_name not in names:
        raise InvalidValueError(f"`adapter_name` must be one of {names}, got {adapter_name!r}.")


@contextmanager
def reference_adapters(model: Any, adapter_name: str | None = None) -> Iterator[None]:
    """Runs the block with the reference policy: adapters disabled, or `adapter_name` active.

    Trainable flags are restored on exit, since switching adapters in PEFT changes which parameters require grad.

    Args:
        model: A `peft.PeftModel` or a transformers model with adapters loaded.
        adapter_name (`str`, *optional*): A frozen adapter to use as the reference; `None` disables all adapters.

    Raises:
        ValueError: If `model` has no adapters or `adapter_name` is unknown.
    """
    check_reference(model, adapter_name)
    wrapper = is_peft_wrapper(model)
    if adapter_name is None:
        if wrapper:
            with model.disable_adapter():
                yield
        else:
            model.disable_adapters()
            try:
                yield
            finally:
                model.enable_adapters()
        return
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    previous = model.active_adapter if wrapper else model.active_adapters()[0]
    model.set_adapter(adapter_name)
    try:
        yield
    finally:
        model.set_adapter(previous)
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
