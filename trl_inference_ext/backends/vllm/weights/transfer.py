"""The common interface of weight pushes to vLLM servers: `WeightTransfer`, and what a push fits and reports.

A push goes in two phases (see `push`): a `WeightTransfer` carries the bytes to every server while it keeps serving
(phase 1: `send_weights` / `send_adapter`), then loads them into each paused server (phase 2: `load_weights`).
Three implement it, one module each: `http_chunks.HttpChunkTransfer` (no shared filesystem needed),
`shared_folder.SharedFolderTransfer` (a folder every server mounts) and `nccl.NcclTransfer` (GPU to GPU).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ..client import VLLMServerClient
from .checks import NamedTensors
from .lora import AdapterExport


@dataclass
class WeightTarget:
    """What a push must fit, as the engine describes itself.

    Attributes:
        params (`set[str]`, *optional*): vLLM's own (fused) parameter names; `None` when unknown (no check then).
        packed_modules (`dict[str, list[str]]`): Fused vLLM module -> the checkpoint modules it is built from.
        tied_embeddings (`bool`): Whether `lm_head` is the embedding matrix (its checkpoint tensor is skipped).
        dtype (`torch.dtype`, *optional*): The engine's weight dtype (weights are cast to it before sending).
        max_lora_rank (`int`, *optional*): The engine's LoRA rank limit; `None` when it runs without LoRA.
    """

    params: set[str] | None
    packed_modules: dict[str, list[str]]
    tied_embeddings: bool = False
    dtype: torch.dtype | None = None
    max_lora_rank: int | None = None


@dataclass
class PushReport:
    """What one push did.

    Attributes:
        servers (`list[str]`): URLs that now serve the new weights.
        failures (`dict[str, str]`): URL -> what failed and what to do, for the others.
        bytes_sent (`int`): Tensor bytes sent to each server (what crosses the network per server).
        seconds (`float`): Wall time of the whole push.
        pause_seconds (`float`): Longest time a server was paused.
        left_paused (`list[str]`): URLs left paused on purpose: loading failed there, so they may hold a mix.
    """

    servers: list[str] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)
    bytes_sent: int = 0
    seconds: float = 0.0
    pause_seconds: float = 0.0
    left_paused: list[str] = field(default_factory=list)


class WeightTransfer(Protocol):
    """How pushed bytes reach the servers (phase 1) and get loaded (phase 2); `push.push_weights` and
    `push.push_adapter` run the phases around it."""

    name: str
    """The `weight_transfer=` option that selects it (`"http"`, `"filesystem"`, `"nccl"`)."""
    needs_worker_extension: bool
    """Whether servers must run this package's worker extension (`trl-inference serve` loads it)."""

    def send_weights(
        self, clients: Sequence[VLLMServerClient], weights: NamedTensors, session: str
    ) -> dict[str, BaseException]:
        """Sends `weights` to each client without changing what it serves; returns the clients that failed."""
        ...

    def load_weights(self, client: VLLMServerClient, session: str, count: int) -> None:
        """Loads what `send_weights` sent into the (paused) server."""
        ...

    def send_adapter(
        self, clients: Sequence[VLLMServerClient], adapter: AdapterExport, session: str
    ) -> tuple[dict[str, str], dict[str, BaseException]]:
        """Puts the adapter where each server can read it; returns the folder per URL, and the failures."""
        ...

    def finish(self, kind: str, session: str) -> None:
        """Called once push `session` of `kind` (`"weights"` or `"adapters"`) is loaded by at least one server."""
        ...

    def send_remedy(self) -> str:
        """What to check on a server that a send failed on (appended to its failure message)."""
        ...

    def close(self) -> None:
        """Releases what the transfer holds between pushes (e.g. NCCL groups)."""
        ...


def on_each_client(
    clients: Sequence[VLLMServerClient], work: Callable[[VLLMServerClient], Any]
) -> dict[str, BaseException]:
    """Runs `work` on every client concurrently; returns the exception of each client that raised, by URL."""
    if not clients:
        return {}
    failures: dict[str, BaseException] = {}
    with ThreadPoolExecutor(max_workers=len(clients)) as pool:
        futures = {c.base_url: pool.submit(work, c) for c in clients}
        for url, future in futures.items():
            exc = future.exception()
            if exc is not None:
                failures[url] = exc
    return failures
