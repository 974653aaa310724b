"""Weights pushed into a vLLM engine: checkpoint names, validation before loading, and PEFT adapter merging.

vLLM's loader takes Hugging Face checkpoint names (`model.layers.0.self_attn.q_proj.weight`) and fuses some modules
itself (q/k/v into `qkv_proj`, gate/up into `gate_up_proj`). A failed reload leaves vLLM's model unusable, so every
check here runs before anything reaches the engine.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch

from ....errors import InvalidTypeError, InvalidValueError
from ...adapters import is_peft_model, unwrap_model

IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")
"""Checkpoint tensors the vLLM loaders skip on purpose; pushing them is harmless, so they are never reported."""
DEFAULT_PACKED_MODULES = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
"""Fused vLLM module -> the checkpoint modules it is built from, when the model does not say otherwise."""
_PEFT_PREFIX = "base_model.model."

NamedTensors = list[tuple[str, torch.Tensor]]


def checkpoint_name(name: str, *, peft: bool = False) -> str | None:
    """Maps a parameter name of a (possibly PEFT-wrapped) transformers model to its checkpoint name.

    LoRA factors and PEFT's copies of original modules map to `None` (they are not checkpoint tensors); merged base
    weights (`...q_proj.base_layer.weight`) and trained `modules_to_save` copies map to the plain name.

    Args:
        name (`str`): A name from `model.named_parameters()`.
        peft (`bool`, *optional*, defaults to `False`): Whether the name comes from a `peft.PeftModel`, whose names
            start with `base_model.model.`.

    Returns:
        `str` or `None`: The name vLLM's loader expects, or `None` to skip the tensor.
    """
    if peft and name.startswith(_PEFT_PREFIX):
        name = name[len(_PEFT_PREFIX) :]
    parts = name.split(".")
    if any(p.startswith("lora_") for p in parts) or "original_module" in parts:
        return None
    if "modules_to_save" in parts:  # X.modules_to_save.<adapter>.Y -> X.Y
        i = parts.index("modules_to_save")
        parts = parts[:i] + parts[i + 2 :]
    return ".".join(p for p in parts if p != "base_layer")


def check_pushed_weights(
    named_tensors: NamedTensors,
    *,
    engine_params: set[str] | None,
    packed_modules: Mapping[str, list[str]],
    tied_embeddings: bool,
) -> NamedTensors:
    """Validates weights before they are handed to vLLM, and drops the ones vLLM would skip anyway.

    Args:
        named_tensors (`list[tuple[str, torch.Tensor]]`): The pushed `(checkpoint name, tensor)` pairs.
        engine_params (`set[str]`, *optional*): vLLM's own (fused) parameter names; `None` skips the unknown-name
            check (the engine's model is not reachable from this process).
        packed_modules (`Mapping[str, list[str]]`): Fused vLLM module -> the checkpoint modules it is built from.
        tied_embeddings (`bool`): Whether the model ties `lm_head` to the embeddings (`lm_head.weight` is skipped).

    Returns:
        `list[tuple[str, torch.Tensor]]`: The weights to load, detached, in the order given.

    Raises:
        TypeError: If a name is not a string or a value is not a tensor.
        ValueError: If a name is unknown to the engine, or a fused module is pushed without all its members (vLLM
            rebuilds a fused module from what it receives, so a partial one would come out corrupted).
    """
    member_of = {member: packed for packed, members in packed_modules.items() for member in members}
    weights, unknown = [], []
    groups: dict[str, set[str]] = {}  # fused engine parameter -> checkpoint modules pushed for it
    for name, tensor in named_tensors:
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise InvalidTypeError("`named_tensors` must map parameter names (str) to tensors.")
        if name.endswith(IGNORED_SUFFIXES) or (tied_embeddings and name == "lm_head.weight"):
            continue
        parts = name.split(".")
        fused = next(((k, member_of[p]) for k, p in enumerate(parts) if p in member_of), None)
        engine_name = name
        if fused is not None:
            k, packed = fused
            engine_name = ".".join([*parts[:k], packed, *parts[k + 1 :]])
            groups.setdefault(engine_name, set()).add(parts[k])
        if engine_params is not None and engine_name not in engine_params:
            unknown.append(name)
        weights.append((name, tensor.detach()))
    if unknown:
        examples = sorted(engine_params or ())[:5]
        raise InvalidValueError(
            f"{len(unknown)} weight name(s) are unknown to the vLLM model, e.g. {unknown[:5]}. Names must be "
            f"Hugging Face checkpoint names (vLLM's own names look like {examples})."
        )
    for engine_name, present in sorted(groups.items()):
        packed = engine_name.split(".")[-2]
        missing = [m for m in packed_modules.get(packed, []) if m not in present]
        if missing:
            raise InvalidValueError(
                f"vLLM fuses {packed_modules[packed]} into {engine_name!r}; push them together (missing {missing})."
            )
    return weights


@contextmanager
def merged_checkpoint_weights(model: torch.nn.Module) -> Iterator[NamedTensors]:
    """Yields a model's parameters under their checkpoint names, with PEFT adapters merged into the base weights.

    A `peft.PeftModel` has its adapters merged on entry (`merge_adapter()`) and unmerged on exit
    (`unmerge_adapter()`), even on error; LoRA factors are left out and merged base weights are yielded under their
    checkpoint names. DDP/DeepSpeed wrappers are unwrapped. The tensors are detached views of the live parameters,
    so they are only valid inside the block.

    Args:
        model (`torch.nn.Module`): A causal LM, possibly PEFT-wrapped.

    Yields:
        `list[tuple[str, torch.Tensor]]`: `(checkpoint name, tensor)` pairs.

    Raises:
        ValueError: If the model has LoRA parameters that cannot be merged (no `merge_adapter()`).
    """
    unwrapped = unwrap_model(model)  # `Any`: PEFT methods are looked up at run time
    # transformers' own adapter integration (`model.load_adapter`) cannot merge, so it counts as not mergeable.
    mergeable = is_peft_model(unwrapped) and hasattr(unwrapped, "merge_adapter")
    if not mergeable and any(".lora_" in n for n, _ in unwrapped.named_parameters()):
        raise InvalidValueError(
            "The model has LoRA parameters but no `merge_adapter()`; wrap it with `peft.get_peft_model` or merge "
            "the adapters before pushing weights."
        )
    if mergeable:
        unwrapped.merge_adapter()
    try:
        weights = []
        for name, param in unwrapped.named_parameters():
            target = checkpoint_name(name, peft=mergeable)
            if target is not None:
                weights.append((target, param.detach()))
        yield weights
    finally:
        if mergeable:
            unwrapped.unmerge_adapter()


def base_checkpoint_weights(model: torch.nn.Module) -> NamedTensors:
    """The base weights of a `peft` model (adapters not merged) under their checkpoint names.

    Used to restore an engine's base weights before it applies a pushed LoRA adapter again, after full (merged)
    weights replaced them. LoRA factors are left out; the tensors are detached views of the live parameters.

    Args:
        model (`torch.nn.Module`): A `peft.PeftModel` (possibly wrapped) whose adapters are not merged.

    Returns:
        `list[tuple[str, torch.Tensor]]`: `(checkpoint name, tensor)` pairs.
    """
    unwrapped = unwrap_model(model)
    if any(getattr(m, "merged", False) for m in unwrapped.modules()):
        raise InvalidValueError("The model's adapters are merged; unmerge them before pushing its base weights.")
    weights = []
    for name, param in unwrapped.named_parameters():
        if "modules_to_save" in name.split("."):
            continue  # the trained copy; the base keeps the original module's weights
        target = checkpoint_name(name, peft=True)
        if target is not None:
            weights.append((target, param.detach()))
    return weights
