"""`recipes/grpo_environment.py` runs end to end: environments in worker processes, their reward in the logs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_environment_recipe_trains_and_logs_the_environment_reward(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    command = [
        sys.executable, str(REPO / "recipes" / "grpo_environment.py"),
        "--model", tiny_model_dir, "--output_dir", str(out), "--num_problems", "8", "--few_shot", "true",
        "--tool_parser", "hermes", "--max_steps", "2", "--per_device_train_batch_size", "4", "--num_generations", "2",
        "--max_completion_length", "24", "--max_tool_turns", "1", "--logging_steps", "1", "--report_to", "none",
        "--bf16", "false", "--save_strategy", "no", "--use_cpu", "true",
    ]  # fmt: skip
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    history = json.loads((out / "metrics.json").read_text())["log_history"]
    steps = [e for e in history if "reward" in e]
    assert len(steps) == 2
    # A random tiny model rarely computes the answer: the column is there, its values are rewards in [0, 1].
    assert all(0.0 <= e["rewards/CalculatorEnvironment/mean"] <= 1.0 for e in steps)
    assert "step   1: reward" in proc.stdout and (out / "adapter_model.safetensors").exists()
