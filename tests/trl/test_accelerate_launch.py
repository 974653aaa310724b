"""`accelerate launch` with two real CPU processes runs the GRPO recipe end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_two_process_grpo_recipe(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO / "recipes" / "accelerate" / "cpu_ddp.yaml"), "--dynamo_backend", "no",
        str(REPO / "recipes" / "grpo_tools.py"),
        "--model", tiny_model_dir, "--output_dir", str(out), "--num_problems", "16",
        "--max_steps", "2", "--per_device_train_batch_size", "2", "--num_generations", "2",
        "--max_completion_length", "24", "--max_tool_turns", "1", "--logging_steps", "1", "--report_to", "none", "--beta", "0.1",
        "--bf16", "false", "--gradient_checkpointing", "false", "--save_strategy", "no", "--use_cpu", "true",
        "--log_rollouts", "true",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    rows = {}
    for rank in (0, 1):
        rows[rank] = [json.loads(line) for line in (out / f"rollouts_rank{rank}.jsonl").read_text().splitlines()]
        assert rows[rank], f"rank {rank} generated nothing"
        assert all(len(r["completion_ids"]) == len(r["env_mask"]) <= 24 for r in rows[rank])
        # one rollout per optimizer step (at global steps 0 and 1), 2 completions per rank
        assert sorted({r["step"] for r in rows[rank]}) == [0, 1]
        assert all(sum(r["step"] == s for r in rows[rank]) == 2 for s in (0, 1))
    shards = {rank: {(r["step"], json.dumps(r["prompt"])) for r in rows[rank]} for rank in rows}
    assert shards[0].isdisjoint(shards[1]), "both ranks generated the same prompts"
    metrics = json.loads((out / "metrics.json").read_text())
    steps = [m for m in metrics["log_history"] if "reward" in m]
    assert metrics["report"]["steps"] == 2 and (out / "reward_curve.png").stat().st_size > 0
    assert len(steps) == 2 and all("kl" in m for m in steps)
    # statistics are gathered: each logged step's mean length (model tokens only) is over both ranks' completions
    for logged, step in zip(steps, (0, 1)):
        lengths = [sum(r["env_mask"]) for rank in rows for r in rows[rank] if r["step"] == step]
        assert len(lengths) == 4 and logged["completions/mean_length"] == pytest.approx(sum(lengths) / 4)
    assert all(m["num_tokens"] > 0 for m in steps)
    assert (out / "adapter_model.safetensors").exists()
