"""Weight pushes over HTTP: checksummed safetensors chunks through `/collective_rpc`, no shared filesystem needed.

The server's worker extension (`server.worker.WeightSyncExtension`) stages the chunks in host memory and loads them
in one `reload_weights` call when the push swaps (see `push`).
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from ....errors import InvalidValueError
from ..client import VLLMServerClient
from ..server.worker import WORKER_EXTENSION, encode_chunk, split_name
from .checks import NamedTensors
from .lora import ADAPTER_NAME, AdapterExport
from .transfer import on_each_client

DEFAULT_CHUNK_BYTES = 64 << 20
"""Tensor bytes per HTTP chunk: large enough to amortise a request, small enough to bound both sides' memory."""


class HttpChunkTransfer:
    """Sends tensors through `/collective_rpc` to the worker extension, in checksummed safetensors chunks.

    Needs servers started with `--worker-extension-cls` naming `server.worker.WeightSyncExtension` (as
    `trl-inference serve` does). Each chunk is serialised once and sent to every server concurrently, with
    `in_flight` chunks on the way at once; each server stages a copy of the pushed weights in host memory until the
    swap.

    Args:
        chunk_bytes (`int`, *optional*, defaults to 64 MiB): Tensor bytes per request (a larger tensor is sent alone).
    """

    name = "http"
    needs_worker_extension = True
    in_flight: int = 2
    """Chunks on the way to a server at once (each costs its size in memory here, base64-encoded)."""

    def __init__(self, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes <= 0:
            raise InvalidValueError(f"`chunk_bytes` must be a positive int, got {chunk_bytes!r}.")
        self.chunk_bytes = chunk_bytes

    def send_weights(
        self, clients: Sequence[VLLMServerClient], weights: NamedTensors, session: str
    ) -> dict[str, BaseException]:
        """Stages `weights` on every client; see `WeightTransfer.send_weights`."""
        return self._stage(clients, weights, session)

    def load_weights(self, client: VLLMServerClient, session: str, count: int) -> None:
        """Loads the staged tensors in one `reload_weights` call (`trl_stage_commit`)."""
        client.collective_rpc("trl_stage_commit", session, str(count))

    def send_adapter(
        self, clients: Sequence[VLLMServerClient], adapter: AdapterExport, session: str
    ) -> tuple[dict[str, str], dict[str, BaseException]]:
        """Stages the adapter, then has each server write it as a `peft` folder on its own disk."""
        failures = self._stage(clients, list(adapter.tensors.items()), session)
        folders: dict[str, str] = {}

        def write(client: VLLMServerClient) -> None:
            (result, *_) = client.collective_rpc(
                "trl_stage_adapter", session, str(len(adapter.tensors)), ADAPTER_NAME, adapter.config
            )
            folders[client.base_url] = str(result["path"])

        failures.update(on_each_client([c for c in clients if c.base_url not in failures], write))
        return folders, failures

    def finish(self, kind: str, session: str) -> None:
        """Nothing to clean up: the worker frees what it staged when it loads."""

    def send_remedy(self) -> str:
        """Where to look when chunks did not reach a server."""
        return (
            "Check that it was started with `trl-inference serve` (or `--worker-extension-cls "
            f"{WORKER_EXTENSION}` and VLLM_SERVER_DEV_MODE=1) and has host memory for a copy of the weights."
        )

    def close(self) -> None:
        """Nothing is held between pushes."""

    def _stage(
        self, clients: Sequence[VLLMServerClient], weights: NamedTensors, session: str
    ) -> dict[str, BaseException]:
        """Sends every chunk to every client, keeping `in_flight` chunks on the way so that encoding here, parsing
        in the server's API process and staging in its engine process overlap."""
        failures = on_each_client(clients, lambda c: c.collective_rpc("trl_stage_begin", session))
        on_the_way: deque[dict[str, Future[None]]] = deque()

        def settle(futures: dict[str, Future[None]]) -> None:
            for url, future in futures.items():
                exc = future.exception()
                if exc is not None:
                    failures.setdefault(url, exc)

        with ThreadPoolExecutor(max_workers=max(1, len(clients) * self.in_flight)) as pool:
            for chunk in chunks(weights, self.chunk_bytes):
                live = [c for c in clients if c.base_url not in failures]
                if not live:
                    break
                data, digest = encode_chunk(chunk)
                on_the_way.append(
                    {c.base_url: pool.submit(send_chunk, c, session=session, data=data, digest=digest) for c in live}
                )
                del data
                while len(on_the_way) >= self.in_flight:
                    settle(on_the_way.popleft())
            while on_the_way:
                settle(on_the_way.popleft())
        for client in clients:  # free what a failed server staged (best effort: it may be unreachable)
            if client.base_url in failures:
                with contextlib.suppress(Exception):
                    client.collective_rpc("trl_stage_abort", session, timeout=10)
        return failures


def send_chunk(client: VLLMServerClient, *, session: str, data: str, digest: str) -> None:
    """Sends one encoded chunk to one server's staging area (`trl_stage_chunk`)."""
    client.collective_rpc("trl_stage_chunk", session, data, digest)


def chunks(weights: NamedTensors, chunk_bytes: int) -> Iterator[dict[str, torch.Tensor]]:
    """Groups tensors, in order, into dicts of at most about `chunk_bytes`.

    A tensor larger than a chunk (e.g. an embedding matrix) is sent in pieces along its first dimension, which the
    worker joins again (`server.worker.assemble`); a piece is never smaller than one row.
    """
    chunk: dict[str, torch.Tensor] = {}
    size = 0
    for name, whole in weights:
        for key, tensor in _row_pieces(name, whole, chunk_bytes):
            nbytes = tensor.numel() * tensor.element_size()
            if chunk and size + nbytes > chunk_bytes:
                yield chunk
                chunk, size = {}, 0
            chunk[key] = tensor
            size += nbytes
    if chunk:
        yield chunk


def _row_pieces(name: str, tensor: torch.Tensor, chunk_bytes: int) -> list[tuple[str, torch.Tensor]]:
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes <= chunk_bytes or tensor.dim() == 0 or tensor.shape[0] < 2:
        return [(name, tensor)]
    rows = max(1, chunk_bytes // max(1, nbytes // tensor.shape[0]))
    parts = tensor.split(rows, dim=0)
    return [(split_name(name, k, len(parts)), part) for k, part in enumerate(parts)]
