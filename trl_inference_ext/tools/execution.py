"""Executing parsed tool calls: one deadline per turn, worker processes by default, every failure shown to the model.

Tool arguments are chosen by the model, so this is the security boundary of a tool-using RL run: whatever a tool does
(hang, raise, exit, crash the interpreter, exhaust memory, return megabytes) becomes a `ToolResult` with `ok=False`
or a truncated output, and the batch goes on.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidValueError
from ..types import ToolCall
from .isolation import ToolProcessPool
from .worker import Outcome, outcome

MAX_OUTPUT_CHARS = 16_384
"""Default longest tool output shown to the model; longer outputs are truncated."""

ISOLATIONS = ("process", "thread")


@dataclass
class ToolResult:
    """The outcome of one tool call.

    Attributes:
        name (`str`): Tool name as called.
        arguments (`dict`): Arguments as parsed.
        content (`str`): What the model sees (the output, or an error message).
        ok (`bool`): Whether the tool ran and returned.
        error (`str`, *optional*): Why it failed: `"invalid_call"`, `"unknown_tool"`, `"timeout"`, `"exception"`,
            `"crashed"` (its worker process died: segfault, `os._exit`, killed) or `"memory"` (out of memory).
    """

    name: str
    arguments: dict[str, Any]
    content: str
    ok: bool
    error: str | None = None


def tool_result(
    call: ToolCall, kind: str | None, text: str, timeout: float, memory_limit: int | None = None
) -> ToolResult:
    """The `ToolResult` of a call's outcome `(kind, text)`: the output, or the error message the model sees.

    Args:
        call (`ToolCall`): The call.
        kind (`str`, *optional*): `None` when it returned, else the error kind (`"timeout"`, `"memory"`,
            `"crashed"`, `"exception"`, ...).
        text (`str`): The output, or the error's detail.
        timeout (`float`): The deadline it had, for the timeout message.
        memory_limit (`int`, *optional*): Its memory cap in bytes, for the out-of-memory message.
    """
    if kind is None:
        return ToolResult(call.name, call.arguments, text, True)
    if kind == "timeout":
        message = f"Error: tool {call.name!r} timed out after {timeout:g}s."
    elif kind == "memory":
        cap = f" (limit {memory_limit} bytes)" if memory_limit else ""
        message = f"Error: tool {call.name!r} ran out of memory{cap}."
    elif kind == "crashed":
        message = f"Error: tool {call.name!r} crashed: {text}."
    else:
        message = f"Error: {text}"
    return ToolResult(call.name, call.arguments, message, False, kind)


def invalid_call_result(call: ToolCall, known: list[str]) -> ToolResult | None:
    """The error result of a call that cannot run (malformed, or naming no tool in `known`), else `None`."""
    if not call.ok:
        message = f"Error: malformed tool call ({call.status}): {call.error}"
        return ToolResult(call.name, call.arguments, message, False, "invalid_call")
    if call.name not in known:
        message = f"Error: unknown tool {call.name!r}. Available tools: {', '.join(sorted(known)) or 'none'}."
        return ToolResult(call.name, call.arguments, message, False, "unknown_tool")
    return None


class ToolExecutor:
    """Runs the tool calls of one turn concurrently, all within one deadline.

    With `isolation="process"` (the default) each call runs in a worker process (a fresh `spawn`ed interpreter,
    see `trl_inference_ext.tools.isolation`). A call still running at the deadline has its worker killed and replaced;
    a worker that crashes or runs out of memory is replaced too, and the call's result says what happened. Tools must
    then be importable: functions defined at the top level of a module, not lambdas or closures (a `TypeError` at
    construction says which tool is not). This is the default because the arguments are model output: the trainer's
    process is protected from any input a tool mishandles.

    With `isolation="thread"` calls run in daemon threads of this process: any callable works and there is no
    process start, but a call that overruns is only abandoned (its thread runs on; async tools are cancelled), and a
    tool that crashes the interpreter or exhausts memory takes the training run with it. Use it for trusted, cheap
    tools or tools that cannot be pickled.

    Async tools run in a fresh event loop per call in both modes.

    Args:
        functions (`dict[str, Callable]`): Tool implementations by name.
        timeout (`float`, *optional*, defaults to 10.0): Seconds allowed for all the calls of one `run` together.
        max_workers (`int`, *optional*, defaults to 8): Calls run at the same time (worker processes or threads).
        isolation (`str`, *optional*, defaults to `"process"`): `"process"` or `"thread"`.
        memory_limit (`int`, *optional*): With `isolation="process"`, bytes of address space one call may add to its
            worker (`RLIMIT_AS`, counted from the worker's size once its tools are imported; Linux). A call that goes
            over gets a `"memory"` error. `None` for no cap.
        max_output_chars (`int`, *optional*, defaults to `MAX_OUTPUT_CHARS`): Longest output shown to the model;
            with processes this also bounds what a worker may send back.

    Example:
        ```python
        from trl_inference_ext.tasks.arithmetic import calculator

        with ToolExecutor({"calculator": calculator}, timeout=5, memory_limit=256 * 2**20) as executor:
            (result,) = executor.run([ToolCall("calculator", {"expression": "6 * 7"}, "", 0, 0)])
        assert result.content == "42"
        ```
    """

    def __init__(
        self,
        functions: dict[str, Callable[..., Any]],
        timeout: float = 10.0,
        max_workers: int = 8,
        *,
        isolation: str = "process",
        memory_limit: int | None = None,
        max_output_chars: int = MAX_OUTPUT_CHARS,
    ) -> None:
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise InvalidValueError(f"`tool_timeout` must be > 0, got {timeout!r}.")
        if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
            raise InvalidValueError(f"`max_workers` must be an int >= 1, got {max_workers!r}.")
        if isolation not in ISOLATIONS:
            raise InvalidValueError(f"`tool_isolation` must be one of {list(ISOLATIONS)}, got {isolation!r}.")
        if memory_limit is not None:
            if isinstance(memory_limit, bool) or not isinstance(memory_limit, int) or memory_limit < 1:
                raise InvalidValueError(
                    f"`tool_memory_limit` must be a positive number of bytes, got {memory_limit!r}."
                )
            if isolation != "process":
                raise InvalidValueError("`tool_memory_limit` needs `tool_isolation='process'`.")
        if isinstance(max_output_chars, bool) or not isinstance(max_output_chars, int) or max_output_chars < 1:
            raise InvalidValueError(f"`max_tool_output_chars` must be an int >= 1, got {max_output_chars!r}.")
        self.functions = dict(functions)
        self.timeout = float(timeout)
        self.max_workers = max_workers
        self.isolation = isolation
        self.memory_limit = memory_limit
        self.max_output_chars = max_output_chars
        self._processes = (
            ToolProcessPool(
                self.functions, max_workers=max_workers, memory_limit=memory_limit, max_output_chars=max_output_chars
            )
            if isolation == "process"
            else None
        )

    def run(self, calls: list[ToolCall]) -> list[ToolResult]:
        """Executes `calls` (malformed ones become error results) and returns results in the same order.

        All calls share one deadline, `timeout` seconds from the start (with processes, from when the workers are
        ready: a first call, or one after a worker was replaced, may wait for a worker to start).

        Raises:
            RuntimeError: With processes, if a worker cannot import the tools.
        """
        results: list[ToolResult | None] = [None] * len(calls)
        runnable: list[int] = []
        for i, call in enumerate(calls):
            results[i] = invalid_call_result(call, list(self.functions))
            if results[i] is None:
                runnable.append(i)
        jobs = [(calls[i].name, calls[i].arguments) for i in runnable]
        outcomes = self._run_threads(jobs) if self._processes is None else self._processes.run(jobs, self.timeout)
        for i, (kind, text) in zip(runnable, outcomes):
            results[i] = self._result(calls[i], kind, text)
        return [r for r in results if r is not None]

    def _result(self, call: ToolCall, kind: str | None, text: str) -> ToolResult:
        return tool_result(call, kind, text, self.timeout, self.memory_limit)

    def _run_threads(self, jobs: list[tuple[str, dict[str, Any]]]) -> list[Outcome]:
        """Runs jobs on up to `max_workers` daemon threads until the deadline; overrunning threads are abandoned."""
        deadline = time.monotonic() + self.timeout
        outcomes: list[Outcome | None] = [None] * len(jobs)
        queue = collections.deque(range(len(jobs)))
        lock = threading.Lock()

        def work() -> None:
            while True:  # at most len(jobs) iterations
                with lock:
                    if not queue or time.monotonic() >= deadline:
                        return
                    j = queue.popleft()
                name, arguments = jobs[j]
                left = max(0.0, deadline - time.monotonic())
                outcomes[j] = outcome(self.functions[name], arguments, left, self.max_output_chars)

        # Daemon threads, unlike a thread pool's, do not hold up interpreter exit when a tool never returns.
        threads = [
            threading.Thread(target=work, name="tool", daemon=True) for _ in range(min(self.max_workers, len(jobs)))
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with lock:
            queue.clear()  # calls not started by the deadline never start
        return [o if o is not None else ("timeout", "") for o in list(outcomes)]

    def close(self) -> None:
        """Kills and reaps the worker processes (threads that overran cannot be stopped and are left to finish)."""
        if self._processes is not None:
            self._processes.close()

    def __enter__(self) -> ToolExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
