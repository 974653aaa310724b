"""`rollout_func` for TRL's `GRPOTrainer`: generation (optionally multi-turn with tools) by `InferenceModule`."""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, replace
from typing import Any

import torch

from ..backends.capabilities import RunsLocalModel, SupportsWeightPush
from ..backends.hf.lora_fold import check_fold_mode
from ..config_checks import POSITIVE_INT, int_at_least
from ..errors import (
    InvalidTypeError,
    InvalidValueError,
    NoServerLeftError,
    ServerConnectionError,
    WeightPushError,
)
from ..module import InferenceModule
from ..tools.config import ToolLoopConfig, takes_tool_loop
from ..tools.environment_loop import EnvironmentRollouts
from ..tools.execution import MAX_OUTPUT_CHARS, ToolExecutor
from ..tools.loop import ToolRollout, repeat_group_size, run_tool_loop
from .colocate import awake_for_rollout, follow_trainer_memory, needs_weight_reload
from .correction import MismatchCorrection, SamplingMetrics, combine_metrics, correct, padded, scoring_settings
from .engine_dtype import engine_dtype_note
from .gather import push_model_weights
from .rows import RowFinder
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
    from `tool_loop` when there are tools, else `None`). `reward_funcs` holds the reward functions to pass on to the
    trainer (`GRPOTrainer(reward_funcs=[*rf.reward_funcs, ...])`): today the one that logs the mismatch correction's
    metrics.
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
        weight_sync_interval: int = 1,
        max_policy_lag: int | None = None,
        environments: EnvironmentRollouts | None = None,
    ) -> None:
        self.inference = inference
        self.environments = environments
        self.rows = RowFinder()
        self.tools = list(tools or [])
        self.tool_parser = tool_parser
        self.tool_loop = tool_loop
        self.tool_executor = tool_executor
        self.sampling = sampling
        self.fold_lora = fold_lora
        self.weight_sync_interval = weight_sync_interval
        self.max_policy_lag = max_policy_lag
        self.sampling_metrics = SamplingMetrics()
        self._synced_step: int | None = None
        self._weights_step: int | None = None
        """The trainer step whose weights the engine holds (`None` before the first push)."""
        self._warned: set[str] = set()

    @property
    def reward_funcs(self) -> list[Callable[..., list[float | None]]]:
        """Reward functions to add to the trainer's: `GRPOTrainer(reward_funcs=[*rf.reward_funcs, my_reward])`.

        With `inference` set, `SamplingMetrics`, which reports the mismatch correction's metrics through TRL's
        `log_metric` (it scores nothing: it returns `None`, which TRL skips); with environments, one
        `EnvironmentReward` per environment class that defines `get_reward` (named after the class, as TRL names
        it).
        """
        funcs: list[Callable[..., list[float | None]]] = [] if self.inference is None else [self.sampling_metrics]
        if self.environments is not None:
            funcs += self.environments.reward_funcs
        return funcs

    def close(self) -> None:
        """Closes every environment instance and stops the tool worker processes (both also happen at interpreter
        exit)."""
        try:
            if self.environments is not None:
                self.environments.pool.close()
        finally:
            if self.tool_executor is not None:
                self.tool_executor.close()

    @contextlib.contextmanager
    def _trainer_model(self, trainer: Any, gather_all: bool = True) -> Iterator[Any]:
        """The trainer's unwrapped model, with ZeRO-3 parameters gathered for the duration (unless `gather_all` is
        false: a weight push gathers them one at a time, `gather.push_model_weights`)."""
        from trl.models import unwrap_model_for_generation

        gather = gather_all and bool(getattr(trainer.args, "ds3_gather_for_generation", True))
        with unwrap_model_for_generation(
            trainer.model_wrapped, trainer.accelerator, gather_deepspeed3_params=gather
        ) as m:
            yield m

    def _runs_trainer_model(self, trainer: Any) -> bool:
        """Whether `inference` generates with the trainer's own model object (no other engine, no push)."""
        assert self.inference is not None
        backend = self.inference.backend
        return isinstance(backend, RunsLocalModel) and backend.model is trainer.accelerator.unwrap_model(
            trainer.model_wrapped
        )

    def _sync_weights(self, trainer: Any, own_model: bool) -> None:
        """Pushes the trainer's weights at a new step (every `weight_sync_interval` steps).

        A push that fails leaves the engine on older weights: the rollouts then carry that older step, and are
        corrected or dropped by `max_policy_lag` (see `_correct`); the error is raised only when the engine never
        received weights or when even the next rollouts would be too old to train on.
        """
        assert self.inference is not None
        step = int(trainer.state.global_step)
        reload = needs_weight_reload(self.inference)  # a level-2 sleep discarded the engine's weights
        if step == self._synced_step and not reload:
            return
        self._synced_step = step
        if own_model:  # `inference` runs the trainer's model object: nothing to push
            self._weights_step = step
            return
        backend = self.inference.backend
        if not isinstance(backend, SupportsWeightPush):
            raise InvalidValueError(
                "The given `inference` runs a different model than the trainer and its backend cannot load weights; "
                "pass `inference=None` to generate with the trainer's model, or use the vLLM backend."
            )
        if not reload and self._weights_step is not None and step - self._weights_step < self.weight_sync_interval:
            return
        error = self._push(trainer, backend)
        if error is None:
            self._weights_step = step
            self.inference.clear_cache()
            return
        lag = None if self._weights_step is None else step - self._weights_step
        if lag is None or (self.max_policy_lag is not None and lag > self.max_policy_lag):
            raise error
        logger.warning(
            "rollout_func: the weight push of step %d failed (%s); generating with the weights of step %d "
            "(policy lag %d, corrected by the importance ratio, see `max_policy_lag`).",
            step,
            error,
            self._weights_step,
            lag,
        )

    def _push(self, trainer: Any, backend: SupportsWeightPush) -> Exception | None:
        """One push of the trainer's weights; the error it failed with (the same on every process), or `None`."""
        from accelerate.utils import broadcast_object_list

        assert self.inference is not None
        accelerator = trainer.accelerator
        shared = backend.server_mode and accelerator.num_processes > 1
        failure: Exception | None = None
        # Every rank enters and gathers (FSDP2 / ZeRO-3 gathers are collective), one parameter at a time, so no
        # rank holds a second full copy; servers shared by the ranks take one push.
        with self._trainer_model(trainer, gather_all=False) as model:
            try:
                push_model_weights(backend, model, push=not shared or accelerator.is_main_process)
            except (WeightPushError, ServerConnectionError, NoServerLeftError) as error:
                failure = error
        if not shared:
            return failure
        accelerator.wait_for_everyone()
        (message,) = broadcast_object_list([None if failure is None else str(failure)], from_process=0)
        if accelerator.is_main_process:
            return failure
        if message is None:
            self.inference.mark_weights_updated()
            return None
        return WeightPushError(message)

    def __call__(self, prompts: list[Any], trainer: Any) -> dict[str, Any]:
        """Generates one completion per entry of `prompts` (TRL passes each prompt `num_generations` times)."""
        if getattr(trainer, "environment_factories", None) is not None:
            raise InvalidValueError(
                "`environment_factory` was given to `GRPOTrainer` as well as a `rollout_func`: TRL would run its own "
                "tool loop again over these rollouts. Pass it to `rollout_func(environment_factory=...)` only, and "
                "the reward functions it brings to the trainer: `GRPOTrainer(reward_funcs=[*rf.reward_funcs, ...])`."
            )
        sampling = sampling_from_trl_args(trainer.args, self.sampling)
        if self.inference is None:
            with self._trainer_model(trainer) as model:
                inference = InferenceModule.from_model(
                    model,
                    trainer.processing_class,
                    chat_template_kwargs=_chat_template_kwargs(trainer),
                    cache_size=0,
                    tool_parser=self.tool_parser,
                    fold_lora=self.fold_lora,
                )
                output = self._rollouts(inference, prompts, sampling, trainer)
            output["weight_version"] = [int(trainer.state.global_step)] * len(prompts)
            return output
        correction = MismatchCorrection.from_trl_args(trainer.args)
        correction.check_applicable()  # before any generation
        follow_trainer_memory(self.inference, trainer.args)  # an engine sharing the trainer's GPU leaves it room
        own_model = self._runs_trainer_model(trainer)
        with awake_for_rollout(self.inference):  # a sleep-mode engine sleeps again before the trainer's passes
            self._sync_weights(trainer, own_model)
            use_trainer_chat_template(self.inference, trainer.processing_class)
            self.inference.chat_template_kwargs = _chat_template_kwargs(trainer)  # prompt tokens as TRL renders them
            if not own_model:
                note = engine_dtype_note(self.inference, trainer.accelerator.unwrap_model(trainer.model_wrapped))
                if note:
                    self._warn_once("dtype", f"rollout_func: {note}")
            output = self._rollouts(self.inference, prompts, sampling, trainer)
        assert self._weights_step is not None
        output["weight_version"] = [self._weights_step] * len(prompts)
        if not own_model:
            self._correct(trainer, output, sampling, correction)
        return output

    def _correct(
        self, trainer: Any, output: dict[str, Any], sampling: dict[str, Any], correction: MismatchCorrection
    ) -> None:
        """Applies the mismatch correction and the staleness bound to `output["env_mask"]`, in place.

        The trainer's model scores the rollouts under the sampling's processing (one forward pass without gradients,
        the extra cost TRL's vLLM path pays too); see `correction` for the ratio and what passes to the loss. A
        rollout whose weights are `lag > 0` steps old is corrected like any other when the correction is on and
        `lag <= max_policy_lag`; otherwise it is dropped from the loss (`env_mask` 0), never trained on as if
        on-policy.
        """
        completions = output["completion_ids"]
        width = max((len(ids) for ids in completions), default=0)
        model_tokens = padded(output["env_mask"], width) > 0
        lag = int(trainer.state.global_step) - int(output["weight_version"][0])
        metrics: dict[str, torch.Tensor] = {}
        keep = model_tokens
        if correction.enabled and width:
            trainer_logps = self._trainer_logprobs(trainer, output, sampling)
            result = correct(trainer_logps, padded(output["logprobs"], width, math.nan), model_tokens, correction)
            keep, metrics = result.keep, result.metrics
        too_old = lag > 0 and (
            not correction.enabled or (self.max_policy_lag is not None and lag > self.max_policy_lag)
        )
        if too_old:
            keep = torch.zeros_like(model_tokens)
        metrics["sampling/policy_lag/mean"] = torch.tensor(float(lag), dtype=torch.float64)
        metrics["sampling/policy_lag/max"] = torch.tensor(float(lag), dtype=torch.float64)
        metrics["sampling/stale_rollouts_dropped"] = torch.tensor(float(too_old), dtype=torch.float64)
        output["env_mask"] = [[int(k) for k in keep[i, : len(ids)].tolist()] for i, ids in enumerate(completions)]
        self.sampling_metrics.pending = combine_metrics(metrics, trainer.accelerator.gather)
        if not any(f is self.sampling_metrics for f in getattr(trainer, "reward_funcs", [])):
            self._warn_once(
                "metrics",
                "rollout_func: the mismatch correction is applied, but its metrics are not logged: pass the rollout "
                "function's reward functions on, `GRPOTrainer(reward_funcs=[*rf.reward_funcs, ...])`.",
            )

    def _trainer_logprobs(self, trainer: Any, output: dict[str, Any], sampling: dict[str, Any]) -> torch.Tensor:
        """`[B, T]` log-probabilities of the rollouts' tokens under the trainer's model, processed as sampled."""
        settings = scoring_settings(sampling)
        prompt_ids, completion_ids = output["prompt_ids"], output["completion_ids"]
        width = max(len(ids) for ids in completion_ids)
        rows = max(1, int(getattr(trainer.args, "per_device_train_batch_size", 8)))
        out = torch.zeros(len(completion_ids), width, dtype=torch.float64)
        with self._trainer_model(trainer) as model, torch.no_grad():
            scorer = InferenceModule.from_model(model, trainer.processing_class, cache_size=0, fold_lora=False)
            for start in range(0, len(completion_ids), rows):
                part = slice(start, start + rows)
                logps = scorer.get_logprobs(prompt_ids[part], completion_ids[part], **settings)
                assert isinstance(logps, torch.Tensor)
                out[part, : logps.shape[1]] = logps.double().cpu()
        return out

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message)

    def _rollouts(
        self, inference: InferenceModule, prompts: list[Any], sampling: dict[str, Any], trainer: Any = None
    ) -> dict[str, Any]:
        if self.environments is not None:
            return self._environment_rollouts(inference, prompts, sampling, trainer)
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

    def _environment_rollouts(
        self, inference: InferenceModule, prompts: list[Any], sampling: dict[str, Any], trainer: Any
    ) -> dict[str, Any]:
        """Rollouts whose tools are their own environment instance's methods (see `environment_rollouts`)."""
        assert self.environments is not None
        sampling = dict(sampling)
        batch = self.environments.start(prompts, self.rows.rows(prompts, trainer), _group_size(prompts, trainer))
        try:
            rollouts = run_tool_loop(
                inference,
                batch.prompts,
                max_new_tokens=sampling.pop("max_new_tokens", 512),
                tool_loop=self.tool_loop,
                rollout_tools=batch.rollout_tools,
                **sampling,
            )
        finally:
            self.environments.finish(batch)
        output = _as_trl_output(rollouts)
        for i, error in enumerate(batch.errors):
            if error is not None:  # its environment never started: nothing to learn from
                output["env_mask"][i] = [0] * len(output["env_mask"][i])
        output["environment_errors"] = batch.errors
        return output


def _chat_template_kwargs(trainer: Any) -> dict[str, Any]:
    """`GRPOConfig.chat_template_kwargs` (TRL accepts a dict, or its JSON text from the command line)."""
    kwargs = getattr(trainer.args, "chat_template_kwargs", None) or {}
    return json.loads(kwargs) if isinstance(kwargs, str) else dict(kwargs)


def _group_size(prompts: list[Any], trainer: Any) -> int:
    """TRL's group size for this call: `num_generations` in training (`num_generations_eval` in evaluation) when it
    divides the batch, else the runs of identical prompts."""
    args = trainer.args
    training = bool(getattr(getattr(trainer, "model", None), "training", True))
    size = getattr(args, "num_generations", None) if training else getattr(args, "num_generations_eval", None)
    if isinstance(size, int) and size > 0 and len(prompts) % size == 0:
        return size
    return repeat_group_size(prompts)


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
    scheduling: str = "trajectory",
    tool_loop: ToolLoopConfig | None = None,
    weight_sync_interval: int = 1,
    max_policy_lag: int | None = None,
    environment_factory: Any = None,
    environment_isolation: str = "process",
    max_environments: int = 64,
    **sampling: Any,
) -> RolloutFunction:
    """Builds a `rollout_func` for `trl.GRPOTrainer`.

    The returned function receives this process's prompts (already repeated `num_generations` times, plain strings or
    chat message lists) and returns `prompt_ids`, `completion_ids`, `logprobs` (of the processed sampling
    distribution), `env_mask` (0 on tool-result tokens, so TRL drops them from the loss), `weight_version` (the trainer
    step whose weights generated each rollout), and with tools also `tool_calls` and `tool_results`; TRL forwards the
    extra keys to reward functions as keyword arguments.

    With `inference` set (another engine than the trainer's model, e.g. vLLM), the rollouts are corrected for the
    sampler/trainer mismatch as TRL corrects its own vLLM rollouts, driven by the same `GRPOConfig` fields
    (`vllm_importance_sampling_correction`, `_mode`, `_clip_min`, `_clip_max`) and logged under the same metric names
    through `rf.reward_funcs`: see `trl_inference_ext.trl.correction`. With `inference=None` the sampler is the
    trainer's model, the ratio is 1 up to float error, and the extra scoring pass is skipped.

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
        scheduling (`str`, *optional*, defaults to `"trajectory"`): `"trajectory"`: a rollout's next turn starts as
            soon as its own tool results are back; `"turn"`: every turn waits for all rollouts' tools. See
            `ToolLoopConfig.scheduling`.
        tool_loop (`ToolLoopConfig`, *optional*): All the tool-loop settings above at once (`max_tool_turns`,
            `stop_tools`, `tool_timeout`, `tool_isolation`, `tool_memory_limit`, `max_tool_output_chars`,
            `reuse_kv`, `scheduling`); passing it together with any of those keyword arguments raises a `TypeError`
            naming them.
        environment_factory (`Callable` or `dict[str, Callable]`, *optional*): Stateful environments with the contract
            of TRL's `GRPOTrainer(environment_factory=...)`, moved here from the trainer (passing it to both is
            refused): one instance per rollout, `reset(**row)` once before its first turn (its text is appended to
            the prompt), its public methods as the rollout's tools, `get_reward()` as a reward named after the class
            (pass `rf.reward_funcs` to the trainer), and a dict picking one environment per example by the row's
            `environment` column. `close()` is lifecycle, never a tool. See `trl_inference_ext.tools.environments`;
            the row of each prompt is found as `trl_inference_ext.trl.rows` describes (`tag_rows` for datasets where
            rows share a prompt). Checked here.
        environment_isolation (`str`, *optional*, defaults to `"process"`): `"process"` keeps each instance in its
            own worker process, killed and replaced when a method overruns `tool_timeout`, crashes or exceeds
            `tool_memory_limit` (the factory must be importable: checked here); `"thread"` keeps instances in this
            process, without that protection.
        max_environments (`int`, *optional*, defaults to 64): Most live environment instances (one per rollout of a
            batch, reused across batches).
        weight_sync_interval (`int`, *optional*, defaults to 1): With `inference` set, push the trainer's weights
            every this many optimizer steps; the rollouts in between come from weights up to `interval - 1` steps old
            (their `weight_version` says which) and are corrected or dropped as below.
        max_policy_lag (`int`, *optional*): Most optimizer steps a rollout's weights may lag behind the trainer's
            and still be trained on (corrected by the importance ratio); older rollouts are dropped from the loss
            (`env_mask` 0). `None`: no bound beyond the correction. With the correction off, any lagging rollout is
            dropped. A failed weight push is tolerated while the lag stays within this bound (logged); beyond it, or
            before the first push, the push error is raised. Logged: `sampling/policy_lag/{mean,max}`,
            `sampling/stale_rollouts_dropped`.
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
    POSITIVE_INT("weight_sync_interval", weight_sync_interval)
    int_at_least(0).or_none()("max_policy_lag", max_policy_lag)
    tool_executor = _tool_executor(tools, tool_loop)
    environments = None
    if environment_factory is not None:
        from ..tools.environment_host import EnvironmentPool
        from ..tools.environments import environment_specs

        specs = environment_specs(environment_factory)
        pool = EnvironmentPool(
            specs,
            isolation=environment_isolation,
            max_instances=max_environments,
            memory_limit=tool_loop.tool_memory_limit,
            max_output_chars=tool_loop.max_tool_output_chars,
        )
        environments = EnvironmentRollouts(
            specs, pool, tools=tools, tool_executor=tool_executor, timeout=tool_loop.tool_timeout
        )
    return RolloutFunction(
        inference,
        tools=tools,
        tool_parser=tool_parser,
        tool_loop=tool_loop,
        tool_executor=tool_executor,
        sampling=sampling,
        fold_lora=fold_lora,
        weight_sync_interval=weight_sync_interval,
        max_policy_lag=max_policy_lag,
        environments=environments,
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
