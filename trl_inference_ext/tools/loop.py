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
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

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


class CallRunner(Protocol):
    """What runs a rollout's tool calls: a `ToolExecutor`, or one environment instance's `EnvironmentExecutor`."""

    def run(self, calls: list[ToolCall]) -> list[ToolResult]:
        """One result per call, in order, within the runner's deadline."""
        ...

    def close(self) -> None:
        """Releases what the runner holds."""
        ...


@dataclass(frozen=True)
class RolloutTools:
    """The tools of one rollout: what its prompt describes and what runs its calls.

    Attributes:
        schemas (`tuple[dict, ...]`): Tool schemas (OpenAI function format) rendered into the prompt.
        executor (`CallRunner`): Runs the rollout's calls.
    """

    schemas: tuple[dict[str, Any], ...]
    executor: CallRunner


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
    scheduling: str = "trajectory",
    tool_loop: ToolLoopConfig | None = None,
    rollout_tools: Sequence[RolloutTools] | None = None,
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
        scheduling (`str`, *optional*, defaults to `"trajectory"`): `"trajectory"` samples a rollout's next turn as
            soon as its own calls are back (with the rollouts ready then), `"turn"` waits for every rollout's calls;
            see `ToolLoopConfig.scheduling`.
        tool_loop (`ToolLoopConfig`, *optional*): All the settings above at once (`max_tool_turns`, `stop_tools`,
            `tool_timeout`, `tool_isolation`, `tool_memory_limit`, `max_tool_output_chars`, `reuse_kv`,
            `scheduling`); passing it
            together with any of those keyword arguments raises a `TypeError` naming them.
        rollout_tools (`Sequence[RolloutTools]`, *optional*): One per prompt: that rollout's own tools (described in
            its prompt) and the executor of its calls, e.g. its environment instance's methods. Replaces `tools`,
            `functions` and `tool_executor`. Rollouts with different executors run their calls at the same time.
        **sampling: Sampling arguments for `generate` (temperature, top_p, top_k, seed, ...).

    Returns:
        `list[ToolRollout]`: One per prompt, in order.
    """
    assert tool_loop is not None  # built from the keyword arguments by `takes_tool_loop`
    _check_budget_and_sampling(max_new_tokens, sampling)
    owned: CallRunner | None = None
    if rollout_tools is not None:
        if len(rollout_tools) != len(prompts):
            raise InvalidValueError(f"Got {len(rollout_tools)} `rollout_tools` for {len(prompts)} prompts.")
        per_rollout = [list(r.schemas) for r in rollout_tools]
        executors: list[CallRunner] = [r.executor for r in rollout_tools]
    else:
        schemas = normalize_tools(tools)
        per_rollout = [schemas] * len(prompts)
        shared = tool_executor
        if shared is None:
            shared = owned = tool_loop.build_executor({**tool_functions(tools), **(functions or {})})
        executors = [shared] * len(prompts)
    parser = get_parser(
        inference.tool_parser_type,
        chat_template=getattr(inference.tokenizer, "chat_template", None),
        tool_schemas=_union(per_rollout),
    )
    rollouts = _start_rollouts(inference, prompts, per_rollout, max_new_tokens)
    chat = [not isinstance(p, str) for p in prompts]
    run = _run_by_trajectory if tool_loop.scheduling == "trajectory" else _run_by_turn
    try:
        with inference.multi_turn() if tool_loop.reuse_kv else contextlib.nullcontext():
            run(_Loop(inference, parser, rollouts, executors, chat, tool_loop, sampling))
    finally:
        if owned is not None:
            owned.close()
    for rollout in rollouts:
        rollout.text = inference.decode(rollout.completion_ids)
    return rollouts


@dataclass
class _Loop:
    """What both schedules work on: the rollouts, their executors and the loop's settings."""

    inference: InferenceModule
    parser: ToolParser
    rollouts: list[ToolRollout]
    executors: list[CallRunner]
    chat: list[bool]
    tool_loop: ToolLoopConfig
    sampling: dict[str, Any]

    def sample(self, indices: list[int], share_prompts: bool) -> list[_ModelTurn]:
        """The next model turn of the rollouts at `indices`, sampled in one batch."""
        return _sample_turn(
            self.inference, self.parser, [self.rollouts[i] for i in indices], share_prompts, self.sampling
        )

    def end_turn(self, i: int, turn: _ModelTurn, last_turn: bool) -> None:
        """Records rollout `i`'s turn and finishes it or shows it its tool results."""
        _end_turn(self.rollouts[i], turn, self.inference, self.chat[i], self.tool_loop.stop_tools, last_turn)


def _run_by_turn(loop: _Loop) -> None:
    """Turn by turn: sample every running rollout, run all their calls together, show the results, repeat."""
    for turn in range(loop.tool_loop.max_tool_turns + 1):
        active = [i for i, rollout in enumerate(loop.rollouts) if not rollout.finished]
        if not active:
            break
        # First turn: identical consecutive prompts (GRPO's repeats) share one prefill and KV cache.
        model_turns = loop.sample(active, turn == 0)
        _execute_together([loop.executors[i] for i in active], model_turns)
        for i, model_turn in zip(active, model_turns):
            loop.end_turn(i, model_turn, turn == loop.tool_loop.max_tool_turns)


def _run_by_trajectory(loop: _Loop) -> None:
    """Each rollout at its own pace: the rollouts ready now (no call of theirs running) are sampled together; their
    calls start at once, in background threads, and each rollout is ready again as soon as its own calls are back.

    Calls sampled in one batch that share an executor run together (one `run`, one deadline); a shared executor
    takes one batch's calls at a time (a lock per executor), an environment instance only its own rollout's.
    Generation stays in this thread. A rollout that waits on its tools misses the next `generate` call, so on the
    Hugging Face backend its KV cache is not kept for it (`InferenceModule.multi_turn`): its next turn prefills its
    context again.
    """
    turns = [0] * len(loop.rollouts)
    ready = [i for i, rollout in enumerate(loop.rollouts) if not rollout.finished]
    first = True
    running: dict[Future[None], list[tuple[int, _ModelTurn]]] = {}
    locks: dict[int, threading.Lock] = {}
    with ThreadPoolExecutor(max_workers=max(1, len(loop.rollouts)), thread_name_prefix="tool-turn") as pool:
        while ready or running:  # every pass samples at least one rollout or collects at least one result
            if ready:
                groups: dict[int, list[tuple[int, _ModelTurn]]] = {}
                for i, model_turn in zip(ready, loop.sample(ready, first)):
                    if model_turn.calls:
                        groups.setdefault(id(loop.executors[i]), []).append((i, model_turn))
                    else:  # nothing to run: it ends now
                        loop.end_turn(i, model_turn, True)
                for members in groups.values():
                    executor = loop.executors[members[0][0]]
                    lock = locks.setdefault(id(executor), threading.Lock())
                    running[pool.submit(_run_calls, executor, [t for _, t in members], lock)] = members
                ready, first = [], False
            done, _ = wait(running, return_when=FIRST_COMPLETED) if running else (set(), set())
            for future in done:
                future.result()  # a failure of the loop itself (not of a tool) propagates
                for i, model_turn in running.pop(future):
                    loop.end_turn(i, model_turn, turns[i] == loop.tool_loop.max_tool_turns)
                    turns[i] += 1
                    if not loop.rollouts[i].finished:
                        ready.append(i)


def _run_calls(
    executor: CallRunner, turns: list[_ModelTurn], lock: contextlib.AbstractContextManager[Any] | None = None
) -> None:
    """Runs the calls of `turns` on `executor` in one `run` (under `lock`: one `run` at a time per executor, when
    several threads share it) and stores each turn's results."""
    with lock if lock is not None else contextlib.nullcontext():
        results = iter(executor.run([call for turn in turns for call in turn.calls]))
    for turn in turns:
        turn.results = [next(results) for _ in turn.calls]


def _check_budget_and_sampling(max_new_tokens: int, sampling: dict[str, Any]) -> None:
    """Refuses a token budget below 1 and the `generate` arguments the loop sets itself."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InvalidValueError(f"`max_new_tokens` must be an int >= 1, got {max_new_tokens!r}.")
    for forbidden in ("num_return_sequences", "return_logprobs", "max_new_tokens"):
        if forbidden in sampling:
            raise InvalidTypeError(f"`{forbidden}` is set by the tool loop; pass prompts once per rollout instead.")


def _union(per_rollout: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Every rollout's tool schemas, each name once (the parser converts arguments by them)."""
    seen: dict[str, dict[str, Any]] = {}
    for schemas in per_rollout:
        for schema in schemas:
            seen.setdefault(schema["function"]["name"], schema)
    return list(seen.values())


def _start_rollouts(
    inference: InferenceModule, prompts: Sequence[Any], schemas: list[list[dict[str, Any]]], max_new_tokens: int
) -> list[ToolRollout]:
    """One empty rollout per prompt, its prompt rendered with its tools (`build_tool_prompt`) and encoded."""
    texts = [
        build_tool_prompt(
            inference.tokenizer,
            p if isinstance(p, str) else list(p),
            tools,
            inference.tool_parser_type,
            chat_template_kwargs=inference.chat_template_kwargs,
        )
        for p, tools in zip(prompts, schemas)
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


def _execute_together(executors: list[CallRunner], turns: list[_ModelTurn]) -> None:
    """Runs the calls of every turn at once, within one deadline however many calls hang, and stores the results.

    Turns that share an executor send it their calls together; different executors (one environment instance per
    rollout) run in parallel threads, each within its own deadline.
    """
    groups: dict[int, tuple[CallRunner, list[_ModelTurn]]] = {}
    for executor, turn in zip(executors, turns):
        if turn.calls:
            groups.setdefault(id(executor), (executor, []))[1].append(turn)
    if len(groups) <= 1:
        for executor, members in groups.values():
            _run_calls(executor, members)
        return
    threads = [threading.Thread(target=_run_calls, args=group, daemon=True) for group in groups.values()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()  # each executor enforces its own deadline


def _end_turn(
    rollout: ToolRollout,
    turn: _ModelTurn,
    inference: InferenceModule,
    chat: bool,
    stop_tools: Sequence[str],
    last_turn: bool,
) -> None:
    """Records a model turn's calls and results, then finishes the rollout or shows it the results (next turn)."""
    rollout.add_tool_calls(turn.calls, turn.results)
    reason = _exit_reason(turn, stop_tools, last_turn)
    if reason is not None:
        rollout.finish(reason)
    else:
        ids = _tool_message_ids(inference.tokenizer, turn, chat, inference.chat_template_kwargs)
        rollout.add_environment_turn(ids)


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


def _tool_message_ids(
    tokenizer: Any, turn: _ModelTurn, chat: bool, chat_template_kwargs: dict[str, Any] | None = None
) -> list[int]:
    """The tokens that show a turn's tool results and open the next model turn (closing the model's turn first),
    rendered with the module's `chat_template_kwargs`."""
    messages = [{"role": "tool", "name": r.name, "content": r.content} for r in turn.results]
    text, needs_eos = tool_results_text(tokenizer, messages, chat, chat_template_kwargs=chat_template_kwargs)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    eos = tokenizer.eos_token_id
    if needs_eos and eos is not None and turn.token_ids[-1:] != [eos]:
        ids = [eos, *ids]
    return ids
