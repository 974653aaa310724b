"""LoRA adapters pushed to vLLM instead of merged full weights.

When the policy is a `peft` LoRA model, only the adapter changes during training: pushing it is a few megabytes
instead of the whole model, and vLLM applies it on top of the base weights it already holds (`enable_lora`). This
module decides whether an adapter can be pushed (vLLM must support every feature it uses, and the engine's
`max_lora_rank` must fit it) and exports it exactly as `peft` saves it (`adapter_model.safetensors` tensors and the
`adapter_config.json` text), without touching the disk. Anything vLLM cannot apply falls back to merged weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

from ...adapters import is_peft_wrapper, unwrap_model

ADAPTER_NAME = "trl-policy"
"""Name the pushed adapter is served under (requests name it as their `model`)."""
SUPPORTED_TARGETS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
"""Modules whose LoRA vLLM applies on the decoder architectures it supports (attention and MLP projections)."""
_PEFT_INITS = frozenset({"gaussian", "eva", "orthogonal", "mica", "lora_ga"})  # string inits that leave the base as is


@dataclass
class AdapterExport:
    """A LoRA adapter as `peft` saves it.

    Attributes:
        tensors (`dict[str, torch.Tensor]`): The `adapter_model.safetensors` tensors (detached, on the model's
            device).
        config (`str`): The `adapter_config.json` text.
        rank (`int`): The largest rank of the adapter (what the engine's `max_lora_rank` must allow).
    """

    tensors: dict[str, torch.Tensor]
    config: str
    rank: int

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def adapter_unsupported_reason(model: torch.nn.Module, max_lora_rank: int | None) -> str | None:
    """Why the adapter of `model` cannot be pushed to a vLLM engine, or `None` when it can.

    Args:
        model (`torch.nn.Module`): The policy, possibly wrapped (DDP / DeepSpeed).
        max_lora_rank (`int`, *optional*): The engine's `max_lora_rank`; `None` when the engine runs without LoRA.

    Returns:
        `str` or `None`: A one-line reason (e.g. "the engine runs without --enable-lora").
    """
    peft_model: Any = unwrap_model(model)
    if not is_peft_wrapper(peft_model):
        return "the model is not a peft.PeftModel"
    if max_lora_rank is None:
        return "the vLLM engine runs without LoRA (`enable_lora=True` / `--enable-lora`)"
    active = _active_adapters(peft_model)
    if len(active) != 1:
        return f"{len(active)} adapters are active; only one can be served"
    config = peft_model.peft_config[active[0]]
    if type(config).__name__ != "LoraConfig":
        return f"the adapter is a {type(config).__name__}, not a LoraConfig"
    problems = []
    if getattr(config, "modules_to_save", None):
        problems.append(f"modules_to_save={config.modules_to_save}")
    if getattr(config, "use_dora", False):
        problems.append("use_dora=True")
    if getattr(config, "lora_bias", False) or getattr(config, "bias", "none") != "none":
        problems.append("LoRA bias")
    init = getattr(config, "init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in _PEFT_INITS:
        problems.append(f"init_lora_weights={init!r} (it changes the base weights)")
    if getattr(config, "layer_replication", None) or getattr(config, "alora_invocation_tokens", None):
        problems.append("layer replication / aLoRA")
    targets = _lora_module_names(peft_model, active[0])
    unsupported = sorted(targets - SUPPORTED_TARGETS)
    if unsupported:
        problems.append(f"LoRA on {unsupported}")
    if problems:
        return "vLLM cannot apply " + ", ".join(problems)
    rank = _max_rank(config)
    if rank > max_lora_rank:
        return f"the adapter's rank {rank} exceeds the engine's max_lora_rank {max_lora_rank}"
    return None


@torch.no_grad()
def export_adapter(model: torch.nn.Module) -> AdapterExport:
    """The active adapter of a `peft` model, as `save_pretrained` would write it.

    Args:
        model (`torch.nn.Module`): A `peft` LoRA model, possibly wrapped; check it with `adapter_unsupported_reason`
            first.

    Returns:
        `AdapterExport`: Its tensors, config text and rank.
    """
    from peft import get_peft_model_state_dict

    peft_model = unwrap_model(model)
    (name,) = _active_adapters(peft_model)
    state = get_peft_model_state_dict(peft_model, adapter_name=name)
    config = peft_model.peft_config[name]
    fields = config.to_dict()
    fields = {k: sorted(v) if isinstance(v, set) else v for k, v in fields.items()}
    fields["inference_mode"] = True
    tensors = {k: v.detach() for k, v in state.items()}
    return AdapterExport(tensors=tensors, config=json.dumps(fields, indent=2, default=str), rank=_max_rank(config))


def _active_adapters(peft_model: torch.nn.Module) -> list[str]:
    active = getattr(peft_model, "active_adapters", None)
    if callable(active):
        active = active()
    if active is None:
        active = [getattr(peft_model, "active_adapter", "default")]
    return [active] if isinstance(active, str) else list(active)


def _lora_module_names(peft_model: torch.nn.Module, adapter: str) -> set[str]:
    """Leaf names (`q_proj`, ...) of the modules carrying a LoRA of `adapter`."""
    names = set()
    for name, module in peft_model.named_modules():
        factors = getattr(module, "lora_A", None)
        if isinstance(factors, torch.nn.ModuleDict) and adapter in factors:
            names.add(name.rsplit(".", 1)[-1])
        embedding = getattr(module, "lora_embedding_A", None)
        if isinstance(embedding, torch.nn.ParameterDict) and adapter in embedding:
            names.add(name.rsplit(".", 1)[-1])
    return names


def _max_rank(config: object) -> int:
    ranks = [int(getattr(config, "r", 0))]
    ranks += [int(r) for r in (getattr(config, "rank_pattern", None) or {}).values()]
    return max(ranks)
