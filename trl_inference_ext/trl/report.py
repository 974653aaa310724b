"""End-of-run report for GRPO runs: reward at the start and end with spread, tool use, KL, speed, and a plot."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .stats import RolloutRecorder


def _mean_se(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, math.nan
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var / len(values))


def training_report(
    log_history: list[dict[str, Any]], recorder: RolloutRecorder, window: int | None = None
) -> dict[str, Any]:
    """Summarises a run from `trainer.state.log_history` and the rollout statistics.

    Args:
        log_history (`list[dict]`): The trainer's log history (one entry per logged step).
        recorder (`RolloutRecorder`): The recorder that wrapped the run's `rollout_func`.
        window (`int`, *optional*): Steps averaged at the start and at the end; defaults to a quarter of the steps
            (at least 1), since a single step's reward is a mean over a handful of completions.

    Returns:
        `dict`: `reward_start`/`reward_end` (mean, standard error over the window's steps),
        `reward_rise_significant` (the rise exceeds the combined standard error), `call_rate_*` (completions with a
        call), `validity_*` (calls that were well formed), `success_*` (calls that ran without error: known tool,
        valid arguments), `kl_end`, `tokens_per_second`, `steps`.
    """
    rewards = [float(e["reward"]) for e in log_history if "reward" in e]
    kls = [float(e["kl"]) for e in log_history if "kl" in e]
    if window is None:
        window = len(rewards) // 4
    window = max(1, min(window, len(rewards) // 2 or 1))
    start, end = _mean_se(rewards[:window]), _mean_se(rewards[-window:])
    combined = math.hypot(start[1], end[1]) if not math.isnan(start[1] + end[1]) else math.inf
    steps = recorder.steps
    first, last = steps[:window], steps[-window:]
    return {
        "steps": len(rewards),
        "window": window,
        "rewards": rewards,
        "reward_start": start,
        "reward_end": end,
        "reward_rise_significant": (end[0] - start[0]) > combined,
        "call_rate_start": _mean_se([s.call_rate for s in first])[0],
        "call_rate_end": _mean_se([s.call_rate for s in last])[0],
        "validity_start": _mean_se([s.validity for s in first])[0],
        "validity_end": _mean_se([s.validity for s in last])[0],
        "success_start": _mean_se([s.success for s in first])[0],
        "success_end": _mean_se([s.success for s in last])[0],
        "kl_end": kls[-1] if kls else math.nan,
        "tokens_per_second": recorder.tokens_per_second,
    }


def format_report(report: dict[str, Any], adapter_dir: str | Path, plot_path: str | Path | None = None) -> str:
    """Renders `training_report(...)` as a few lines of text."""
    (s_mean, s_se), (e_mean, e_se) = report["reward_start"], report["reward_end"]
    verdict = "rose (more than the combined standard error)" if report["reward_rise_significant"] else "did not rise"
    lines = [
        f"Steps: {report['steps']} (start/end = mean of the first/last {report['window']} steps)",
        f"Reward: {s_mean:.3f} ± {s_se:.3f} -> {e_mean:.3f} ± {e_se:.3f}: {verdict}",
        f"Tool-call rate: {report['call_rate_start']:.2f} -> {report['call_rate_end']:.2f}; "
        f"well-formed calls: {report['validity_start']:.2f} -> {report['validity_end']:.2f}; "
        f"calls that ran: {report['success_start']:.2f} -> {report['success_end']:.2f}",
        f"KL to the adapter-off reference (last step): {report['kl_end']:.4f}",
        f"Generation: {report['tokens_per_second']:.1f} model tokens/s",
        f"Adapter saved to: {adapter_dir}",
    ]
    if plot_path is not None:
        lines.append(f"Reward curve: {plot_path}")
    return "\n".join(lines)


def plot_rewards(log_history: list[dict[str, Any]], path: str | Path, title: str | None = None) -> Path:
    """Saves the per-step reward (and each reward function's mean, unweighted) as a PNG.

    Args:
        log_history (`list[dict]`): The trainer's log history.
        path (`str` or `Path`): Where to write the PNG.
        title (`str`, *optional*): Plot title, e.g. how the total is weighted.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    entries = [e for e in log_history if "reward" in e]
    steps = list(range(1, len(entries) + 1))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [e["reward"] for e in entries], marker="o", label="total reward")
    for key in sorted({k for e in entries for k in e if k.startswith("rewards/") and k.endswith("/mean")}):
        values = [math.nan if e.get(key) is None else e[key] for e in entries]  # TRL logs None for a skipped function
        if not all(math.isnan(v) for v in values):
            ax.plot(steps, values, linestyle="--", label=key[len("rewards/") : -5])
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("mean reward")
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
