"""`trl-inference generate` / `score` on a tiny model, with and without a PEFT adapter."""

from __future__ import annotations

import json

import pytest
import torch

from trl_inference_ext.cli import main


def test_generate_and_score(tiny_model_dir, tmp_path):
    out = tmp_path / "gen.jsonl"
    assert main(["generate", "--model", tiny_model_dir, "--prompt", "add two", "--prompt", "the city", "--greedy",
                 "--max-new-tokens", "5", "--num-return-sequences", "2", "--output", str(out)]) == 0  # fmt: skip
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["add two", "add two", "the city", "the city"]
    assert rows[0]["completion"] == rows[1]["completion"] and rows[0]["finish_reason"] in {"stop", "length"}
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps({"prompt": r["prompt"], "response": r["completion"]}) for r in rows))
    scores = tmp_path / "scores.jsonl"
    assert main(["score", "--model", tiny_model_dir, "--pairs", str(pairs), "--output", str(scores)]) == 0
    scored = [json.loads(line) for line in scores.read_text().splitlines()]
    assert all(s["sum_logprob"] <= 0 and len(s["logprobs"]) > 0 for s in scored)


def test_adapter_changes_outputs(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False),
    )
    model.save_pretrained(tmp_path / "adapter")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "add two", "response": " the answer"}))
    for name, extra in (("base", []), ("tuned", ["--adapter", str(tmp_path / "adapter")])):
        assert (
            main(["score", "--model", tiny_model_dir, "--pairs", str(pairs), "--output", str(tmp_path / name), *extra])
            == 0
        )
    base, tuned = (json.loads((tmp_path / n).read_text())["sum_logprob"] for n in ("base", "tuned"))
    assert abs(base - tuned) > 1e-3


def test_bad_input(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "x"}))
    with pytest.raises(ValueError, match="missing"):
        main(["generate", "--model", tiny_model_dir, "--prompts", str(bad)])
    with pytest.raises(SystemExit):
        main(["generate", "--model", tiny_model_dir])
