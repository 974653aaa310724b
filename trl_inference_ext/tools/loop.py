"""Multi-turn tool use: generate -> parse -> execute -> show results -> continue, on exact token ids.

Each rollout keeps one growing list of completion token ids. Model tokens come from sampling (with their log-probs);
tool-result tokens are appended from the chat template's tool-message format and marked 0 in `env_mask`, so a
trainer can drop them from the loss. Earlier turns are never re-tokenised.

One turn of `run_tool_loop`, for every rollout still running: sample its next model turn (all rollouts in one batch)
and parse the calls (`_sample_turn`), execute the calls of all rollouts together (one deadline, `_execute_together`),
then either finish the rollout (`_exit_reason`) or append the tool results as an environment turn and go on
(`_end_turn`). The loop's settings are one `ToolLoopConfig`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import InvalidTypeError, InvalidValueError, OperationError
from ..types import ToolCall
from .config import ToolLoopConfig, takes_tool_loop
from .execution import MAX_OUTPUT_CHARS, ToolExecutor, ToolResult
from .parsers import ToolParser, get_parser
from .prompting import build_tool_prompt, tool_results_text
from .schema import normalize_tools, tool_functions

if TYPE_CHECKING:
    from ..module import InferenceModule

FINISH_REASONS = ("stop", "length", "max_tool_turns", "stop_tool")
"""Why a rollout ended: answered without a call, token budget spent, tool turns used up, or a stop tool called."""


@dataclass
class ToolRollout:
    """One multi-turn rollout: a prompt, then model turns and environment (tool-result) turns, then its finish.

    `run_tool_loop` builds it with `add_model_turn`, `add_tool_calls` and `add_environment_turn`, and ends it with
    `finish`. Both kinds of turn count against one budget, `max_new_tokens`; a turn that does not fit is cut.

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
        max_new_tokens (`int`): Budget for all completion tokens, model and tool.
    """

    prompt_ids: list[int]
    completion_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    env_mask: list[int] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    tool_results: list[ToolResult] = field(default_factory=list)
    finish_reason: str = "length"
    text: str = ""
    max_new_tokens: int = 512
    _finished: bool = field(default=False, init=False, repr=False)

    @property
    def num_calls(self) -> int:
        """Number of calls parsed."""
        return len(self.tool_calls)

    @property
    def num_failed_calls(self) -> int:
        """Calls that were malformed, named an unknown tool, raised or timed out."""
        return sum(not r.ok for r in self.tool_results)

    @property
    def context_ids(self) -> list[int]:
        """What the model reads before its next turn: the prompt and every completion token so far."""
        return self.prompt_ids + self.completion_ids

    @property
    def remaining_tokens(self) -> int:
        """Completion tokens the budget still allows."""
        return max(0, self.max_new_tokens - len(self.completion_ids))

    @property
    def finished(self) -> bool:
        """Whether `finish` was called."""
        return self._finished

    def add_model_turn(self, token_ids: Sequence[int], logprobs: Sequence[float]) -> list[int]:
        """Appends sampled tokens and their log-probs (`env_mask` 1), as many as the budget allows.

        Args:
            token_ids (`Sequence[int]`): The tokens the model sampled this turn.
            logprobs (`Sequence[float]`): Their log-probs, one per token.

        Returns:
            `list[int]`: The tokens kept (fewer than given when the budget cut the turn).
        """
        self._check_open()
        if len(token_ids) != len(logprobs):
            raise InvalidValueError(
                f"Got {len(token_ids)} token ids but {len(logprobs)} log-probs; they must be aligned."
            )
        kept = list(token_ids[: self.remaining_tokens])
        self.completion_ids += kept
        self.logprobs += list(logprobs[: len(kept)])
        self.env_mask += [1] * len(kept)
        return kept

    def add_tool_calls(self, calls: Sequence[ToolCall], results: Sequence[ToolResult]) -> None:
        """Records the calls parsed from a model turn and their outcomes (shown to the model or not).

        Args:
            calls (`Sequence[ToolCall]`): The calls, malformed ones included.
            results (`Sequence[ToolResult]`): One outcome per call, in the same order.
        """
        if len(calls) != len(results):
            raise InvalidValueError(f"Got {len(calls)} tool calls but {len(results)} results; they must be aligned.")
        self.tool_calls += calls
        self.tool_results += results

    def add_environment_turn(self, token_ids: Sequence[int]) -> None:
        """Appends tool-result tokens (log-prob 0.0, `env_mask` 0), as many as the budget allows.

        A turn that spends the budget finishes the rollout with `"length"`: the model has no room left to answer.

        Args:
            token_ids (`Sequence[int]`): The tokens that show the tool results and open the next model turn.
        """
        self._check_open()
        kept = list(token_ids[: self.remaining_tokens])
        self.completion_ids += kept
        self.logprobs += [0.0] * len(kept)
        self.env_mask += [0] * len(kept)
        if self.remaining_tokens == 0:
            self.finish("length")

    def finish(self, reason: str) -> None:
        """Ends the rollout.

        Args:
            reason (`str`): One of `FINISH_REASONS`.
        """
        if reason not in FINISH_REASONS:
            raise InvalidValueError(f"`reason` must be one of {list(FINISH_REASONS)}, got {reason!r}.")
        self._check_open()
        self.finish_reason = reason
        self._finished = True

    def _check_open(self) -> None:
        if self._finished:
            raise OperationError(f"This rollout already finished ({self.finish_reason!r}); it takes no more turns.")


@dataclass
class _ModelTurn:
    """What the model produced for one rollout in one turn, and what its calls did."""

    token_ids: list[int]
    truncated: bool
    calls: list[ToolCall]
    results: list[ToolResult] = field(default_factory=list)  # filled by `_execute_together`


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


@takes_tool_loop
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
    reuse_kv: bool = True,
    tool_loop: ToolLoopConfig | None = None,
    **sampling: Any,
) -> list[ToolRollout]:
    """Runs multi-turn tool use for a batch of prompts (one rollout per prompt).

    The loop's settings come either from `tool_loop` or from the keyword arguments of the same names (see
    `ToolLoopConfig` for each): not both.

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
            built from the settings above (`ToolLoopConfig.build_executor`) and closed at the end.
        reuse_kv (`bool`, *optional*, defaults to `True`): Keep each rollout's KV cache from one turn to the next, so
            a turn runs only the tokens appended since the model's last one (`InferenceModule.multi_turn`; a no-op on
            backends that do not keep such caches). `False` re-runs each rollout's whole context every turn; both
            give the same rollouts up to float error.
        tool_loop (`ToolLoopConfig`, *optional*): All the settings above at once (`max_tool_turns`, `stop_tools`,
            `tool_timeout`, `tool_isolation`, `tool_memory_limit`, `max_tool_output_chars`, `reuse_kv`); passing it
            together with any of those keyword arguments raises a `TypeError` naming them.
        **sampling: Sampling arguments for `generate` (temperature, top_p, top_k, seed, ...).

    Returns:
        `list[ToolRollout]`: One per prompt, in order.
    """
    assert tool_loop is not None  # built from the keyword arguments by `takes_tool_loop`
    _check_budget_and_sampling(max_new_tokens, sampling)
    schemas = normalize_tools(tools)
    parser = get_parser(
        inference.tool_parser_type,
        chat_template=getattr(inference.tokenizer, "chat_template", None),
        tool_schemas=schemas,
    )
    rollouts = _start_rollouts(inference, prompts, schemas, max_new_tokens)
    chat = [not isinstance(p, str) for p in prompts]
    executor = tool_executor
    if executor is None:
        executor = tool_loop.build_executor({**tool_functions(tools), **(functions or {})})
    try:
        with inference.multi_turn() if tool_loop.reuse_kv else contextlib.nullcontext():
            for turn in range(tool_loop.max_tool_turns + 1):
                active = [i for i, rollout in enumerate(rollouts) if not rollout.finished]
                if not active:
                    break
                # First turn: identical consecutive prompts (GRPO's repeats) share one prefill and KV cache.
                model_turns = _sample_turn(inference, parser, [rollouts[i] for i in active], turn == 0, sampling)
                _execute_together(executor, model_turns)
                last_turn = turn == tool_loop.max_tool_turns
                for i, model_turn in zip(active, model_turns):
                    _end_turn(rollouts[i], model_turn, inference.tokenizer, chat[i], tool_loop.stop_tools, last_turn)
    finally:
        if tool_executor is None:
            executor.close()
    for rollout in rollouts:
        rollout.text = inference.decode(rollout.completion_ids)
    return rollouts


def _check_budget_and_sampling(max_new_tokens: int, sampling: dict[str, Any]) -> None:
    """Refuses a token budget below 1 and the `generate` arguments the loop sets itself."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InvalidValueError(f"`max_new_tokens` must be an int >= 1, got {max_new_tokens!r}.")
    for forbidden in ("num_return_sequences", "return_logprobs", "max_new_tokens"):
        if forbidden in sampling:
            raise InvalidTypeError(f"`{forbidden}` is set by the tool loop; pass prompts once per rollout instead.")


def _start_rollouts(
    inference: InferenceModule, prompts: Sequence[Any], schemas: list[dict[str, Any]], max_new_tokens: int
) -> list[ToolRollout]:
    """One empty rollout per prompt, its prompt rendered with the tools (`build_tool_prompt`) and encoded."""
    texts = [
        build_tool_prompt(
            inference.tokenizer, p if isinstance(p, str) else list(p), schemas, inference.tool_parser_type
        )
        for p in prompts
    ]
    prompt_ids = inference.encode_prompts(texts) if texts else []
    return [ToolRollout(prompt_ids=ids, max_new_tokens=max_new_tokens) for ids in prompt_ids]


def _sample_turn(
    inference: InferenceModule,
    parser: ToolParser,
    rollouts: list[ToolRollout],
    share_prompts: bool,
    sampling: dict[str, Any],
) -> list[_ModelTurn]:
    """Samples the next model turn of every rollout in one batch, appends it to each (`add_model_turn`) and parses
    its calls.

    With `share_prompts`, runs of identical contexts are generated as one prompt with `num_return_sequences`.

    Returns:
        `list[_ModelTurn]`: Per rollout, the tokens kept, whether the turn was cut (by the budget or by the batch's
        `max_new_tokens`) and the calls parsed from the kept tokens.
    """
    contexts = [rollout.context_ids for rollout in rollouts]
    group = repeat_group_size(contexts) if share_prompts else 1
    result = inference.generate(
        contexts[::group],
        use_cache=False,
        max_new_tokens=max(rollout.remaining_tokens for rollout in rollouts),
        return_logprobs=True,
        num_return_sequences=group,
        **sampling,
    )
    assert result.logprobs is not None and result.token_ids is not None and result.metadata is not None
    turns = []
    for rollout, ids, logprobs, finish in zip(
        rollouts, result.token_ids, result.logprobs, result.metadata["finish_reasons"]
    ):
        kept = rollout.add_model_turn(ids, logprobs.tolist())
        truncated = len(kept) < len(ids) or finish == "length"
        turns.append(_ModelTurn(kept, truncated, parser.parse(inference.decode(kept))))
    return turns


def _execute_together(executor: ToolExecutor, turns: list[_ModelTurn]) -> None:
    """Runs the calls of every turn at once, within one deadline however many calls hang, and stores the results."""
    results = iter(executor.run([call for turn in turns for call in turn.calls]))
    for turn in turns:
        turn.results = [next(results) for _ in turn.calls]


def _end_turn(
    rollout: ToolRollout, turn: _ModelTurn, tokenizer: Any, chat: bool, stop_tools: Sequence[str], last_turn: bool
) -> None:
    """Records a model turn's calls and results, then finishes the rollout or shows it the results (next turn)."""
    rollout.add_tool_calls(turn.calls, turn.results)
    reason = _exit_reason(turn, stop_tools, last_turn)
    if reason is not None:
        rollout.finish(reason)
    else:
        rollout.add_environment_turn(_tool_message_ids(tokenizer, turn, chat))


def _exit_reason(turn: _ModelTurn, stop_tools: Sequence[str], last_turn: bool) -> str | None:
    """Why a rollout ends after this model turn, or `None` when its tool results are shown and it goes on.

    The one other way out: the tool results spend the budget (`ToolRollout.add_environment_turn`).
    """
    if not turn.calls:
        return "length" if turn.truncated else "stop"
    if any(call.ok and call.name in stop_tools for call in turn.calls):
        return "stop_tool"
    if turn.truncated:
        return "length"
    if last_turn:
        return "max_tool_turns"
    return None


def _tool_message_ids(tokenizer: Any, turn: _ModelTurn, chat: bool) -> list[int]:
    """The tokens that show a turn's tool results and open the next model turn (closing the model's turn first)."""
    messages = [{"role": "tool", "name": r.name, "content": r.content} for r in turn.results]
    text, needs_eos = tool_results_text(tokenizer, messages, chat)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    eos = tokenizer.eos_token_id
    if needs_eos and eos is not None and turn.token_ids[-1:] != [eos]:
        ids = [eos, *ids]
    return ids
