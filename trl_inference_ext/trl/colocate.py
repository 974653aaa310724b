"""One device for trainer and engine: the in-process vLLM engine's memory share and sleep mode under `rollout_func`.

An in-process vLLM engine on the trainer's GPU must leave the trainer room. The rule:

- The engine follows the trainer's `GRPOConfig`: `vllm_gpu_memory_utilization` (a share in (0, 1], or a size in
  bytes) and `vllm_enable_sleep_mode`, unless the option was given to the module (`gpu_memory_utilization=` /
  `kv_cache_memory_bytes=`, `enable_sleep_mode=`), which then wins.
- On a GPU an engine whose share or sleep mode was left unset starts at its first use, so the trainer's settings
  reach it first (`follow_trainer_memory` at the first rollout). One that already started (something generated
  before training) with a larger share than the config allows, or without the sleep mode the config asks for, is an
  error that names the option to set: its memory cannot be given back.
- vLLM's CPU build keeps its byte budget (`kv_cache_memory_bytes`): a share of a GPU means nothing there, so the
  config's share is ignored (logged once); its `vllm_enable_sleep_mode=True` is refused, as vLLM refuses sleep mode
  on the CPU build.

With sleep mode, `awake_for_rollout` wakes the engine's weights before the weight push, the push drops the prefix
cache, the first request wakes the KV cache, and the engine sleeps again when the rollout ends, so the trainer's
forward and backward passes see the freed memory.

```python
follow_trainer_memory(inference, trainer.args)
with awake_for_rollout(inference):
    ...  # weight push, then generation
```
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from typing import Any

from ..backends.capabilities import SleepsBetweenRollouts
from ..backends.vllm.options import MEMORY_SHARE, cpu_only, device_memory_bytes, memory_fraction
from ..errors import InvalidValueError, UnsupportedError

logger = logging.getLogger(__name__)

_SHARE_ARG = "vllm_gpu_memory_utilization"
_SLEEP_ARG = "vllm_enable_sleep_mode"


def _in_process_vllm(inference: Any) -> Any:
    """The `VLLMBackend` of `inference` when it runs an in-process engine, else `None`."""
    from ..backends.vllm.backend import VLLMBackend

    backend = getattr(inference, "backend", inference)
    return backend if isinstance(backend, VLLMBackend) and not backend.server_mode else None


def trainer_engine_settings(args: Any) -> dict[str, Any]:
    """The engine settings a trainer's config asks for: `gpu_memory_utilization` and `enable_sleep_mode`.

    Args:
        args (`trl.GRPOConfig`): The trainer's config (`vllm_gpu_memory_utilization`, `vllm_enable_sleep_mode`).

    Returns:
        `dict[str, Any]`: `{"gpu_memory_utilization": share, "enable_sleep_mode": bool}`.

    Raises:
        InvalidValueError: If the share is neither a fraction in (0, 1] nor a size in bytes.
    """
    share = MEMORY_SHARE(f"GRPOConfig.{_SHARE_ARG}", getattr(args, _SHARE_ARG, 0.3))
    return {"gpu_memory_utilization": share, "enable_sleep_mode": bool(getattr(args, _SLEEP_ARG, False))}


def follow_trainer_memory(inference: Any, args: Any) -> None:
    """Gives an in-process vLLM engine the memory share and sleep mode of the trainer's config (see the module's rule).

    Options the user gave are kept. An engine that has not started takes the rest from `args`; one that already
    started is checked against them. Does nothing for other backends and for servers (their memory is set where they
    start: `trl-inference serve --gpu-memory-utilization`). Calling it again changes nothing.

    Args:
        inference (`InferenceModule` or backend): The module handed to `rollout_func`.
        args (`trl.GRPOConfig`): The trainer's config.

    Raises:
        InvalidValueError: If the engine already started with a larger share than `args` allows, or without the sleep
            mode `args` asks for; the message names the option to set.
        UnsupportedError: If `args` asks for sleep mode on vLLM's CPU build.
    """
    backend = _in_process_vllm(inference)
    if backend is None:
        return
    wanted = trainer_engine_settings(args)
    options = backend.options
    follow_sleep = not options.is_set("enable_sleep_mode")
    if cpu_only():
        if follow_sleep and wanted["enable_sleep_mode"]:
            raise UnsupportedError(
                f"`GRPOConfig.{_SLEEP_ARG}=True` asks for vLLM's sleep mode, which vLLM's CPU build refuses ('Sleep "
                f"mode is not supported on current platform.'); set `{_SLEEP_ARG}=False` on this machine."
            )
        if not options.memory_is_set:
            _log_cpu_budget(backend.engine_memory.get("kv_cache_memory_bytes") if backend.engine_memory else None)
        return
    changes = {}
    if not options.memory_is_set:
        changes["gpu_memory_utilization"] = wanted["gpu_memory_utilization"]
    if follow_sleep:
        changes["enable_sleep_mode"] = wanted["enable_sleep_mode"]
    if not changes:
        return
    if not backend.started:
        logger.info("The in-process vLLM engine follows the trainer's config: %s.", changes)
        backend.update_engine_options(**changes)
        return
    check_started_engine(backend.engine_memory or {}, changes, device_memory_bytes())


def check_started_engine(started_with: dict[str, Any], wanted: dict[str, Any], device_bytes: int | None) -> None:
    """Raises unless an engine that started with `started_with` fits what the trainer's config asks (`wanted`).

    Args:
        started_with (`dict[str, Any]`): The memory arguments the engine started with (`VLLMBackend.engine_memory`).
        wanted (`dict[str, Any]`): The settings taken from the config that the user did not set
            (`gpu_memory_utilization`, `enable_sleep_mode`).
        device_bytes (`int`, *optional*): The device's memory, for a share given in bytes.

    Raises:
        InvalidValueError: Naming the share or sleep mode to pass to the module, or the config field to change.
    """
    if "gpu_memory_utilization" in wanted:
        allowed = memory_fraction(wanted["gpu_memory_utilization"], device_bytes, f"GRPOConfig.{_SHARE_ARG}")
        taken = started_with.get("gpu_memory_utilization")
        if taken is not None and taken > allowed + 1e-9:
            raise InvalidValueError(
                f"The in-process vLLM engine already started with gpu_memory_utilization={taken:g}, more than "
                f"`GRPOConfig.{_SHARE_ARG}={wanted['gpu_memory_utilization']}` allows for an engine that shares "
                f"its GPU with the trainer. Create the module with `gpu_memory_utilization={allowed:g}` (or the "
                f"share you want; a size in bytes works too), or raise `{_SHARE_ARG}` in GRPOConfig; and generate "
                "nothing with it before training starts, so the engine starts with the trainer's share."
            )
    if wanted.get("enable_sleep_mode"):
        raise InvalidValueError(
            f"`GRPOConfig.{_SLEEP_ARG}=True`, but the in-process vLLM engine already started without sleep mode. "
            f"Create the module with `enable_sleep_mode=True`, or set `{_SLEEP_ARG}=False`."
        )


@functools.lru_cache(maxsize=1)
def _log_cpu_budget(kv_bytes: int | None) -> None:
    budget = f"{kv_bytes} bytes of KV cache" if kv_bytes else "its own memory setting"
    logger.info("vLLM's CPU build keeps %s; GRPOConfig.%s (a share of a GPU) does not apply to it.", budget, _SHARE_ARG)


def needs_weight_reload(inference: Any) -> bool:
    """Whether the engine discarded its weights in a level-2 sleep, so the rollout must push weights even when the
    trainer's weights did not change since the last push."""
    backend = getattr(inference, "backend", inference)
    return isinstance(backend, SleepsBetweenRollouts) and backend.weights_lost


@contextlib.contextmanager
def awake_for_rollout(inference: Any) -> Iterator[None]:
    """Keeps a sleep-mode engine awake for one rollout, and asleep outside it.

    On entry the engine's weights are woken (a weight push may follow: only an awake engine loads weights, and the
    push drops the prefix cache); the first request wakes its KV cache; on exit, even on error, it sleeps, freeing
    its memory for the trainer's passes. Does nothing for an engine without sleep mode and for other backends.

    Args:
        inference (`InferenceModule` or backend): The module that generates the rollout.
    """
    backend = getattr(inference, "backend", inference)
    if not (isinstance(backend, SleepsBetweenRollouts) and backend.sleeps):
        yield
        return
    backend.wake_up(["weights"])
    try:
        yield
    finally:
        backend.sleep()


__all__ = [
    "awake_for_rollout",
    "check_started_engine",
    "follow_trainer_memory",
    "needs_weight_reload",
    "trainer_engine_settings",
]
