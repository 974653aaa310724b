"""GRPO with a LoRA adapter and a calculator tool on self-generated arithmetic word problems.

The reference policy for the KL term is the same model with the adapter disabled (TRL's PEFT path), rollouts come
from `trl_inference_ext.trl.rollout_func` (multi-turn: the model calls the calculator, sees the result, answers),
and tool-result tokens are masked out of the loss through `env_mask`.

    python recipes/grpo_tools.py --model tiny --output_dir outputs/grpo --max_steps 2
    accelerate launch --config_file recipes/accelerate/ddp.yaml recipes/grpo_tools.py --model PATH --output_dir out
    python recipes/grpo_tools.py --config recipes/grpo_tools.yaml          # the same, from a YAML file

`--model` is any local causal LM folder (`tiny` builds a tiny random model). `--inference_backend vllm` (or
`--use_vllm`) generates with this package's in-process vLLM engine (weights pushed from the trainer at each step)
instead of the trainer's model; `auto` takes vLLM where it is installed and usable, else the trainer's model (saying
so in one line). Rollouts from vLLM are corrected for the sampler/trainer mismatch as TRL corrects its own
(`vllm_importance_sampling_*` in the config; metrics `sampling/*`).
`--vllm_server_urls URL1,URL2` generates on vLLM servers started with `trl-inference serve MODEL --lora-rank R`
(the same model folder; key in $VLLM_API_KEY), pushing the LoRA adapter to every server at each step.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class RecipeArguments:
    """Arguments of the recipe (the training arguments are `trl.GRPOConfig`'s)."""

    model: str = field(
        default="tiny",
        metadata={
            "help": "Local causal LM folder; 'default' for the embedded SmolLM2-135M-Instruct; 'tiny' to build one."
        },
    )
    few_shot: bool = field(default=False, metadata={"help": "Start each prompt with a worked tool-call example."})
    num_problems: int = field(default=256, metadata={"help": "Number of generated training problems."})
    problem_seed: int = field(default=0, metadata={"help": "Seed of the problem generator."})
    max_tool_turns: int = field(default=2, metadata={"help": "Most rounds of tool calls per rollout."})
    tool_parser: str = field(
        default="auto",
        metadata={"help": "Tool-call format the model is prompted with ('auto': its chat template's, else hermes)."},
    )
    format_reward_weight: float = field(default=0.5, metadata={"help": "Weight of the well-formed-call reward."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], metadata={"help": "Modules given adapters."}
    )
    log_rollouts: bool = field(
        default=False, metadata={"help": "Write each rank's rollouts to OUTPUT/rollouts_rankN.jsonl."}
    )
    inference_backend: str = field(
        default="trainer",
        metadata={
            "help": "Who generates the rollouts: 'trainer' (the trainer's model), 'vllm' (an in-process vLLM engine "
            "fed the trainer's weights at each step), 'auto' (vLLM when it is installed and usable, else 'trainer').",
            "choices": ["trainer", "vllm", "auto"],
        },
    )
    vllm_server_urls: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated URLs of vLLM servers started with `trl-inference serve MODEL --lora-rank R`: "
            "rollouts are spread over them and the adapter is pushed to each at every step (API key from "
            "$VLLM_API_KEY)."
        },
    )


def build_trainer(args: RecipeArguments, training_args: Any) -> tuple[Any, Any]:
    """Builds the `GRPOTrainer` of the recipe and the recorder of its rollout statistics."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOTrainer

    from trl_inference_ext import InferenceModule
    from trl_inference_ext.tasks.arithmetic import calculator, correct_answer_reward, make_problems
    from trl_inference_ext.testing import build_tiny_model
    from trl_inference_ext.trl import RolloutRecorder, ToolLoopConfig, rollout_func, tool_call_reward

    tool_loop = ToolLoopConfig(max_tool_turns=args.max_tool_turns)  # checked before any model loads
    model_path = args.model
    if model_path == "tiny":
        model_path = str(build_tiny_model(Path(training_args.output_dir) / "tiny-model"))
    else:
        from trl_inference_ext.model_source import resolve_model_name

        model_path = resolve_model_name(model_path)  # "default" is the embedded model; a missing folder is named
    # A chat template that renders `tools=` describes them itself; otherwise the tools go into a system preamble.
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    dtype = torch.bfloat16 if training_args.bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)

    inference = None
    if args.vllm_server_urls:  # remote servers generate; weights (the LoRA adapter) are pushed at each new step
        training_args.use_vllm = False
        inference = InferenceModule(
            model_path,
            backend="vllm",
            base_url=args.vllm_server_urls.split(","),
            api_key=os.environ.get("VLLM_API_KEY"),
            tool_parser=args.tool_parser,
        )
    elif wants_vllm(args, training_args):  # our vLLM backend generates; TRL's own vLLM path stays off
        training_args.use_vllm = False
        # On a GPU the trainer shares the device: take TRL's memory share. On the CPU build the backend sizes the KV
        # cache in bytes by itself (a share of RAM would depend on what this process already holds).
        memory = (
            {"gpu_memory_utilization": training_args.vllm_gpu_memory_utilization} if torch.cuda.is_available() else {}
        )
        inference = InferenceModule(
            model_path,
            backend="vllm",
            dtype="bfloat16" if training_args.bf16 else "float32",
            tool_parser=args.tool_parser,
            **memory,
        )
    rollout = rollout_func(inference=inference, tools=[calculator], tool_parser=args.tool_parser, tool_loop=tool_loop)
    extra = rollout.reward_funcs  # with vLLM: the mismatch correction's metrics (they score nothing)
    if args.log_rollouts:
        rollout = _logging_rollout(rollout, Path(training_args.output_dir))
    recorder = RolloutRecorder(rollout)
    if training_args.reward_weights is None:
        training_args.reward_weights = [1.0, args.format_reward_weight]
    training_args.reward_weights = [0.0] * len(extra) + list(training_args.reward_weights)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[
            *extra,
            correct_answer_reward,
            tool_call_reward(tools=[calculator], tool_parser=args.tool_parser),
        ],
        args=training_args,
        train_dataset=Dataset.from_list(
            make_problems(args.num_problems, args.problem_seed, few_shot=args.few_shot, tool_parser=args.tool_parser)
        ),
        processing_class=tokenizer,
        peft_config=LoraConfig(
            r=args.lora_r, lora_alpha=args.lora_alpha, target_modules=args.lora_target_modules, task_type="CAUSAL_LM"
        ),
        rollout_func=recorder,
    )
    return trainer, recorder


def wants_vllm(args: RecipeArguments, training_args: Any) -> bool:
    """Whether the in-process vLLM engine generates (`--inference_backend`, or `--use_vllm` as before)."""
    if args.inference_backend not in ("trainer", "vllm", "auto"):
        raise ValueError(f"--inference_backend must be trainer, vllm or auto, got {args.inference_backend!r}")
    if training_args.use_vllm or args.inference_backend == "vllm":
        return True
    if args.inference_backend == "trainer":
        return False
    from trl_inference_ext.backends.vllm.availability import is_vllm_usable

    if is_vllm_usable():
        print("Generating with the in-process vLLM engine (--inference_backend auto).", flush=True)
        return True
    print("vLLM is not usable here: generating with the trainer's model (--inference_backend auto).", flush=True)
    return False


def _logging_rollout(rollout: Any, output_dir: Path) -> Any:
    def logged(prompts: list[Any], trainer: Any) -> dict[str, Any]:
        out = rollout(prompts, trainer)
        rank = trainer.accelerator.process_index
        output_dir.mkdir(parents=True, exist_ok=True)
        with open(output_dir / f"rollouts_rank{rank}.jsonl", "a") as f:
            for i, prompt in enumerate(prompts):
                row = {"step": trainer.state.global_step, "prompt": prompt, "completion_ids": out["completion_ids"][i]}
                f.write(json.dumps({**row, "env_mask": out["env_mask"][i]}) + "\n")
        return out

    return logged


def main() -> None:
    """Parses arguments (command line or `--config file.yaml`), trains, saves the adapter and the metrics."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    # TRL warns that vLLM 0.32 is outside the versions its own vLLM paths were tested with; this recipe drives vLLM
    # through trl_inference_ext and keeps TRL's vLLM paths off, so the warning does not apply here.
    warnings.filterwarnings("ignore", message="TRL currently supports vLLM versions", category=UserWarning)
    from trl import GRPOConfig, TrlParser

    args, training_args = TrlParser((RecipeArguments, GRPOConfig)).parse_args_and_config()
    trainer, recorder = build_trainer(args, training_args)
    trainer.train()
    output_dir = Path(training_args.output_dir)
    trainer.save_model(str(output_dir))  # the LoRA adapter, in PEFT format
    if trainer.accelerator.is_main_process:
        from trl_inference_ext.trl.report import format_report, plot_rewards, training_report

        history = trainer.state.log_history
        report = training_report(history, recorder)
        weights = training_args.reward_weights
        name = "SmolLM2-135M-Instruct" if args.model == "default" else Path(args.model).name
        title = f"GRPO + LoRA, {name}: total = {weights[-2]:g} x correct answer + {weights[-1]:g} x valid call"
        plot = plot_rewards(history, output_dir / "reward_curve.png", title=title)
        with open(output_dir / "metrics.json", "w") as f:
            json.dump({"log_history": history, "report": report}, f, indent=1, default=str)
        print("\n" + format_report(report, output_dir, plot))


if __name__ == "__main__":
    main()
