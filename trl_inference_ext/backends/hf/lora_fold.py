"""Decode-time LoRA folding: a LoRA policy samples with one product per layer, like a plain model.

An unmerged PEFT LoRA layer computes `base(x) + scale * B(A(dropout(x)))` for every active adapter: three products
and a few dozen Python operations per layer and per decoded token (SmolLM2-135M, r=16 on q/k/v/o: 1.7 s of 4.6 s of
decoding). Merging the adapter into the base weights (`merge_adapter()` / `unmerge_adapter()`) would remove that cost
but rounds the trainer's own weights on every round trip. `LoraFold` instead keeps a separate **decode-time copy**
`W' = W + sum_a scale_a * B_a @ A_a` (and `b' = b + sum_a scale_a * b_B,a` with `lora_bias`) for each LoRA layer, and
while a `with fold.applied():` block runs, routes that layer's forward to `F.linear(x, W', b')`. The PEFT model's
parameters are only read. The copy is recomputed only when a tensor it was computed from changes (tensor version
counter, storage, identity), the set of active adapters changes, or the caller's `weights_key` changes: once per
optimizer step in training.

What is folded, per `peft.tuners.lora.Linear` layer:

- active adapters only (`set_adapter`, several active adapters are summed); with adapters disabled
  (`disable_adapter()`, the reference policy) the layer is routed to its base weight, without any copy;
- `lora_alpha / r` or rsLoRA scaling, as PEFT stored it in `layer.scaling` (so `set_scale` is honoured);
- LoRA dropout only when it is the identity (`p == 0` or eval mode; generation runs in eval mode);
- `lora_bias` adapters (the bias is folded too).

Everything else keeps PEFT's own forward, so the result is never silently different: a layer whose base is not a
plain `nn.Linear` (quantised layers, GPT-2's `Conv1D`), with non-plain weight tensors (sharded, quantised tensor
subclasses, meta), with hooks or patched forwards on its parts (Accelerate offloading), with a LoRA variant (DoRA,
aLoRA, ...), merged adapters, or active training-mode dropout; calls with extra arguments (PEFT's mixed-adapter
batches) or inputs of another dtype. Embedding LoRA and `modules_to_save` copies are not LoRA linear layers: they run
as they always do.

Memory: the copy costs the size of every folded weight, `sum(out_features * in_features * element_size)` (plus the
folded biases), e.g. 106 MB in float32 for SmolLM2-135M with LoRA on q/k/v/o, and is kept between blocks until the
weights change. With `enabled="auto"` it is made only when it fits in `FOLD_MEMORY_FRACTION` of the free memory of
its device (`MemAvailable` on CPU, `torch.cuda.mem_get_info` on CUDA; unknown elsewhere, so not folded).

Routing is per thread: the layers' forwards are swapped only on the module instances and only while a block is open,
and a swapped forward defers to PEFT's own forward in any thread (or context) that is not inside the block.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
import torch.nn.functional as F

from ...errors import InvalidValueError

logger = logging.getLogger(__name__)

FOLD_MEMORY_FRACTION = 0.2
"""With `enabled="auto"`, the most of a device's free memory the decode-time copy may take."""

Route = tuple[torch.Tensor, "torch.Tensor | None"]
_ROUTES: ContextVar[dict[torch.nn.Module, Route] | None] = ContextVar("trl_inference_ext_lora_routes", default=None)
_INSTALL_LOCK = threading.Lock()
_INSTALLED: dict[torch.nn.Module, list[Any]] = {}  # layer -> [open blocks, its own forward before]
_NO_FORWARD = object()


def check_fold_mode(enabled: Any, name: str = "fold_lora") -> None:
    """Raises `ValueError` unless `enabled` is `True`, `False` or `"auto"`."""
    if not (isinstance(enabled, bool) or (isinstance(enabled, str) and enabled == "auto")):
        raise InvalidValueError(f"`{name}` must be True, False or 'auto', got {enabled!r}.")


def _lora_linear_class() -> type | None:
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError:
        return None
    return Linear


def _plain(tensor: Any) -> bool:
    """A dense, materialised tensor (not sharded, quantised, or on the meta device)."""
    data = tensor.data if isinstance(tensor, torch.nn.Parameter) else tensor
    return type(data) is torch.Tensor and data.layout == torch.strided and data.device.type != "meta"


def _untouched(module: torch.nn.Module) -> bool:
    """No hooks and no forward patched onto the instance (as Accelerate's offloading hooks do)."""
    return not module._forward_hooks and not module._forward_pre_hooks and "forward" not in module.__dict__


def _folded_adapters(layer: Any) -> list[str] | None:
    """The active adapters folded into `layer`'s decode-time weight, or `None` if it must keep PEFT's forward.

    An empty list means the layer computes its base linear layer only (adapters disabled or none active here).
    """
    base = layer.base_layer
    if type(base) is not torch.nn.Linear or not _untouched(base) or layer.merged or layer.fan_in_fan_out:
        return None
    weight, bias = base.weight, base.bias
    if not _plain(weight) or not weight.is_floating_point() or (bias is not None and not _plain(bias)):
        return None
    if weight.shape != (base.out_features, base.in_features):  # e.g. a ZeRO-3 partition that was not gathered
        return None
    if layer.disable_adapters:
        return []
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    for name in active:
        if name in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(name, False):
            return None
        lora_a, lora_b, dropout = layer.lora_A[name], layer.lora_B[name], layer.lora_dropout[name]
        if type(lora_a) is not torch.nn.Linear or type(lora_b) is not torch.nn.Linear or lora_a.bias is not None:
            return None
        if not all(_untouched(m) for m in (lora_a, lora_b, dropout)):
            return None
        identity = type(dropout) is torch.nn.Identity or (
            type(dropout) is torch.nn.Dropout and (not dropout.training or dropout.p == 0.0)
        )
        if not identity:
            return None
        tensors = [lora_a.weight, lora_b.weight] + ([lora_b.bias] if lora_b.bias is not None else [])
        if not all(_plain(t) and t.device == weight.device for t in tensors):
            return None
        rank = lora_a.out_features
        if lora_a.weight.shape != (rank, weight.shape[1]) or lora_b.weight.shape != (weight.shape[0], rank):
            return None
    return active


def _tensor_state(tensor: torch.Tensor | None) -> tuple[int, int, int] | None:
    return None if tensor is None else (id(tensor), tensor._version, tensor.data_ptr())


def _layer_key(layer: Any, adapters: list[str]) -> tuple[Any, ...]:
    """Everything the folded weight of `layer` depends on."""
    base = layer.base_layer
    parts: list[Any] = [_tensor_state(base.weight), _tensor_state(base.bias)]
    for name in adapters:
        lora_b = layer.lora_B[name]
        parts += [
            name,
            float(layer.scaling[name]),
            _tensor_state(layer.lora_A[name].weight),
            _tensor_state(lora_b.weight),
            _tensor_state(lora_b.bias),
        ]
    return tuple(parts)


def _fold(layer: Any, adapters: list[str]) -> Route:
    """`(W + sum scale * B @ A, b + sum scale * b_B)`, computed in float32 and stored in the base weight's dtype."""
    base = layer.base_layer
    weight = base.weight.detach()
    folded = weight.float().clone() if weight.dtype != torch.float32 else weight.clone()
    bias = base.bias.detach() if base.bias is not None else None
    folded_bias = None
    for name in adapters:
        scale = float(layer.scaling[name])
        lora_b = layer.lora_B[name]
        folded.addmm_(lora_b.weight.detach().float(), layer.lora_A[name].weight.detach().float(), alpha=scale)
        if lora_b.bias is not None:
            if folded_bias is None:
                folded_bias = bias.float().clone() if bias is not None else folded.new_zeros(folded.shape[0])
            folded_bias.add_(lora_b.bias.detach().float(), alpha=scale)
    return folded.to(weight.dtype), (folded_bias.to(weight.dtype) if folded_bias is not None else bias)


def _weight_bytes(layer: Any, adapters: list[str]) -> int:
    weight = layer.base_layer.weight
    extra = weight.shape[0] if any(layer.lora_B[name].bias is not None for name in adapters) else 0
    return (weight.numel() + extra) * weight.element_size()


def free_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on `device`: `MemAvailable` on CPU, the CUDA driver's free memory on CUDA,
    `None` when unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def _routed_forward(layer: torch.nn.Module, fallback: Any) -> Any:
    """A forward for `layer` that computes `F.linear(x, W', b')` inside a block, and `fallback` everywhere else."""

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        routes = _ROUTES.get()
        route = routes.get(layer) if routes is not None else None
        if route is None or args or kwargs or x.dtype != route[0].dtype:
            return fallback(x, *args, **kwargs)
        return F.linear(x, route[0], route[1])

    return forward


def routed_layers() -> int:
    """Number of layers whose `forward` is routed through a fold right now (0 outside every `applied()` block)."""
    with _INSTALL_LOCK:
        return len(_INSTALLED)


def _install(layers: list[torch.nn.Module]) -> None:
    with _INSTALL_LOCK:
        for layer in layers:
            entry = _INSTALLED.get(layer)
            if entry is not None:
                entry[0] += 1
                continue
            previous = layer.__dict__.get("forward", _NO_FORWARD)
            fallback = previous if previous is not _NO_FORWARD else type(layer).forward.__get__(layer)
            _INSTALLED[layer] = [1, previous]
            layer.forward = _routed_forward(layer, fallback)


def _uninstall(layers: list[torch.nn.Module]) -> None:
    with _INSTALL_LOCK:
        for layer in layers:
            entry = _INSTALLED[layer]
            entry[0] -= 1
            if entry[0] > 0:
                continue
            del _INSTALLED[layer]
            if entry[1] is _NO_FORWARD:
                del layer.forward
            else:
                layer.forward = entry[1]


class LoraFold:
    """Decode-time copies of a PEFT model's LoRA linear layers with their active adapters folded in.

    The copy costs the bytes of every folded weight (`out_features * in_features * element_size`, plus folded
    biases; see `folded_bytes`); layers whose adapters are disabled are routed to their base weight at no cost.

    Args:
        model (`torch.nn.Module`): A `peft.PeftModel` or a transformers model with PEFT adapters loaded; a model
            without LoRA layers makes every block a no-op. Its parameters are never written.
        enabled (`bool` or `"auto"`, *optional*, defaults to `"auto"`): `True` folds whatever is supported, `False`
            never routes anything (PEFT's forward everywhere), `"auto"` folds when the copy fits in
            `memory_fraction` of the free memory of each device it lives on.
        memory_fraction (`float`, *optional*, defaults to `FOLD_MEMORY_FRACTION`): See `enabled`.

    Example:

    ```python
    fold = LoraFold(peft_model)
    with torch.no_grad(), fold.applied():
        out = peft_model(input_ids)  # LoRA layers compute F.linear(x, W + scale * B @ A, b)
    ```
    """

    def __init__(
        self, model: torch.nn.Module, enabled: bool | str = "auto", *, memory_fraction: float = FOLD_MEMORY_FRACTION
    ) -> None:
        check_fold_mode(enabled, "enabled")
        if not 0.0 < memory_fraction <= 1.0:
            raise InvalidValueError(f"`memory_fraction` must be in (0, 1], got {memory_fraction!r}.")
        self.model = model
        self.enabled = enabled
        self.memory_fraction = memory_fraction
        self.fold_count = 0
        """Layer weights folded so far; unchanged by a block when nothing a copy depends on has changed."""
        self.routed_layers = 0
        """LoRA layers routed by the last block (folded or base weight); 0 means PEFT's forward everywhere."""
        self.folded_layers = 0
        """LoRA layers computed from a folded copy in the last block."""
        self._folds: dict[torch.nn.Module, tuple[tuple[Any, ...], Route]] = {}
        self._lock = threading.Lock()
        self._skipped_for_memory = False

    @property
    def folded_bytes(self) -> int:
        """Bytes held by the decode-time copies (weights and folded biases)."""
        total = 0
        for layer, (_, (weight, bias)) in self._folds.items():
            total += weight.numel() * weight.element_size()
            if bias is not None and bias is not getattr(layer.base_layer, "bias", None):
                total += bias.numel() * bias.element_size()
        return total

    def clear(self) -> None:
        """Drops the decode-time copies (the next block folds again)."""
        with self._lock:
            self._folds.clear()

    def _plan(self, weights_key: Any) -> tuple[dict[torch.nn.Module, Route], int]:
        """Routes for this block and how many use a folded copy, (re)folding what changed since the last one."""
        linear_cls = _lora_linear_class()
        if self.enabled is False or linear_cls is None:
            self._folds.clear()
            return {}, 0
        wanted: dict[Any, tuple[list[str], tuple[Any, ...]]] = {}
        routes: dict[torch.nn.Module, Route] = {}
        layers: list[Any] = [m for m in self.model.modules() if type(m) is linear_cls]
        for module in layers:
            adapters = _folded_adapters(module)
            if adapters is None:
                continue
            if not adapters:
                base = module.base_layer
                routes[module] = (base.weight, base.bias)
                continue
            wanted[module] = (adapters, (weights_key, *_layer_key(module, adapters)))
        # Copies of layers that now run on their base weight (adapters disabled, e.g. the reference policy) are kept
        # for when the adapters are back; those of layers gone or no longer supported are dropped.
        for stale in [layer for layer in self._folds if layer not in wanted and layer not in routes]:
            del self._folds[stale]
        if wanted and not self._fits(wanted):
            self._folds.clear()
            return routes, 0
        for layer, (adapters, key) in wanted.items():
            held = self._folds.get(layer)
            if held is None or held[0] != key:
                self._folds.pop(layer, None)  # free the old copy before making the new one
                self._folds[layer] = (key, _fold(layer, adapters))
                self.fold_count += 1
            routes[layer] = self._folds[layer][1]
        return routes, len(wanted)

    def _fits(self, wanted: dict[Any, tuple[list[str], tuple[Any, ...]]]) -> bool:
        if self.enabled is True:
            return True
        needed: dict[torch.device, int] = {}
        held: dict[torch.device, int] = {}
        for layer, (adapters, _) in wanted.items():
            device = layer.base_layer.weight.device
            needed[device] = needed.get(device, 0) + _weight_bytes(layer, adapters)
            if layer in self._folds:
                held[device] = held.get(device, 0) + _weight_bytes(layer, adapters)
        for device, size in needed.items():
            free = free_memory(device)
            if free is None or size > self.memory_fraction * (free + held.get(device, 0)):
                if not self._skipped_for_memory:
                    logger.info(
                        "LoRA folding is off: the decode-time copy (%.0f MB on %s) does not fit in %.0f%% of the free "
                        "memory (%s); generation runs through PEFT's LoRA layers. Pass `fold_lora=True` to force it.",
                        size / 2**20,
                        device,
                        100 * self.memory_fraction,
                        "unknown" if free is None else f"{free / 2**20:.0f} MB",
                    )
                    self._skipped_for_memory = True
                return False
        return True

    @contextmanager
    def applied(self, weights_key: Any = None) -> Iterator[None]:
        """Runs the block with the supported LoRA layers computing from their folded copies (in this thread only).

        The routes are fixed when the block opens: switch adapters (`set_adapter`, `disable_adapter()`) outside it.

        Args:
            weights_key (*optional*): A hashable version of the weights from the caller (e.g. a backend's
                `weights_version`); when it changes, every copy is folded again, also after out-of-place updates that
                tensor version counters do not see.
        """
        with self._lock, torch.no_grad():
            routes, self.folded_layers = self._plan(weights_key)
        self.routed_layers = len(routes)
        if not routes:
            yield
            return
        layers = list(routes)
        _install(layers)
        token = _ROUTES.set(routes)
        try:
            yield
        finally:
            _ROUTES.reset(token)
            _uninstall(layers)
