"""Held-out check of a tool-use adapter: the same unseen arithmetic problems solved with the adapter off and on.

    python recipes/evaluate_tools.py --model default --adapter outputs/demo          # after `make demo`
    python recipes/evaluate_tools.py --model PATH --adapter DIR --num_problems 32 --output eval.json

Problems come from another seed than the training set and any question that also appears in the training set is
dropped. Each problem runs through the same multi-turn calculator loop as training (greedy decoding), once with the
PEFT adapter disabled (the base model) and once with it enabled. The script prints accuracy, tool-call rate and the
rate of calls that ran, and a few transcripts.
"""

from __future__ import annotations

import argparse
import json
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trl_inference_ext.tools import ToolLoopConfig


def held_out_problems(
    count: int, seed: int, train_count: int, train_seed: int, tool_parser: str = "hermes"
) -> list[dict[str, Any]]:
    """`count` few-shot problems generated from `seed`, none of whose questions is in the training set.

    The worked example of each prompt is written in the `tool_parser` format.
    """
    from trl_inference_ext.tasks.arithmetic import make_problems

    seen = {row["prompt"][-1]["content"] for row in make_problems(train_count, train_seed, few_shot=True)}
    candidates = make_problems(count * 4 + 16, seed, few_shot=True, tool_parser=tool_parser)
    rows = [row for row in candidates if row["prompt"][-1]["content"] not in seen][:count]
    if len(rows) < count:
        raise ValueError(f"only {len(rows)} held-out problems differ from the training set; use another --seed")
    return rows


def evaluate(inference: Any, problems: list[dict[str, Any]], max_new_tokens: int, tool_loop: ToolLoopConfig) -> dict:
    """Runs the calculator loop greedily on the problems, with the settings of `tool_loop`; returns rates and the
    transcripts."""
    from trl_inference_ext.tasks.arithmetic import calculator, correct_answer_reward
    from trl_inference_ext.tools.loop import run_tool_loop

    rollouts = run_tool_loop(
        inference,
        [row["prompt"] for row in problems],
        [calculator],
        max_new_tokens=max_new_tokens,
        tool_loop=tool_loop,
        do_sample=False,
    )
    texts = [inference.tokenizer.decode(r.completion_ids, skip_special_tokens=True) for r in rollouts]
    correct = correct_answer_reward(texts, [row["answer"] for row in problems])
    calls = sum(r.num_calls for r in rollouts)
    ran = sum(result.ok for r in rollouts for result in r.tool_results)
    return {
        "accuracy": sum(correct) / len(problems),
        "call_rate": sum(1 for r in rollouts if r.num_calls) / len(problems),
        "calls_that_ran": ran / calls if calls else 0.0,
        "transcripts": [
            {"question": row["prompt"][-1]["content"], "answer": row["answer"], "completion": text}
            for row, text in zip(problems, texts)
        ],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Evaluates with the adapter off and on, prints a table and a few transcripts, optionally writes JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="base model folder, or 'default' (embedded SmolLM2)")
    parser.add_argument("--adapter", required=True, help="PEFT adapter folder (a GRPO run's output_dir)")
    parser.add_argument("--num_problems", type=int, default=16)
    parser.add_argument("--seed", type=int, default=1, help="problem seed of the held-out set")
    parser.add_argument("--train_problems", type=int, default=256, help="size of the training set to exclude")
    parser.add_argument("--train_seed", type=int, default=0, help="problem seed of the training set to exclude")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--max_tool_turns", type=int, default=1)
    parser.add_argument("--tool_parser", default="auto", help="tool-call format ('auto': the chat template's)")
    parser.add_argument("--show", type=int, default=2, help="transcripts to print per setting")
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    from trl_inference_ext.cli import load_module
    from trl_inference_ext.tools import ToolLoopConfig

    tool_loop = ToolLoopConfig(max_tool_turns=args.max_tool_turns)  # checked before the model loads
    inference = load_module(args.model, args.adapter, "huggingface", "float32", args.tool_parser)
    problems = held_out_problems(
        args.num_problems, args.seed, args.train_problems, args.train_seed, tool_parser=args.tool_parser
    )
    peft_model = inference.backend.model
    results = {}
    for label, scope in (("adapter off", peft_model.disable_adapter()), ("adapter on", nullcontext())):
        with scope:
            results[label] = evaluate(inference, problems, args.max_new_tokens, tool_loop)

    print(f"{len(problems)} held-out problems, greedy decoding, {args.max_tool_turns} calculator turn(s)")
    print(f"{'':12}{'accuracy':>10}{'call rate':>11}{'calls ran':>11}")
    for label, r in results.items():
        print(f"{label:12}{r['accuracy']:>10.2f}{r['call_rate']:>11.2f}{r['calls_that_ran']:>11.2f}")
    for label, r in results.items():
        for t in r["transcripts"][: args.show]:
            print(f"\n[{label}] {t['question']} (answer {t['answer']})\n{t['completion']}")
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
