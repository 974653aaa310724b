"""Stateful environments with TRL's `environment_factory` contract, checked once, before any rollout.

An environment is an object made by a factory (a class, or any callable returning an instance), one instance per
rollout. Its public methods, type-hinted and with Google-style docstrings, are the tools the model may call during
that rollout; its state persists across the rollout's turns. Three names are lifecycle, never offered as tools:

- `reset(**row)` (required): called once per rollout, before its first turn, with the dataset row. It may return
  text, appended to the prompt's last user message (to a string prompt); `None` appends nothing. A `reset` that
  declares `group_index` / `group_member` parameters also learns which GRPO group, and which member of it, the
  rollout is: the rollouts of one group can start from the same state.
- `get_reward()` (optional): the rollout's reward, read once it finished; it reaches the trainer as a reward function
  named after the environment's class (weight 1 in TRL; see `RolloutFunction.reward_funcs`).
- `close()` (optional): called when the instance is no longer needed (TRL 1.16 offers it to the model as a tool;
  here it is lifecycle).

A `dict` of factories picks one per example by the row's `environment` column (which `reset` then does not receive)
and shows the model only that environment's tools, as TRL does.
"""

from __future__ import annotations

import inspect
import pickle
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidTypeError, InvalidValueError

LIFECYCLE = ("reset", "get_reward", "close")
"""Methods of an environment that are never tools."""
GROUP_PARAMETERS = ("group_index", "group_member")
"""Parameters a `reset` may declare to learn its rollout's GRPO group and its place in it."""
ENVIRONMENT_COLUMN = "environment"
"""The dataset column that picks the environment of an example when `environment_factory` is a dict."""

EnvironmentFactory = Callable[[], Any]


@dataclass(frozen=True)
class EnvironmentSpec:
    """One environment, as checked at construction.

    Attributes:
        name (`str`, *optional*): Its key in a dict `environment_factory` (`None` for a single factory).
        factory (`Callable`): Makes one instance.
        cls (`type`): The instances' class.
        tools (`tuple[str, ...]`): The public methods offered to the model.
        schemas (`tuple[dict, ...]`): Their tool schemas (OpenAI function format), in the same order.
        has_reward (`bool`): Whether instances define `get_reward`.
        has_close (`bool`): Whether instances define `close`.
        reset_group_parameters (`tuple[str, ...]`): Which of `GROUP_PARAMETERS` its `reset` declares.
    """

    name: str | None
    factory: EnvironmentFactory
    cls: type
    tools: tuple[str, ...]
    schemas: tuple[dict[str, Any], ...]
    has_reward: bool
    has_close: bool
    reset_group_parameters: tuple[str, ...]

    @property
    def methods(self) -> list[str]:
        """Every method a host may call: the tools and the lifecycle methods the class defines."""
        return [
            *self.tools,
            "reset",
            *(["get_reward"] if self.has_reward else []),
            *(["close"] if self.has_close else []),
        ]

    def check_sendable(self) -> None:
        """Refuses a factory that a spawned worker process could not rebuild (it travels by pickle, by reference).

        Raises:
            InvalidTypeError: Naming the environment and why, with what to do instead.
        """
        try:
            pickle.dumps(self.factory)
        except Exception as err:  # PicklingError, AttributeError ("Can't pickle local object"), TypeError
            raise InvalidTypeError(
                f"Environment {self.label} cannot be sent to a worker process: its factory cannot be pickled "
                f"({type(err).__name__}: {err}). Define the class (or factory function) at the top level of an "
                "importable module, or pass `environment_isolation='thread'` to run environments in the trainer's "
                "process, without protection against hangs and crashes."
            ) from err

    @property
    def label(self) -> str:
        """How messages name it."""
        return self.cls.__name__ if self.name is None else f"{self.name!r} ({self.cls.__name__})"


def environment_specs(environment_factory: Any) -> dict[str | None, EnvironmentSpec]:
    """Checks `environment_factory` (one factory, or a dict of them) and describes each environment.

    A factory that is a class is read without being called; any other factory is called once to learn its class
    (the probe instance is closed when it has `close`).

    Raises:
        InvalidTypeError: If it is neither a callable nor a non-empty dict of callables with string keys.
        InvalidValueError: If an environment has no `reset`, or a tool method lacks type hints or a docstring
            (naming the method and what is missing), or two tools share a name.
    """
    if isinstance(environment_factory, Mapping):
        if not environment_factory:
            raise InvalidValueError("`environment_factory` is an empty dict; give at least one environment.")
        for key, factory in environment_factory.items():
            if not isinstance(key, str):
                raise InvalidTypeError(f"`environment_factory` keys must be environment names (str), got {key!r}.")
            if not callable(factory):
                raise InvalidTypeError(
                    f"`environment_factory[{key!r}]` must be callable, got {type(factory).__name__}."
                )
        return {key: describe_environment(factory, key) for key, factory in environment_factory.items()}
    if not callable(environment_factory):
        raise InvalidTypeError(
            "`environment_factory` must be a callable or a dict of callables, got "
            f"{type(environment_factory).__name__}."
        )
    return {None: describe_environment(environment_factory, None)}


def describe_environment(factory: EnvironmentFactory, name: str | None = None) -> EnvironmentSpec:
    """Describes one environment (see `environment_specs`)."""
    cls = factory if isinstance(factory, type) else _probe_class(factory)
    label = cls.__name__ if name is None else f"{name!r} ({cls.__name__})"
    members = dict(inspect.getmembers(cls, predicate=inspect.isfunction))  # on the class: properties not evaluated
    if "reset" not in members:
        raise InvalidValueError(
            f"Environment {label} has no `reset` method; define `reset(self, **row)`, called with the dataset row "
            "before each rollout (it may return text appended to the prompt)."
        )
    tools = tuple(sorted(n for n in members if not n.startswith("_") and n not in LIFECYCLE))
    schemas = tuple(_schema(members[n], label) for n in tools)
    reset_parameters = inspect.signature(members["reset"]).parameters
    return EnvironmentSpec(
        name=name,
        factory=factory,
        cls=cls,
        tools=tools,
        schemas=schemas,
        has_reward="get_reward" in members,
        has_close="close" in members,
        reset_group_parameters=tuple(p for p in GROUP_PARAMETERS if p in reset_parameters),
    )


def _probe_class(factory: EnvironmentFactory) -> type:
    instance = factory()
    close = getattr(instance, "close", None)
    if callable(close):
        close()
    return type(instance)


def _schema(function: Callable[..., Any], label: str) -> dict[str, Any]:
    from transformers.utils import get_json_schema

    name = function.__name__
    if not inspect.getdoc(function):
        raise InvalidValueError(
            f"Method `{name}` of environment {label} has no docstring: a tool needs one (a Google-style docstring "
            "with a description and an `Args:` entry per parameter), or rename it `_{name}` to keep it private."
        )
    try:
        return get_json_schema(types.MethodType(function, object()))  # bound: `self` is not a parameter
    except Exception as err:  # transformers' DocstringParsingException / TypeHintParsingException
        raise InvalidValueError(
            f"Method `{name}` of environment {label} cannot become a tool: {err}. Give every parameter a type hint "
            "and an `Args:` entry in its docstring, or rename it `_{name}` to keep it private."
        ) from err


def observation_prompt(prompt: Any, observation: str) -> Any:
    """`prompt` with `observation` appended as TRL appends it: to the last message's content (a chat prompt, which is
    rebuilt, not mutated), or to the text (a string prompt)."""
    if not observation:
        return prompt
    if isinstance(prompt, str):
        return prompt + observation
    last = dict(prompt[-1])
    content = last.get("content")
    if isinstance(content, list):
        last["content"] = [*content, {"type": "text", "text": observation}]
    else:
        last["content"] = (content or "") + observation
    return [*prompt[:-1], last]
