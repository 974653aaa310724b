"""Full weights from a sharded trainer, one parameter at a time: FSDP2 (`DTensor` shards) and DeepSpeed ZeRO-3.

A weight push needs whole tensors, but gathering a sharded model at once would put a second full copy of it on every
rank. `gathered_parameters` gathers one parameter, hands it on, and releases it before the next, so a rank holds its
shards plus one full tensor at a time. Gathering is collective: every rank iterates the same parameters in the same
order, also the ranks that push nothing (`push_model_weights(..., push=False)`).

```python
with unwrap_model_for_generation(trainer.model_wrapped, trainer.accelerator, gather_deepspeed3_params=False) as model:
    push_model_weights(backend, model, push=not shared or trainer.accelerator.is_main_process)
```
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from ..backends.adapters import is_peft_model, unwrap_model
from ..backends.capabilities import SupportsWeightPush
from ..backends.vllm.weights.checks import checkpoint_name
from ..errors import UnsupportedError


def is_dtensor(tensor: Any) -> bool:
    """Whether `tensor` is a `torch.distributed.tensor.DTensor` (an FSDP2 / tensor-parallel shard)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(tensor, DTensor)


def is_zero3_partitioned(tensor: Any) -> bool:
    """Whether `tensor` is a parameter partitioned by DeepSpeed ZeRO-3 (it carries a `ds_id`)."""
    return hasattr(tensor, "ds_id")


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether any parameter of `model` is an FSDP2 shard or a ZeRO-3 partition."""
    return any(is_dtensor(p) or is_zero3_partitioned(p) for p in unwrap_model(model).parameters())


def gathered_parameters(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields `(name, full tensor)` for each parameter of `model`, gathering one at a time (collective).

    A `DTensor` is gathered with `full_tensor()`, a ZeRO-3 parameter inside `deepspeed.zero.GatheredParameters`; other
    parameters are yielded as they are. Each full tensor is valid until the next one is requested: copy it to keep it.

    Args:
        model (`torch.nn.Module`): The (unwrapped or wrapped) model; every rank must iterate it the same way.

    Yields:
        `tuple[str, torch.Tensor]`: The parameter's name (as `named_parameters()` gives it) and its full, detached
            value.
    """
    for name, param in unwrap_model(model).named_parameters():
        if is_dtensor(param):
            full = param.detach().full_tensor()
            yield name, full
            del full
        elif is_zero3_partitioned(param):
            import deepspeed

            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                yield name, param.detach()
        else:
            yield name, param.detach()


def push_model_weights(backend: Any | None, model: torch.nn.Module, *, push: bool = True) -> int | None:
    """Pushes the trainer's weights into `backend`, gathering sharded parameters one at a time.

    Every rank calls it: with a sharded model the gathers are collective, so the ranks that push nothing (`push=False`,
    e.g. all but the main process when the servers are shared) still take part in them. An unsharded model is pushed
    with `load_weights_from_model` (LoRA adapters alone when the engine can take them), only where `push` is set.

    Args:
        backend (`SupportsWeightPush`, *optional*): The vLLM backend (in-process or servers); only used where `push`.
        model (`torch.nn.Module`): The trainer's model, unwrapped without gathering (ZeRO-3:
            `unwrap_model_for_generation(..., gather_deepspeed3_params=False)`).
        push (`bool`, *optional*, defaults to `True`): Whether this rank sends the weights.

    Returns:
        `int` or `None`: The new `weights_version` where this rank pushed, else `None`.

    Raises:
        UnsupportedError: If a sharded model is a `peft` model (its adapters would have to be merged into sharded
            base weights).
    """
    if push and not (isinstance(backend, SupportsWeightPush) and hasattr(backend, "load_weight_stream")):
        raise UnsupportedError(f"The {getattr(backend, 'name', type(backend).__name__)!r} backend cannot load weights.")
    pusher: Any = backend  # checked above where it is used
    if not is_sharded(model):
        return pusher.load_weights_from_model(model) if push else None
    if is_peft_model(unwrap_model(model)):
        raise UnsupportedError(
            "Pushing a sharded (FSDP2 / ZeRO-3) PEFT model is not supported: its adapters would have to be merged "
            "into sharded base weights. Merge and unload the adapter, or train it without sharding (DDP / ZeRO-2)."
        )
    pairs = ((checkpoint_name(n), t) for n, t in gathered_parameters(model))
    stream = ((n, t) for n, t in pairs if n is not None)
    if not push:
        for _ in stream:  # take part in every gather
            pass
        return None
    names = [n for n in (checkpoint_name(p) for p, _ in unwrap_model(model).named_parameters()) if n is not None]
    try:
        return int(pusher.load_weight_stream(names, stream))
    finally:
        for _ in stream:  # a push that failed part-way: finish the gathers the other ranks are waiting in
            pass


__all__ = ["gathered_parameters", "is_dtensor", "is_sharded", "is_zero3_partitioned", "push_model_weights"]
