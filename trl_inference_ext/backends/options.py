"""Backend options: which keywords each backend accepts, and one clear error for the others.

A misspelled option (`devcie="cpu"`) must fail before anything loads, naming the valid options, instead of
surfacing later as some library's `unexpected keyword argument`.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any

from ..errors import InvalidValueError


def check_options(backend: str, options: Mapping[str, Any], valid: Iterable[str], *, listed: str | None = None) -> None:
    """Raises if `options` holds a keyword that `backend` does not accept.

    Args:
        backend (`str`): The backend's name, for the message.
        options (`Mapping[str, Any]`): The keywords given.
        valid (`Iterable[str]`): The keywords the backend accepts.
        listed (`str`, *optional*): How the message describes the valid options (default: all of them, by name).

    Raises:
        ValueError: Naming each unknown option, the closest valid name when there is one, and the valid options.
    """
    allowed = sorted(set(valid))
    unknown = [name for name in options if name not in allowed]
    if not unknown:
        return
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, allowed, n=1)
        hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    plural = "s" * (len(unknown) > 1)
    raise InvalidValueError(
        f"Unknown option{plural} for the {backend} backend: {', '.join(hints)}. "
        f"Valid options: {listed or ', '.join(allowed)}."
    )
