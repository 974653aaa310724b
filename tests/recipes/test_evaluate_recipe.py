"""`recipes/evaluate_tools.py`: held-out problems, adapter off and on, through the real calculator loop."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def load_recipe():
    spec = importlib.util.spec_from_file_location("evaluate_tools", REPO / "recipes" / "evaluate_tools.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_held_out_problems_exclude_the_training_set():
    from trl_inference_ext.tasks.arithmetic import make_problems

    recipe = load_recipe()

    def questions(rows):
        return {r["prompt"][-1]["content"] for r in rows}

    held_out = recipe.held_out_problems(20, seed=1, train_count=64, train_seed=0)
    assert len(held_out) == 20 and not questions(make_problems(64, 0, few_shot=True)) & questions(held_out)
    # with the training seed itself, the first problems are the training ones and are skipped
    same_seed = recipe.held_out_problems(4, seed=0, train_count=4, train_seed=0)
    assert len(same_seed) == 4 and not questions(make_problems(4, 0, few_shot=True)) & questions(same_seed)


def test_adapter_off_and_on(tiny_model_dir, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from trl_inference_ext import InferenceModule
    from trl_inference_ext.tasks.arithmetic import calculator, correct_answer_reward
    from trl_inference_ext.tools.loop import run_tool_loop

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM")
    adapter = tmp_path / "adapter"
    get_peft_model(base, config).save_pretrained(adapter)

    output = tmp_path / "eval.json"
    recipe = load_recipe()
    results = recipe.main(
        ["--model", tiny_model_dir, "--adapter", str(adapter), "--num_problems", "3", "--max_new_tokens", "12",
         "--output", str(output)]
    )  # fmt: skip
    assert set(results) == {"adapter off", "adapter on"}
    problems = recipe.held_out_problems(3, seed=1, train_count=256, train_seed=0)  # the recipe's defaults
    for r in results.values():
        transcripts = r["transcripts"]
        assert [(t["question"], t["answer"]) for t in transcripts] == [
            (p["prompt"][-1]["content"], p["answer"]) for p in problems
        ]
        correct = correct_answer_reward([t["completion"] for t in transcripts], [t["answer"] for t in transcripts])
        assert r["accuracy"] == sum(correct) / 3 and 0.0 <= r["call_rate"] <= 1.0
    off = [t["completion"] for t in results["adapter off"]["transcripts"]]
    on = [t["completion"] for t in results["adapter on"]["transcripts"]]
    assert off != on  # the adapter (non-zero LoRA B) changes what the model writes
    # adapter off is the base model: a disabled LoRA layer runs only its base layer, the same float computation
    base = InferenceModule(tiny_model_dir, device="cpu", dtype="float32", tool_parser="hermes")
    rollouts = run_tool_loop(
        base, [p["prompt"] for p in problems], [calculator], max_tool_turns=1, max_new_tokens=12, do_sample=False
    )
    assert off == [base.tokenizer.decode(r.completion_ids, skip_special_tokens=True) for r in rollouts]
    assert json.loads(output.read_text())["adapter on"]["transcripts"][0]["completion"] == on[0]
    assert "held-out problems" in capsys.readouterr().out
