"""The documented examples run end to end (on a tiny local model) and show what they claim."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_inference_examples_on_tiny_model():
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples" / "inference_examples.py"), "--model", "tiny"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    out = proc.stdout
    assert proc.returncode == 0, out[-2000:] + proc.stderr[-3000:]
    for title in ("Basic generation", "Logits and log-probabilities", "Tool calling", "Caching", "RL integration"):
        assert f"=== {title}" in out
    gaps = [float(g) for g in re.findall(r"max \|diff\| = ([0-9.e+-]+)", out)]
    assert gaps and all(g < 1e-4 for g in gaps)
    assert "greedy call 2: cached=True" in out
    assert "hermes: [('calculator', {'expression': '17 * 23'})]" in out
    grad = float(re.search(r"LoRA gradient L1 norm ([0-9.]+)", out).group(1))
    assert grad > 0
    assert "=== Hugging Face and vLLM side by side ===" in out
