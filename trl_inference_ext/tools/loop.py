"""Multi-turn tool use: generate -> parse -> execute -> show results -> continue, on exact token ids.

Each rollout keeps one growing list of completion token ids. Model tokens come from sampling (with their log-probs);
tool-result tokens are appended from the chat template's tool-message format and marked 0 in `env_mask`, so a
trainer can drop them from the loss. Earlier turns are never re-tokenised.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..types import ToolCall
from .execution import MAX_OUTPUT_CHARS, ToolExecutor, ToolResult
from .parsers import get_parser
from .prompting import build_tool_prompt, tool_results_text
from .schema import normalize_tools, tool_functions

if TYPE_CHECKING:
    from ..module import InferenceModule


@dataclass
class ToolRollout:
    """One multi-turn rollout.

    Attributes:
        prompt_ids (`list[int]`): Prompt token ids (tools included).
        completion_ids (`list[int]`): Model and tool-result tokens, in order.
        logprobs (`list[float]`): Log-prob of each completion token (0.0 for tool-result tokens).
        env_mask (`list[int]`): 1 for model tokens, 0 for tool-result tokens.
        tool_calls (`list[ToolCall]`): Every call parsed, malformed ones included.
        tool_results (`list[ToolResult]`): The outcome of each call, aligned with `tool_calls`.
        finish_reason (`str`): `"stop"` (answered without a call), `"length"` (token budget), `"max_tool_turns"` or
            `"stop_tool"`.
        text (`str`): Decoded completion (model and tool tokens).
    """

    prompt_ids: list[int]
    completion_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    env_mask: list[int] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    tool_results: list[ToolResult] = field(default_factory=list)
    finish_reason: str = "length"
    text: str = ""

    @property
    def num_calls(self) -> int:
        """Number of calls parsed."""
        return len(self.tool_calls)

    @property
    def num_failed_calls(self) -> int:
        """Calls that were malformed, named an unknown tool, raised or timed out."""
        return sum(not r.ok for r in self.tool_results)


def repeat_group_size(items: Sequence[Any]) -> int:
    """Length of the runs of identical consecutive items when all runs have that length, else 1.

    TRL passes each prompt `num_generations` times in a row; generating each distinct prompt once with
    `num_return_sequences` equal to this size gives the same rollouts while prefilling each prompt once.
    """
    runs, start = [], 0
    for i in range(1, len(items) + 1):
        if i == len(items) or items[i] != items[start]:
            runs.append(i - start)
            start = i
    return runs[0] if runs and all(r == runs[0] for r in runs) else 1


def run_tool_loop(
    inference: InferenceModule,
    prompts: Sequence[Any],
    tools: Sequence[Any] | None = None,
    *,
    max_tool_turns: int = 3,
    max_new_tokens: int = 512,
    stop_tools: Sequence[str] = (),
    tool_timeout: float = 10.0,
    functions: dict[str, Callable[..., Any]] | None = None,
    tool_isolation: str = "process",
    tool_memory_limit: int | None = None,
    max_tool_output_chars: int = MAX_OUTPUT_CHARS,
    tool_executor: ToolExecutor | None = None,
    **sampling: Any,
) -> list[ToolRollout]:
    """Runs multi-turn tool use for a batch of prompts (one rollout per prompt).

    Args:
        inference (`InferenceModule`): Generates the model turns; its `tool_parser_type` parses calls.
        prompts (`Sequence`): Strings or chat message lists. Pass each prompt once per wanted rollout.
        tools (`Sequence`, *optional*): Tool definitions; callables are executed, dicts only described.
        max_tool_turns (`int`, *optional*, defaults to 3): Most rounds of tool execution per rollout.
        max_new_tokens (`int`, *optional*, defaults to 512): Budget for all completion tokens (model + tool).
        stop_tools (`Sequence[str]`, *optional*): Tools whose call ends the rollout (executed, results not shown).
        tool_timeout (`float`, *optional*, defaults to 10.0): Seconds allowed for all the tool calls of one turn (the
            calls of every rollout in the batch run together, within this one deadline).
        functions (`dict[str, Callable]`, *optional*): Implementations for tools given as dicts.
        tool_isolation (`str`, *optional*, defaults to `"process"`): `"process"` runs tools in worker processes that
            are killed at the deadline and replaced (tools must be importable functions); `"thread"` runs them in
            threads of this process (any callable, no protection). See `ToolExecutor`.
        tool_memory_limit (`int`, *optional*): Bytes of memory one call may add to its worker process (processes only).
        max_tool_output_chars (`int`, *optional*, defaults to `MAX_OUTPUT_CHARS`): Longest tool output shown to the
            model.
        tool_executor (`ToolExecutor`, *optional*): Run the calls on this executor, with its own functions, timeout
            and isolation, and leave it open (its worker processes then serve later batches too). By default one is
            built from the arguments above and closed at the end.
        **sampling: Sampling arguments for `generate` (temperature, top_p, top_k, seed, ...).

    Returns:
        `list[ToolRollout]`: One per prompt, in order.
    """
    if isinstance(max_tool_turns, bool) or not isinstance(max_tool_turns, int) or max_tool_turns < 0:
        raise ValueError(f"`max_tool_turns` must be an int >= 0, got {max_tool_turns!r}.")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"`max_new_tokens` must be an int >= 1, got {max_new_tokens!r}.")
    for forbidden in ("num_return_sequences", "return_logprobs", "max_new_tokens"):
        if forbidden in sampling:
            raise TypeError(f"`{forbidden}` is set by the tool loop; pass prompts once per rollout instead.")
    schemas = normalize_tools(tools)
    implementations = {**tool_functions(tools), **(functions or {})}
    tokenizer = inference.tokenizer
    parser = get_parser(
        inference.tool_parser_type, chat_template=getattr(tokenizer, "chat_template", None), tool_schemas=schemas
    )
    chat = [not isinstance(p, str) for p in prompts]
    encoded = [
        build_tool_prompt(tokenizer, p if isinstance(p, str) else list(p), schemas, inference.tool_parser_type)
        for p in prompts
    ]
    rollouts = [ToolRollout(prompt_ids=inference._encode_prompts([e])[0]) for e in encoded]
    eos = tokenizer.eos_token_id
    executor = tool_executor
    if executor is None:
        executor = ToolExecutor(
            implementations,
            timeout=tool_timeout,
            isolation=tool_isolation,
            memory_limit=tool_memory_limit,
            max_output_chars=max_tool_output_chars,
        )
    active = list(range(len(rollouts)))
    try:
        for turn in range(max_tool_turns + 1):
            if not active:
                break
            budget = max(max_new_tokens - len(rollouts[i].completion_ids) for i in active)
            contexts = [rollouts[i].prompt_ids + rollouts[i].completion_ids for i in active]
            # First turn: identical consecutive prompts (GRPO's repeats) share one prefill and KV cache.
            group = repeat_group_size(contexts) if turn == 0 else 1
            result = inference.generate(
                contexts[::group],
                use_cache=False,
                max_new_tokens=budget,
                return_logprobs=True,
                num_return_sequences=group,
                **sampling,
            )
            assert result.logprobs is not None and result.token_ids is not None and result.metadata is not None
            calling = []  # (rollout index, its new ids, its calls, truncated) of the rollouts that called tools
            for j, i in enumerate(active):
                rollout = rollouts[i]
                room = max_new_tokens - len(rollout.completion_ids)
                ids, lps = result.token_ids[j][:room], result.logprobs[j][:room].tolist()
                rollout.completion_ids += ids
                rollout.logprobs += lps
                rollout.env_mask += [1] * len(ids)
                truncated = len(ids) < len(result.token_ids[j]) or result.metadata["finish_reasons"][j] == "length"
                calls = parser.parse(inference._decode(ids))
                if not calls:
                    rollout.finish_reason = "length" if truncated else "stop"
                    continue
                rollout.tool_calls += calls
                calling.append((i, ids, calls, truncated))
            # Every call of the turn, all rollouts together: one deadline, however many calls hang.
            results = iter(executor.run([call for _, _, calls, _ in calling for call in calls]))
            still_active = []
            for i, ids, calls, truncated in calling:
                rollout = rollouts[i]
                outcomes = [next(results) for _ in calls]
                rollout.tool_results += outcomes
                if any(c.ok and c.name in stop_tools for c in calls):
                    rollout.finish_reason = "stop_tool"
                    continue
                if truncated or turn == max_tool_turns:
                    rollout.finish_reason = "length" if truncated else "max_tool_turns"
                    continue
                messages = [{"role": "tool", "name": r.name, "content": r.content} for r in outcomes]
                text, needs_eos = tool_results_text(tokenizer, messages, chat[i])
                env_ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
                if needs_eos and eos is not None and (not ids or ids[-1] != eos):
                    env_ids = [eos, *env_ids]
                env_ids = env_ids[: max_new_tokens - len(rollout.completion_ids)]
                rollout.completion_ids += env_ids
                rollout.logprobs += [0.0] * len(env_ids)
                rollout.env_mask += [0] * len(env_ids)
                if len(rollout.completion_ids) >= max_new_tokens:
                    rollout.finish_reason = "length"
                    continue
                still_active.append(i)
            active = still_active
    finally:
        if tool_executor is None:
            executor.close()
    for rollout in rollouts:
        rollout.text = inference._decode(rollout.completion_ids)
    return rollouts
