"""Several vLLM servers behind one client: requests spread by prompt group, failover, weights pushed to all.

vLLM is the distributed engine; this module adds only what a client of several servers needs:

- **Spreading.** Requests of one group (the `n` samples of a prompt, the scoring prefixes of one sequence) go to one
  server, so its prefix cache serves the whole group. Each group goes to the server with the least outstanding work
  (prompt plus budgeted completion tokens of its requests in flight), with at most `max_concurrent_requests`
  requests in flight per server, so a faster server takes more groups.
- **Failover.** A server that cannot be reached (killed, restarted, network down, timed out) is dropped and the
  groups it had not finished are sent to the others; each request's answer is kept exactly once, in input order.
- **Re-admission.** A dropped server comes back only when `/health` answers *and* it holds the current weights: it
  reports the weight version of the latest push (it only lost its connection), or it took part in a new push. A
  restarted server reports vLLM's default version, so it waits for the next push.
- **Weights.** `push_weights` / `push_adapter` send to every server that is in service or healthy again
  (`weights.push`); servers the push could not reach are dropped with the reason.

A pool of one server is the single-server client.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

from ...errors import InvalidValueError, NoServerLeftError, VLLMServerUnusableError, WeightPushError
from .affinity import PrefixAffinity
from .client import CompletionRequests, VLLMServerClient
from .server.worker import WORKER_EXTENSION
from .weights.checks import DEFAULT_PACKED_MODULES, NamedTensors
from .weights.http_chunks import HttpChunkTransfer
from .weights.lora import AdapterExport
from .weights.push import describe_server, dtype_from_name, push_adapter, push_weights
from .weights.transfer import PushReport, WeightTarget, WeightTransfer

logger = logging.getLogger(__name__)

DEFAULT_VERSION = "default"
"""The weight version a vLLM server reports before any push (`/weight_info`)."""


class ServerPool(CompletionRequests):
    """Generates, scores and receives weights through one or more vLLM servers.

    Args:
        clients (`Sequence[VLLMServerClient]`): One client per server (distinct URLs).
        weight_transfer (`WeightTransfer`, *optional*): How pushed weights travel (default: `HttpChunkTransfer()`).
        readmit_interval (`float`, *optional*, defaults to 5.0): Seconds between two health probes of the dropped
            servers (probes run at the start of a batch).
    """

    def __init__(
        self,
        clients: Sequence[VLLMServerClient],
        weight_transfer: WeightTransfer | None = None,
        readmit_interval: float = 5.0,
    ) -> None:
        urls = [c.base_url for c in clients]
        if not urls:
            raise InvalidValueError("A server pool needs at least one server.")
        if len(set(urls)) != len(urls):
            raise InvalidValueError(f"The same server is listed twice in {urls}.")
        self.clients = list(clients)
        self.weight_transfer: WeightTransfer = weight_transfer or HttpChunkTransfer()
        self.readmit_interval = readmit_interval
        self.dropped: dict[str, str] = {}
        """URL -> why the server is out of service."""
        self.weight_version = DEFAULT_VERSION
        """The version every server in service holds (set by each push)."""
        self._lock = threading.Lock()
        self._last_probe = 0.0
        self.affinity = PrefixAffinity()
        """Which server answered which prompt: a rollout's later turns go where its earlier ones went."""

    # ------------------------------------------------------------------------------------------- members
    @property
    def base_urls(self) -> list[str]:
        """All servers' URLs, in service or not."""
        return [c.base_url for c in self.clients]

    @property
    def adapter(self) -> str | None:
        """The LoRA adapter requests are sent to (the same on every server in service), or `None`."""
        live = self.live
        return live[0].adapter if live else None

    @property
    def live(self) -> list[VLLMServerClient]:
        """The servers in service."""
        return [c for c in self.clients if c.base_url not in self.dropped]

    def drop(self, client: VLLMServerClient, reason: str) -> None:
        """Takes `client` out of service (logged once, with the reason)."""
        with self._lock:
            if client.base_url in self.dropped:
                return
            self.dropped[client.base_url] = reason
        logger.warning("vLLM server %s is out of service: %s", client.base_url, reason)

    def readmit(self, force: bool = False) -> list[str]:
        """Brings back dropped servers that are healthy and hold the current weights.

        Args:
            force (`bool`, *optional*, defaults to `False`): Probe now, even within `readmit_interval` of the last
                probe.

        Returns:
            `list[str]`: The URLs brought back.
        """
        now = time.monotonic()
        force = force or not self.live  # with no server in service there is nothing to lose by probing
        if not self.dropped or (not force and now - self._last_probe < self.readmit_interval):
            return []
        self._last_probe = now
        back = []
        for client in [c for c in self.clients if c.base_url in self.dropped]:
            if client.unusable is not None or not client.is_healthy(timeout=5.0):
                continue
            try:
                current = client.weight_version() == self.weight_version
            except Exception:  # the server is up but not answering yet; try again at the next probe
                continue
            if current:
                with self._lock:
                    self.dropped.pop(client.base_url, None)
                back.append(client.base_url)
                logger.info("vLLM server %s is back in service.", client.base_url)
        return back

    def adopt_weight_version(self) -> str:
        """Takes the weight version the servers in service report as the current one (when they all agree).

        For a client whose servers were updated by someone else, e.g. the main process of a multi-process trainer:
        without it, a server that drops out would never rejoin, since it could never match this client's version.

        Returns:
            `str`: The version now current.
        """
        try:
            versions = {client.weight_version() for client in self.live}
        except Exception:  # an unreachable server is dropped at the next request; keep what we know
            return self.weight_version
        if len(versions) == 1:
            (version,) = versions
            if version is not None:
                self.weight_version = version
        return self.weight_version

    def max_model_len(self) -> int | None:
        """The served model's `max_model_len` (asked of the first server in service)."""
        return self._first_live().max_model_len()

    def served_model(self) -> str:
        """The served model id (asked of the first server in service)."""
        return self._first_live().served_model()

    def _first_live(self) -> VLLMServerClient:
        self.readmit()
        live = self.live
        if not live:
            raise self._no_server_left()
        return live[0]

    def _reachable(self) -> VLLMServerClient:
        """A server that answers, in service or not (to read the model's structure, which does not change)."""
        self.readmit()
        for client in self.live + [c for c in self.clients if c.base_url in self.dropped]:
            if client.base_url not in self.dropped or client.is_healthy(timeout=5.0):
                return client
        raise self._no_server_left()

    def _no_server_left(self) -> NoServerLeftError:
        reasons = "; ".join(f"{url}: {why}" for url, why in self.dropped.items())
        return NoServerLeftError(
            f"No vLLM server left in service ({reasons}). Restart the servers (`trl-inference serve ...`); a server "
            "that is healthy again rejoins at the next weight push (or at once when it still holds the current "
            "weights)."
        )

    # ------------------------------------------------------------------------------------------- requests
    def complete(self, payloads: list[dict[str, Any]], groups: list[int] | None = None) -> list[dict[str, Any]]:
        """Sends `/v1/completions` bodies over the servers, one group per server, and returns answers in order.

        Args:
            payloads (`list[dict]`): Request bodies without the model id.
            groups (`list[int]`, *optional*): Group key of each body (default: each body its own group).

        Returns:
            `list[dict]`: The JSON answers, in input order, one per body.

        Raises:
            NoServerLeftError: If every server dropped out before all requests were answered (with a single
                server, its own `ConnectionError` / `TimeoutError` is raised instead).
            VLLMServerError: If a server refused a request (an HTTP error other than 502/503/504): that is a problem
                with the request, not the server, so it is not retried elsewhere.
        """
        self.readmit()
        if not payloads:
            return []
        keys = list(range(len(payloads))) if groups is None else list(groups)
        if len(keys) != len(payloads):
            raise InvalidValueError(f"`groups` has {len(keys)} entries for {len(payloads)} payloads.")
        members: dict[int, list[int]] = {}
        for index, key in enumerate(keys):
            members.setdefault(key, []).append(index)
        pending = deque(members.values())  # groups in input order
        answers: list[dict[str, Any] | None] = [None] * len(payloads)
        outstanding = {c.base_url: 0 for c in self.clients}
        in_flight: dict[Future[list[dict[str, Any]]], tuple[VLLMServerClient, list[int], int, int]] = {}
        per_server = {c.base_url: 0 for c in self.clients}
        threads = sum(c.max_concurrent_requests for c in self.clients)  # groups in flight are at most this many
        last_error: BaseException | None = None
        with ThreadPoolExecutor(max_workers=max(1, min(threads, len(pending)))) as pool:
            while pending or in_flight:
                while pending:
                    group = pending[0]
                    sticky = self._sticky_client(payloads[group[0]])
                    candidates = [sticky] if sticky is not None else self.live
                    open_ = [c for c in candidates if _fits(c, len(group), per_server[c.base_url])]
                    if not open_:
                        break  # its own server is busy (or every server is): wait for a group to finish
                    client = min(open_, key=lambda c: (outstanding[c.base_url], per_server[c.base_url]))
                    pending.popleft()
                    work = sum(_work(payloads[i]) for i in group)
                    slots = min(len(group), client.max_concurrent_requests)
                    outstanding[client.base_url] += work
                    per_server[client.base_url] += slots
                    future = pool.submit(_send_group, client, [payloads[i] for i in group])
                    in_flight[future] = (client, group, work, slots)
                if not in_flight:
                    if len(self.clients) == 1 and last_error is not None:
                        raise last_error  # one server: its own error says it best (it rejoins once healthy)
                    raise self._no_server_left() from last_error
                done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for future in done:
                    client, group, work, slots = in_flight.pop(future)
                    outstanding[client.base_url] -= work
                    per_server[client.base_url] -= slots
                    exc = future.exception()
                    if exc is None:
                        for index, answer in zip(group, future.result()):
                            answers[index] = answer
                        self.affinity.remember(_prompt_ids(payloads[group[0]]), client.base_url)
                    elif isinstance(exc, (ConnectionError, TimeoutError, VLLMServerUnusableError)):
                        self.drop(client, f"{type(exc).__name__}: {exc}")
                        last_error = exc
                        pending.appendleft(group)  # answered by another server, before later groups
                    else:
                        for other in in_flight:
                            other.cancel()
                        raise exc
        assert all(a is not None for a in answers)
        return [a for a in answers if a is not None]

    # -------------------------------------------------------------------------------------------- weights
    def describe(self) -> WeightTarget:
        """What the served model looks like to a push (from the worker extension of a server that answers).

        Without the extension, the parameter names are unknown (`params=None`) and vLLM's usual fused modules are
        assumed (shared-folder pushes only).

        Raises:
            WeightPushError: If the server cannot receive weights this pool's way (the message says how to start it).
        """
        client = self._reachable()
        info = describe_server(client)
        if info is None:
            if self.weight_transfer.needs_worker_extension:
                raise WeightPushError(
                    f"The vLLM server at {client.base_url} lacks the worker extension that receives weights over "
                    f"HTTP. Start it with `trl-inference serve MODEL` (or add `--worker-extension-cls "
                    f"{WORKER_EXTENSION}`), or push through a shared folder (`weight_transfer='filesystem'`, "
                    "`weight_transfer_dir=`); nothing was sent."
                )
            return WeightTarget(params=None, packed_modules=dict(DEFAULT_PACKED_MODULES))
        packed = {k: list(v) for k, v in (info.get("packed_modules") or {}).items()} or dict(DEFAULT_PACKED_MODULES)
        rank = info.get("max_lora_rank")
        return WeightTarget(
            params=set(info.get("params") or ()) or None,
            packed_modules=packed,
            tied_embeddings=bool(info.get("tied_embeddings", False)),
            dtype=dtype_from_name(info.get("dtype")),
            max_lora_rank=int(rank) if isinstance(rank, int) else None,
        )

    def _sticky_client(self, payload: dict[str, Any]) -> VLLMServerClient | None:
        """The live server that answered an earlier turn of this request's rollout, if any."""
        url = self.affinity.server_for(_prompt_ids(payload))
        return next((c for c in self.live if c.base_url == url), None)

    def push_weights(self, weights: NamedTensors, version: str, target: WeightTarget) -> PushReport:
        """Pushes checked weights to every server in service or healthy again (see `weights.push.push_weights`).

        Raises:
            WeightPushError: If no server took the weights (the message names each server and what to do).
        """
        clients = self._push_targets()
        report = push_weights(clients, weights, self.weight_transfer, version, target)
        return self._after_push(report, version, "weights")

    def push_adapter(self, adapter: AdapterExport, version: str) -> PushReport:
        """Pushes a LoRA adapter to every server in service or healthy again (see `weights.push.push_adapter`).

        Raises:
            WeightPushError: If no server took the adapter.
        """
        clients = self._push_targets()
        report = push_adapter(clients, adapter, self.weight_transfer, version)
        return self._after_push(report, version, "LoRA adapter")

    def _push_targets(self) -> list[VLLMServerClient]:
        targets = [c for c in self.clients if c.base_url not in self.dropped or c.is_healthy(timeout=5.0)]
        if not targets:
            raise self._no_server_left()
        return targets

    def _after_push(self, report: PushReport, version: str, what: str) -> PushReport:
        for client in self.clients:
            if client.base_url in report.servers:
                client.unusable = None
                with self._lock:
                    self.dropped.pop(client.base_url, None)
            elif client.base_url in report.failures:
                client.unusable = f"The {what} push to {client.base_url} failed: {report.failures[client.base_url]}"
                self.drop(client, client.unusable)
        if not report.servers:
            lines = "\n".join(f"- {url}: {why}" for url, why in report.failures.items())
            raise WeightPushError(f"The {what} push reached no vLLM server:\n{lines}")
        self.weight_version = version
        self.affinity.clear()  # the servers dropped their prefix caches
        # A server that missed this push holds older weights than the others: it stays out until the next push.
        for client in self.clients:
            if client.base_url not in report.servers and client.base_url not in self.dropped:
                self.drop(client, f"it missed the push of weight version {version}")
        return report

    # ---------------------------------------------------------------------------------------------- tuning
    @property
    def retry_backoff(self) -> float:
        """Seconds before a server's first retry; doubles on each further retry."""
        return self.clients[0].retry_backoff

    @retry_backoff.setter
    def retry_backoff(self, seconds: float) -> None:
        for client in self.clients:
            client.retry_backoff = seconds

    @property
    def max_concurrent_requests(self) -> int:
        """Concurrent HTTP requests per server (each server batches them)."""
        return self.clients[0].max_concurrent_requests

    @max_concurrent_requests.setter
    def max_concurrent_requests(self, count: int) -> None:
        for client in self.clients:
            client.max_concurrent_requests = count

    def close(self) -> None:
        """Releases what the weight transfer holds (e.g. NCCL groups); connections are per request."""
        self.weight_transfer.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.base_urls!r}, dropped={sorted(self.dropped)!r})"


def _send_group(client: VLLMServerClient, payloads: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The answers to one group's bodies from one server (the requests of a group run concurrently there)."""
    return client.complete(payloads)


def _fits(client: VLLMServerClient, size: int, busy: int) -> bool:
    """Whether a group of `size` requests can start on `client`, which has `busy` request slots taken.

    A group holds as many slots as it sends at once (`min(size, max_concurrent_requests)`); a larger group than the
    server's slots starts only on an idle server, and is sent `max_concurrent_requests` requests at a time.
    """
    return busy == 0 or busy + min(size, client.max_concurrent_requests) <= client.max_concurrent_requests


def _prompt_ids(payload: dict[str, Any]) -> list[int]:
    """A request body's prompt token ids (empty for a text prompt, which is not routed by prefix)."""
    prompt = payload.get("prompt") or []
    return list(prompt) if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt) else []


def _work(payload: dict[str, Any]) -> int:
    """Tokens a request may cost a server: its prompt, plus its completion budget for each sample."""
    prompt = payload.get("prompt") or []
    return len(prompt) + int(payload.get("n", 1)) * int(payload.get("max_tokens") or 1)
