"""vLLM backend: an in-process `vllm.LLM` (colocated with training) or a client for a running vLLM server.

Both modes take and return token ids, so results line up with the Hugging Face backend token for token.

Log-probabilities follow the same contract as everywhere else in the package: the log-prob reported for a sampled
token is taken under the *processed* distribution (repetition penalty, temperature, min-p, top-k, top-p, in the
sampler's order, renormalised), which is why the engine runs with `logprobs_mode="processed_logprobs"`. vLLM's prompt
log-probs are *raw* (no penalty, no temperature, no truncation), so `score_logprobs` uses them only at temperature 1
without truncation or penalty; otherwise it asks the sampler itself for the log-prob of each response token (one
single-token request per position, see `score_logprobs`).

Where requests go is a `connection.EngineConnection`: the in-process engine (`engine`) or a pool of one or more
servers (`pool`, over the HTTP client in `client`). Weight pushes are checked in `weights.checks`, sent to servers by
`weights.push` (received there by `server.worker`), and LoRA adapters exported by `weights.lora`. The sampling
settings both connections share live in `sampling`. vLLM is imported lazily: importing this module never needs it.

The options are declared, documented and validated once in `options` (`VLLMOptions`, with the engine memory and
scheduler settings derived from them); whether vLLM is installed and can run here is `availability`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, cast

import torch

from ...errors import (
    InvalidValueError,
    NoServerLeftError,
    OperationError,
    UnsupportedError,
    VLLMEngineStartError,
    VLLMServerError,
    VLLMServerUnusableError,
    WeightPushError,
)
from ...types import SamplingConfig
from ..adapters import is_peft_model, unwrap_model
from ..base import ScoringConfig, SequenceOutput
from .availability import INSTALL_HINT, is_cpu_build, is_vllm_usable, require_vllm
from .client import VLLMServerClient
from .connection import EngineConnection
from .cpu_threads import keep_trainer_threads
from .engine import InProcessEngine
from .options import (
    DEFAULT_CPU_KV_CACHE_BYTES,
    DEFAULT_GPU_MEMORY_UTILIZATION,
    NON_EMPTY_STR,
    VLLMOptions,
    backend_option_names,
    cpu_only,
    cpu_scheduler_settings,
    default_cpu_kv_cache_bytes,
    engine_memory_settings,
    engine_option_names,
)
from .pool import ServerPool
from .sampling import (
    MAX_TEMPERATURE,
    MIN_TEMPERATURE,
    check_sampling,
    check_temperature,
    needs_processing,
    request_plan,
    request_seed,
)
from .weights import DEFAULT_CHUNK_BYTES, WEIGHT_TRANSFERS, PushReport, make_weight_transfer
from .weights.checks import base_checkpoint_weights, check_pushed_weights, checkpoint_name, merged_checkpoint_weights
from .weights.lora import adapter_unsupported_reason, export_adapter

__all__ = [
    "DEFAULT_CPU_KV_CACHE_BYTES",
    "DEFAULT_GPU_MEMORY_UTILIZATION",
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
    "cpu_scheduler_settings",
    "default_cpu_kv_cache_bytes",
    "engine_memory_settings",
    "engine_option_names",
    "is_vllm_usable",
]

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- engine start
def _start_failure_message(exc: BaseException, memory: Mapping[str, Any]) -> str:
    used = ", ".join(f"{k}={v!r}" for k, v in memory.items()) or "vLLM's defaults"
    if is_cpu_build() and not torch.cuda.is_available():
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


def _start_engine(model_name: str, options: VLLMOptions, memory: Mapping[str, Any] | None = None) -> Any:
    """Starts the in-process `vllm.LLM` with `options`, the memory settings they imply and processed log-probs.

    Args:
        model_name (`str`): The model.
        options (`VLLMOptions`): The options.
        memory (`Mapping[str, Any]`, *optional*): The memory arguments (`engine_memory_settings` of the options when
            not given).

    Raises:
        VLLMEngineStartError: If the engine cannot start; the message names the memory setting to change.
    """
    # The engine must live in this process for `load_weights` to hand it tensors; vLLM reads this at start-up.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM

    if memory is None:
        memory = engine_memory_settings(options.gpu_memory_utilization, options.kv_cache_memory_bytes)
    engine_kwargs = {**cpu_scheduler_settings(options.engine_kwargs), **options.engine_kwargs}
    if options.enable_sleep_mode:
        engine_kwargs["enable_sleep_mode"] = True
    try:
        # On the CPU build the engine's start rebinds this process's threads, cores and memory policy, which would
        # starve the trainer it shares the process with: restored as they were (see cpu_threads).
        with keep_trainer_threads():
            return LLM(
                model=model_name,
                tensor_parallel_size=options.tensor_parallel_size,
                dtype=cast(Any, options.dtype),  # vLLM validates the value and names the allowed ones
                seed=options.seed,
                trust_remote_code=options.trust_remote_code,
                logprobs_mode="processed_logprobs",
                **memory,
                **engine_kwargs,
            )
    except Exception as exc:
        raise VLLMEngineStartError(_start_failure_message(exc, memory)) from exc


def defers_start(options: VLLMOptions) -> bool:
    """Whether an in-process engine with `options` starts at its first use rather than when the backend is built.

    On a GPU, an engine whose memory share or sleep mode was left unset waits, so that `rollout_func` can give it the
    trainer's settings first (`trl.colocate.follow_trainer_memory`): a share taken at start cannot be given back. On
    the CPU build (a byte budget, no sleep mode) and with both settings given, it starts at once.
    """
    if options.server_mode or cpu_only():
        return False
    return not (options.memory_is_set and options.is_set("enable_sleep_mode"))


ALL_SLEEP_TAGS = frozenset({"weights", "kv_cache"})
"""What a sleeping engine has released (vLLM's `wake_up(tags)` names)."""


def _server_pool(model_name: str, options: VLLMOptions) -> ServerPool:
    """The pool of `options.server_urls`, pushing weights the way `options.weight_transfer` says.

    Raises:
        InvalidValueError: If the weight transfer's settings do not fit together (see `make_weight_transfer`).
        OperationError: If `weight_transfer="nccl"` is asked for without a CUDA GPU.
    """
    transfer = make_weight_transfer(options.weight_transfer, options.weight_transfer_dir, options.weight_chunk_bytes)
    clients = [
        VLLMServerClient(
            url, model_name, api_key=options.api_key, timeout=options.timeout, max_retries=options.max_retries
        )
        for url in options.server_urls
    ]
    return ServerPool(clients, weight_transfer=transfer)


# ----------------------------------------------------------------------------------------------------- helpers
def _pad_rows(rows: list[torch.Tensor]) -> torch.Tensor:
    """Stacks 1-D float rows into `[len(rows), longest]`, right-padded with 0."""
    width = max((len(r) for r in rows), default=0)
    out = torch.zeros(len(rows), width, dtype=torch.float32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


# ----------------------------------------------------------------------------------------------------- backend
class VLLMBackend:
    """Generates and scores with vLLM, in-process (`vllm.LLM`) or through one or more vLLM servers.

    In-process, the engine runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0` is set unless you set it
    yourself) so `load_weights` can hand tensors to the model without serialising them: that is the colocated mode of
    RL training, where the trainer pushes new weights after each optimizer step. With `base_url`, requests go to
    servers started with `trl-inference serve MODEL` (or `vllm serve MODEL --logprobs-mode processed_logprobs`);
    with several URLs, prompt groups are spread over them and a server that dies is failed over (`ServerPool`). The
    tokenizer is always loaded locally from `model_name` so token ids agree.

    Where requests go is a `connection.EngineConnection`: `InProcessEngine` in-process, `ServerPool`
    for servers. This class plans the requests, validates pushed weights and pads the results.

    On a GPU, an in-process engine whose memory share or sleep mode was left unset starts at its first use (or
    `start()`), so a trainer can give it its share first (see `defers_start`). With `enable_sleep_mode=True` it can
    free its GPU memory between rollouts: `sleep()` releases it (`sleep_level` 1: weights to host memory; 2: weights
    discarded, so the next push must reload them), `wake_up()` takes it back; requests wake a sleeping engine, and a
    weight push wakes its weights first, so weights are only ever loaded into an awake engine. Every weight change
    drops the prefix cache, so no request reuses KV computed with old weights.

    The keyword options (`tensor_parallel_size`, `dtype`, `gpu_memory_utilization`, `kv_cache_memory_bytes`,
    `enable_sleep_mode`, `sleep_level`, `base_url`, `api_key`, `timeout`, `max_retries`, `weight_transfer`,
    `weight_transfer_dir`, `weight_chunk_bytes`, `sync_adapters`, `seed`, `trust_remote_code`) are the fields of
    `VLLMOptions`, documented there with their defaults and the values they allow, and validated there before vLLM is
    imported or the tokenizer loads.
    `VLLMBackend.from_options(model_name, options)` takes them as one `VLLMOptions`.

    Args:
        model_name (`str`): Model identifier or local folder (also the tokenizer's source).
        **engine_kwargs: Further `vllm.LLM` arguments (in-process mode; `VLLMOptions.engine_kwargs`), e.g.
            `max_model_len`, `enforce_eager=True` (much faster start-up, no compilation), `enable_prefix_caching`,
            `enable_lora=True` with `max_lora_rank=`.

    Attributes:
        options (`VLLMOptions`): The options, as validated.

    Raises:
        ImportError: In-process mode without vLLM installed (the message gives the install command).
        ValueError: If an argument is out of range, `logprobs_mode` is overridden, or engine options are given
            with `base_url` (they are the server's `vllm serve` flags there); see `VLLMOptions`.
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
        enable_sleep_mode: bool | None = None,
        sleep_level: int = 1,
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
        NON_EMPTY_STR("model_name", model_name)
        options = VLLMOptions(
            tensor_parallel_size=tensor_parallel_size,
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            kv_cache_memory_bytes=kv_cache_memory_bytes,
            enable_sleep_mode=enable_sleep_mode,
            sleep_level=sleep_level,
            base_url=base_url,
            api_key=api_key,
            timeout=timeout,
            max_retries=max_retries,
            weight_transfer=weight_transfer,
            weight_transfer_dir=weight_transfer_dir,
            weight_chunk_bytes=weight_chunk_bytes,
            sync_adapters=sync_adapters,
            seed=seed,
            trust_remote_code=trust_remote_code,
            engine_kwargs=engine_kwargs,
        )
        options.check_engine_names()  # in-process only; imports vLLM when there are engine arguments
        self.model_name = model_name
        self.options = options
        self.sync_adapters = bool(options.sync_adapters)
        self._version = 0
        self._session = uuid.uuid4().hex[:12]  # tells this backend's pushes apart from anyone else's on a server
        self._base_changed = False  # whether full weights were pushed (an adapter then needs the base pushed back)
        self.last_push: PushReport | None = None
        """What the latest weight push did (servers reached, bytes, seconds), or `None` before the first."""
        self.engine_memory: dict[str, Any] | None = None
        """The memory arguments the in-process engine started with (`None` before it starts, and with servers)."""
        self._asleep: set[str] = set()  # what the sleeping engine released ("weights", "kv_cache")
        self._weights_lost = False  # a level-2 sleep discarded the weights: a push must come before any request
        self._connection: EngineConnection | None = None
        self._engine_dtype: torch.dtype | None = None  # read once known (see `engine_dtype`)
        if options.server_mode:
            self._connection = _server_pool(model_name, options)
        else:
            require_vllm()
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_name, trust_remote_code=options.trust_remote_code)
        if not options.server_mode and not defers_start(options):
            self.start()

    @classmethod
    def from_options(cls, model_name: str, options: VLLMOptions) -> VLLMBackend:
        """The backend of `model_name` with `options`: the same as `VLLMBackend(model_name, **kwargs)`.

        Args:
            model_name (`str`): Model identifier or local folder (also the tokenizer's source).
            options (`VLLMOptions`): The options, engine arguments included (`options.engine_kwargs`).

        Returns:
            `VLLMBackend`: The backend, connected to its servers or with its engine started.
        """
        return cls(model_name, **options.backend_kwargs())

    # ------------------------------------------------------------------------------------ engine life cycle
    @property
    def connection(self) -> EngineConnection:
        """Where requests go: the in-process engine (started here if it has not started yet) or the servers."""
        if self._connection is None:
            self.start()
        assert self._connection is not None
        return self._connection

    @property
    def started(self) -> bool:
        """Whether the in-process engine has started (always `True` with servers)."""
        return self._connection is not None

    def start(self) -> None:
        """Starts the in-process engine now, if it has not started (it otherwise starts at its first use).

        Raises:
            VLLMEngineStartError: If the engine cannot start; the message names the memory setting to change.
        """
        if self._connection is not None:
            return
        memory = engine_memory_settings(self.options.gpu_memory_utilization, self.options.kv_cache_memory_bytes)
        self._connection = InProcessEngine(_start_engine(self.model_name, self.options, memory))
        self.engine_memory = memory

    def update_engine_options(self, **changes: Any) -> None:
        """Changes options of the in-process engine before it starts (a checked copy of `options`).

        Args:
            **changes: `VLLMOptions` fields, e.g. `gpu_memory_utilization=0.3`, `enable_sleep_mode=True`.

        Raises:
            OperationError: If the engine has already started (its memory cannot be given back).
            ValueError: If a value is not allowed (see `VLLMOptions`).
        """
        if self.started:
            raise OperationError(
                f"The vLLM engine has already started; {sorted(changes)} can only be changed before it starts."
            )
        self.options = dataclasses.replace(self.options, **changes)

    @property
    def sleeps(self) -> bool:
        """Whether the engine runs with sleep mode (`enable_sleep_mode=True`), so `sleep()` frees its memory."""
        return bool(self.options.enable_sleep_mode) and not self.server_mode

    @property
    def sleeping(self) -> bool:
        """Whether the engine is asleep, wholly or in part (weights or KV cache released)."""
        return bool(self._asleep)

    @property
    def weights_lost(self) -> bool:
        """Whether a level-2 sleep discarded the engine's weights, so a weight push must come before any request."""
        return self._weights_lost

    def sleep(self) -> None:
        """Frees the engine's GPU memory until the next `wake_up()` or request (`sleep_level` 1: weights to host
        memory; 2: weights discarded) and drops its KV and prefix caches. A no-op without sleep mode, before the engine
        started, or when already asleep."""
        if not self.sleeps or not self.started or self._asleep:
            return
        level = self.options.sleep_level
        cast(InProcessEngine, self.connection).sleep(level)
        self._asleep = set(ALL_SLEEP_TAGS)
        if level >= 2:
            self._weights_lost = True
            self._base_changed = True  # a pushed adapter needs its base weights pushed back first

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """Takes back what `sleep()` released: all of it, or the parts named (`"weights"`, `"kv_cache"`).

        Waking the weights first and the KV cache after the weight push keeps the peak low (vLLM's own order). A
        no-op when awake.

        Args:
            tags (`Sequence[str]`, *optional*): `"weights"` and/or `"kv_cache"`; all when not given.
        """
        wanted = set(ALL_SLEEP_TAGS if tags is None else tags) & self._asleep
        if not wanted:
            return
        cast(InProcessEngine, self.connection).wake_up(None if wanted == ALL_SLEEP_TAGS else sorted(wanted))
        self._asleep -= wanted

    def _awake_for_requests(self) -> None:
        """Wakes a sleeping engine before a request; refuses one that lost its weights in a level-2 sleep."""
        if self._weights_lost:
            raise OperationError(
                "The vLLM engine slept at level 2 and discarded its weights; push weights (`load_weights_from_model`) "
                "before generating or scoring, or use `sleep_level=1`."
            )
        self.wake_up()

    # ----------------------------------------------------------------------------------------------- state
    @property
    def servers(self) -> ServerPool | None:
        """The servers requests go to (spreading, failover, pushes), or `None` in-process."""
        return self.connection if isinstance(self.connection, ServerPool) else None

    @property
    def llm(self) -> Any:
        """The in-process `vllm.LLM`, or `None` in server mode or once closed."""
        return self.connection.llm if isinstance(self.connection, InProcessEngine) else None

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
        return self.connection.adapter

    @property
    def vocab_size(self) -> int:
        """The tokenizer's length (the served model's head size is not known from here)."""
        return len(self.tokenizer)

    @property
    def state_key(self) -> tuple[Any, ...]:
        """The weights version: pushed adapters bump it too."""
        return (self.weights_version,)

    @property
    def max_context_length(self) -> int | None:
        """The engine's `max_model_len` (in server mode, as reported by `/v1/models`)."""
        return self.connection.max_model_len()

    @property
    def engine_dtype(self) -> torch.dtype | None:
        """The dtype the engine holds the weights and computes in, or `None` when it cannot be known.

        vLLM resolves `dtype="auto"` itself: a float32 checkpoint is served in the platform's first supported dtype,
        bfloat16 on GPUs with bfloat16 and on the CPU build (`vllm/config/model.py`, `_resolve_auto_dtype`), so an
        `"auto"` engine can sample in another dtype than a float32 trainer. In-process, read from the engine's model
        config (`None` before the engine starts); with servers, as a server's worker extension reports it
        (`trl-inference serve`; `None` for a server without it or none reachable), read once.
        """
        if self._engine_dtype is None:
            self._engine_dtype = self._read_engine_dtype()
        return self._engine_dtype

    def _read_engine_dtype(self) -> torch.dtype | None:
        connection = self._connection
        if isinstance(connection, InProcessEngine):
            if connection.llm is None:
                return None
            dtype = connection.llm.llm_engine.model_config.dtype
            return dtype if isinstance(dtype, torch.dtype) else None
        if isinstance(connection, ServerPool):
            try:
                return connection.describe().dtype
            except (OperationError, ConnectionError, TimeoutError) as exc:  # no extension, no dev routes, no server
                logger.debug("The servers did not report their dtype: %s", exc)
        return None

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
        if isinstance(self._connection, InProcessEngine):
            self._connection.reset_prefix_cache()

    def close(self) -> None:
        """Shuts the in-process engine down (no-op in server mode, when already closed or never started)."""
        if self._connection is not None:
            self._connection.close()

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
        self._awake_for_requests()
        prompts, n, offsets = request_plan(prompt_ids, sampling)
        seeds = [request_seed(sampling, o) for o in offsets]
        per_prompt = sampling.num_return_sequences // n  # requests per original prompt
        groups = [r // per_prompt for r in range(len(prompts))]
        per_request = self.connection.generate(prompts, n, seeds, sampling, groups)
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
        repetition penalty / temperature / min-p / top-k / top-p, and `logprob_token_ids=[response[t]]`, so the value
        is exactly what sampling
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
            raise InvalidValueError(
                f"`prompt_ids` and `response_ids` must have the same length, got {len(prompt_ids)} and "
                f"{len(response_ids)}."
            )
        self._awake_for_requests()
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
        raise UnsupportedError(
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
        for i, values in zip(todo, self.connection.prompt_logprobs(full)):
            start = len(prompt_ids[i]) - 1  # values[j] predicts full[j + 1]
            rows[i] = torch.tensor(values[start:], dtype=torch.float32)
        return rows

    def _score_processed(
        self, prompt_ids: list[list[int]], response_ids: list[list[int]], scoring: ScoringConfig
    ) -> list[torch.Tensor]:
        """Response log-probs under the processed distribution: one single-token request per response token.

        The request's prompt is `prompt + response[:t]`, so vLLM's repetition penalty (which acts on the prompt's ids
        and the output's) covers exactly the ids before position `t`, as during sampling.
        """
        sampling = SamplingConfig(
            max_new_tokens=1,
            temperature=scoring.temperature,
            top_k=scoring.top_k,
            top_p=scoring.top_p,
            min_p=scoring.min_p,
            repetition_penalty=scoring.repetition_penalty,
        )
        jobs = [(i, t) for i, r in enumerate(response_ids) for t in range(len(r))]
        values: list[float] = []
        for start in range(0, len(jobs), self.score_budget):
            chunk = jobs[start : start + self.score_budget]
            prefixes = [list(prompt_ids[i]) + list(response_ids[i][:t]) for i, t in chunk]
            targets = [response_ids[i][t] for i, t in chunk]
            groups = [i for i, _ in chunk]  # the prefixes of one sequence share a server's prefix cache
            values.extend(self.connection.next_token_logprobs(prefixes, targets, sampling, groups))
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
        (requests in flight are kept), loads them, drops its prefix cache and resumes (see `weights.push`). A server
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
        target = self.connection.describe()
        weights = check_pushed_weights(
            items,
            engine_params=target.params,
            packed_modules=target.packed_modules,
            tied_embeddings=target.tied_embeddings,
        )
        if not weights:
            raise InvalidValueError("`named_tensors` is empty: there is nothing to load.")
        self._push(lambda version: self.connection.push_weights(weights, version, target))
        self._base_changed = True
        return self._version

    @torch.no_grad()
    def load_weights_from_model(self, model: torch.nn.Module) -> int:
        """Pushes the weights of a transformers model (the policy being trained) into the engine or servers.

        For a `peft` LoRA model whose adapter the engine can apply (it runs with LoRA, the rank fits, the adapter
        uses only what vLLM supports: see `weights.lora.adapter_unsupported_reason`), only the adapter is pushed and
        requests are served with it, loaded in place under `weights.lora.ADAPTER_NAME`. Otherwise the adapters are
        merged for the push (`merge_adapter()`) and unmerged afterwards (`unmerge_adapter()`), even on error, and the
        merged weights are sent under their checkpoint names. DDP/DeepSpeed wrappers are unwrapped. For parameters
        sharded by FSDP2 or ZeRO-3, use `trl.gather.push_model_weights`, which gathers them one at a time.

        The adapter path assumes the engine's base weights are the PEFT model's base (the server was started on the
        same checkpoint); after a full-weight push the base weights are pushed back once before the adapter.

        Args:
            model (`torch.nn.Module`): A causal LM with the same architecture as the engine's model.

        Returns:
            `int`: The new `weights_version`.

        Raises:
            ValueError: If the model has LoRA parameters it cannot merge, or see `load_weights`.
        """
        if self.sync_adapters and is_peft_model(unwrap_model(model)):
            reason = adapter_unsupported_reason(model, self.connection.describe().max_lora_rank)
            if reason is None:
                if self._base_changed:
                    self.load_weights(base_checkpoint_weights(model))
                adapter = export_adapter(model)
                self._push(lambda version: self.connection.push_adapter(adapter, version))
                self._base_changed = False
                return self._version
            _log_merged_fallback(reason)
        with merged_checkpoint_weights(model) as weights:
            return self.load_weights(weights)

    def load_weight_stream(self, names: Sequence[str], stream: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Loads weights that arrive one at a time (e.g. gathered from a sharded trainer), without holding them all.

        The names are checked first, as `load_weights` checks them, before any tensor is produced; then `stream` is
        consumed once, in the order of `names`. An in-process engine copies each tensor into its parameters as it
        arrives, so the caller can release it right after; servers are sent a host copy of each one (the push swaps
        all of them in at once, so the set is staged in host memory, never on the device).

        Args:
            names (`Sequence[str]`): The checkpoint names `stream` yields, in its order.
            stream (iterable of `(name, tensor)`): The weights, produced lazily.

        Returns:
            `int`: The new `weights_version`.

        Raises:
            ValueError: If a name is unknown to the engine, a fused module is incomplete, or `names` is empty.
        """
        target = self.connection.describe()
        placeholder = torch.empty(0)
        kept = check_pushed_weights(
            [(n, placeholder) for n in names],
            engine_params=target.params,
            packed_modules=target.packed_modules,
            tied_embeddings=target.tied_embeddings,
        )
        if not kept:
            raise InvalidValueError("`names` is empty: there is nothing to load.")
        wanted = {n for n, _ in kept}
        in_process = isinstance(self.connection, InProcessEngine) and self.connection.direct_rpc()

        def weights() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in stream:
                if name in wanted:
                    yield name, (tensor.detach() if in_process else tensor.detach().cpu())

        if in_process:
            engine = cast(InProcessEngine, self.connection)
            self._push(lambda version: engine.push_weights(weights(), version, target))
        else:
            pushed = list(weights())
            self._push(lambda version: self.connection.push_weights(pushed, version, target))
        self._base_changed = True
        return self._version

    def _push(self, push: Callable[[str], PushReport]) -> None:
        """Runs one push under the next version; the version is bumped even when it fails, as weights may have
        changed somewhere, so no cached generation from before can be served. A sleeping in-process engine gets its
        weights back first (only then can they be loaded), and after the push the weights are current again."""
        self.wake_up(["weights"])
        try:
            self.last_push = push(f"trl-{self._session}-{self._version + 1}")
            self._weights_lost = False
        finally:
            self._bump_version()

    def __repr__(self) -> str:
        where = f"base_url={self.base_url!r}" if self.server_mode else "in_process=True"
        return f"{type(self).__name__}(model={self.model_name!r}, {where}, weights_version={self._version})"


@functools.lru_cache(maxsize=8)
def _log_merged_fallback(reason: str) -> None:
    logger.info("Pushing merged full weights instead of the LoRA adapter: %s.", reason)
