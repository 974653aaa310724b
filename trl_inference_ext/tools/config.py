"""`ToolLoopConfig`: the settings of the multi-turn tool loop, checked once, in one place.

`rollout_func(tool_loop=...)` and `run_tool_loop(..., tool_loop=...)` take one; their keyword arguments of the same
names (`max_tool_turns=`, `tool_timeout=`, ...) build one, so both ways give the same loop and the same errors.

```python
from trl_inference_ext.tools import ToolLoopConfig
from trl_inference_ext.trl import rollout_func

tool_loop = ToolLoopConfig(max_tool_turns=2, tool_timeout=5.0, tool_memory_limit=256 * 2**20)
rollout = rollout_func(tools=[calculator], tool_loop=tool_loop)
```

This module imports neither torch nor transformers.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ParamSpec, TypeVar

from ..config_checks import Check, check_bool, check_fields, int_at_least, is_int, is_real, one_of
from ..errors import InvalidTypeError, InvalidValueError
from .execution import ISOLATIONS, MAX_OUTPUT_CHARS, ToolExecutor

POSITIVE_SECONDS = Check("a number of seconds > 0", lambda v: is_real(v) and v > 0, convert=float)
"""A timeout: an int or float `> 0` (not a bool, not NaN), stored as a float."""
SCHEDULES = ("trajectory", "turn")
"""How the tool loop schedules turns (see `ToolLoopConfig.scheduling`)."""
MEMORY_BYTES = Check("None or a positive number of bytes (an int >= 1)", lambda v: is_int(v) and v >= 1, optional=True)
"""A memory cap in bytes, or `None` for none."""


def check_tool_names(name: str, value: Any) -> tuple[str, ...]:
    """Tool names: any iterable of strings but a bare string, stored as a tuple."""
    names = tuple(value) if isinstance(value, Iterable) and not isinstance(value, (str, bytes)) else None
    if names is None or not all(isinstance(n, str) for n in names):
        raise InvalidTypeError(f"`{name}` must be a sequence of tool names (strings), got {value!r:.80}.")
    return names


@dataclass(frozen=True, kw_only=True)
class ToolLoopConfig:
    """Settings of the multi-turn tool loop (`run_tool_loop`, `rollout_func(tools=...)`).

    Every value is checked when the config is built: a wrong type or a value out of range raises an
    `InvalidValueError` (a `ValueError`) or `InvalidTypeError` (a `TypeError`) that names the field and what it
    allows. The config is frozen; `dataclasses.replace(config, max_tool_turns=1)` makes a changed, checked copy.

    Parameters:
        > Turns

        max_tool_turns (`int`, *optional*, defaults to `3`):
            Most rounds of tool execution per rollout (`>= 0`; `0` ends every rollout after its first model turn).
        stop_tools (`Sequence[str]`, *optional*, defaults to `()`):
            Tools whose call ends the rollout (the call is executed, its result not shown). Stored as a tuple.

        > Tool execution

        tool_timeout (`float`, *optional*, defaults to `10.0`):
            Seconds (`> 0`) allowed for all the tool calls of one turn: the calls of every rollout in the batch run
            together, within this one deadline.
        tool_isolation (`str`, *optional*, defaults to `"process"`):
            `"process"` runs tools in worker processes, killed at the deadline and replaced, so no tool call can
            hang, crash or exhaust the caller (tools must be importable functions); `"thread"` runs them in threads
            of this process (any callable, no protection). See `ToolExecutor`.
        tool_memory_limit (`int`, *optional*):
            Bytes (`>= 1`) of memory one tool call may add to its worker process; needs `tool_isolation="process"`.
            `None` for no cap.
        max_tool_output_chars (`int`, *optional*, defaults to `MAX_OUTPUT_CHARS`):
            Longest tool output shown to the model (`>= 1`); longer outputs are truncated.

        > Decoding across turns

        reuse_kv (`bool`, *optional*, defaults to `True`):
            Keep each rollout's KV cache from one turn to the next, so a turn runs only the tokens appended since the
            model's last one (`InferenceModule.multi_turn`; a no-op on backends that keep no such caches). `False`
            re-runs each rollout's whole context every turn; both give the same rollouts up to float error.
        scheduling (`str`, *optional*, defaults to `"trajectory"`):
            `"trajectory"`: a rollout's next turn is generated as soon as its own tool results are back, with the
            other rollouts ready at that moment, while slower tools of other rollouts still run (each rollout's
            calls run on its own environment instance, or with those sampled in the same batch on a shared tool
            executor). `"turn"`: every turn waits for the tool calls of all rollouts, as a batch. Both give the same
            kind of rollouts; `"trajectory"` never makes a rollout wait for another's tools.
    """

    max_tool_turns: int = field(
        default=3,
        metadata={"help": "Most rounds of tool execution per rollout (>= 0).", "check": int_at_least(0)},
    )
    stop_tools: Sequence[str] = field(
        default=(),
        metadata={"help": "Tools whose call ends the rollout (executed, result not shown).", "check": check_tool_names},
    )
    tool_timeout: float = field(
        default=10.0,
        metadata={
            "help": "Seconds (> 0) allowed for all the tool calls of one turn, every rollout of the batch together.",
            "check": POSITIVE_SECONDS,
        },
    )
    tool_isolation: str = field(
        default="process",
        metadata={
            "help": "'process' (worker processes, killed at the deadline) or 'thread' (threads of this process).",
            "check": one_of(ISOLATIONS),
        },
    )
    tool_memory_limit: int | None = field(
        default=None,
        metadata={
            "help": "Bytes of memory one tool call may add to its worker process (tool_isolation='process'); None: "
            "no cap.",
            "check": MEMORY_BYTES,
        },
    )
    max_tool_output_chars: int = field(
        default=MAX_OUTPUT_CHARS,
        metadata={"help": "Longest tool output shown to the model (>= 1).", "check": int_at_least(1)},
    )
    reuse_kv: bool = field(
        default=True,
        metadata={
            "help": "Keep each rollout's KV cache across tool turns (prefill only what was appended).",
            "check": check_bool,
        },
    )

    scheduling: str = field(
        default="trajectory",
        metadata={
            "help": "'trajectory' (a rollout's next turn starts when its own tools are done) or 'turn' (every turn "
            "waits for all rollouts' tools).",
            "check": one_of(SCHEDULES),
        },
    )

    def __post_init__(self) -> None:
        check_fields(self)
        if self.tool_memory_limit is not None and self.tool_isolation != "process":
            raise InvalidValueError(
                f"`tool_memory_limit` needs `tool_isolation='process'`, got `tool_isolation={self.tool_isolation!r}`."
            )

    def build_executor(self, functions: dict[str, Callable[..., Any]]) -> ToolExecutor:
        """A `ToolExecutor` for `functions` with this config's timeout, isolation, memory limit and output cap.

        It starts no process yet: with `tool_isolation="process"` the workers start at its first call; `close()` it
        (or use it as a context manager) to stop them.

        Args:
            functions (`dict[str, Callable]`): Tool implementations by name.
        """
        return ToolExecutor(
            functions,
            timeout=self.tool_timeout,
            isolation=self.tool_isolation,
            memory_limit=self.tool_memory_limit,
            max_output_chars=self.max_tool_output_chars,
        )


TOOL_LOOP_FIELDS = tuple(f.name for f in fields(ToolLoopConfig))
"""The names of `ToolLoopConfig`'s fields, which are also the keyword arguments it replaces."""

_P = ParamSpec("_P")
_R = TypeVar("_R")


def takes_tool_loop(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Decorates a function that takes `tool_loop=` (keyword-only) and also the keyword arguments it bundles, so that
    `fn` always receives one checked `ToolLoopConfig`.

    Without `tool_loop`, the config is built from the bundled arguments of the call (their defaults where not
    given). A `tool_loop` that is not a `ToolLoopConfig`, or one given together with any argument named in
    `TOOL_LOOP_FIELDS` (by keyword or by position), raises an `InvalidTypeError` naming them: there is one way to
    give each setting. The signature shown by `inspect.signature` and its defaults stay `fn`'s.

    Args:
        fn (`Callable`): The function; its keyword-only parameter `tool_loop` defaults to `None`.
    """
    signature = inspect.signature(fn)
    bundled = [name for name in TOOL_LOOP_FIELDS if name in signature.parameters]

    @functools.wraps(fn)
    def checked(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:  # a call `fn` itself refuses: let it say why
            return fn(*args, **kwargs)
        tool_loop = bound.arguments.get("tool_loop")
        if tool_loop is None:
            bound.apply_defaults()
            bound.arguments["tool_loop"] = ToolLoopConfig(**{name: bound.arguments[name] for name in bundled})
        elif not isinstance(tool_loop, ToolLoopConfig):
            raise InvalidTypeError(f"`tool_loop` must be a ToolLoopConfig or None, got {type(tool_loop).__name__}.")
        elif both := [name for name in bundled if name in bound.arguments]:
            names = ", ".join(f"`{name}`" for name in both)
            raise InvalidTypeError(
                f"{names} and `tool_loop` were both given; set {names} on the `ToolLoopConfig` "
                f"(`dataclasses.replace(tool_loop, {both[0]}=...)`) or pass the keyword argument alone."
            )
        return fn(*bound.args, **bound.kwargs)

    return checked


__all__ = ["TOOL_LOOP_FIELDS", "ToolLoopConfig", "takes_tool_loop"]
