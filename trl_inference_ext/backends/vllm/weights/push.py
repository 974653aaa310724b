"""Pushing weights and LoRA adapters into running vLLM servers.

A push to a set of servers goes in two phases, so no server ever serves a mix of old and new weights:

1. **Send.** The bytes travel to every server while it keeps serving, by a `transfer.WeightTransfer`: over HTTP in
   checksummed chunks staged in host memory by the worker extension (`http_chunks.HttpChunkTransfer`, needs no
   shared filesystem), as safetensors files in a folder every server can read (`shared_folder.SharedFolderTransfer`),
   or not at all before phase 2 (`nccl.NcclTransfer` broadcasts while the server is paused). Nothing live changes
   yet; a server that fails here keeps its old weights consistently.
2. **Swap.** Each server is paused (`/pause?mode=keep`: requests in flight are frozen, not lost), the staged weights
   are loaded in one `reload_weights` call (or the adapter is reloaded in place), the prefix cache is dropped
   (kept requests are recomputed with the new weights), the server's weight version is set, and it resumes.

A server that fails in either phase is reported in the returned failures with what to do; the caller (`ServerPool`)
takes it out of service until a later push succeeds. A server that fails while loading stays paused, so whatever mix
it holds is never served.

The fused-group completeness check (`checks.check_pushed_weights`) runs before this module sees the weights.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ....errors import VLLMServerError, WeightPushError
from ..client import VLLMServerClient
from ..server.worker import WORKER_EXTENSION
from .checks import NamedTensors
from .lora import ADAPTER_NAME, AdapterExport
from .transfer import PushReport, WeightTarget, WeightTransfer, on_each_client


def new_session() -> str:
    """A fresh push id (also a safe folder name)."""
    return uuid.uuid4().hex


def push_weights(
    clients: Sequence[VLLMServerClient],
    weights: NamedTensors,
    transfer: WeightTransfer,
    version: str,
    target: WeightTarget,
) -> PushReport:
    """Pushes full (or partial) weights to `clients`: send to all, then swap on each (see the module docstring).

    Args:
        clients (`Sequence[VLLMServerClient]`): The servers.
        weights (`list[tuple[str, torch.Tensor]]`): Checked `(checkpoint name, tensor)` pairs.
        transfer (`WeightTransfer`): How the bytes travel.
        version (`str`): The weight version to record on each server (`/update_weight_version`).
        target (`WeightTarget`): The engine's description (its dtype is what is sent).

    Returns:
        `PushReport`: Which servers took the weights, and why the others did not.
    """
    started = time.perf_counter()
    weights = [(n, _cast(t, target.dtype)) for n, t in weights]
    session = new_session()
    report = PushReport(bytes_sent=sum(t.numel() * t.element_size() for _, t in weights))
    failures = transfer.send_weights(clients, weights, session)
    for url, exc in failures.items():
        report.failures[url] = (
            f"sending the weights failed ({_describe(exc)}); it still serves its previous weights. "
            f"{transfer.send_remedy()}"
        )
    ready = [c for c in clients if c.base_url not in failures]
    _swap(ready, lambda c: transfer.load_weights(c, session, len(weights)), version, report)
    for client in ready:
        if client.base_url in report.servers:
            client.adapter = None  # full weights replace whatever adapter was served
    if report.servers:
        transfer.finish("weights", session)
    report.seconds = time.perf_counter() - started
    return report


def push_adapter(
    clients: Sequence[VLLMServerClient], adapter: AdapterExport, transfer: WeightTransfer, version: str
) -> PushReport:
    """Pushes a LoRA adapter to `clients`, loaded in place under `ADAPTER_NAME`; requests then name it.

    Args:
        clients (`Sequence[VLLMServerClient]`): The servers (started with `--enable-lora`).
        adapter (`AdapterExport`): The adapter, as `peft` saves it.
        transfer (`WeightTransfer`): How the bytes travel.
        version (`str`): The weight version to record on each server.

    Returns:
        `PushReport`: Which servers took the adapter, and why the others did not.
    """
    started = time.perf_counter()
    session = new_session()
    report = PushReport(bytes_sent=adapter.nbytes)
    folders, failures = transfer.send_adapter(clients, adapter, session)
    for url, exc in failures.items():
        report.failures[url] = (
            f"sending the LoRA adapter failed ({_describe(exc)}); it still serves its previous weights. "
            f"{transfer.send_remedy()}"
        )
    ready = [c for c in clients if c.base_url not in failures]
    _swap(ready, lambda c: c.load_lora_adapter(ADAPTER_NAME, folders[c.base_url]), version, report)
    for client in ready:
        if client.base_url in report.servers:
            client.adapter = ADAPTER_NAME
    if report.servers:
        transfer.finish("adapters", session)
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
    errors = on_each_client(clients, lambda c: durations.append(swap(c)))
    for url, exc in errors.items():
        report.failures.setdefault(url, f"it could not be resumed ({_describe(exc)}); restart the server.")
    report.servers = [c.base_url for c in clients if c.base_url not in report.failures]
    report.pause_seconds = max(durations, default=0.0)


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


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """`tensor` in the engine's dtype, so no more bytes travel than the engine keeps (floating tensors only)."""
    if dtype is None or not tensor.is_floating_point() or tensor.dtype == dtype:
        return tensor
    return tensor.to(dtype)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:300]}"


def dtype_from_name(name: str | None) -> torch.dtype | None:
    """`torch.float32` for `"float32"` (or `"torch.float32"`); `None` for anything unknown."""
    if not name:
        return None
    value = getattr(torch, str(name).removeprefix("torch."), None)
    return value if isinstance(value, torch.dtype) else None
