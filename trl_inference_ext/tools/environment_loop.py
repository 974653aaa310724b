"""Rollouts in stateful environments, with the contract of TRL's `environment_factory` (see `environments`).

For each rollout of a batch, given its dataset row: take an instance of its environment (the row's `environment`
column picks one when there are several), `reset(**row)` it once (the observation it returns is appended to the
prompt as TRL appends it), run the tool loop with that instance's methods as the rollout's tools, read
`get_reward()` once the rollout finished, and give the instance back, whatever happened. Used by
`rollout_func(environment_factory=...)` (which finds each prompt's row, see `trl.rows`) and by
`InferenceModule.batch_generate_with_tools(environment_factory=...)` for evaluation outside a trainer.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidValueError
from .environment_host import EnvironmentExecutor, EnvironmentHost, EnvironmentPool
from .environments import ENVIRONMENT_COLUMN, EnvironmentSpec, observation_prompt
from .execution import ToolExecutor
from .loop import RolloutTools
from .schema import normalize_tools

logger = logging.getLogger(__name__)


class EnvironmentReward:
    """The reward function of one environment class: `get_reward()` of each rollout that ran in it, `None` for the
    others (TRL skips `None`). Named after the class, as TRL names it."""

    def __init__(self, cls: type) -> None:
        self.cls = cls
        self.__name__ = cls.__name__
        self.pending: list[float | None] = []
        """The rewards of the latest batch, one per rollout."""

    def __call__(self, completions: list[Any], **kwargs: Any) -> list[float | None]:
        """The rewards of the batch the trainer scores now (the one the rollout function returned last)."""
        if len(self.pending) != len(completions):
            raise InvalidValueError(
                f"{self.__name__} has {len(self.pending)} rewards for {len(completions)} completions: pass it to the "
                "trainer of the rollout function that generated them (`reward_funcs=[*rf.reward_funcs, ...]`)."
            )
        rewards, self.pending = self.pending, []
        return rewards


@dataclass
class EnvironmentBatch:
    """One batch's environment state, from `start` to `finish`."""

    prompts: list[Any]
    """The prompts with each reset's observation appended."""
    rollout_tools: list[RolloutTools]
    hosts: list[EnvironmentHost]
    errors: list[str | None] = field(default_factory=list)
    """Per rollout, why its environment failed to reset (the rollout is then not trained on), else `None`."""


class EnvironmentRollouts:
    """Runs the environment side of a batch of rollouts (see the module docstring).

    Args:
        specs (`dict`): The environments (`tools.environments.environment_specs`).
        pool (`EnvironmentPool`): Where instances live.
        tools (`Sequence`, *optional*): Standalone tools offered next to every environment's methods.
        tool_executor (`ToolExecutor`, *optional*): Runs the standalone tools.
        timeout (`float`): Seconds allowed for `reset`, for `get_reward`, and for the calls of one turn.
    """

    def __init__(
        self,
        specs: dict[str | None, EnvironmentSpec],
        pool: EnvironmentPool,
        *,
        tools: Sequence[Any] | None,
        tool_executor: ToolExecutor | None,
        timeout: float,
    ) -> None:
        self.specs = specs
        self.pool = pool
        self.standalone = tuple(normalize_tools(tools))
        self.tool_executor = tool_executor
        self.timeout = timeout
        self.rewards = {
            spec.cls: EnvironmentReward(spec.cls) for spec in specs.values() if spec.has_reward
        }  # one per class, as in TRL (a dict may map several names to one class)
        self._groups = 0

    @property
    def reward_funcs(self) -> list[EnvironmentReward]:
        """One reward function per environment class with `get_reward`."""
        return list(self.rewards.values())

    def start(self, prompts: list[Any], rows: list[dict[str, Any]], group_size: int) -> EnvironmentBatch:
        """Takes and resets one instance per rollout; the caller must `finish` the batch (in a `finally`).

        Args:
            prompts (`list`): One prompt per rollout (GRPO groups contiguous).
            rows (`list[dict]`): Each rollout's dataset row, passed to `reset`.
            group_size (`int`): Rollouts per group (`reset` may learn its group and member).
        """
        names = [self._environment_of(row) for row in rows]
        batch = EnvironmentBatch(prompts=[], rollout_tools=[], hosts=[])
        try:
            for i, (prompt, row, name) in enumerate(zip(prompts, rows, names)):
                host = self.pool.acquire(name)
                batch.hosts.append(host)
                observation, error = self._reset(host, row, name, i, group_size)
                batch.prompts.append(observation_prompt(_plain(prompt), observation))
                batch.errors.append(error)
                executor = EnvironmentExecutor(host, self.tool_executor, self.timeout)
                batch.rollout_tools.append(RolloutTools(host.spec.schemas + self.standalone, executor))
        except BaseException:
            self.finish(batch)
            raise
        self._groups += math.ceil(len(prompts) / max(group_size, 1))
        return batch

    def _environment_of(self, row: dict[str, Any]) -> str | None:
        if None in self.specs:
            return None
        name = row.get(ENVIRONMENT_COLUMN)
        if name not in self.specs:
            raise InvalidValueError(
                f"Example has `{ENVIRONMENT_COLUMN}={name!r}`, which is not among the environments passed to "
                f"`environment_factory`. Expected one of: {list(self.specs)}."
            )
        return name

    def _reset(
        self, host: EnvironmentHost, row: dict[str, Any], name: str | None, index: int, group_size: int
    ) -> tuple[str, str | None]:
        arguments = {k: v for k, v in row.items() if k != ENVIRONMENT_COLUMN} if name is not None else dict(row)
        group = {"group_index": self._groups + index // group_size, "group_member": index % group_size}
        for parameter in host.spec.reset_group_parameters:
            arguments[parameter] = group[parameter]
        kind, text = host.call("reset", arguments, self.timeout)
        if kind is None:
            return text, None
        error = f"reset of environment {host.spec.label} failed ({kind}): {text}"
        logger.warning("%s; the rollout is not trained on.", error)
        return "", error

    def finish(self, batch: EnvironmentBatch) -> None:
        """Reads each rollout's `get_reward()` into the reward functions, then gives every instance back."""
        try:
            for reward in self.rewards.values():
                reward.pending = [self._reward(host) if host.spec.cls is reward.cls else None for host in batch.hosts]
        finally:
            for host in batch.hosts:
                self.pool.release(host)

    def _reward(self, host: EnvironmentHost) -> float | None:
        kind, text = host.call("get_reward", {}, self.timeout)
        try:
            value = float(text) if kind is None else math.nan
        except ValueError:
            value = math.nan
        if math.isnan(value):
            logger.warning("get_reward of environment %s gave no number (%s %s).", host.spec.label, kind, text[:200])
            return None
        return value


def _plain(prompt: Any) -> Any:
    """The prompt as a plain `str` or `list` (a tagged prompt carries its row, which the model must not see)."""
    return str(prompt) if isinstance(prompt, str) else list(prompt)


def generate_in_environments(
    inference: Any,
    prompts: list[Any],
    environment_factory: Any,
    *,
    tools: Sequence[Any] | None = None,
    rows: Sequence[dict[str, Any]] | None = None,
    max_new_tokens: int = 512,
    tool_loop: Any = None,
    environment_isolation: str = "process",
    **sampling: Any,
) -> tuple[Any, list[list[Any]]]:
    """Multi-turn generation with one fresh environment instance per prompt, outside any trainer (evaluation).

    The backend of `InferenceModule.batch_generate_with_tools(environment_factory=...)`; see there.

    Returns:
        `tuple[GenerationResult, list[list[ToolCall]]]`: One sequence per prompt (model and tool tokens, as in a
        rollout) and its well-formed calls; `metadata` adds `env_mask`, `tool_results`, `rewards` (each rollout's
        `get_reward()`, `None` without one), `environment_errors`, `finish_reasons` and `invalid_tool_calls`.
    """
    import torch

    from ..types import GenerationResult
    from .config import ToolLoopConfig
    from .environments import environment_specs
    from .loop import run_tool_loop
    from .schema import tool_functions

    config = tool_loop if tool_loop is not None else ToolLoopConfig()
    rows = [dict(r) for r in rows] if rows is not None else [{"prompt": p} for p in prompts]
    if len(rows) != len(prompts):
        raise InvalidValueError(f"Got {len(rows)} `environment_rows` for {len(prompts)} prompts.")
    specs = environment_specs(environment_factory)
    pool = EnvironmentPool(
        specs,
        isolation=environment_isolation,
        max_instances=max(1, len(prompts)),
        memory_limit=config.tool_memory_limit,
        max_output_chars=config.max_tool_output_chars,
    )
    executor = config.build_executor(tool_functions(tools)) if tools else None
    session = EnvironmentRollouts(specs, pool, tools=tools, tool_executor=executor, timeout=config.tool_timeout)
    try:
        batch = session.start(prompts, rows, group_size=1)
        try:
            rollouts = run_tool_loop(
                inference,
                batch.prompts,
                max_new_tokens=max_new_tokens,
                tool_loop=config,
                rollout_tools=batch.rollout_tools,
                **sampling,
            )
        finally:
            session.finish(batch)
    finally:
        pool.close()
        if executor is not None:
            executor.close()
    rewards: list[float | None] = [None] * len(prompts)
    for reward in session.reward_funcs:
        for i, value in enumerate(reward.pending):
            if value is not None:
                rewards[i] = value
    metadata = {
        "prompt_token_ids": [r.prompt_ids for r in rollouts],
        "finish_reasons": [r.finish_reason for r in rollouts],
        "env_mask": [r.env_mask for r in rollouts],
        "tool_results": [r.tool_results for r in rollouts],
        "rewards": rewards,
        "environment_errors": batch.errors,
        "invalid_tool_calls": [[c for c in r.tool_calls if not c.ok] for r in rollouts],
    }
    result = GenerationResult(
        texts=[r.text for r in rollouts],
        token_ids=[r.completion_ids for r in rollouts],
        logprobs=[torch.tensor(r.logprobs, dtype=torch.float32) for r in rollouts],
        metadata=metadata,
    )
    return result, [[c for c in r.tool_calls if c.ok] for r in rollouts]
