"""Environment rollouts whose tool is slow at random: trajectory scheduling against turn-by-turn and against TRL.

16 rollouts (4 prompts x 4 generations, one GRPO step) x 3 tool turns on a tiny model fitted to call `add` three
times before answering, in an environment whose `add` sleeps a random 0 to 2 s (seeded per call). Rows, each a real
`GRPOTrainer` step with a LoRA policy, in one run:

- `trajectory`: `rollout_func(environment_factory=SlowEnvironment)` (each instance in its worker process; a
  rollout's next turn starts as soon as its own call is back);
- `turn`: the same with `scheduling="turn"` (every turn waits for the slowest call of the batch);
- `trl`: TRL's own loop, `GRPOTrainer(environment_factory=SlowEnvironment, max_tool_calling_iterations=3)`.

Each row trains `--steps` steps (default 2) in its own subprocess; the table shows the median step time and the
ratios. The tool latencies are the same in every row (a seeded draw per rollout and call number).

    python benchmarks/environment_loop.py            # ~3 minutes on an idle 2-core machine
    python benchmarks/environment_loop.py --no-write
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from benchmarks._results import append_results

ROWS = {
    "trajectory": "ours, trajectory scheduling",
    "turn": "ours, turn by turn",
    "trl": "TRL `environment_factory`",
}
TURNS = 3
MAX_LATENCY_S = 2.0


def conversation(a: int, b: int) -> list[dict[str, Any]]:
    """Three `add` calls, each on the previous result, then the answer: what the tiny model is fitted on."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": f"add {a} and {b} three times"}]
    total = a
    for _ in range(TURNS):
        call = f'<tool_call>\n{{"name": "add", "arguments": {{"a": {total}, "b": {b}}}}}\n</tool_call>'
        messages.append({"role": "assistant", "content": call})
        total += b
        messages.append({"role": "tool", "name": "add", "content": str(total)})
    messages.append({"role": "assistant", "content": f"the answer is {total}"})
    return messages


class SlowEnvironment:
    """`add` that takes a seeded random 0 to 2 s: the same latency for the same prompt and call in every row."""

    def reset(self, prompt: Any = None, **row: Any) -> None:
        self.seed = json.dumps(prompt, sort_keys=True)
        self.calls = 0

    def add(self, a: int, b: int) -> int:
        """Adds two integers.

        Args:
            a: First number.
            b: Second number.
        """
        self.calls += 1
        time.sleep(random.Random(f"{self.seed}-{self.calls}").uniform(0, MAX_LATENCY_S))
        return a + b

    def get_reward(self) -> float:
        return float(self.calls)


def run_row(row: str, model_dir: str, steps: int, out: Path) -> None:
    """Trains `steps` GRPO steps of `row` and writes the step times to `out`."""
    import datasets
    import peft
    import torch
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from trl_inference_ext.trl import ToolLoopConfig, rollout_func

    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.start = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            times.append(time.perf_counter() - self.start)

    prompts = [
        [{"role": "user", "content": f"add {a} and {b} three times"}] for a, b in [(2, 3), (4, 1), (1, 5), (3, 3)]
    ]
    config = dict(
        output_dir=tempfile.mkdtemp(prefix="env_bench_"), max_steps=steps, beta=0.0, num_generations=4,
        per_device_train_batch_size=16, max_completion_length=160, temperature=0.5, learning_rate=1e-5,
        logging_steps=1, report_to="none", use_cpu=True, bf16=False, save_strategy="no", seed=0, disable_tqdm=True,
    )  # fmt: skip
    kwargs: dict[str, Any] = {}
    reward_funcs: list[Any] = []
    rf = None
    if row == "trl":
        config["max_tool_calling_iterations"] = TURNS
        kwargs["environment_factory"] = SlowEnvironment
        reward_funcs = [lambda completions, **kw: [0.0] * len(completions)]
    else:
        tool_loop = ToolLoopConfig(max_tool_turns=TURNS, tool_timeout=30.0, scheduling=row)
        rf = rollout_func(environment_factory=SlowEnvironment, tool_parser="hermes", tool_loop=tool_loop)
        kwargs["rollout_func"] = rf
        reward_funcs = list(rf.reward_funcs)
    trainer = trl.GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
        reward_funcs=reward_funcs,
        args=trl.GRPOConfig(**config),
        train_dataset=datasets.Dataset.from_dict({"prompt": prompts}),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
        callbacks=[Timer()],
        **kwargs,
    )
    try:
        trainer.train()
    finally:
        if rf is not None:
            rf.close()
    calls = [e.get("rewards/SlowEnvironment/mean") for e in trainer.state.log_history if "reward" in e]
    out.write_text(json.dumps({"times": times, "calls_per_rollout": calls}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return run_row(args.worker, args.model, args.steps, Path(args.out))

    from trl_inference_ext.testing import build_tiny_model, fit_conversations

    tmp = Path(tempfile.mkdtemp(prefix="env_bench_"))
    folder = build_tiny_model(tmp / "model", seed=1)
    schema = _add_schema()
    conversations = [conversation(a, b) for a, b in [(2, 3), (4, 1), (1, 5), (3, 3)]]
    model_dir = str(fit_conversations(folder, conversations, tools=[schema], steps=300))
    results: dict[str, Any] = {}
    begin = time.perf_counter()
    for row in ROWS:
        out = tmp / f"{row}.json"
        command = [sys.executable, __file__, "--worker", row, "--model", model_dir, "--steps", str(args.steps)]
        subprocess.run([*command, "--out", str(out)], check=True, timeout=1800)
        results[row] = json.loads(out.read_text())
        print(f"  {row:10} steps {', '.join(f'{t:.1f}' for t in results[row]['times'])} s", flush=True)
    wall = time.perf_counter() - begin
    trl_s = statistics.median(results["trl"]["times"])
    turn_s = statistics.median(results["turn"]["times"])
    lines = [
        "| row | step s (median) | vs TRL | vs turn by turn | tool calls per rollout |",
        "|---|---:|---:|---:|---:|",
    ]
    for row, label in ROWS.items():
        step = statistics.median(results[row]["times"])
        calls = [c for c in results[row]["calls_per_rollout"] if c is not None]
        shown = f"{statistics.mean(calls):.2f}" if calls else "n/a"
        lines.append(f"| {label} [`{row}`] | {step:.2f} | {step / trl_s:.2f} | {step / turn_s:.2f} | {shown} |")
    table = "\n".join(lines)
    print("\n" + table)
    notes = (
        f"- 16 rollouts (4 prompts x 4 generations) x up to {TURNS} tool turns, one GRPO step each (LoRA r=4, tiny "
        f"model fitted to call `add` {TURNS} times), the tool sleeping a seeded uniform 0-{MAX_LATENCY_S:g} s per "
        f"call; {args.steps} steps per row, one subprocess per row; whole run {wall:.0f} s.\n"
        "- TRL's row counts calls through its own `get_reward` column only when the environment defines one (it "
        "does here: calls per rollout)."
    )
    print(notes)
    if not args.no_write:
        append_results("Environment rollouts with a slow tool: trajectory scheduling", table, notes=notes)


def _add_schema() -> Any:
    def add(a: int, b: int) -> int:
        """Adds two integers.

        Args:
            a: First number.
            b: Second number.
        """
        return a + b

    return add


if __name__ == "__main__":
    main()
