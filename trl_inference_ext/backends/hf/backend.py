"""Hugging Face transformers backend: own sampling loop, chunked exact scoring, PEFT reference toggling."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch

from ...errors import InvalidValueError, UnsupportedError
from ...scoring import DEFAULT_CHUNK_BYTES, TokenHistory, logprobs_from_hidden, process_with, selective_logprobs
from ...types import SamplingConfig
from .. import adapters
from ..base import ScoringConfig, SequenceOutput
from ..options import check_options
from .decoding import DecodeSpec, sample
from .lora_fold import FOLD_MEMORY_FRACTION, LoraFold, check_fold_mode, free_memory
from .turn_cache import TURN_CACHE_MEMORY_FRACTION, TurnCache

logger = logging.getLogger(__name__)

DTYPES: dict[str, Any] = {
    "auto": "auto",
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}
DEVICES = ("auto", "cuda", "cpu")
# Config attributes that make logits differ from `lm_head(hidden)`; such models are scored from full logits.
_LOGIT_TRANSFORM_ATTRS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def resolve_device(device: str | torch.device) -> torch.device:
    """Maps `"auto"`, `"cuda"`, `"cpu"` (or a `torch.device`) to this process's device.

    `"auto"` asks Accelerate, so under `accelerate launch` each process gets its own accelerator.
    """
    if isinstance(device, torch.device):
        return device
    if not isinstance(device, str) or device.split(":")[0] not in DEVICES:
        raise InvalidValueError(f"`device` must be one of {list(DEVICES)} (or 'cuda:N'), got {device!r}.")
    if device == "auto":
        from accelerate import PartialState

        return PartialState().device
    if device == "cuda":
        if not torch.cuda.is_available():
            raise InvalidValueError("`device='cuda'` was requested but CUDA is not available; use 'auto' or 'cpu'.")
        from accelerate import PartialState

        return torch.device("cuda", PartialState().local_process_index % torch.cuda.device_count())
    return torch.device(device)


def parameter_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """The dtype that holds most of a model's floating-point parameters, or `None` when it has none.

    Counted by elements, so a PEFT model's adapters in float32 on a bfloat16 base count as bfloat16. Parameters that
    ZeRO-3 partitioned away (no elements here) leave the first floating-point parameter's dtype.

    Args:
        model (`torch.nn.Module`): Any module, possibly wrapped by PEFT, DDP or DeepSpeed.
    """
    counts: dict[torch.dtype, int] = {}
    for parameter in adapters.unwrap_model(model).parameters():
        if parameter.is_floating_point():
            counts[parameter.dtype] = counts.get(parameter.dtype, 0) + parameter.numel()
    return max(counts, key=counts.__getitem__) if counts else None  # ties: the first seen


def hidden_path(model: Any) -> tuple[Any, Any] | None:
    """`(decoder, lm_head)` of a causal LM whose logits are exactly `lm_head(decoder(...))`, else `None`.

    Callers that need only some positions' logits (scoring, sampling) run the decoder and apply the head themselves;
    models that soft-cap or scale their logits (see `_LOGIT_TRANSFORM_ATTRS`) must go through their own forward.

    Args:
        model (`torch.nn.Module`): A transformers causal LM, possibly PEFT-wrapped.
    """
    causal_lm = adapters.base_model(model)
    config = getattr(causal_lm, "config", None)
    if any(getattr(config, attr, None) not in (None, 1, 1.0) for attr in _LOGIT_TRANSFORM_ATTRS):
        return None
    decoder = causal_lm.get_decoder() if hasattr(causal_lm, "get_decoder") else None
    head = causal_lm.get_output_embeddings()
    if decoder is None or head is None or decoder is causal_lm:
        return None
    return decoder, head


class HuggingFaceBackend:
    """Runs a transformers causal LM (optionally PEFT-wrapped) for generation and scoring.

    Args:
        model (`torch.nn.Module`): A causal LM, possibly a `peft.PeftModel`. It is not moved or copied.
        tokenizer: Its tokenizer.
        model_name (`str`, *optional*): Name reported in result metadata.
        chunk_bytes (`int`, *optional*): Memory budget for one chunk of float32 logits during scoring.
        fold_lora (`bool` or `"auto"`, *optional*, defaults to `"auto"`): For a PEFT LoRA model, generate from a
            decode-time copy of each LoRA linear layer with its active adapters folded in (`W + scale * B @ A`, see
            `hf.lora_fold`) instead of PEFT's unmerged layers: one product per layer, the PEFT parameters
            untouched, re-folded only when the weights change. The copy costs the bytes of the folded weights (e.g.
            106 MB in float32 for SmolLM2-135M with LoRA on q/k/v/o). `"auto"` folds when the copy fits in
            `FOLD_MEMORY_FRACTION` (20%) of the device's free memory; `True` always, `False` never. Scoring always
            runs through PEFT's layers (gradients reach the adapters).
    """

    name = "huggingface"

    LOADER_OPTIONS: ClassVar[tuple[str, ...]] = (
        "cache_dir",
        "gguf_file",
        "local_files_only",
        "low_cpu_mem_usage",
        "quantization_config",
        "revision",
        "subfolder",
        "token",
        "use_safetensors",
        "variant",
    )
    """Arguments of transformers' `from_pretrained` that `from_pretrained` passes through."""

    @classmethod
    def option_names(cls) -> frozenset[str]:
        """Every keyword `from_pretrained` accepts: its own options and `LOADER_OPTIONS`."""
        own = inspect.signature(cls.from_pretrained).parameters
        return frozenset(n for n, p in own.items() if p.kind is p.KEYWORD_ONLY) | frozenset(cls.LOADER_OPTIONS)

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        model_name: str | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        fold_lora: bool | str = "auto",
    ) -> None:
        check_fold_mode(fold_lora)
        self.model: Any = adapters.unwrap_model(model)
        self.tokenizer = tokenizer
        self.model_name: str = model_name or str(getattr(getattr(self.model, "config", None), "_name_or_path", "model"))
        self.chunk_bytes = chunk_bytes
        self._version = 0
        self._fingerprint = self._weights_fingerprint()
        self.lora_fold = LoraFold(self.model, fold_lora, memory_fraction=FOLD_MEMORY_FRACTION)
        self.turn_cache: TurnCache | None = None

    @property
    def fold_lora(self) -> bool | str:
        """Whether generation folds LoRA adapters into a decode-time weight copy (`True`, `False` or `"auto"`)."""
        return self.lora_fold.enabled

    @fold_lora.setter
    def fold_lora(self, value: bool | str) -> None:
        check_fold_mode(value)
        self.lora_fold.enabled = value
        if value is False:
            self.lora_fold.clear()

    @classmethod
    def from_pretrained(
        cls,
        model_name: str,
        *,
        device: str | torch.device = "auto",
        dtype: str = "auto",
        trust_remote_code: bool = False,
        gradient_checkpointing: bool = False,
        attn_implementation: str | None = None,
        fold_lora: bool | str = "auto",
        **model_kwargs: Any,
    ) -> HuggingFaceBackend:
        """Loads a model and tokenizer from a local folder or hub name.

        Args:
            model_name (`str`): Model identifier or path.
            device (`str`, *optional*, defaults to `"auto"`): `"auto"` (Accelerate's device for this process),
                `"cuda"` or `"cpu"`.
            dtype (`str`, *optional*, defaults to `"auto"`): `"auto"`, `"float16"`, `"bfloat16"` or `"float32"`.
            trust_remote_code (`bool`, *optional*, defaults to `False`): Passed to transformers.
            gradient_checkpointing (`bool`, *optional*, defaults to `False`): Enables gradient checkpointing.
            attn_implementation (`str`, *optional*): e.g. `"sdpa"`, `"eager"`, `"flash_attention_2"`.
            fold_lora (`bool` or `"auto"`, *optional*, defaults to `"auto"`): See the class docstring (applies when
                the folder holds a PEFT adapter).
            **model_kwargs: Further arguments for `AutoModelForCausalLM.from_pretrained`, among `LOADER_OPTIONS`
                (`revision`, `cache_dir`, `local_files_only`, `quantization_config`, ...).

        Raises:
            ValueError: If an option is unknown (the message lists the valid ones) or `dtype` is not supported.
        """
        check_options(cls.name, model_kwargs, cls.option_names())
        check_fold_mode(fold_lora)
        if dtype not in DTYPES:
            raise InvalidValueError(f"`dtype` must be one of {list(DTYPES)}, got {dtype!r}.")
        target = resolve_device(device)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_name, trust_remote_code=trust_remote_code)
        if attn_implementation is not None:
            model_kwargs["attn_implementation"] = attn_implementation
        model: Any = AutoModelForCausalLM.from_pretrained(
            model_name, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, **model_kwargs
        )
        model.to(target)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable()
        return cls(model, tokenizer, model_name=model_name, fold_lora=fold_lora)

    # ----------------------------------------------------------------------------------------------- state
    def _weights_fingerprint(self) -> tuple[int, int]:
        # Every in-place update (optimizer steps, `load_state_dict`, `copy_`) bumps a tensor's version counter.
        params = list(self.model.parameters())
        return len(params), sum(p._version for p in params)

    @property
    def weights_version(self) -> int:
        """Bumped whenever the model's parameters change, detected from tensor version counters."""
        fingerprint = self._weights_fingerprint()
        if fingerprint != self._fingerprint:
            self._fingerprint = fingerprint
            self._version += 1
        return self._version

    def mark_weights_updated(self) -> None:
        """Bumps the weights version explicitly (e.g. after an out-of-place weight swap)."""
        self._version += 1

    @property
    def state_key(self) -> tuple[Any, ...]:
        """Weights version plus which adapters are active: what a cached generation depends on."""
        return (self.weights_version, adapters.adapter_state(self.model))

    @property
    def device(self) -> torch.device:
        """Device of the input embeddings, where inputs are placed."""
        return self.model.get_input_embeddings().weight.device

    @property
    def engine_dtype(self) -> torch.dtype | None:
        """The dtype of the model's weights (most of its floating-point parameters), which generation runs in."""
        return parameter_dtype(self.model)

    @property
    def vocab_size(self) -> int:
        """Rows of the output embedding (may exceed the tokenizer's length when padded)."""
        head = self.model.get_output_embeddings()
        if head is not None and hasattr(head, "weight"):
            return int(head.weight.shape[0])
        return int(getattr(self.model.config, "vocab_size", 0) or len(self.tokenizer))

    @property
    def max_context_length(self) -> int | None:
        """The model's `max_position_embeddings`, when it declares one."""
        config = getattr(self.model, "config", None)
        value = getattr(config, "max_position_embeddings", None)
        return int(value) if isinstance(value, int) else None

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """EOS ids from the tokenizer and the generation config."""
        ids: set[int] = set()
        for source in (self.tokenizer.eos_token_id, getattr(self.model.generation_config, "eos_token_id", None)):
            if isinstance(source, int):
                ids.add(source)
            elif isinstance(source, (list, tuple)):
                ids.update(int(i) for i in source)
        return frozenset(ids)

    def check_reference(self, adapter_name: str | None = None) -> None:
        """Raises `InvalidValueError` unless the model has adapters to turn off (and `adapter_name`, if given)."""
        adapters.check_reference(self.model, adapter_name)

    @contextmanager
    def reference_context(self, adapter_name: str | None = None) -> Iterator[None]:
        """Runs the block with adapters disabled (or `adapter_name` active), without a second model copy."""
        with adapters.reference_adapters(self.model, adapter_name):
            yield

    # ------------------------------------------------------------------------------------------ generation
    def generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig) -> list[SequenceOutput]:
        """Samples completions with the KV-cache-sharing loop in `hf.decoding`.

        Raises:
            NotImplementedError: If `sampling.engine_options` is not empty (they are settings of vLLM's sampler).
        """
        if sampling.engine_options:
            names = ", ".join(f"`{name}`" for name in sorted(sampling.engine_options))
            raise UnsupportedError(
                f"The huggingface backend does not implement the vLLM sampling option(s) {names}: they need the vLLM "
                'backend (`InferenceModule(..., backend="vllm")`). Remove them to generate here.'
            )
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = next(iter(self.eos_token_ids), 0)
        spec = DecodeSpec(
            eos_token_ids=self.eos_token_ids,
            pad_token_id=pad,
            device=self.device,
            max_context_length=self.max_context_length,
            stop_checker=self._stop_checker(sampling.stop),
            hidden_path=hidden_path(self.model),
        )
        # Gradient checkpointing turns the KV cache off in training mode; rollouts run in eval mode, then restore.
        was_training = self.model.training
        self.model.eval()
        try:
            with self.lora_fold.applied(self.weights_version):
                turns = self.turn_cache
                return sample(
                    self.model, prompt_ids, sampling, spec, turns, self.state_key if turns is not None else None
                )
        finally:
            self.model.train(was_training)

    @contextmanager
    def keep_turn_caches(self, max_bytes: int | None = None) -> Iterator[TurnCache]:
        """Keeps each stopped row's KV cache from one `generate` call to the next, for multi-turn rollouts.

        Inside the block, a prompt that extends a row of the previous call (its prompt and sampled tokens) runs only
        the tokens after them: a tool turn prefills its end-of-turn token and tool message, not the whole context.
        Results are those of a prefill from the start up to float error. Entries live for one call, are dropped when
        the weights or active adapters change, and all are freed when the block exits. Nested blocks share the outer
        store.

        Args:
            max_bytes (`int`, *optional*): Most bytes of keys and values kept (per kept token: `2 x layers x
                kv_heads x head_dim x dtype bytes`). Defaults to `TURN_CACHE_MEMORY_FRACTION` of the device's free
                memory now (none kept where that is unknown). Rows that do not fit are re-prefilled.

        Yields:
            `TurnCache`: The store, for inspection.
        """
        if self.turn_cache is not None:
            yield self.turn_cache
            return
        if max_bytes is None:
            free = free_memory(self.device)
            max_bytes = int(free * TURN_CACHE_MEMORY_FRACTION) if free is not None else 0
        self.turn_cache = TurnCache(max_bytes)
        try:
            yield self.turn_cache
        finally:
            self.turn_cache.clear()
            self.turn_cache = None

    def _stop_checker(self, stops: tuple[str, ...]) -> Any:
        if not stops:
            return None
        window = max(len(s) for s in stops) + 2  # every token decodes to at least one character

        def hit(ids: list[int]) -> bool:
            tail = self.tokenizer.decode(ids[-window:], skip_special_tokens=False)
            return any(s in tail for s in stops)

        return hit

    # ---------------------------------------------------------------------------------------------- scoring
    def _pack(
        self, prompt_ids: list[list[int]], response_ids: list[list[int]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-pads prompt + response; returns ids, attention mask, predicting positions, targets, target mask."""
        lengths = [len(p) + len(r) for p, r in zip(prompt_ids, response_ids)]
        width, resp_width = max(lengths), max(len(r) for r in response_ids)
        pad = self.tokenizer.pad_token_id or 0
        input_ids = torch.full((len(lengths), width), pad, dtype=torch.long)
        attention = torch.zeros((len(lengths), width), dtype=torch.long)
        targets = torch.zeros((len(lengths), resp_width), dtype=torch.long)
        target_mask = torch.zeros((len(lengths), resp_width), dtype=torch.bool)
        positions = torch.zeros((len(lengths), resp_width), dtype=torch.long)
        for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
            input_ids[i, : lengths[i]] = torch.tensor(p + r, dtype=torch.long)
            attention[i, : lengths[i]] = 1
            targets[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            target_mask[i, : len(r)] = True
            positions[i] = torch.arange(resp_width) + len(p) - 1
            positions[i, len(r) :] = 0
        device = self.device
        return (
            input_ids.to(device),
            attention.to(device),
            positions.to(device),
            targets.to(device),
            target_mask.to(device),
        )

    def _history(
        self,
        prompt_ids: list[list[int]],
        response_ids: list[list[int]],
        scoring: ScoringConfig,
        shape: torch.Size,
        vocab_size: int,
    ) -> TokenHistory | None:
        """The ids before each scored position (`[B, T]`), when the repetition penalty needs them."""
        if scoring.repetition_penalty == 1.0:
            return None
        sequence = torch.arange(shape[0])[:, None].expand(shape[0], shape[1])
        length = torch.tensor([len(p) for p in prompt_ids])[:, None] + torch.arange(shape[1])[None, :]
        return TokenHistory.from_sequences(
            [list(p) + list(r) for p, r in zip(prompt_ids, response_ids)],
            vocab_size,
            sequence.to(self.device),
            length.to(self.device),
        )

    def score_logprobs(
        self, prompt_ids: list[list[int]], response_ids: list[list[int]], scoring: ScoringConfig
    ) -> torch.Tensor:
        """`[B, T]` log-probs of response tokens; gradients flow when called with grad enabled."""
        input_ids, attention, positions, targets, target_mask = self._pack(prompt_ids, response_ids)
        path = hidden_path(self.model)
        processing: dict[str, Any] = {"min_p": scoring.min_p, "repetition_penalty": scoring.repetition_penalty}
        if path is not None:
            decoder, head = path
            hidden = decoder(input_ids=input_ids, attention_mask=attention).last_hidden_state
            picked = hidden.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
            vocab_size = head.weight.shape[0] if hasattr(head, "weight") else None
            if vocab_size is None and scoring.repetition_penalty != 1.0:
                with torch.no_grad():
                    vocab_size = head(picked[:1, :1]).shape[-1]
            out = logprobs_from_hidden(
                picked,
                head,
                targets,
                scoring.temperature,
                scoring.top_k,
                scoring.top_p,
                chunk_bytes=self.chunk_bytes,
                vocab_size=vocab_size,
                history=self._history(prompt_ids, response_ids, scoring, targets.shape, vocab_size or 0),
                **processing,
            )
        else:
            logits = self.model(input_ids=input_ids, attention_mask=attention).logits
            picked = logits.gather(1, positions.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
            out = selective_logprobs(
                picked,
                targets,
                scoring.temperature,
                scoring.top_k,
                scoring.top_p,
                chunk_bytes=self.chunk_bytes,
                history=self._history(prompt_ids, response_ids, scoring, targets.shape, picked.shape[-1]),
                **processing,
            )
        return out.masked_fill(~target_mask, 0.0)

    def score_logits(
        self, prompt_ids: list[list[int]], response_ids: list[list[int]], scoring: ScoringConfig
    ) -> torch.Tensor:
        """`[B, T, V]` float32 processed logits predicting each response token (zeros at padding)."""
        input_ids, attention, positions, targets, target_mask = self._pack(prompt_ids, response_ids)
        logits = self.model(input_ids=input_ids, attention_mask=attention).logits
        picked = logits.gather(1, positions.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
        history = self._history(prompt_ids, response_ids, scoring, targets.shape, picked.shape[-1])
        processed = process_with(picked, scoring, None if history is None else history.seen_all())
        return processed.masked_fill(~target_mask.unsqueeze(-1), 0.0)
