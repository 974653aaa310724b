"""`rollout_func` for TRL's `GRPOTrainer`: generation (optionally multi-turn with tools) by `InferenceModule`."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, replace
from typing import Any

from ..backends.capabilities import RunsLocalModel, SupportsWeightPush
from ..backends.hf.lora_fold import check_fold_mode
from ..errors import InvalidTypeError, InvalidValueError
from ..module import InferenceModule
from ..tools.config import ToolLoopConfig, takes_tool_loop
from ..tools.execution import MAX_OUTPUT_CHARS, ToolExecutor
from ..tools.loop import ToolRollout, repeat_group_size, run_tool_loop
from .sampling import sampling_from_trl_args

logger = logging.getLogger(__name__)


class _ToolLoopSetting:
    """An attribute of `RolloutFunction` that reads one field of its `tool_loop`; setting it replaces the config with
    a checked copy (`dataclasses.replace`). Kept so that `rollout.max_tool_turns` & co. work as they did."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, rollout: RolloutFunction | None, owner: type | None = None) -> Any:
        return self if rollout is None else getattr(rollout.tool_loop, self.name)

    def __set__(self, rollout: RolloutFunction, value: Any) -> None:
        rollout.tool_loop = replace(rollout.tool_loop, **{self.name: value})


class RolloutFunction:
    """A callable with TRL's `rollout_func(prompts, trainer) -> dict` signature.

    Built by `rollout_func(...)`; see there for the arguments. `tool_executor` runs the calls of every step (built
    from `tool_loop` when there are tools, else `None`).
    """

    max_tool_turns = _ToolLoopSetting()
    stop_tools = _ToolLoopSetting()
    reuse_kv = _ToolLoopSetting()

    def __init__(
        self,
        inference: InferenceModule | None,
        *,
        tools: Sequence[Any] | None,
        tool_parser: str,
        tool_loop: ToolLoopConfig,
        tool_executor: ToolExecutor | None,
        sampling: dict[str, Any],
        fold_lora: bool | str = "auto",
    ) -> None:
        self.inference = inference
        self.tools = list(tools or [])
        self.tool_parser = tool_parser
        self.tool_loop = tool_loop
        self.tool_executor = tool_executor
        self.sampling = sampling
        self.fold_lora = fold_lora
        self._synced_step: int | None = None

    def close(self) -> None:
        """Stops the tool worker processes (they are also stopped at interpreter exit)."""
        if self.tool_executor is not None:
            self.tool_executor.close()

    @contextlib.contextmanager
    def _trainer_model(self, trainer: Any) -> Iterator[Any]:
        """The trainer's unwrapped model, with ZeRO-3 parameters gathered for the duration."""
        from trl.models import unwrap_model_for_generation

        gather = bool(getattr(trainer.args, "ds3_gather_for_generation", True))
        with unwrap_model_for_generation(
            trainer.model_wrapped, trainer.accelerator, gather_deepspeed3_params=gather
        ) as m:
            yield m

    def _sync_weights(self, trainer: Any) -> None:
        assert self.inference is not None
        step = int(trainer.state.global_step)
        if step == self._synced_step:
            return
        backend = self.inference.backend
        if isinstance(backend, SupportsWeightPush):
            accelerator = trainer.accelerator
            shared = backend.server_mode and accelerator.num_processes > 1
            with self._trainer_model(trainer) as model:  # every rank enters: a ZeRO-3 gather is collective
                if not shared or accelerator.is_main_process:  # servers shared by the ranks take one push
                    backend.load_weights_from_model(model)
            if shared:
                accelerator.wait_for_everyone()
                if not accelerator.is_main_process:
                    backend.mark_weights_updated()
        elif not (
            isinstance(backend, RunsLocalModel)
            and backend.model is trainer.accelerator.unwrap_model(trainer.model_wrapped)
        ):
            raise InvalidValueError(
                "The given `inference` runs a different model than the trainer and its backend cannot load weights; "
                "pass `inference=None` to generate with the trainer's model, or use the vLLM backend."
            )
        self.inference.clear_cache()
        self._synced_step = step

    def __call__(self, prompts: list[Any], trainer: Any) -> dict[str, Any]:
        """Generates one completion per entry of `prompts` (TRL passes each prompt `num_generations` times)."""
        sampling = sampling_from_trl_args(trainer.args, self.sampling)
        if self.inference is not None:
            self._sync_weights(trainer)
            use_trainer_chat_template(self.inference, trainer.processing_class)
            return self._rollouts(self.inference, prompts, sampling)
        with self._trainer_model(trainer) as model:
            inference = InferenceModule.from_model(
                model, trainer.processing_class, cache_size=0, tool_parser=self.tool_parser, fold_lora=self.fold_lora
            )
            return self._rollouts(inference, prompts, sampling)

    def _rollouts(self, inference: InferenceModule, prompts: list[Any], sampling: dict[str, Any]) -> dict[str, Any]:
        if self.tools:
            sampling = dict(sampling)
            rollouts = run_tool_loop(
                inference,
                prompts,
                self.tools,
                max_new_tokens=sampling.pop("max_new_tokens", 512),
                tool_executor=self.tool_executor,
                tool_loop=self.tool_loop,
                **sampling,
            )
            return _as_trl_output(rollouts)
        group = repeat_group_size(prompts)
        result = inference.generate(
            prompts[::group], use_cache=False, num_return_sequences=group, return_logprobs=True, **sampling
        )
        assert result.token_ids is not None and result.logprobs is not None and result.metadata is not None
        prompt_ids = [result.metadata["prompt_token_ids"][i // group] for i in range(len(prompts))]
        return {
            "prompt_ids": prompt_ids,
            "completion_ids": result.token_ids,
            "logprobs": [lp.tolist() for lp in result.logprobs],
            "env_mask": [[1] * len(ids) for ids in result.token_ids],
        }


def use_trainer_chat_template(inference: InferenceModule, processing_class: Any) -> None:
    """Makes `inference` render chat prompts (and tool turns) with the trainer's chat template.

    TRL renders prompts with `processing_class`; a module given as `rollout_func(inference=...)` loaded its own
    tokenizer, whose template may differ (e.g. one the user set on the trainer's tokenizer to render tools). The
    trainer's template is copied onto the module's tokenizer, so both render the same prompt tokens.
    """
    tokenizer = getattr(processing_class, "tokenizer", processing_class)  # a processor carries its tokenizer
    template = getattr(tokenizer, "chat_template", None)
    if not template or getattr(inference.tokenizer, "chat_template", None) == template:
        return
    logger.info("rollout_func: the inference module renders chat prompts with the trainer's chat template.")
    inference.tokenizer.chat_template = template


def _as_trl_output(rollouts: list[ToolRollout]) -> dict[str, Any]:
    return {
        "prompt_ids": [r.prompt_ids for r in rollouts],
        "completion_ids": [r.completion_ids for r in rollouts],
        "logprobs": [r.logprobs for r in rollouts],
        "env_mask": [r.env_mask for r in rollouts],
        "tool_calls": [[asdict(c) for c in r.tool_calls] for r in rollouts],
        "tool_results": [[asdict(t) for t in r.tool_results] for r in rollouts],
    }


@takes_tool_loop
def rollout_func(
    inference: InferenceModule | None = None,
    tools: Sequence[Any] | None = None,
    tool_parser: str = "auto",
    max_tool_turns: int = 3,
    stop_tools: Sequence[str] = (),
    tool_timeout: float = 10.0,
    tool_isolation: str = "process",
    tool_memory_limit: int | None = None,
    max_tool_output_chars: int = MAX_OUTPUT_CHARS,
    reuse_kv: bool = True,
    fold_lora: bool | str = "auto",
    *,
    tool_loop: ToolLoopConfig | None = None,
    **sampling: Any,
) -> Callable[[list[Any], Any], dict[str, Any]]:
    """Builds a `rollout_func` for `trl.GRPOTrainer`.

    The returned function receives this process's prompts (already repeated `num_generations` times, plain strings or
    chat message lists) and returns `prompt_ids`, `completion_ids`, `logprobs` (of the processed sampling
    distribution), `env_mask` (0 on tool-result tokens, so TRL drops them from the loss), and with tools also
    `tool_calls` and `tool_results`, which TRL forwards to reward functions as keyword arguments.

    The tool loop's settings come either from `tool_loop` or from the keyword arguments of the same names (see
    `ToolLoopConfig` for each): not both. They are checked here, before training starts.

    Args:
        inference (`InferenceModule`, *optional*): Generate with this module (e.g. the vLLM backend); its weights are
            synced from the trainer's model at each new global step, and chat prompts render with the trainer's
            chat template (copied onto the module's tokenizer, as TRL renders them). `None` generates with the
            trainer's own (unwrapped, possibly PEFT, ZeRO-3-gathered) model on the Hugging Face backend.
        tools (`Sequence`, *optional*): Tools for multi-turn rollouts (callables are executed).
        tool_parser (`str`, *optional*, defaults to `"auto"`): Tool-call format (used when `inference=None`).
            `"auto"` (also the default of `tool_call_reward` and the CLI) reads the format the trainer's chat
            template teaches; `InferenceModule` keeps the original documentation's `"json"`.
        max_tool_turns (`int`, *optional*, defaults to 3): Most rounds of tool execution per rollout.
        stop_tools (`Sequence[str]`, *optional*): Tools whose call ends a rollout.
        tool_timeout (`float`, *optional*, defaults to 10.0): Seconds allowed for all the tool calls of one turn.
        tool_isolation (`str`, *optional*, defaults to `"process"`): `"process"` runs tools in worker processes,
            killed at the deadline and replaced, so no tool call can hang, crash or exhaust the trainer (tools must be
            importable functions: checked here); `"thread"` runs them in the trainer's threads. The workers live as
            long as the returned function (see its `close()`). See `ToolExecutor`.
        tool_memory_limit (`int`, *optional*): Bytes of memory one tool call may add to its worker process.
        max_tool_output_chars (`int`, *optional*, defaults to `MAX_OUTPUT_CHARS`): Longest tool output shown to the
            model.
        reuse_kv (`bool`, *optional*, defaults to `True`): Keep each rollout's KV cache across tool turns (Hugging
            Face backend), so a turn prefills only the appended tool-result tokens; see `run_tool_loop`.
        fold_lora (`bool` or `str`, *optional*, defaults to `"auto"`): With `inference=None`, decode a LoRA policy
            from a folded copy of the adapted weights (`"auto"`: when it fits in memory; see
            `backends.hf.lora_fold`). The trainer's own weights are never modified.
        tool_loop (`ToolLoopConfig`, *optional*): All the tool-loop settings above at once (`max_tool_turns`,
            `stop_tools`, `tool_timeout`, `tool_isolation`, `tool_memory_limit`, `max_tool_output_chars`,
            `reuse_kv`); passing it together with any of those keyword arguments raises a `TypeError` naming them.
        **sampling: Overrides for the sampling settings read from `trainer.args` (`temperature`, `top_p`, `top_k`,
            `max_new_tokens`, `seed`, `stop`).

    Example:
        ```python
        trainer = GRPOTrainer(model=..., reward_funcs=[...], args=GRPOConfig(...), train_dataset=ds,
                              peft_config=LoraConfig(...), rollout_func=rollout_func(tools=[calculator]))
        ```
    """
    if inference is not None and not isinstance(inference, InferenceModule):
        raise InvalidTypeError(f"`inference` must be an InferenceModule or None, got {type(inference).__name__}.")
    assert tool_loop is not None  # built from the keyword arguments by `takes_tool_loop`
    from ..tools.parsers import PARSER_NAMES

    if tool_parser not in PARSER_NAMES:
        raise InvalidValueError(f"`tool_parser` must be one of {list(PARSER_NAMES)}, got {tool_parser!r}.")
    check_fold_mode(fold_lora)
    return RolloutFunction(
        inference,
        tools=tools,
        tool_parser=tool_parser,
        tool_loop=tool_loop,
        tool_executor=_tool_executor(tools, tool_loop),
        sampling=sampling,
        fold_lora=fold_lora,
    )


def _tool_executor(tools: Sequence[Any] | None, tool_loop: ToolLoopConfig) -> ToolExecutor | None:
    """The executor that serves every step, or `None` without tools.

    The tools are checked now, not mid-training; no worker process starts before the first call.
    """
    if not tools:
        return None
    from ..tools.schema import normalize_tools, tool_functions

    normalize_tools(tools)
    return tool_loop.build_executor(tool_functions(tools))
