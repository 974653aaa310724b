"""Tool calls in worker processes: killed at the deadline and replaced, so no tool can take the trainer down.

Workers are started with the `spawn` method: a fresh interpreter that inherits nothing from the trainer. `fork`
would copy a process that runs torch (OpenMP, CUDA, NCCL and data-loader threads); a lock held by any of those
threads at the moment of the fork stays locked in the child for ever, and CUDA cannot be used in a forked child at
all. `forkserver` avoids that too but is one server per interpreter, shared with every other library that uses it.
The price of `spawn` is that tools travel by pickle, that is by reference: a tool must be a function defined at the
top level of an importable module (or a picklable callable object). Lambdas, closures, functions defined inside
other functions or in an interactive session (`__main__` without a file) cannot be sent; `dump_functions` says so at
construction. A script's `__main__` is re-imported in each worker, so functions defined at its top level work, the
usual `if __name__ == "__main__":` guard is needed, and tools defined inside that guard are not found.

Each worker runs `worker.py` by path, a standard-library-only module, so it costs an interpreter start, the script's
top-level imports and its tools' own imports, not an import of this package. At most about `6 * max_output_chars`
bytes of JSON come back per call, and nothing a tool returns is unpickled here.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import json
import multiprocessing
import multiprocessing.connection  # imports multiprocessing.util, whose exit handler then runs after ours
import os
import pickle
import runpy
import signal
import sys
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidTypeError, OperationError
from . import worker as _worker_module
from .worker import Outcome

STARTUP_TIMEOUT = 120.0
"""Seconds a new worker may take to start and import its tools, before a turn's deadline starts."""

_JOIN_TIMEOUT = 5.0
_WORKER_PATH = os.path.abspath(_worker_module.__file__ or "")


def dump_functions(functions: dict[str, Callable[..., Any]]) -> bytes:
    """Pickles the tool table for the workers.

    Raises:
        TypeError: Naming the first tool that a spawned worker could not import, with what to do instead.
    """
    main = sys.modules.get("__main__")
    for name, fn in functions.items():
        reason = None
        if getattr(fn, "__module__", None) == "__main__" and not getattr(main, "__file__", None):
            reason = "it is defined in an interactive session, which a new interpreter cannot import"
        else:
            try:
                pickle.dumps(fn)
            except Exception as err:  # PicklingError, AttributeError ("Can't pickle local object"), TypeError
                reason = f"it cannot be pickled ({type(err).__name__}: {err})"
        if reason:
            raise InvalidTypeError(
                f"Tool {name!r} cannot be sent to a worker process: {reason}. With `isolation='process'` a tool must "
                "be a function defined at the top level of an importable module (not a lambda, a closure or a "
                "function defined inside another function) or a picklable callable object. Move it to a module, or "
                "pass `isolation='thread'` (`tool_isolation='thread'`) to run it in the trainer's own process, "
                "without protection against hangs and crashes."
            )
    return pickle.dumps(dict(functions))


@dataclass(eq=False)
class Worker:
    """One spawned worker process and the pool's end of its pipe."""

    process: Any  # multiprocessing.context.SpawnProcess
    conn: multiprocessing.connection.Connection
    ready: bool = False
    job: int | None = None


def start_worker(context: Any, payload: bytes, memory_limit: int | None, max_output_chars: int) -> Worker:
    """Spawns one worker process running `worker.serve` on `payload` (a tool table or an environment)."""
    parent_conn, child_conn = context.Pipe()
    arguments = {
        "conn": child_conn,
        "payload": payload,
        "memory_limit": memory_limit,
        "max_output_chars": max_output_chars,
    }
    # The target is `runpy.run_path` on worker.py rather than a function of this package, which the child would have
    # to import (and with it torch, through the package's `__init__`).
    process = context.Process(
        target=runpy.run_path,
        args=(_WORKER_PATH,),
        kwargs={"init_globals": {"worker_arguments": arguments}, "run_name": _worker_module.RUN_NAME},
        name="tool-worker",
        daemon=True,
    )
    process.start()
    child_conn.close()
    return Worker(process, parent_conn)


def reply_limit(max_output_chars: int) -> int:
    """Most bytes a worker's JSON reply may take: `max_output_chars` characters, each escaped as at most 6 bytes."""
    return 6 * max_output_chars + 1024


def receive(conn: multiprocessing.connection.Connection, limit: int) -> dict[str, Any] | None:
    """A worker's next JSON message (at most `limit` bytes), or `None` when it died or broke the protocol."""
    try:
        message = json.loads(conn.recv_bytes(limit))
    except (EOFError, OSError, ValueError):
        return None
    return message if isinstance(message, dict) else None


def reply_outcome(message: dict[str, Any], max_output_chars: int) -> Outcome:
    """The `Outcome` of a worker's reply to a call: its error kind (only the kinds a worker reports) and its text,
    held to `max_output_chars` (plus the truncation mark)."""
    kind = message.get("kind")
    content = str(message.get("content", ""))[: max_output_chars + len(_worker_module.TRUNCATION_MARK)]
    return (kind if kind in ("timeout", "memory", "exception") else None), content


def describe_exit(process: Any) -> str:
    process.join(_JOIN_TIMEOUT)
    code = process.exitcode
    if code is None:
        return "its worker process stopped answering"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = "; the system may have run out of memory" if -code == signal.SIGKILL else ""
        return f"its worker process was killed by {name}{hint}"
    return f"its worker process exited with code {code}"


def kill(process: Any) -> None:
    # A worker leads its own process group (see `worker.serve`): killing the group ends what its tool started too.
    with contextlib.suppress(OSError):  # not a group leader yet (still starting), or gone
        os.killpg(process.pid, signal.SIGKILL)
    if process.exitcode is None:
        process.kill()


def _stop(workers: list[Worker]) -> None:
    """Kills and reaps `workers`: all the kills first, then the joins, so this waits for one join at most."""
    for w in workers:
        if w.process.exitcode is None:
            kill(w.process)
    for w in workers:
        w.process.join(_JOIN_TIMEOUT)
        w.conn.close()
        if w.process.exitcode is not None:
            w.process.close()
    workers.clear()


class ToolProcessPool:
    """Up to `max_workers` worker processes that run tool calls, one call per worker at a time.

    Workers start on demand and stay for the next calls. A worker whose call overruns the deadline is killed;
    one that crashes, or whose call ran out of memory, is discarded; a replacement starts at once.

    Args:
        functions (`dict[str, Callable]`): Tool implementations by name (see `dump_functions` for what qualifies).
        max_workers (`int`): Most worker processes.
        memory_limit (`int`, *optional*): Bytes of address space a call may add to its worker (`RLIMIT_AS`, set
            once the worker has imported its tools); `None` for no cap. Linux only.
        max_output_chars (`int`): Longest text a call returns.
    """

    def __init__(
        self,
        functions: dict[str, Callable[..., Any]],
        *,
        max_workers: int,
        memory_limit: int | None,
        max_output_chars: int,
    ) -> None:
        self._payload = dump_functions(functions)
        self.max_workers = max_workers
        self.memory_limit = memory_limit
        self.max_output_chars = max_output_chars
        self._max_reply_bytes = reply_limit(max_output_chars)
        self._context = multiprocessing.get_context("spawn")
        self._workers: list[Worker] = []
        # Workers are killed when the pool is closed, collected, or at interpreter exit. This exit handler is
        # registered after multiprocessing's (imported above), so it runs first and multiprocessing finds no child
        # to wait for.
        self._finalizer = weakref.finalize(self, _stop, self._workers)
        self._finalizer.atexit = False
        atexit.register(self._finalizer)

    def _start(self) -> None:
        self._workers.append(start_worker(self._context, self._payload, self.memory_limit, self.max_output_chars))

    def _retire(self, workers: list[Worker], replace: bool = True) -> None:
        """Kills `workers` and, with `replace`, starts as many new ones (they load while the trainer goes on)."""
        count = len(workers)
        for w in workers:
            self._workers.remove(w)
        _stop(list(workers))
        for _ in range(count if replace else 0):
            self._start()

    def _receive(self, w: Worker) -> dict[str, Any] | None:
        """The worker's next message, or `None` when it died or broke the protocol."""
        return receive(w.conn, self._max_reply_bytes)

    def _on_ready_message(self, w: Worker) -> None:
        message = self._receive(w)
        if message is not None and message.get("ready") is True:
            w.ready = True
            return
        detail = message.get("error") if message else describe_exit(w.process)
        self.close()  # a configuration error: every worker would fail the same way
        raise OperationError(
            f"A tool worker could not load the tools: {detail}. A worker is a new interpreter: each tool must be "
            "importable there (defined at the top level of a module on `sys.path`, outside any "
            "`if __name__ == '__main__':` block)."
        )

    def _await_ready(self, count: int, deadline: float) -> None:
        """Waits (until `deadline` at most) for `count` workers to be ready, or for all that are starting."""
        while (
            sum(w.ready for w in self._workers) < count
            and (starting := [w for w in self._workers if not w.ready])
            and (left := deadline - time.monotonic()) > 0
        ):
            handles: list[Any] = [w.conn for w in starting] + [w.process.sentinel for w in starting]
            fired = set(multiprocessing.connection.wait(handles, left))
            for w in starting:
                if w.conn in fired or w.process.sentinel in fired:
                    self._on_ready_message(w)

    def run(self, jobs: list[tuple[str, dict[str, Any]]], timeout: float) -> list[Outcome]:
        """Runs `(name, arguments)` jobs, all within one deadline `timeout` seconds after the workers are ready.

        Raises:
            RuntimeError: If a worker cannot load the tools (a configuration error, not a tool failure).
        """
        outcomes: list[Outcome | None] = [None] * len(jobs)
        if not jobs:
            return []
        if not self._finalizer.alive:
            raise OperationError("The tool executor is closed.")
        for w in [w for w in self._workers if w.process.exitcode is not None]:  # died while idle
            self._retire([w], replace=False)
        wanted = min(self.max_workers, len(jobs))
        while len(self._workers) < wanted:
            self._start()
        self._await_ready(wanted, time.monotonic() + STARTUP_TIMEOUT)

        deadline = time.monotonic() + timeout
        pending = collections.deque(range(len(jobs)))
        try:
            while (pending or self._running()) and (left := deadline - time.monotonic()) > 0:
                for w in list(self._workers):
                    if pending and w.ready and w.job is None:
                        if w.process.exitcode is None:
                            self._dispatch(w, pending.popleft(), jobs, left, outcomes)
                        else:  # died after its last reply
                            self._retire([w])
                watched = [w for w in self._workers if w.job is not None or not w.ready]
                if not watched:
                    break  # nothing running or starting: every job has an outcome
                handles: list[Any] = [w.conn for w in watched] + [w.process.sentinel for w in watched]
                fired = set(multiprocessing.connection.wait(handles, left))
                for w in watched:
                    if w.conn not in fired and w.process.sentinel not in fired:
                        continue
                    if w.ready:
                        self._on_reply(w, outcomes)
                    else:
                        self._on_ready_message(w)
        finally:  # at the deadline, or when interrupted (Ctrl-C): no call may outlive its run
            self._retire(self._running())
        return [outcome if outcome is not None else ("timeout", "") for outcome in outcomes]

    def _running(self) -> list[Worker]:
        return [w for w in self._workers if w.job is not None]

    def _dispatch(
        self, w: Worker, job: int, jobs: list[tuple[str, dict[str, Any]]], left: float, outcomes: list[Outcome | None]
    ) -> None:
        name, arguments = jobs[job]
        try:
            request = pickle.dumps((name, arguments, left))
        except Exception as err:
            outcomes[job] = ("exception", f"arguments cannot be sent to the tool: {type(err).__name__}: {err}")
            return
        try:
            w.conn.send_bytes(request)
        except OSError:
            outcomes[job] = ("crashed", describe_exit(w.process))
            self._retire([w])
            return
        w.job = job

    def _on_reply(self, w: Worker, outcomes: list[Outcome | None]) -> None:
        assert w.job is not None
        message = self._receive(w) if w.conn.poll() else None
        if message is None:
            outcomes[w.job] = ("crashed", describe_exit(w.process))
            self._retire([w])
            return
        outcomes[w.job] = reply_outcome(message, self.max_output_chars)
        w.job = None
        if message.get("kind") == "memory":  # the call may have left the worker's heap in a poor state: start afresh
            self._retire([w])

    def close(self) -> None:
        """Kills and reaps every worker; the pool cannot be used afterwards."""
        self._finalizer()
        atexit.unregister(self._finalizer)
