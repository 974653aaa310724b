"""One tool call turned into text, and the worker process that runs calls for `isolation.ToolProcessPool` (a table
of tools) or for `environment_host.EnvironmentProcess` (one environment instance, whose state lives here).

This module uses the standard library only. The pool runs it by path in a spawned interpreter (see
`isolation.py`), so a worker imports the modules its tools live in and nothing else: importing the
`trl_inference_ext` package would pull torch into every worker. The thread executor imports the same helpers, so
both isolations turn values and errors into text the same way.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import multiprocessing.connection
import os
import pickle
import signal
import threading
from collections.abc import Awaitable, Callable
from typing import Any

try:
    import resource
except ImportError:  # not on Windows; memory caps need it
    resource = None  # type: ignore[assignment]

RUN_NAME = "__trl_inference_ext_tool_worker__"
"""`__name__` the pool runs this file under; the block at the end serves only then."""

TRUNCATION_MARK = "…[truncated]"

Outcome = tuple[str | None, str]
"""`(None, output text)` for a call that returned, else `(error kind, detail)`."""

ENVIRONMENT = "environment"
"""First item of the payload `(ENVIRONMENT, factory, methods)` that makes a worker host one environment instance."""


class EnvironmentMethods(dict[str, Callable[..., Any]]):
    """The methods of one environment instance that a worker may call, by name (a tool table for `serve`).

    `reset` returning `None` (nothing to add to the prompt) is sent as an empty observation.
    """

    def __init__(self, instance: Any, names: list[str]) -> None:
        super().__init__({name: getattr(instance, name) for name in names if callable(getattr(instance, name, None))})
        reset = self.get("reset")
        if reset is not None:

            def reset_observation(**row: Any) -> Any:
                value = reset(**row)
                return "" if value is None else value

            self["reset"] = reset_observation


def truncate(text: str, limit: int) -> str:
    """`text` cut to `limit` characters, with a mark when it was cut."""
    return text if len(text) <= limit else text[:limit] + TRUNCATION_MARK


def to_text(value: Any, limit: int) -> str:
    """A tool's return value as the text the model sees: strings as they are, the rest as JSON, cut to `limit`."""
    if isinstance(value, str):
        return truncate(value, limit)
    try:
        text = json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        text = str(value)
    return truncate(text, limit)


async def _bounded(awaitable: Awaitable[Any], timeout: float | None) -> Any:
    return await asyncio.wait_for(awaitable, timeout)


def outcome(fn: Callable[..., Any], arguments: dict[str, Any], timeout: float | None, limit: int) -> Outcome:
    """Calls `fn(**arguments)` and never raises.

    Async tools (and awaitables a sync tool returns) run in a fresh event loop and are cancelled after `timeout`
    seconds. A sync tool is not interrupted: its caller enforces the deadline.

    Returns:
        `Outcome`: `(None, output text)` on success, else `(kind, detail)` with kind `"timeout"`, `"memory"` or
        `"exception"` (detail `"ErrorType: message"`), the text cut to `limit` characters.
    """
    try:
        value = fn(**arguments)
        if inspect.isawaitable(value):
            value = asyncio.run(_bounded(value, timeout))
        return None, to_text(value, limit)
    except MemoryError:
        return "memory", ""
    except (asyncio.TimeoutError, TimeoutError):
        return "timeout", ""
    except BaseException as err:  # SystemExit too: whatever a tool raises is reported, never propagated
        return "exception", truncate(f"{type(err).__name__}: {err}", limit)


def address_space_bytes() -> int:
    """This process's virtual memory size (Linux `/proc`), 0 where it cannot be read."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _limit_address_space(extra_bytes: int) -> None:
    if resource is None:
        return
    limit = address_space_bytes() + extra_bytes
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))  # hard too, so a tool cannot raise it again


def _exit_with_parent() -> None:
    """Ends this process when the trainer's process is gone, even while a tool hangs (a daemon thread watches)."""
    parent = multiprocessing.parent_process()
    if parent is None or parent.sentinel is None:
        return
    sentinel = parent.sentinel

    def watch() -> None:
        multiprocessing.connection.wait([sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _send(conn: multiprocessing.connection.Connection, message: dict[str, Any]) -> None:
    conn.send_bytes(json.dumps(message, ensure_ascii=False).encode())


def serve(
    conn: multiprocessing.connection.Connection, payload: bytes, memory_limit: int | None, max_output_chars: int
) -> None:
    """Worker main: loads the tools, reports readiness, then runs one call at a time until the pipe closes.

    Requests are pickled `(name, arguments, timeout)` tuples from the pool (the trusted side). Replies are JSON, so
    the trainer's process never unpickles anything a tool produced, and at most `max_output_chars` characters of
    text cross the pipe.

    Args:
        conn (`Connection`): This worker's end of its pipe to the pool.
        payload (`bytes`): The pickled `{name: callable}` tool table, or `(ENVIRONMENT, factory, method names)`: the
            worker then builds one instance with `factory()` (its failure is reported as not ready) and serves its
            methods.
        memory_limit (`int`, *optional*): Bytes of address space calls may add to this process once the tools are
            loaded (`RLIMIT_AS`); `None` for no cap.
        max_output_chars (`int`): Longest text sent back per call.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the trainer, which then closes its workers
    if hasattr(os, "setsid"):
        os.setsid()  # own process group: killing this worker kills whatever its tools started
    try:
        functions = pickle.loads(payload)
        if isinstance(functions, tuple) and functions[:1] == (ENVIRONMENT,):
            _, factory, names = functions
            functions = EnvironmentMethods(factory(), names)
    except BaseException as err:
        _send(conn, {"ready": False, "error": truncate(f"{type(err).__name__}: {err}", max_output_chars)})
        return
    _exit_with_parent()
    if resource is not None:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # crashes are expected here: no core files
    if memory_limit is not None:
        _limit_address_space(memory_limit)
    _send(conn, {"ready": True})
    while True:  # ends when the pool closes its end of the pipe or kills this process
        try:
            name, arguments, timeout = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return
        fn = functions.get(name)
        kind, text = (
            ("exception", f"no method {name!r}") if fn is None else outcome(fn, arguments, timeout, max_output_chars)
        )
        try:
            _send(conn, {"kind": kind, "content": text})
        except MemoryError:
            _send(conn, {"kind": "memory", "content": ""})


if __name__ == RUN_NAME:
    serve(**globals()["worker_arguments"])
