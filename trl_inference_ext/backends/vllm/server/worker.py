"""Worker extension that lets a vLLM server receive weights and LoRA adapters over HTTP, without a shared filesystem.

Start the server with `--worker-extension-cls trl_inference_ext.backends.vllm.server.worker.WeightSyncExtension` (the
`trl-inference serve` launcher does) and `VLLM_SERVER_DEV_MODE=1`; its methods are then callable through vLLM's
`/collective_rpc` route, whose arguments are strings. A push happens in two phases:

1. *Staging*, while the server keeps serving: `trl_stage_begin`, then `trl_stage_chunk` once per chunk. A chunk is a
   safetensors blob (no pickle: only tensors can come out of it), base64-encoded, with its SHA-256. Chunks are kept in
   host memory; the live weights are not touched, so a transfer that breaks off leaves the server consistent.
2. *Commit*, with the server paused: `trl_stage_commit` checks that every announced tensor arrived, then loads them
   all in one `reload_weights` call (vLLM fuses q/k/v and gate/up as it loads). `trl_stage_adapter` instead writes
   them as a PEFT adapter folder on the server's disk, for vLLM's `/v1/load_lora_adapter`.

This module runs inside the vLLM worker process: it imports only torch and safetensors.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from typing import Any

import torch

from ....errors import InvalidValueError, OperationError

WORKER_EXTENSION = "trl_inference_ext.backends.vllm.server.worker.WeightSyncExtension"
"""The `--worker-extension-cls` value that gives a server these methods."""
ADAPTER_ROOT_ENV = "TRL_INFERENCE_ADAPTER_DIR"
"""Environment variable naming the folder where received adapters are written (default: a folder in the temp dir)."""

PART_MARK = "::trl-part:"
"""Joins a tensor's name and its piece number when a tensor larger than a chunk is sent in pieces."""
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def encode_chunk(tensors: dict[str, torch.Tensor]) -> tuple[str, str]:
    """Serialises tensors for `trl_stage_chunk`.

    Args:
        tensors (`dict[str, torch.Tensor]`): The tensors of one chunk (moved to CPU, made contiguous).

    Returns:
        `tuple[str, str]`: The base64 text of the safetensors blob and the blob's SHA-256 hex digest.
    """
    from safetensors.torch import save

    blob = save({name: t.detach().to("cpu").contiguous() for name, t in tensors.items()})
    return base64.b64encode(blob).decode("ascii"), hashlib.sha256(blob).hexdigest()


def decode_chunk(data: str, digest: str) -> dict[str, torch.Tensor]:
    """Reverses `encode_chunk`, checking the digest.

    Raises:
        ValueError: If the data is not base64 or does not match `digest`.
    """
    from safetensors.torch import load

    blob = base64.b64decode(data.encode("ascii"), validate=True)
    if hashlib.sha256(blob).hexdigest() != digest:
        raise InvalidValueError("A weight chunk arrived corrupted (SHA-256 mismatch); nothing was loaded.")
    return load(blob)


class WeightSyncExtension:
    """Methods mixed into vLLM's worker class (`--worker-extension-cls`), called through `/collective_rpc`.

    All names start with `trl_` so they cannot clash with the worker's own attributes; every method takes and
    returns JSON-compatible values.
    """

    _trl_session: str | None = None
    _trl_staged: dict[str, torch.Tensor] | None = None

    def trl_describe(self) -> dict[str, Any]:
        """What a client needs before sending anything: vLLM's parameter names, fused modules, dtype and LoRA limits."""
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        names = sorted(n.replace(".base_layer.", ".") for n, _ in model.named_parameters())
        config = self.vllm_config  # type: ignore[attr-defined]
        lora = getattr(config, "lora_config", None)
        return {
            "params": names,
            "packed_modules": {k: list(v) for k, v in dict(getattr(model, "packed_modules_mapping", {})).items()},
            "dtype": str(config.model_config.dtype).removeprefix("torch."),
            "max_lora_rank": None if lora is None else int(lora.max_lora_rank),
            "tied_embeddings": bool(getattr(config.model_config.hf_text_config, "tie_word_embeddings", False)),
        }

    def trl_stage_begin(self, session: str) -> dict[str, Any]:
        """Starts a staging session, dropping whatever an earlier, unfinished one left behind."""
        self._trl_session = str(session)
        self._trl_staged = {}
        return {"session": self._trl_session}

    def trl_stage_chunk(self, session: str, data: str, digest: str) -> dict[str, Any]:
        """Adds one chunk (see `encode_chunk`) to the staging session.

        Raises:
            RuntimeError: If `session` is not the current session (another client started one since).
            ValueError: If the chunk is corrupted or repeats a tensor name.
        """
        staged = self._trl_staging(session)
        tensors = decode_chunk(data, digest)
        repeated = sorted(set(tensors) & set(staged))
        if repeated:
            raise InvalidValueError(f"Tensors sent twice in one push: {repeated[:5]}.")
        staged.update(tensors)
        return {"staged": len(staged)}

    def trl_stage_commit(self, session: str, count: str) -> dict[str, Any]:
        """Loads the staged tensors into the model in one `reload_weights` call, then ends the session.

        Args:
            session (`str`): The staging session.
            count (`str`): How many tensors the client sent; the commit is refused unless exactly these arrived.

        Raises:
            RuntimeError: If the session is unknown or incomplete; the live weights are untouched then.
        """
        staged = assemble(self._trl_staging(session), count)
        started = time.perf_counter()
        self._trl_session, self._trl_staged = None, None
        self.reload_weights(weights_iterator=iter(staged.items()))  # type: ignore[attr-defined]
        return {"loaded": len(staged), "seconds": time.perf_counter() - started}

    def trl_stage_adapter(self, session: str, count: str, name: str, config: str) -> dict[str, Any]:
        """Writes the staged tensors as a PEFT adapter folder on this machine and ends the session.

        The folder is `<root>/trl_inference_adapters/<engine instance>/<name>/<session>`, where root is
        `$TRL_INFERENCE_ADAPTER_DIR` or the temp dir: the same path for every worker of the server, another one for
        each server sharing the disk. Older versions of the adapter are removed.

        Args:
            session (`str`): The staging session.
            count (`str`): How many tensors the client sent.
            name (`str`): The adapter's name (letters, digits, `.`, `_`, `-`).
            config (`str`): The adapter's `adapter_config.json` text.

        Returns:
            `dict`: `{"path": folder}`, for `/v1/load_lora_adapter`.
        """
        from safetensors.torch import save_file

        staged = assemble(self._trl_staging(session), count)
        if not _NAME.match(name) or not _NAME.match(session):
            raise InvalidValueError(f"Invalid adapter name or session {name!r} / {session!r}.")
        json.loads(config)  # refuse anything that is not JSON
        instance = str(getattr(self.vllm_config, "instance_id", "") or "") or str(os.getppid())  # type: ignore[attr-defined]
        if not _NAME.match(instance):
            instance = hashlib.sha256(instance.encode()).hexdigest()[:16]
        base = os.environ.get(ADAPTER_ROOT_ENV) or tempfile.gettempdir()
        root = os.path.join(base, "trl_inference_adapters", instance, name)  # servers sharing a disk stay apart
        folder = os.path.join(root, session)
        os.makedirs(folder, mode=0o700, exist_ok=True)
        save_file({k: v.contiguous() for k, v in staged.items()}, os.path.join(folder, "adapter_model.safetensors"))
        with open(os.path.join(folder, "adapter_config.json"), "w") as f:
            f.write(config)
        self._trl_session, self._trl_staged = None, None
        for old in os.listdir(root):  # only the newest version is ever loaded again
            if old != session and _NAME.match(old):
                shutil.rmtree(os.path.join(root, old), ignore_errors=True)
        return {"path": folder}

    def trl_stage_abort(self, session: str) -> dict[str, Any]:
        """Drops the staging session `session` (no-op when another session is current)."""
        if self._trl_session == session:
            self._trl_session, self._trl_staged = None, None
        return {"aborted": True}

    def _trl_staging(self, session: str) -> dict[str, torch.Tensor]:
        if self._trl_staged is None or self._trl_session != session:
            raise OperationError(f"No staging session {session!r} on this worker (it was replaced or never started).")
        return self._trl_staged


def split_name(name: str, part: int, parts: int) -> str:
    """The staging name of piece `part` (0-based) of `parts` of tensor `name`, for tensors larger than a chunk."""
    return f"{name}{PART_MARK}{part}/{parts}"


def assemble(staged: dict[str, torch.Tensor], count: str) -> dict[str, torch.Tensor]:
    """The pushed tensors, with split ones joined again (pieces along dim 0), checked against the announced count.

    Args:
        staged (`dict[str, torch.Tensor]`): What arrived, pieces under `split_name` names.
        count (`str`): How many tensors the client sent.

    Raises:
        RuntimeError: If a tensor or a piece is missing; nothing is loaded then.
    """
    whole: dict[str, torch.Tensor] = {}
    pieces: dict[str, dict[int, torch.Tensor]] = {}
    expected: dict[str, int] = {}
    for key, tensor in staged.items():
        if PART_MARK not in key:
            whole[key] = tensor
            continue
        name, _, where = key.rpartition(PART_MARK)
        part, _, parts = where.partition("/")
        pieces.setdefault(name, {})[int(part)] = tensor
        expected[name] = int(parts)
    for name, got in pieces.items():
        if sorted(got) != list(range(expected[name])):
            raise OperationError(f"{len(got)} of {expected[name]} pieces of {name!r} arrived; nothing was loaded.")
        whole[name] = torch.cat([got[k] for k in range(expected[name])], dim=0)
    if len(whole) != int(count):
        raise OperationError(f"Only {len(whole)} of {count} tensors arrived; nothing was loaded.")
    return whole
