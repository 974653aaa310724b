"""Pushing weights and LoRA adapters into running vLLM servers.

A push to a set of servers goes in two phases, so no server ever serves a mix of old and new weights:

1. **Send.** The bytes travel to every server while it keeps serving: over HTTP in checksummed chunks staged in
   host memory by the worker extension (`HTTPChunks`, needs no shared filesystem), or as safetensors files in a folder
   every server can read (`SharedFilesystem`). Nothing live changes yet; a server that fails here keeps its old
   weights consistently.
2. **Swap.** Each server is paused (`/pause?mode=keep`: requests in flight are frozen, not lost), the staged weights
   are loaded in one `reload_weights` call (or the adapter is reloaded in place), the prefix cache is dropped
   (kept requests are recomputed with the new weights), the server's weight version is set, and it resumes.

A server that fails in either phase is reported in the returned failures with what to do; the caller (`ServerPool`)
takes it out of service until a later push succeeds. A server that fails while loading stays paused, so whatever mix
it holds is never served.

The fused-group completeness check (`vllm_weights.check_pushed_weights`) runs before this module sees the weights.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from .vllm_lora import ADAPTER_NAME, AdapterExport
from .vllm_server import VLLMServerClient, VLLMServerError
from .vllm_weights import NamedTensors
from .vllm_worker import WORKER_EXTENSION, encode_chunk, split_name

DEFAULT_CHUNK_BYTES = 64 << 20
"""Tensor bytes per HTTP chunk: large enough to amortise a request, small enough to bound both sides' memory."""


class WeightPushError(RuntimeError):
    """A weight push reached no server; the message names each server, what failed and what to do."""


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


class ServerWeightTransport(Protocol):
    """How pushed bytes reach the servers (phase 1); `push_weights` / `push_adapter` run phase 2 around it."""

    name: str

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

    def close(self) -> None:
        """Releases what the transport holds between pushes (e.g. NCCL groups)."""
        ...


# --------------------------------------------------------------------------------------------- transports
class HTTPChunks:
    """Sends tensors through `/collective_rpc` to the worker extension, in checksummed safetensors chunks.

    Needs servers started with `--worker-extension-cls trl_inference_ext.backends.vllm_worker.WeightSyncExtension`
    (as `trl-inference serve` does). Each chunk is serialised once and sent to every server concurrently, with
    `in_flight` chunks on the way at once; each server stages a copy of the pushed weights in host memory until the
    swap.

    Args:
        chunk_bytes (`int`, *optional*, defaults to 64 MiB): Tensor bytes per request (a larger tensor is sent alone).
    """

    name = "http"
    in_flight: int = 2
    """Chunks on the way to a server at once (each costs its size in memory here, base64-encoded)."""

    def __init__(self, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes <= 0:
            raise ValueError(f"`chunk_bytes` must be a positive int, got {chunk_bytes!r}.")
        self.chunk_bytes = chunk_bytes

    def send_weights(
        self, clients: Sequence[VLLMServerClient], weights: NamedTensors, session: str
    ) -> dict[str, BaseException]:
        """Stages `weights` on every client; see `ServerWeightTransport.send_weights`."""
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

        failures.update(_each([c for c in clients if c.base_url not in failures], write))
        return folders, failures

    def close(self) -> None:
        """Nothing is held between pushes."""

    def _stage(
        self, clients: Sequence[VLLMServerClient], weights: NamedTensors, session: str
    ) -> dict[str, BaseException]:
        """Sends every chunk to every client, keeping `in_flight` chunks on the way so that encoding here, parsing
        in the server's API process and staging in its engine process overlap."""
        failures = _each(clients, lambda c: c.collective_rpc("trl_stage_begin", session))
        on_the_way: deque[dict[str, Future[None]]] = deque()

        def settle(futures: dict[str, Future[None]]) -> None:
            for url, future in futures.items():
                exc = future.exception()
                if exc is not None:
                    failures.setdefault(url, exc)

        with ThreadPoolExecutor(max_workers=max(1, len(clients) * self.in_flight)) as pool:
            for chunk in _chunks(weights, self.chunk_bytes):
                live = [c for c in clients if c.base_url not in failures]
                if not live:
                    break
                data, digest = encode_chunk(chunk)
                on_the_way.append(
                    {c.base_url: pool.submit(_send_chunk, c, session=session, data=data, digest=digest) for c in live}
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


class SharedFilesystem:
    """Writes safetensors files into a folder every server can read, then has each server reload from it.

    Works with a plain `vllm serve` (no worker extension needed). The folder keeps only the newest push: vLLM
    records the path it last loaded from, so that one is removed only when the next push replaces it.

    Args:
        directory (`str`): A folder at the same path on this machine and on every server's (e.g. an NFS mount).
    """

    name = "filesystem"

    def __init__(self, directory: str) -> None:
        if not isinstance(directory, str) or not directory:
            raise ValueError(f"`directory` must be a folder path, got {directory!r}.")
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


# -------------------------------------------------------------------------------------------- push phases
def new_session() -> str:
    """A fresh push id (also a safe folder name)."""
    return uuid.uuid4().hex


def push_weights(
    clients: Sequence[VLLMServerClient],
    weights: NamedTensors,
    transport: ServerWeightTransport,
    version: str,
    target: WeightTarget,
) -> PushReport:
    """Pushes full (or partial) weights to `clients`: send to all, then swap on each (see the module docstring).

    Args:
        clients (`Sequence[VLLMServerClient]`): The servers.
        weights (`list[tuple[str, torch.Tensor]]`): Checked `(checkpoint name, tensor)` pairs.
        transport (`ServerWeightTransport`): How the bytes travel.
        version (`str`): The weight version to record on each server (`/update_weight_version`).
        target (`WeightTarget`): The engine's description (its dtype is what is sent).

    Returns:
        `PushReport`: Which servers took the weights, and why the others did not.
    """
    started = time.perf_counter()
    weights = [(n, _cast(t, target.dtype)) for n, t in weights]
    session = new_session()
    report = PushReport(bytes_sent=sum(t.numel() * t.element_size() for _, t in weights))
    failures = transport.send_weights(clients, weights, session)
    for url, exc in failures.items():
        report.failures[url] = (
            f"sending the weights failed ({_describe(exc)}); it still serves its previous weights. "
            f"{_send_remedy(transport)}"
        )
    ready = [c for c in clients if c.base_url not in failures]
    _swap(ready, lambda c: transport.load_weights(c, session, len(weights)), version, report)
    for client in ready:
        if client.base_url in report.servers:
            client.adapter = None  # full weights replace whatever adapter was served
    if isinstance(transport, SharedFilesystem) and report.servers:
        transport.finish("weights", session)
    report.seconds = time.perf_counter() - started
    return report


def push_adapter(
    clients: Sequence[VLLMServerClient], adapter: AdapterExport, transport: ServerWeightTransport, version: str
) -> PushReport:
    """Pushes a LoRA adapter to `clients`, loaded in place under `ADAPTER_NAME`; requests then name it.

    Args:
        clients (`Sequence[VLLMServerClient]`): The servers (started with `--enable-lora`).
        adapter (`AdapterExport`): The adapter, as `peft` saves it.
        transport (`ServerWeightTransport`): How the bytes travel.
        version (`str`): The weight version to record on each server.

    Returns:
        `PushReport`: Which servers took the adapter, and why the others did not.
    """
    started = time.perf_counter()
    session = new_session()
    report = PushReport(bytes_sent=adapter.nbytes)
    folders, failures = transport.send_adapter(clients, adapter, session)
    for url, exc in failures.items():
        report.failures[url] = (
            f"sending the LoRA adapter failed ({_describe(exc)}); it still serves its previous weights. "
            f"{_send_remedy(transport)}"
        )
    ready = [c for c in clients if c.base_url not in failures]
    _swap(ready, lambda c: c.load_lora_adapter(ADAPTER_NAME, folders[c.base_url]), version, report)
    for client in ready:
        if client.base_url in report.servers:
            client.adapter = ADAPTER_NAME
    if isinstance(transport, SharedFilesystem) and report.servers:
        transport.finish("adapters", session)
    report.seconds = time.perf_counter() - started
    return report


def _swap(
    clients: Sequence[VLLMServerClient], load: Callable[[VLLMServerClient], None], version: str, report: PushReport
) -> None:
    """Phase 2 on each client, concurrently: pause, load, drop the prefix cache, record the version, resume."""

    def swap(client: VLLMServerClient) -> float:
        try:
            client.pause()
        except Exception as exc:
            report.failures[client.base_url] = (
                f"it could not be paused ({_describe(exc)}); it still serves its previous weights. Check that it "
                "runs with VLLM_SERVER_DEV_MODE=1 (`trl-inference serve` sets it) and is reachable."
            )
            raise
        paused = time.perf_counter()
        try:
            load(client)
            client.reset_prefix_cache()
            client.set_weight_version(version)
        except Exception as exc:
            report.failures[client.base_url] = (
                f"loading the pushed weights failed ({_describe(exc)}); it is left paused, since it may hold a mix of "
                "old and new weights. Push the weights again (the next `load_weights` does) or restart the server."
            )
            report.left_paused.append(client.base_url)
            raise
        client.resume()
        return time.perf_counter() - paused

    durations: list[float] = []
    errors = _each(clients, lambda c: durations.append(swap(c)))
    for url, exc in errors.items():
        report.failures.setdefault(url, f"it could not be resumed ({_describe(exc)}); restart the server.")
    report.servers = [c.base_url for c in clients if c.base_url not in report.failures]
    report.pause_seconds = max(durations, default=0.0)


# ------------------------------------------------------------------------------------------------ helpers
def describe_server(client: VLLMServerClient) -> dict[str, Any] | None:
    """The worker extension's description of the server's model (`trl_describe`), or `None` without the extension.

    Raises:
        WeightPushError: If the server has no weight-sync routes at all (started without `VLLM_SERVER_DEV_MODE=1`).
    """
    try:
        results = client.collective_rpc("trl_describe", timeout=60)
    except VLLMServerError as exc:
        if exc.status == 404:
            raise WeightPushError(
                f"The vLLM server at {client.base_url} has no weight-sync routes, so it cannot receive weights. Start "
                f"it with `trl-inference serve MODEL` (or `vllm serve` with VLLM_SERVER_DEV_MODE=1 and "
                f"`--worker-extension-cls {WORKER_EXTENSION}`); nothing was sent."
            ) from None
        if "trl_describe" in exc.body and "not implemented" in exc.body:
            return None
        raise
    return results[0] if results and isinstance(results[0], dict) else None


def _each(clients: Sequence[VLLMServerClient], work: Callable[[VLLMServerClient], Any]) -> dict[str, BaseException]:
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


def _send_chunk(client: VLLMServerClient, *, session: str, data: str, digest: str) -> None:
    client.collective_rpc("trl_stage_chunk", session, data, digest)


def _chunks(weights: NamedTensors, chunk_bytes: int) -> Iterator[dict[str, torch.Tensor]]:
    """Groups tensors, in order, into dicts of at most about `chunk_bytes`.

    A tensor larger than a chunk (e.g. an embedding matrix) is sent in pieces along its first dimension, which the
    worker joins again (`vllm_worker.assemble`); a piece is never smaller than one row.
    """
    chunk: dict[str, torch.Tensor] = {}
    size = 0
    for name, whole in weights:
        for key, tensor in _pieces(name, whole, chunk_bytes):
            nbytes = tensor.numel() * tensor.element_size()
            if chunk and size + nbytes > chunk_bytes:
                yield chunk
                chunk, size = {}, 0
            chunk[key] = tensor
            size += nbytes
    if chunk:
        yield chunk


def _pieces(name: str, tensor: torch.Tensor, chunk_bytes: int) -> list[tuple[str, torch.Tensor]]:
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes <= chunk_bytes or tensor.dim() == 0 or tensor.shape[0] < 2:
        return [(name, tensor)]
    rows = max(1, chunk_bytes // max(1, nbytes // tensor.shape[0]))
    parts = tensor.split(rows, dim=0)
    return [(split_name(name, k, len(parts)), part) for k, part in enumerate(parts)]


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """`tensor` in the engine's dtype, so no more bytes travel than the engine keeps (floating tensors only)."""
    if dtype is None or not tensor.is_floating_point() or tensor.dtype == dtype:
        return tensor
    return tensor.to(dtype)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:300]}"


def _send_remedy(transport: ServerWeightTransport) -> str:
    if isinstance(transport, HTTPChunks):
        return (
            "Check that it was started with `trl-inference serve` (or `--worker-extension-cls "
            f"{WORKER_EXTENSION}` and VLLM_SERVER_DEV_MODE=1) and has host memory for a copy of the weights."
        )
    return "Check that the shared folder is mounted at the same path on the server."


def dtype_from_name(name: str | None) -> torch.dtype | None:
    """`torch.float32` for `"float32"` (or `"torch.float32"`); `None` for anything unknown."""
    if not name:
        return None
    value = getattr(torch, str(name).removeprefix("torch."), None)
    return value if isinstance(value, torch.dtype) else None
