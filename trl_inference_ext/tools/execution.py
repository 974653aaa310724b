"""Executing parsed tool calls: sync or async callables, per-call timeout, errors reported to the model."""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..types import ToolCall

MAX_OUTPUT_CHARS = 16_384
"""Tool outputs longer than this are truncated before they are shown to the model."""


@dataclass
class ToolResult:
    """The outcome of one tool call.

    Attributes:
        name (`str`): Tool name as called.
        arguments (`dict`): Arguments as parsed.
        content (`str`): What the model sees (the output, or an error message).
        ok (`bool`): Whether the tool ran and returned.
        error (`str`, *optional*): Why it failed: `"invalid_call"`, `"unknown_tool"`, `"timeout"` or `"exception"`.
    """

    name: str
    arguments: dict[str, Any]
    content: str
    ok: bool
    error: str | None = None


def _to_text(value: Any) -> str:
    if isinstance(value, str):
        text = value
    else:
        try:
            text = json.dumps(value, ensure_ascii=False, default=str)
        except (TypeError, ValueError):
            text = str(value)
    return text if len(text) <= MAX_OUTPUT_CHARS else text[:MAX_OUTPUT_CHARS] + "…[truncated]"


def _invoke(fn: Callable[..., Any], arguments: dict[str, Any], timeout: float) -> Any:
    if inspect.iscoroutinefunction(fn):
        return asyncio.run(asyncio.wait_for(fn(**arguments), timeout))
    return fn(**arguments)


class ToolExecutor:
    """Runs tool calls concurrently in a thread pool, each with a timeout.

    A sync tool that overruns its timeout is reported as failed; its thread cannot be interrupted and finishes in
    the background, so tools should bound their own work.

    Args:
        functions (`dict[str, Callable]`): Tool implementations by name.
        timeout (`float`, *optional*, defaults to 10.0): Seconds allowed per call.
        max_workers (`int`, *optional*, defaults to 8): Concurrent calls.
    """

    def __init__(self, functions: dict[str, Callable[..., Any]], timeout: float = 10.0, max_workers: int = 8) -> None:
        if timeout <= 0:
            raise ValueError(f"`tool_timeout` must be > 0, got {timeout}.")
        self.functions = dict(functions)
        self.timeout = timeout
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="tool")

    def run(self, calls: list[ToolCall]) -> list[ToolResult]:
        """Executes `calls` (malformed ones become error results) and returns results in the same order."""
        futures: dict[int, concurrent.futures.Future[Any]] = {}
        results: dict[int, ToolResult] = {}
        for i, call in enumerate(calls):
            if not call.ok:
                results[i] = ToolResult(
                    call.name,
                    call.arguments,
                    f"Error: malformed tool call ({call.status}): {call.error}",
                    False,
                    "invalid_call",
                )
            elif call.name not in self.functions:
                known = ", ".join(sorted(self.functions)) or "none"
                results[i] = ToolResult(
                    call.name,
                    call.arguments,
                    f"Error: unknown tool {call.name!r}. Available tools: {known}.",
                    False,
                    "unknown_tool",
                )
            else:
                futures[i] = self._pool.submit(_invoke, self.functions[call.name], call.arguments, self.timeout)
        for i, future in futures.items():
            call = calls[i]
            try:
                value = future.result(timeout=self.timeout)
                results[i] = ToolResult(call.name, call.arguments, _to_text(value), True)
            except (concurrent.futures.TimeoutError, asyncio.TimeoutError):
                results[i] = ToolResult(
                    call.name,
                    call.arguments,
                    f"Error: tool {call.name!r} timed out after {self.timeout}s.",
                    False,
                    "timeout",
                )
            except Exception as err:  # the model sees the error instead of the training run crashing
                results[i] = ToolResult(
                    call.name, call.arguments, f"Error: {type(err).__name__}: {err}", False, "exception"
                )
        return [results[i] for i in range(len(calls))]

    def close(self) -> None:
        """Shuts the thread pool down without waiting for overrunning calls."""
        self._pool.shutdown(wait=False, cancel_futures=True)
