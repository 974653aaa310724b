"""The README's TRL snippets run as written (on a tiny local model)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def snippet(name: str) -> str:
    match = re.search(rf"<!-- readme-test: {name} -->\n```python\n(.*?)```", README.read_text(), re.DOTALL)
    assert match, f"README has no snippet {name!r}"
    return match.group(1)


@pytest.mark.slow
def test_grpo_snippet(tiny_model_dir, tmp_path):
    namespace = {"model_path": tiny_model_dir, "output_dir": str(tmp_path / "grpo")}
    exec(compile(snippet("grpo"), "README.md:grpo", "exec"), namespace)  # our own documentation, not model output
    logs = [e for e in namespace["trainer"].state.log_history if "kl" in e]
    assert len(logs) == 2 and all(e["completions/mean_length"] > 0 for e in logs)


def test_ppo_snippet(tiny_model_dir):
    namespace = {"model_path": tiny_model_dir}
    exec(compile(snippet("ppo"), "README.md:ppo", "exec"), namespace)
    losses = namespace["losses"]
    assert all(torch.isfinite(v) for v in losses.values())
    value_head = namespace["policy"].value_head
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in value_head.parameters())
