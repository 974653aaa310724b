"""Reward functions for tool use, with TRL's reward-function signature.

TRL calls `reward_func(prompts=..., completions=..., completion_ids=..., **kwargs)`, where `kwargs` holds the
dataset columns and the extra fields of `rollout_func` (here `tool_calls` and `tool_results`). Each function below
also works without those fields by parsing the completion text itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

from ..errors import InvalidValueError
from ..tools.parsers import get_parser
from ..tools.schema import normalize_tools
from ..tools.validation import argument_errors

RewardFunction = Callable[..., list[float]]


def _text(completion: Any) -> str:
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):  # conversational: [{"role": "assistant", "content": ...}, ...]
        return "".join(str(m.get("content") or "") for m in completion if isinstance(m, dict))
    return str(completion)


def _calls_per_completion(completions: Sequence[Any], kwargs: dict[str, Any], parser: Any) -> list[list[dict]]:
    calls = kwargs.get("tool_calls")
    if calls is not None and len(calls) == len(completions):
        return [list(c or []) for c in calls]
    return [[asdict(c) for c in parser.parse(_text(completion))] for completion in completions]


def tool_call_reward(
    tools: Sequence[Any] | None = None, tool_parser: str = "auto", no_call: float = 0.0
) -> RewardFunction:
    """Rewards well-formed calls of known tools with schema-valid arguments.

    The reward of a completion is the fraction of its calls that are well formed, name a known tool (when `tools` is
    given) and have arguments valid under that tool's JSON schema; `no_call` when it made no call.

    Args:
        tools (`Sequence`, *optional*): Tool definitions (dicts or callables) to check names and arguments against.
        tool_parser (`str`, *optional*, defaults to `"auto"`): Format used when `tool_calls` is not provided (with
            `rollout_func`, the rollouts' own parsed calls are used). `"auto"`, like `rollout_func` and the CLI:
            every format is tried, as no chat template is known here; name the format to score only that one.
        no_call (`float`, *optional*, defaults to 0.0): Reward for a completion without any call.
    """
    normalized = normalize_tools(tools)
    schemas = {s["function"]["name"]: s["function"]["parameters"] for s in normalized}
    parser = get_parser(tool_parser, tool_schemas=normalized or None)

    def tool_call_format(completions: Sequence[Any], **kwargs: Any) -> list[float]:
        rewards = []
        for calls in _calls_per_completion(completions, kwargs, parser):
            if not calls:
                rewards.append(no_call)
                continue
            good = 0
            for call in calls:
                if call.get("status") != "ok":
                    continue
                if schemas and (
                    call["name"] not in schemas or argument_errors(schemas[call["name"]], call["arguments"])
                ):
                    continue
                good += 1
            rewards.append(good / len(calls))
        return rewards

    return tool_call_format


def tool_success_reward(no_call: float = 0.0) -> RewardFunction:
    """Rewards tool calls that ran and returned: the fraction of a completion's executed calls that succeeded.

    Needs the `tool_results` field that `trl_inference_ext.trl.rollout_func(tools=...)` returns.

    Args:
        no_call (`float`, *optional*, defaults to 0.0): Reward for a completion without any call.
    """

    def tool_success(completions: Sequence[Any], **kwargs: Any) -> list[float]:
        results = kwargs.get("tool_results")
        if results is None:
            raise InvalidValueError("`tool_success_reward` needs `tool_results`: use `rollout_func(tools=...)`.")
        return [sum(bool(r.get("ok")) for r in rs) / len(rs) if rs else no_call for rs in results]

    return tool_success
