"""Per-step rollout statistics (tool-call rate and validity, generation speed) for reports and plots."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RolloutStep:
    """What one `rollout_func` call produced."""

    step: int
    completions: int
    model_tokens: int
    seconds: float
    with_call: int
    calls: int
    valid_calls: int
    successful_calls: int = 0

    @property
    def call_rate(self) -> float:
        """Fraction of completions with at least one tool call."""
        return self.with_call / self.completions if self.completions else 0.0

    @property
    def validity(self) -> float:
        """Fraction of calls that were well formed (0 when there were none)."""
        return self.valid_calls / self.calls if self.calls else 0.0

    @property
    def success(self) -> float:
        """Fraction of calls that ran without error (known tool, valid arguments; 0 when there were none)."""
        return self.successful_calls / self.calls if self.calls else 0.0


@dataclass
class RolloutRecorder:
    """Wraps a `rollout_func` and records a `RolloutStep` per call; behaves exactly like the wrapped function.

    Args:
        rollout (`Callable`): A TRL `rollout_func(prompts, trainer)`.
    """

    rollout: Callable[[list[Any], Any], dict[str, Any]]
    steps: list[RolloutStep] = field(default_factory=list)

    def __call__(self, prompts: list[Any], trainer: Any) -> dict[str, Any]:
        """Runs the wrapped rollout and records its statistics."""
        start = time.perf_counter()
        out = self.rollout(prompts, trainer)
        seconds = time.perf_counter() - start
        calls = out.get("tool_calls") or [[] for _ in out["completion_ids"]]
        masks = out.get("env_mask") or [[1] * len(c) for c in out["completion_ids"]]
        results = out.get("tool_results") or []
        self.steps.append(
            RolloutStep(
                step=int(trainer.state.global_step),
                completions=len(out["completion_ids"]),
                model_tokens=sum(sum(m) for m in masks),
                seconds=seconds,
                with_call=sum(1 for c in calls if c),
                calls=sum(len(c) for c in calls),
                valid_calls=sum(1 for c in calls for call in c if call.get("status") == "ok"),
                successful_calls=sum(1 for r in results for result in r if result.get("ok")),
            )
        )
        return out

    @property
    def tokens_per_second(self) -> float:
        """Model tokens generated per second of rollout time, over all steps."""
        seconds = sum(s.seconds for s in self.steps)
        return sum(s.model_tokens for s in self.steps) / seconds if seconds else 0.0
