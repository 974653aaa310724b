"""Weight pushes over NCCL: the trainer's GPU broadcasts tensors straight into each server's GPUs.

Written against vLLM's own weight-transfer API (`vllm.distributed.weight_transfer`): the server runs vLLM's NCCL
engine (`trl-inference serve --weight-transfer nccl`, i.e. `--weight-transfer-config '{"backend": "nccl"}'`) and this
side drives vLLM's `NCCLTrainerWeightTransferEngine` through the server's weight-transfer routes
(`/init_weight_transfer_engine`, `/start_weight_update`, `/update_weights`, `/finish_weight_update`), with the API key.

Each server gets its own NCCL group (this process is rank 0, the server's workers follow), opened at the first push
on a free port of `master_address` (an address of this machine that the servers can reach). NCCL writes straight into
the served weights, so unlike `HttpChunkTransfer` nothing is staged: the whole transfer happens in phase 2 of
`push.push_weights`, while the server is paused, and a transfer that fails half-way leaves it paused (never
serving a mix). LoRA adapters are small; they travel as HTTP chunks (`send_adapter`).

Needs CUDA on both sides and the servers' GPUs able to reach this machine's (NCCL over the network or NVLink).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import urllib.parse
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from ....errors import InvalidValueError, OperationError
from ..client import VLLMServerClient
from .checks import NamedTensors
from .http_chunks import HttpChunkTransfer
from .lora import AdapterExport

SERVER_FLAG = "--weight-transfer nccl"
"""What `trl-inference serve` needs to start a server this transfer can reach."""
NCCL_ADDRESS_ENV = "TRL_INFERENCE_NCCL_ADDRESS"
"""The address of this machine that servers reach for the NCCL rendezvous (default: derived from its host name)."""


class _KeyedWeightSyncClient:
    """vLLM's `VLLMWeightSyncClient` protocol over our client, so every route carries the API key."""

    def __init__(self, client: VLLMServerClient) -> None:
        self.client = client

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self.client.request("POST", "/init_weight_transfer_engine", {"init_info": init_info}, max_retries=0)

    def start_weight_update(self) -> None:
        self.client.request("POST", "/start_weight_update", max_retries=0)

    def update_weights(self, update_info: Any) -> None:
        self.client.request("POST", "/update_weights", {"update_info": update_info}, max_retries=0)

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        body = None if weight_version is None else {"weight_version": weight_version}
        self.client.request("POST", "/finish_weight_update", body, max_retries=0)

    def shutdown_weight_transfer_engine(self) -> None:
        self.client.request("POST", "/shutdown_weight_transfer_engine", max_retries=0)


def _weight_source(weights: NamedTensors, device: torch.device) -> Any:
    """A vLLM `WeightSource` over `(checkpoint name, tensor)` pairs, each moved to `device` as it is sent."""
    from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource

    class PushedWeights(WeightSource):
        def metadata(self) -> list[ParamMeta]:
            return [ParamMeta(name, t.dtype, tuple(t.shape)) for name, t in weights]

        def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                yield name, tensor.detach().to(device, non_blocking=True).contiguous()

    return PushedWeights()


class NcclTransfer:
    """Pushes weights with vLLM's NCCL weight-transfer engine (see the module docstring).

    Args:
        master_address (`str`, *optional*): An address of this machine the servers reach (default: this machine's
            host name for remote servers, `127.0.0.1` for servers on the loopback interface).
        device (`str` or `torch.device`, *optional*, defaults to `"cuda"`): The GPU this side broadcasts from.
        packed (`bool`, *optional*, defaults to `True`): vLLM's packed broadcast (tensors batched into buffers).
        chunk_bytes (`int`, *optional*): Bytes per HTTP chunk for LoRA adapters (see `HttpChunkTransfer`).

    Raises:
        RuntimeError: If CUDA is not available here.
    """

    name = "nccl"
    needs_worker_extension = False

    def __init__(
        self,
        master_address: str | None = None,
        device: str | torch.device = "cuda",
        packed: bool = True,
        chunk_bytes: int | None = None,
    ) -> None:
        if not torch.cuda.is_available():
            raise OperationError(
                "`weight_transfer='nccl'` needs a CUDA GPU on the trainer's side (and servers started with "
                f"`trl-inference serve ... {SERVER_FLAG}` on GPUs); on CPU use 'http' or 'filesystem'."
            )
        if master_address is not None and (not isinstance(master_address, str) or not master_address):
            raise InvalidValueError(f"`master_address` must be a host name or IP address, got {master_address!r}.")
        self.master_address = master_address
        self.device = torch.device(device)
        self.packed = bool(packed)
        self._adapters = HttpChunkTransfer() if chunk_bytes is None else HttpChunkTransfer(chunk_bytes)
        self._engines: dict[str, Any] = {}
        self._pending: dict[str, NamedTensors] = {}
        self._lock = threading.Lock()  # one broadcast at a time on this GPU

    # ---------------------------------------------------------------------------------- WeightTransfer
    def send_weights(
        self, clients: Sequence[VLLMServerClient], weights: NamedTensors, session: str
    ) -> dict[str, BaseException]:
        """Opens the NCCL group of each server that has none yet and keeps `weights` for phase 2 (no copy)."""
        failures: dict[str, BaseException] = {}
        for client in clients:
            try:
                self._connect(client)
            except Exception as exc:
                self._engines.pop(client.base_url, None)
                failures[client.base_url] = exc
        self._pending = {session: weights}  # only the newest push is kept
        return failures

    def load_weights(self, client: VLLMServerClient, session: str, count: int) -> None:
        """Broadcasts the pushed weights into the (paused) server, which loads them layer by layer."""
        weights = self._pending.get(session)
        if weights is None or len(weights) != count:
            raise OperationError(f"No pushed weights of session {session!r} to broadcast.")
        engine = self._engines[client.base_url]
        with self._lock:
            engine.source = _weight_source(weights, self.device)
            try:
                engine.send_weights()
            except Exception:
                self._drop(client.base_url)  # the group is unusable after a failed collective: reopen next time
                raise
            finally:
                engine.source = None

    def send_adapter(
        self, clients: Sequence[VLLMServerClient], adapter: AdapterExport, session: str
    ) -> tuple[dict[str, str], dict[str, BaseException]]:
        """Sends the (small) adapter as HTTP chunks; see `HttpChunkTransfer.send_adapter`."""
        return self._adapters.send_adapter(clients, adapter, session)

    def finish(self, kind: str, session: str) -> None:
        """Nothing to clean up (the newest push's tensors are kept until the next push replaces them)."""

    def send_remedy(self) -> str:
        """Where to look when the NCCL group of a server could not be opened."""
        return (
            f"Check that it was started with `trl-inference serve ... {SERVER_FLAG}` on a GPU and that it reaches "
            f"this machine at the address in ${{{NCCL_ADDRESS_ENV}}} (or this host's name)."
        )

    def close(self) -> None:
        """Closes every NCCL group (best effort: a server may be gone)."""
        for url in list(self._engines):
            self._drop(url)

    # ------------------------------------------------------------------------------------------- helpers
    def _connect(self, client: VLLMServerClient) -> None:
        if client.base_url in self._engines:
            return
        from vllm.distributed.weight_transfer.nccl_engine import (
            NCCLTrainerInitInfo,
            NCCLTrainerWeightTransferEngine,
        )

        workers = int(client.request("GET", "/get_world_size", max_retries=0)["world_size"])
        address = self.master_address or _address_for(client.base_url)
        init = NCCLTrainerInitInfo(
            master_address=address, master_port=_free_port(address), world_size=1 + workers, packed=self.packed, rank=0
        )
        placeholder = _weight_source([], self.device)  # the engine needs a source; each push sets its own
        with torch.cuda.device(self.device):
            engine = NCCLTrainerWeightTransferEngine.trainer_init(
                init, client=_KeyedWeightSyncClient(client), source=placeholder
            )
        self._engines[client.base_url] = engine

    def _drop(self, url: str) -> None:
        engine = self._engines.pop(url, None)
        if engine is None:
            return
        with contextlib.suppress(Exception):  # the server may be unreachable; its group dies with it
            engine.shutdown()
            engine.client.shutdown_weight_transfer_engine()


def _address_for(url: str) -> str:
    """The address of this machine that the server at `url` reaches: loopback for a local server."""
    host = urllib.parse.urlsplit(url).hostname
    if host in ("127.0.0.1", "localhost", "::1"):
        return "127.0.0.1"
    return socket.gethostbyname(socket.gethostname())


def _free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])
