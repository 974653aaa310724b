"""Where `VLLMBackend`'s requests and weight pushes go: the connection interface.

`VLLMBackend` plans requests (greedy repeats, seeds, scoring chunks), validates pushed weights and pads results; a
connection only carries them. Two implement it: `engine.InProcessEngine` (a `vllm.LLM` in this process) and
`pool.ServerPool` (one or more vLLM servers, with spreading and failover).
"""

from __future__ import annotations

from typing import Protocol

from ...types import SamplingConfig
from .sampling import Completion
from .weights.checks import NamedTensors
from .weights.lora import AdapterExport
from .weights.transfer import PushReport, WeightTarget


class EngineConnection(Protocol):
    """The few operations `VLLMBackend` needs from wherever vLLM runs.

    `groups` give a group key per request: requests of one group share a prefix (the samples of one prompt, the
    scoring prefixes of one sequence), and a connection with several servers keeps a group on one of them.
    """

    @property
    def adapter(self) -> str | None:
        """The pushed LoRA adapter requests are served with, or `None` for the base model."""
        ...

    def generate(
        self,
        prompts: list[list[int]],
        n: int,
        seeds: list[int | None],
        sampling: SamplingConfig,
        groups: list[int] | None = None,
    ) -> list[list[Completion]]:
        """Samples `n` completions per prompt (one request each); per request, its completions."""
        ...

    def prompt_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """Raw log-probs of every token after the first of each sequence."""
        ...

    def next_token_logprobs(
        self, prefixes: list[list[int]], targets: list[int], sampling: SamplingConfig, groups: list[int] | None = None
    ) -> list[float]:
        """Processed log-prob of each target token right after its prefix."""
        ...

    def max_model_len(self) -> int | None:
        """Longest prompt + completion the engine accepts, or `None` when unknown."""
        ...

    def describe(self) -> WeightTarget:
        """What pushed weights must fit (parameter names, fused modules, dtype, LoRA rank limit)."""
        ...

    def push_weights(self, weights: NamedTensors, version: str, target: WeightTarget) -> PushReport:
        """Replaces (some of) the weights with checked ones; pushed adapters stop being used."""
        ...

    def push_adapter(self, adapter: AdapterExport, version: str) -> PushReport:
        """Serves a LoRA adapter on top of the base weights from now on."""
        ...

    def close(self) -> None:
        """Releases the engine or connections."""
        ...
