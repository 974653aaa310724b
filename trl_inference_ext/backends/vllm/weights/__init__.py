"""Weights into vLLM: checks before loading (`checks`), LoRA-only pushes (`lora`), and pushes to servers (`push`).

A push to servers goes through a `transfer.WeightTransfer`, one module per way: `http_chunks`, `shared_folder`,
`nccl`. `WEIGHT_TRANSFERS` maps the `weight_transfer=` option to the one it builds.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from ....errors import InvalidValueError
from .http_chunks import DEFAULT_CHUNK_BYTES, HttpChunkTransfer
from .nccl import NCCL_ADDRESS_ENV, NcclTransfer
from .shared_folder import SharedFolderTransfer
from .transfer import PushReport, WeightTarget, WeightTransfer


def _http_chunks(directory: str | None, chunk_bytes: int) -> WeightTransfer:
    return HttpChunkTransfer(chunk_bytes)


def _shared_folder(directory: str | None, chunk_bytes: int) -> WeightTransfer:
    if not directory:
        raise InvalidValueError(
            "`weight_transfer='filesystem'` needs `weight_transfer_dir`: a folder at the same path here and on every "
            "server."
        )
    return SharedFolderTransfer(directory)


def _nccl(directory: str | None, chunk_bytes: int) -> WeightTransfer:
    return NcclTransfer(master_address=os.environ.get(NCCL_ADDRESS_ENV) or None, chunk_bytes=chunk_bytes)


WEIGHT_TRANSFERS: dict[str, Callable[[str | None, int], WeightTransfer]] = {
    "http": _http_chunks,
    "filesystem": _shared_folder,
    "nccl": _nccl,
}
"""How weights reach vLLM servers, by `weight_transfer=` name: HTTP chunks to the worker extension, files in a shared
folder, or vLLM's NCCL weight-transfer engine (GPUs on both sides). Each entry builds the transfer from
`(weight_transfer_dir, chunk_bytes)`."""


def chosen_weight_transfer(weight_transfer: str | None, weight_transfer_dir: str | None) -> str:
    """The `weight_transfer=` name a push uses: the one given, else `"filesystem"` when `weight_transfer_dir` is
    given, else `"http"` (not checked against `WEIGHT_TRANSFERS`)."""
    return weight_transfer or ("filesystem" if weight_transfer_dir else "http")


def make_weight_transfer(
    weight_transfer: str | None, weight_transfer_dir: str | None, chunk_bytes: int
) -> WeightTransfer:
    """The transfer a push to servers uses: `weight_transfer` by name, else a shared folder when
    `weight_transfer_dir` is given, else HTTP chunks.

    Args:
        weight_transfer (`str`, *optional*): A key of `WEIGHT_TRANSFERS`.
        weight_transfer_dir (`str`, *optional*): The shared folder (only with `"filesystem"`).
        chunk_bytes (`int`): Tensor bytes per HTTP chunk.

    Raises:
        InvalidValueError: If the name is unknown, or the folder is missing or given to another transfer.
    """
    choice = chosen_weight_transfer(weight_transfer, weight_transfer_dir)
    if choice not in WEIGHT_TRANSFERS:
        raise InvalidValueError(f"`weight_transfer` must be one of {list(WEIGHT_TRANSFERS)}, got {weight_transfer!r}.")
    if weight_transfer_dir and choice != "filesystem":
        raise InvalidValueError("`weight_transfer_dir` is only used with `weight_transfer='filesystem'`.")
    return WEIGHT_TRANSFERS[choice](weight_transfer_dir, chunk_bytes)


__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "NCCL_ADDRESS_ENV",
    "WEIGHT_TRANSFERS",
    "HttpChunkTransfer",
    "NcclTransfer",
    "PushReport",
    "SharedFolderTransfer",
    "WeightTarget",
    "WeightTransfer",
    "chosen_weight_transfer",
    "make_weight_transfer",
]
