"""GRPO with a LoRA adapter in a stateful environment: `tasks.arithmetic.CalculatorEnvironment`, one per rollout.

The word problems and the worked example are those of `grpo_tools.py`; the calculator is now an environment that
`rollout_func(environment_factory=...)` resets with each problem's row and whose `get_reward()` (1 when one of the
rollout's calculations produced the answer) reaches the trainer as a reward named `CalculatorEnvironment`, next to
the correct-answer reward. Each instance lives in its own worker process.

    python recipes/grpo_environment.py --model default --few_shot true --tool_parser hermes --max_tool_turns 1 \\
        --max_steps 10 --num_generations 4 --per_device_train_batch_size 4 --max_completion_length 64 \\
        --temperature 0.7 --learning_rate 5e-4 --beta 0.02 --logging_steps 1 --report_to none --output_dir out/env

Arguments are those of `grpo_tools.py` (`RecipeArguments` and `trl.GRPOConfig`); `--inference_backend auto` samples
with the in-process vLLM engine where it is usable.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from grpo_tools import RecipeArguments, wants_vllm


def build_trainer(args: RecipeArguments, training_args: Any) -> tuple[Any, Any]:
    """The `GRPOTrainer` of the recipe and its rollout function (whose `close()` ends the environments)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOTrainer

    from trl_inference_ext import InferenceModule
    from trl_inference_ext.model_source import resolve_model_name
    from trl_inference_ext.tasks.arithmetic import CalculatorEnvironment, correct_answer_reward, make_problems
    from trl_inference_ext.testing import build_tiny_model
    from trl_inference_ext.trl import ToolLoopConfig, rollout_func

    tool_loop = ToolLoopConfig(max_tool_turns=args.max_tool_turns)
    if args.model == "tiny":
        model_path = str(build_tiny_model(Path(training_args.output_dir) / "tiny-model"))
    else:
        model_path = resolve_model_name(args.model)
    inference = None
    if wants_vllm(args, training_args):
        training_args.use_vllm = False  # our vLLM backend generates; TRL's own vLLM path stays off
        dtype = "bfloat16" if training_args.bf16 else "float32"
        inference = InferenceModule(model_path, backend="vllm", dtype=dtype, tool_parser=args.tool_parser)
    rf = rollout_func(
        inference=inference,
        environment_factory=CalculatorEnvironment,
        tool_parser=args.tool_parser,
        tool_loop=tool_loop,
    )
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(
            model_path, dtype=torch.bfloat16 if training_args.bf16 else torch.float32
        ),
        reward_funcs=[*rf.reward_funcs, correct_answer_reward],
        args=training_args,
        train_dataset=Dataset.from_list(
            make_problems(args.num_problems, args.problem_seed, few_shot=args.few_shot, tool_parser=args.tool_parser)
        ),
        processing_class=AutoTokenizer.from_pretrained(model_path),
        peft_config=LoraConfig(
            r=args.lora_r, lora_alpha=args.lora_alpha, target_modules=args.lora_target_modules, task_type="CAUSAL_LM"
        ),
        rollout_func=rf,
    )
    return trainer, rf


def main() -> None:
    """Parses arguments, trains, saves the adapter and the log history, and prints the rewards per step."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    warnings.filterwarnings("ignore", message="TRL currently supports vLLM versions", category=UserWarning)
    from trl import GRPOConfig, TrlParser

    args, training_args = TrlParser((RecipeArguments, GRPOConfig)).parse_args_and_config()
    trainer, rf = build_trainer(args, training_args)
    try:
        trainer.train()
    finally:
        rf.close()
    output_dir = Path(training_args.output_dir)
    trainer.save_model(str(output_dir))
    if trainer.accelerator.is_main_process:
        history = trainer.state.log_history
        with open(output_dir / "metrics.json", "w") as f:
            json.dump({"log_history": history}, f, indent=1, default=str)
        for entry in history:
            if "reward" in entry:
                environment = entry.get("rewards/CalculatorEnvironment/mean")
                print(f"step {entry['step']:>3}: reward {entry['reward']:.3f}, environment reward {environment}")


if __name__ == "__main__":
    main()
