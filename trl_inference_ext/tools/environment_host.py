"""Where environment instances live: one worker process each (by default), or the trainer's own process.

Environment methods run with model-chosen arguments, like tools, so by default each instance lives in its own
spawned worker process (`worker.py`, the same worker that runs tools): its state persists across the turns of its
rollout and never reaches another rollout's instance; a method that hangs past its deadline, crashes the interpreter
or exceeds the memory cap gets its worker killed, the rollout sees an error result, and the instance is replaced for
later rollouts. `EnvironmentPool` bounds the number of live instances, reuses instances across rollouts (each
rollout starts with `reset`), and closes every instance (calling its `close()` when it has one) when it is closed,
at the latest at interpreter exit.
"""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing
import multiprocessing.connection
import pickle
import threading
import time
import weakref
from typing import Any, Protocol

from ..errors import InvalidValueError, OperationError
from ..types import ToolCall
from .environments import EnvironmentSpec
from .execution import ToolExecutor, ToolResult, invalid_call_result, tool_result
from .isolation import STARTUP_TIMEOUT, Worker, describe_exit, kill, receive, reply_limit, reply_outcome, start_worker
from .worker import ENVIRONMENT, EnvironmentMethods, Outcome, outcome

ENVIRONMENT_ISOLATIONS = ("process", "thread")
CLOSE_TIMEOUT = 5.0
"""Seconds an instance's `close()` may take before its worker is killed anyway."""


class EnvironmentHost(Protocol):
    """One live environment instance."""

    spec: EnvironmentSpec
    alive: bool
    """False once the instance was lost (killed at a deadline, crashed): it serves no further call."""

    def call(self, name: str, arguments: dict[str, Any], timeout: float) -> Outcome:
        """Calls method `name` with `arguments` within `timeout` seconds; never raises."""
        ...

    def close(self) -> None:
        """Calls the instance's `close()` (when it has one) and releases it."""
        ...


class InProcessEnvironment:
    """An instance in the trainer's process (`environment_isolation="thread"`): any factory works, but a method that
    overruns is only abandoned (the instance is then retired) and a crash takes the trainer with it."""

    def __init__(self, spec: EnvironmentSpec, max_output_chars: int) -> None:
        self.spec = spec
        self.max_output_chars = max_output_chars
        self.instance = spec.factory()
        self.methods = EnvironmentMethods(self.instance, spec.methods)  # the table a worker process serves
        self.alive = True

    def call(self, name: str, arguments: dict[str, Any], timeout: float) -> Outcome:
        if not self.alive:
            return "crashed", "the environment instance was lost earlier in this rollout"
        method = self.methods.get(name)
        if method is None:
            return "exception", f"no method {name!r}"
        box: list[Outcome] = []
        thread = threading.Thread(
            target=lambda: box.append(outcome(method, arguments, timeout, self.max_output_chars)),
            name="environment",
            daemon=True,
        )
        thread.start()
        thread.join(timeout)
        if not box:
            self.alive = False  # its thread may still change the state: never reuse it
            return "timeout", ""
        return box[0]

    def close(self) -> None:
        if self.spec.has_close and self.alive:
            self.call("close", {}, CLOSE_TIMEOUT)
        self.alive = False


class EnvironmentProcess:
    """An instance in its own spawned worker process, built there by the factory (which travels by pickle)."""

    def __init__(self, spec: EnvironmentSpec, context: Any, memory_limit: int | None, max_output_chars: int) -> None:
        self.spec = spec
        self.max_output_chars = max_output_chars
        self._max_reply_bytes = reply_limit(max_output_chars)
        payload = pickle.dumps((ENVIRONMENT, spec.factory, spec.methods))
        self.worker: Worker = start_worker(context, payload, memory_limit, max_output_chars)
        self.alive = True

    def _receive(self, timeout: float) -> dict[str, Any] | str:
        """The worker's next message within `timeout`, else `"timeout"` (it ran late) or `"crashed"` (it died or
        broke the protocol)."""
        fired = multiprocessing.connection.wait([self.worker.conn, self.worker.process.sentinel], timeout)
        if not fired:
            return "timeout"
        if self.worker.conn not in fired:
            return "crashed"
        return receive(self.worker.conn, self._max_reply_bytes) or "crashed"

    def _ensure_ready(self) -> Outcome | None:
        if self.worker.ready:
            return None
        message = self._receive(STARTUP_TIMEOUT)
        if isinstance(message, dict) and message.get("ready") is True:
            self.worker.ready = True
            return None
        detail = message.get("error") if isinstance(message, dict) else describe_exit(self.worker.process)
        self._lose()
        return "crashed", f"the environment could not be built in its worker process: {detail}"

    def call(self, name: str, arguments: dict[str, Any], timeout: float) -> Outcome:
        if not self.alive:
            return "crashed", "the environment instance was lost earlier in this rollout"
        failure = self._ensure_ready()
        if failure is not None:
            return failure
        try:
            self.worker.conn.send_bytes(pickle.dumps((name, arguments, timeout)))
        except Exception as err:  # unpicklable arguments, or a dead pipe
            if isinstance(err, OSError):
                self._lose()
                return "crashed", describe_exit(self.worker.process)
            return "exception", f"arguments cannot be sent to the environment: {type(err).__name__}: {err}"
        message = self._receive(timeout)
        if not isinstance(message, dict):
            self._lose()
            return ("timeout", "") if message == "timeout" else ("crashed", describe_exit(self.worker.process))
        if message.get("kind") == "memory":
            self._lose()  # the heap may be in a poor state: the instance is not reused
        return reply_outcome(message, self.max_output_chars)

    def _lose(self) -> None:
        self.alive = False
        kill(self.worker.process)
        self.worker.process.join(CLOSE_TIMEOUT)
        self.worker.conn.close()

    def close(self) -> None:
        if self.alive and self.spec.has_close and self.worker.ready:
            self.call("close", {}, CLOSE_TIMEOUT)
        if self.alive:
            self._lose()


class EnvironmentPool:
    """Live environment instances, at most `max_instances`, reused across rollouts and closed together.

    Args:
        specs (`dict`): The environments, by name (`environment_specs`).
        isolation (`str`, *optional*, defaults to `"process"`): `"process"` (one worker process per instance) or
            `"thread"` (instances in this process).
        max_instances (`int`, *optional*, defaults to 64): Most live instances (idle ones included).
        memory_limit (`int`, *optional*): Bytes of address space an instance's worker may add once built.
        max_output_chars (`int`, *optional*, defaults to 16384): Longest method output shown to the model.
    """

    def __init__(
        self,
        specs: dict[str | None, EnvironmentSpec],
        *,
        isolation: str = "process",
        max_instances: int = 64,
        memory_limit: int | None = None,
        max_output_chars: int = 16_384,
    ) -> None:
        if isolation not in ENVIRONMENT_ISOLATIONS:
            raise InvalidValueError(
                f"`environment_isolation` must be one of {list(ENVIRONMENT_ISOLATIONS)}, got {isolation!r}."
            )
        if isinstance(max_instances, bool) or not isinstance(max_instances, int) or max_instances < 1:
            raise InvalidValueError(f"`max_environments` must be an int >= 1, got {max_instances!r}.")
        if isolation == "process":
            for spec in specs.values():
                spec.check_sendable()
        elif memory_limit is not None:
            raise InvalidValueError(
                "`tool_memory_limit` caps environments only with `environment_isolation='process'`."
            )
        self.specs = specs
        self.isolation = isolation
        self.max_instances = max_instances
        self.memory_limit = memory_limit
        self.max_output_chars = max_output_chars
        self._context = multiprocessing.get_context("spawn")
        self._idle: list[EnvironmentHost] = []
        self._leased: list[EnvironmentHost] = []
        self._finalizer = weakref.finalize(self, _close_all, self._idle, self._leased)
        self._finalizer.atexit = False
        atexit.register(self._finalizer)

    @property
    def live(self) -> int:
        """Instances alive now, idle or in use."""
        return len(self._idle) + len(self._leased)

    def acquire(self, name: str | None) -> EnvironmentHost:
        """An instance of environment `name` for one rollout: an idle one, else a new one (the oldest idle instance
        of another environment is closed first when the pool is full).

        Raises:
            OperationError: If `max_instances` are all in use, or the pool is closed.
        """
        if not self._finalizer.alive:
            raise OperationError("The environment pool is closed.")
        for idle in self._idle:
            if idle.spec.name == name:
                self._idle.remove(idle)
                self._leased.append(idle)
                return idle
        if self.live >= self.max_instances and self._idle:
            self._idle.pop(0).close()
        if self.live >= self.max_instances:
            raise OperationError(
                f"One batch needs more than `max_environments={self.max_instances}` live environment instances; "
                "raise it (each instance is a worker process with `environment_isolation='process'`) or generate "
                "fewer rollouts per process."
            )
        spec = self.specs[name]
        if self.isolation == "process":
            host: EnvironmentHost = EnvironmentProcess(spec, self._context, self.memory_limit, self.max_output_chars)
        else:
            host = InProcessEnvironment(spec, self.max_output_chars)
        self._leased.append(host)
        return host

    def release(self, host: EnvironmentHost) -> None:
        """Takes an instance back: kept for a later rollout while alive, else closed."""
        with contextlib.suppress(ValueError):
            self._leased.remove(host)
        if host.alive and self._finalizer.alive:
            self._idle.append(host)
        else:
            host.close()

    def close(self) -> None:
        """Closes every instance (their `close()` first); the pool cannot be used afterwards."""
        self._finalizer()
        atexit.unregister(self._finalizer)


def _close_all(*groups: list[EnvironmentHost]) -> None:
    for group in groups:
        while group:
            with contextlib.suppress(Exception):  # closing must reach every instance, whatever one does
                group.pop().close()


class EnvironmentExecutor:
    """Runs one rollout's tool calls: its environment's methods on its instance (one after another, in the order
    the model wrote them, since they share its state) and other tools on a shared `ToolExecutor`, all within one
    deadline per turn.

    Args:
        host (`EnvironmentHost`): The rollout's instance.
        tools (`ToolExecutor`, *optional*): Runs the standalone tools (those not bound to the environment).
        timeout (`float`): Seconds allowed for all the calls of one turn.
    """

    def __init__(self, host: EnvironmentHost, tools: ToolExecutor | None, timeout: float) -> None:
        self.host = host
        self.tools = tools
        self.timeout = timeout

    def close(self) -> None:
        """Nothing to release: the instance belongs to its `EnvironmentPool`."""

    @property
    def tool_names(self) -> list[str]:
        """Every name the model may call in this rollout."""
        return [*self.host.spec.tools, *(self.tools.functions if self.tools else {})]

    def run(self, calls: list[ToolCall]) -> list[ToolResult]:
        """Executes `calls` in order and returns one result per call."""
        deadline = time.monotonic() + self.timeout
        known = self.tool_names
        results = []
        for call in calls:
            invalid = invalid_call_result(call, known)
            if invalid is not None:
                results.append(invalid)
            elif call.name in self.host.spec.tools:
                left = max(0.0, deadline - time.monotonic())
                lost_or_in_time = left > 0 or not self.host.alive  # a lost instance says so, whatever the time
                kind, text = self.host.call(call.name, call.arguments, left) if lost_or_in_time else ("timeout", "")
                results.append(tool_result(call, kind, text, self.timeout))
            else:
                assert self.tools is not None
                results.extend(self.tools.run([call]))
        return results
