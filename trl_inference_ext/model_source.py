"""Where a model comes from: the embedded default model, a local folder, or a hub identifier.

`resolve_model_name` runs before any backend loads anything, so a typo in a path is reported as such ("folder not
found") instead of as transformers' hub-id syntax error, and `"default"` means the embedded model everywhere.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import InvalidTypeError, InvalidValueError, ModelNotFoundError

DEFAULT_MODEL_NAME = "default"
"""The name that selects the embedded default model (SmolLM2-135M-Instruct, see `default_model`)."""

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
"""`name` or `org/name`: what the hub accepts as a model identifier."""


def _looks_like_path(name: str) -> bool:
    if name.startswith(("/", "./", "../", "~", ".\\", "..\\")) or name in (".", ".."):
        return True
    if "\\" in name or name.count("/") > 1:
        return True
    if "/" in name and Path(name.split("/", 1)[0]).is_dir():  # `outputs/run1` next to an `outputs` folder
        return True
    return not _HUB_ID.match(name)


def resolve_model_name(model_name: str) -> str:
    """Turns what a user passes as a model into what a backend loads.

    - `"default"` becomes the folder of the embedded default model (converted once, see
      `default_model.default_model_path`).
    - An existing folder is returned as is; it must hold a `config.json`.
    - Something that can only be a path (absolute, `./`, `~`, more than one `/`, or `dir/name` where `dir` is a
      local folder) and does not exist raises `FileNotFoundError("folder not found: ...")`.
    - Anything else (`name` or `org/name`) is a hub identifier, returned unchanged.

    Args:
        model_name (`str`): The model as given by the user.

    Returns:
        `str`: A local folder or a hub identifier.

    Raises:
        TypeError: If `model_name` is not a string.
        ValueError: If it is empty, or an existing path that is not a model folder.
        FileNotFoundError: If it is a path that does not exist.
        ImportError: For `"default"` when the package that ships the embedded model is missing.
    """
    if not isinstance(model_name, (str, os.PathLike)):
        raise InvalidTypeError(f"`model_name` must be a string or a path, got {type(model_name).__name__}.")
    name = os.fspath(model_name)
    if not isinstance(name, str) or not name.strip():
        raise InvalidValueError("`model_name` is empty: pass a local folder, a hub identifier, or 'default'.")
    if name == DEFAULT_MODEL_NAME:
        from .default_model import default_model_path

        return str(default_model_path())
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise InvalidValueError(
                f"`model_name` {name!r} is a file; pass the folder that holds the model's config.json."
            )
        if not (path / "config.json").is_file():
            raise InvalidValueError(f"`model_name` {name!r} is a folder without config.json: not a model folder.")
        return str(path)
    if _looks_like_path(name):
        raise ModelNotFoundError(f"folder not found: {name}")
    return name
