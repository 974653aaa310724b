"""The in-process vLLM engine as an `EngineConnection`: a `vllm.LLM` in this process (colocated with training).

Requests become `vllm.SamplingParams`; weight pushes hand tensors to the model without serialising them when the
worker shares this process, and through a safetensors file otherwise. A pushed LoRA adapter is written to a private
temporary folder and loaded under a fresh id, so nothing computed with the previous adapter can be reused.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

from ...errors import OperationError
from ...types import SamplingConfig
from .sampling import Completion, finish_reason, merged_engine_options, sampler_settings
from .weights.checks import DEFAULT_PACKED_MODULES, NamedTensors
from .weights.lora import ADAPTER_NAME, AdapterExport
from .weights.transfer import PushReport, WeightTarget


def _structured(settings: dict[str, Any]) -> dict[str, Any]:
    """`settings` with the nested options given as dicts (as JSON requests give them) built into vLLM's classes."""
    from vllm.sampling_params import RepetitionDetectionParams, StructuredOutputsParams

    classes = {"structured_outputs": StructuredOutputsParams, "repetition_detection": RepetitionDetectionParams}
    return {k: classes[k](**v) if k in classes and isinstance(v, dict) else v for k, v in settings.items()}


def _entries(logprobs: Any, position: int) -> list[tuple[int, float]]:
    """(token id, log-prob) pairs at `position` of a vLLM logprobs container (list of dicts or `FlatLogprobs`)."""
    if hasattr(logprobs, "start_indices"):  # FlatLogprobs
        start, end = logprobs.start_indices[position], logprobs.end_indices[position]
        return list(zip(logprobs.token_ids[start:end], logprobs.logprobs[start:end]))
    entry = logprobs[position]
    return [] if entry is None else [(int(t), float(lp.logprob)) for t, lp in entry.items()]


def logprob_of(logprobs: Any, position: int, token: int) -> float:
    """Log-prob of `token` at `position` of a vLLM logprobs container.

    Raises:
        RuntimeError: If vLLM reported no log-prob for that token there.
    """
    for t, lp in _entries(logprobs, position):
        if t == token:
            return float(lp)
    raise OperationError(f"vLLM returned no log-prob for token {token} at position {position}.")


class InProcessEngine:
    """Generation, scoring and weight pushes for a `vllm.LLM` running in this process.

    Args:
        llm (`vllm.LLM`): The engine (started with `logprobs_mode="processed_logprobs"`).
    """

    def __init__(self, llm: Any) -> None:
        self.llm: Any = llm
        self._target: WeightTarget | None = None
        self._lora: Any = None  # the LoRARequest requests are sent with, once an adapter was pushed
        self._lora_folder: str | None = None
        self._lora_ids = 0

    def _engine(self) -> Any:
        if self.llm is None:
            raise OperationError("This VLLMBackend was closed; create a new one.")
        return self.llm

    # ------------------------------------------------------------------------------------------- requests
    def max_model_len(self) -> int:
        """The engine's `max_model_len`."""
        return int(self._engine().llm_engine.model_config.max_model_len)

    def sampling_params(
        self, sampling: SamplingConfig, n: int, seed: int | None, *, logprob_token: int | None = None
    ) -> Any:
        """`vllm.SamplingParams` for `sampling`, with its `engine_options` merged in; with `logprob_token`, reports
        that token's log-prob instead."""
        from vllm import SamplingParams

        settings = {
            "n": n,
            **sampler_settings(sampling),
            "seed": seed,
            "max_tokens": sampling.max_new_tokens,
            "stop": list(sampling.stop) or None,
            "logprobs": 0 if sampling.return_logprobs and logprob_token is None else None,
            "logprob_token_ids": None if logprob_token is None else [logprob_token],
            "flat_logprobs": True,
            "detokenize": bool(sampling.stop),  # stop strings need text; otherwise ids are all we use
        }
        return SamplingParams(**_structured(merged_engine_options(settings, sampling)))

    def _run(self, prompts: list[list[int]], params: list[Any]) -> list[Any]:
        inputs = [{"prompt_token_ids": list(p)} for p in prompts]
        return self._engine().generate(inputs, params, use_tqdm=False, lora_request=self._lora)

    def generate(
        self,
        prompts: list[list[int]],
        n: int,
        seeds: list[int | None],
        sampling: SamplingConfig,
        groups: list[int] | None = None,
    ) -> list[list[Completion]]:
        """Samples `n` completions per prompt; per request, its completions (`groups` is not needed here)."""
        results = self._run(prompts, [self.sampling_params(sampling, n, seed) for seed in seeds])
        per_request = []
        for request in results:
            completions: list[Completion] = []
            for c in sorted(request.outputs, key=lambda c: c.index):
                ids = [int(t) for t in c.token_ids]
                logprobs = None
                if sampling.return_logprobs:
                    values = [logprob_of(c.logprobs, j, t) for j, t in enumerate(ids)]
                    logprobs = torch.tensor(values, dtype=torch.float32)
                completions.append((ids, finish_reason(c.finish_reason), logprobs))
            per_request.append(completions)
        return per_request

    def prompt_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
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
        results = self._run([ids[:-1] for ids in sequences], params)
        per_seq = []
        for res, ids in zip(results, sequences):
            last = logprob_of(res.outputs[0].logprobs, 0, ids[-1])
            per_seq.append([*(logprob_of(res.prompt_logprobs, j, ids[j]) for j in range(1, len(ids) - 1)), last])
        return per_seq

    def next_token_logprobs(
        self, prefixes: list[list[int]], targets: list[int], sampling: SamplingConfig, groups: list[int] | None = None
    ) -> list[float]:
        """Log-prob of each target token right after its prefix, as the sampler reports it."""
        results = self._run(prefixes, [self.sampling_params(sampling, 1, None, logprob_token=t) for t in targets])
        return [logprob_of(res.outputs[0].logprobs, 0, t) for res, t in zip(results, targets)]

    # -------------------------------------------------------------------------------------------- weights
    def direct_rpc(self) -> bool:
        """Whether the worker shares this process, so tensors can be passed by reference."""
        engine = self._engine().llm_engine
        inproc = type(getattr(engine, "engine_core", None)).__name__ == "InprocClient"
        return inproc and int(engine.vllm_config.parallel_config.world_size) == 1

    def describe(self) -> WeightTarget:
        """The engine's parameter names (read once from the in-process model), fused modules, dtype and LoRA limit."""
        if self._target is None:
            engine = self._engine().llm_engine
            config = engine.model_config
            lora = getattr(engine.vllm_config, "lora_config", None)
            params: set[str] | None = None
            packed = dict(DEFAULT_PACKED_MODULES)
            if self.direct_rpc():

                def read(model: torch.nn.Module) -> tuple[list[str], dict[str, list[str]]]:
                    names = [n.replace(".base_layer.", ".") for n, _ in model.named_parameters()]
                    return names, dict(getattr(model, "packed_modules_mapping", {}))

                names, mapping = self._engine().apply_model(read)[0]
                params = set(names)
                packed.update({k: list(v) for k, v in mapping.items()})
            self._target = WeightTarget(
                params=params,
                packed_modules=packed,
                tied_embeddings=bool(getattr(config.hf_text_config, "tie_word_embeddings", False)),
                dtype=config.dtype if isinstance(config.dtype, torch.dtype) else None,
                max_lora_rank=None if lora is None else int(lora.max_lora_rank),
            )
        return self._target

    def push_weights(
        self, weights: NamedTensors | Iterable[tuple[str, torch.Tensor]], version: str, target: WeightTarget
    ) -> PushReport:
        """Loads checked weights into the model and drops the prefix cache; full weights end any pushed adapter.

        When the worker shares this process, `weights` may be a lazy iterable: it is consumed once, each tensor copied
        into the model as it arrives (so a sharded trainer can gather one at a time).
        """
        started = time.perf_counter()
        nbytes = 0

        def counted() -> Iterator[tuple[str, torch.Tensor]]:
            nonlocal nbytes
            for name, tensor in weights:
                nbytes += tensor.numel() * tensor.element_size()
                yield name, tensor

        if self.direct_rpc():
            self._engine().collective_rpc("reload_weights", kwargs={"weights_iterator": counted()})
        else:  # workers live in other processes: hand the tensors over through a safetensors file
            from safetensors.torch import save_file

            with tempfile.TemporaryDirectory(prefix="trl_inference_ext_weights_") as folder:
                save_file(
                    {n: t.detach().cpu().contiguous() for n, t in counted()}, os.path.join(folder, "model.safetensors")
                )
                self._engine().collective_rpc("reload_weights", kwargs={"weights_path": folder})
        self._set_adapter(None, None)
        self.reset_prefix_cache()
        return PushReport(servers=["in-process"], bytes_sent=nbytes, seconds=time.perf_counter() - started)

    def push_adapter(self, adapter: AdapterExport, version: str) -> PushReport:
        """Loads a LoRA adapter under a fresh id; later requests use it (the engine needs `enable_lora=True`)."""
        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest

        started = time.perf_counter()
        folder = tempfile.mkdtemp(prefix="trl_inference_ext_adapter_")
        try:
            tensors = {n: t.detach().cpu().contiguous() for n, t in adapter.tensors.items()}
            save_file(tensors, os.path.join(folder, "adapter_model.safetensors"))
            with open(os.path.join(folder, "adapter_config.json"), "w") as f:
                f.write(adapter.config)
            self._lora_ids += 1
            request = LoRARequest(lora_name=ADAPTER_NAME, lora_int_id=self._lora_ids, lora_path=folder)
            self._engine().llm_engine.add_lora(request)  # loads now: a bad adapter fails here, not mid-batch
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        self._set_adapter(request, folder)
        self.reset_prefix_cache()
        return PushReport(servers=["in-process"], bytes_sent=adapter.nbytes, seconds=time.perf_counter() - started)

    def _set_adapter(self, request: Any, folder: str | None) -> None:
        """Switches requests to `request` (or the base model), unloading and deleting the previous adapter."""
        previous, old_folder = self._lora, self._lora_folder
        self._lora, self._lora_folder = request, folder
        if previous is not None:
            self._engine().llm_engine.remove_lora(previous.lora_int_id)
        if old_folder is not None:
            shutil.rmtree(old_folder, ignore_errors=True)

    def sleep(self, level: int) -> None:
        """Releases the engine's GPU memory (`vllm.LLM.sleep(level)`: 1 moves the weights to host memory, 2 discards
        them; both drop the KV and prefix caches). Needs an engine started with `enable_sleep_mode=True`."""
        self._engine().sleep(level=level)

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """Takes back the memory `sleep` released: all of it, or the parts named (`"weights"`, `"kv_cache"`)."""
        self._engine().wake_up(None if tags is None else list(tags))

    def reset_prefix_cache(self) -> None:
        """Drops the prefix cache, whose KV entries were computed with the old weights."""
        if self.llm is not None:
            self.llm.reset_prefix_cache()

    @property
    def adapter(self) -> str | None:
        """The name of the pushed LoRA adapter requests use, or `None` for the base model."""
        return None if self._lora is None else ADAPTER_NAME

    def close(self) -> None:
        """Shuts the engine down and deletes a pushed adapter's folder (no-op when already closed)."""
        if self.llm is not None:
            engine_core = getattr(self.llm.llm_engine, "engine_core", None)
            if engine_core is not None and hasattr(engine_core, "shutdown"):
                engine_core.shutdown()
            self.llm = None
        if self._lora_folder is not None:
            shutil.rmtree(self._lora_folder, ignore_errors=True)
            self._lora, self._lora_folder = None, None
