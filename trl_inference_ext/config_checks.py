"""Declarative checks for the package's option dataclasses (`VLLMOptions`, `ToolLoopConfig`).

A field declares its rule where it is declared, in its metadata: `"check"` (a `Check`, or any function
`check(name, value) -> value`) and optionally `"used_when"` (a predicate on the whole object, for a rule that applies
only where the field is used). `check_fields(self)` in `__post_init__` runs them in field order and stores the value
each returns (e.g. a list of names normalised to a tuple), so every error names its field and what it allows.

```python
@dataclass(frozen=True, kw_only=True)
class MyOptions:
    retries: int = field(default=3, metadata={"help": "Retries on failure.", "check": int_at_least(0)})

    def __post_init__(self) -> None:
        check_fields(self)
```

This module imports nothing beyond the standard library and `errors`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import InvalidTypeError, InvalidValueError

FieldCheck = Callable[[str, Any], Any]
"""A rule: `check(name, value)` returns the value to store (normalised where the rule says so), or raises an error
that names the field `name` and the allowed values."""


@dataclass(frozen=True)
class Check:
    """A rule stated once for the message and once as a test.

    Attributes:
        allowed (`str`): The allowed values, as the message says them (`"an int >= 1"`).
        test (`Callable[[Any], bool]`): Whether a value is allowed.
        optional (`bool`, *optional*, defaults to `False`): Whether `None` (the option left unset) is allowed too.
        error (`type[Exception]`, *optional*, defaults to `InvalidValueError`): What a value that fails raises.
        convert (`Callable[[Any], Any]`, *optional*): Normalises an allowed value before it is stored.
    """

    allowed: str
    test: Callable[[Any], bool]
    optional: bool = False
    error: type[Exception] = InvalidValueError
    convert: Callable[[Any], Any] | None = None

    def __call__(self, name: str, value: Any) -> Any:
        """Returns `value` (converted) when it is allowed.

        Args:
            name (`str`): The field's name, for the message.
            value (`Any`): Its value.

        Raises:
            InvalidValueError: By default, naming the field, the allowed values and the value (`error` otherwise).
        """
        if value is None and self.optional:
            return None
        if not self.test(value):
            raise self.error(f"`{name}` must be {self.allowed}, got {value!r}.")
        return value if self.convert is None else self.convert(value)

    def or_none(self) -> Check:
        """The same rule, with `None` (unset) allowed too."""
        return dataclasses.replace(self, optional=True)


def is_int(value: Any) -> bool:
    """Whether `value` is an int and not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """Whether `value` is an int or a float and not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def int_at_least(minimum: int) -> Check:
    """An int (not a bool) `>= minimum`."""
    return Check(f"an int >= {minimum}", lambda v: is_int(v) and v >= minimum)


def one_of(choices: tuple[str, ...] | list[str]) -> Check:
    """One of `choices`."""
    return Check(f"one of {list(choices)}", lambda v: isinstance(v, str) and v in choices)


POSITIVE_INT = Check("a positive int", lambda v: is_int(v) and v > 0)
"""An int (not a bool) `> 0`."""


def check_bool(name: str, value: Any) -> bool:
    """A bool, nothing else (`1` or `"yes"` are refused with an `InvalidTypeError`)."""
    if not isinstance(value, bool):
        raise InvalidTypeError(f"`{name}` must be a bool, got {type(value).__name__}.")
    return value


def check_fields(config: Any) -> None:
    """Runs the `"check"` of every field of the dataclass instance `config` whose `"used_when"` holds (all fields
    without one), in field order, and stores what each returns (frozen dataclasses included).

    Args:
        config (`Any`): A dataclass instance whose fields declare their rules in their metadata.

    Raises:
        InvalidValueError: Or the error a rule raises, naming the first field whose value is not allowed.
    """
    for option in dataclasses.fields(config):
        check: FieldCheck | None = option.metadata.get("check")
        used_when: Callable[[Any], bool] | None = option.metadata.get("used_when")
        if check is None or (used_when is not None and not used_when(config)):
            continue
        value = check(option.name, getattr(config, option.name))
        if value is not getattr(config, option.name):
            object.__setattr__(config, option.name, value)


__all__ = [
    "POSITIVE_INT",
    "Check",
    "FieldCheck",
    "check_bool",
    "check_fields",
    "int_at_least",
    "is_int",
    "is_real",
    "one_of",
]
