"""Weight pushes through a shared folder: safetensors files every server reads, then `reload_weights` from there.

Works with a plain `vllm serve` (no worker extension needed); the folder must be at the same path on this machine and
on every server's (e.g. an NFS mount).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence

from ....errors import InvalidValueError
from ..client import VLLMServerClient
from .checks import NamedTensors
from .lora import AdapterExport


class SharedFolderTransfer:
    """Writes safetensors files into a folder every server can read, then has each server reload from it.

    Works with a plain `vllm serve` (no worker extension needed). The folder keeps only the newest push: vLLM
    records the path it last loaded from, so that one is removed only when the next push replaces it.

    Args:
        directory (`str`): A folder at the same path on this machine and on every server's (e.g. an NFS mount).
    """

    name = "filesystem"
    needs_worker_extension = False

    def __init__(self, directory: str) -> None:
        if not isinstance(directory, str) or not directory:
            raise InvalidValueError(f"`directory` must be a folder path, got {directory!r}.")
        self.directory = os.path.abspath(directory)

    def send_weights(
        self, clients: Sequence[VLLMServerClient], weights: NamedTensors, session: str
    ) -> dict[str, BaseException]:
        """Writes `weights/<session>/model.safetensors` once for all servers."""
        from safetensors.torch import save_file

        folder = self._folder("weights", session)
        save_file({n: t.detach().cpu().contiguous() for n, t in weights}, os.path.join(folder, "model.safetensors"))
        return {}

    def load_weights(self, client: VLLMServerClient, session: str, count: int) -> None:
        """Has the server reload the pushed tensors from the shared folder (`reload_weights(weights_path=...)`)."""
        client.reload_weights_from(os.path.join(self.directory, "weights", session))

    def send_adapter(
        self, clients: Sequence[VLLMServerClient], adapter: AdapterExport, session: str
    ) -> tuple[dict[str, str], dict[str, BaseException]]:
        """Writes the adapter folder (`adapter_model.safetensors`, `adapter_config.json`) once for all servers."""
        from safetensors.torch import save_file

        folder = self._folder("adapters", session)
        tensors = {n: t.detach().cpu().contiguous() for n, t in adapter.tensors.items()}
        save_file(tensors, os.path.join(folder, "adapter_model.safetensors"))
        with open(os.path.join(folder, "adapter_config.json"), "w") as f:
            f.write(adapter.config)
        return {c.base_url: folder for c in clients}, {}

    def send_remedy(self) -> str:
        """Where to look when the files did not reach a server."""
        return "Check that the shared folder is mounted at the same path on the server."

    def close(self) -> None:
        """Nothing is held between pushes (the newest push's folder stays: the servers loaded from it)."""

    def finish(self, kind: str, session: str) -> None:
        """Removes the older pushes of `kind` once `session` is loaded everywhere it could be."""
        root = os.path.join(self.directory, kind)
        for name in os.listdir(root):
            if name != session:
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)

    def _folder(self, kind: str, session: str) -> str:
        folder = os.path.join(self.directory, kind, session)
        os.makedirs(folder, exist_ok=True)
        return folder
