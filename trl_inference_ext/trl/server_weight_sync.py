"""This package's weight pushes as TRL's `WeightTransferProtocol` (`trl.experimental.async_grpo`).

`AsyncGRPOTrainer(weight_transfer=...)` streams the trainer's weights through any object with
`init_weight_transfer / pause / send_weights / resume / destroy`. TRL's default sends them over NCCL, which needs a
GPU on both sides; `ServerWeightSync` sends them the ways `VLLMBackend` does (HTTP chunks, needing no shared
filesystem, or a shared folder) to one or several servers started with `trl-inference serve`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from ..backends.vllm.backend import VLLMBackend
from ..errors import InvalidValueError
from ..module import InferenceModule

logger = logging.getLogger(__name__)


class ServerWeightSync:
    """Implements TRL's `WeightTransferProtocol` with `VLLMBackend`'s weight transfers to servers.

    Args:
        target (`InferenceModule`, `VLLMBackend`, `str` or `list[str]`): Where weights go: a module or backend in
            server mode (its servers, weight transfer and API key are used), or server URLs (then `model_name` is
            needed).
        model_name (`str`, *optional*): The served model's folder or id (for URLs: the tokenizer is loaded from it).
        **backend_kwargs: `VLLMBackend` options when `target` is URLs, e.g. `api_key=`, `weight_transfer=`,
            `weight_transfer_dir=`.

    Example:
        ```python
        from trl.experimental.async_grpo import AsyncGRPOTrainer
        from trl_inference_ext.trl import ServerWeightSync

        transfer = ServerWeightSync(["http://10.0.0.2:8000", "http://10.0.0.3:8000"], model_name=MODEL,
                                    api_key=KEY)
        trainer = AsyncGRPOTrainer(..., weight_transfer=transfer)
        ```
    """

    def __init__(
        self,
        target: InferenceModule | VLLMBackend | str | Sequence[str],
        model_name: str | None = None,
        **backend_kwargs: Any,
    ) -> None:
        if isinstance(target, InferenceModule):
            backend: Any = target.backend
        elif isinstance(target, VLLMBackend):
            backend = target
        else:
            if model_name is None:
                raise InvalidValueError("`model_name` is needed when `target` is server URLs.")
            backend = VLLMBackend(model_name, base_url=target, **backend_kwargs)
        if not isinstance(backend, VLLMBackend) or backend.servers is None:
            raise InvalidValueError(
                "`target` must be vLLM servers: a `VLLMBackend` / `InferenceModule` with `base_url`."
            )
        self.backend: VLLMBackend = backend
        self.syncs = 0
        self._paused: list[Any] = []

    def init_weight_transfer(self) -> None:
        """Checks that the servers are reachable and describe their model (the push's completeness check needs it).

        Raises:
            NoServerLeftError: If no server answers.
        """
        servers = self.backend.servers
        assert servers is not None
        servers.readmit(force=True)
        target = servers.describe()
        logger.info(
            "Weight transfer to %s ready (%s, engine dtype %s).",
            servers.base_urls,
            servers.weight_transfer.name,
            target.dtype,
        )

    def pause(self) -> None:
        """Pauses every server in service (requests in flight are kept); the push itself pauses them too."""
        self._paused = self._live()
        for client in self._paused:
            client.pause()

    def send_weights(self, iterator: Iterator[tuple[str, torch.Tensor]]) -> None:
        """Pushes `(checkpoint name, tensor)` pairs to every server (checked whole before any byte is sent).

        The servers resume as soon as the new weights are in place; `resume` then has nothing left to do.

        Raises:
            ValueError: If a name is unknown or a fused module incomplete (nothing is sent).
            WeightPushError: If no server took the weights.
        """
        self.backend.load_weights(list(iterator))
        self.syncs += 1

    def resume(self) -> None:
        """Resumes the servers `pause` paused (a no-op for those the push already resumed), except any the push left
        paused on purpose because loading failed there (they may hold a mix of old and new weights)."""
        report = self.backend.last_push
        keep = set(report.left_paused) if report is not None else set()
        for client in self._paused:
            if client.base_url not in keep:
                with contextlib.suppress(Exception):  # one unreachable server must not keep the others paused
                    client.resume()
        self._paused = []

    def destroy(self) -> None:
        """Nothing to release: every push is self-contained."""

    def _live(self) -> list[Any]:
        servers = self.backend.servers
        return [] if servers is None else servers.live


VLLMWeightTransfer = ServerWeightSync
"""The former name of `ServerWeightSync`, kept for existing code (it is no `weights.transfer.WeightTransfer`)."""
