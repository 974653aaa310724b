"""`trl-inference`: generate or score from the command line, JSONL in and out.

    trl-inference generate --model PATH [--adapter DIR] --prompt "What is 2+2?" [--chat] [--max-new-tokens 64]
    trl-inference generate --model default --prompts prompts.jsonl --output out.jsonl --num-return-sequences 4
    trl-inference score --model PATH --pairs pairs.jsonl --output scores.jsonl

Prompt files hold one JSON object per line with a `prompt` (a string or chat messages); pair files add a `response`.
`--model default` is the embedded SmolLM2-135M-Instruct; `--adapter` loads a PEFT adapter (e.g. a GRPO run's output).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any


def _read_jsonl(path: str, keys: Sequence[str]) -> list[dict[str, Any]]:
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            missing = [k for k in keys if k not in row]
            if missing:
                raise ValueError(f"{path}:{n}: missing {missing}")
            rows.append(row)
    return rows


def _batches(rows: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(rows), size):
        yield rows[i : i + size]


def load_module(model: str, adapter: str | None, backend: str, dtype: str, tool_parser: str) -> Any:
    """Builds an `InferenceModule`, resolving `default` and attaching a PEFT adapter when given."""
    from . import InferenceModule

    if model == "default":
        from .default_model import default_model_path

        model = str(default_model_path())
    if adapter is None:
        return InferenceModule(model, backend=backend, dtype=dtype, tool_parser=tool_parser)
    if backend != "huggingface":
        raise ValueError("`--adapter` needs the huggingface backend (merge the adapter to serve it with vLLM).")
    from peft import PeftModel
    from transformers import AutoTokenizer

    from .backends.huggingface import HuggingFaceBackend

    base = HuggingFaceBackend.from_pretrained(model, dtype=dtype).model
    tokenizer = AutoTokenizer.from_pretrained(adapter if (Path(adapter) / "tokenizer_config.json").exists() else model)
    return InferenceModule.from_model(PeftModel.from_pretrained(base, adapter), tokenizer, tool_parser=tool_parser)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `trl-inference`."""
    parser = argparse.ArgumentParser(prog="trl-inference", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("generate", "score"):
        p = sub.add_parser(name)
        p.add_argument("--model", required=True, help="local model folder, or 'default'")
        p.add_argument("--adapter", default=None, help="PEFT adapter folder to load on top of the model")
        p.add_argument("--backend", default="huggingface", choices=["huggingface", "vllm"])
        p.add_argument("--dtype", default="float32", choices=["auto", "float16", "bfloat16", "float32"])
        p.add_argument("--batch-size", type=int, default=8)
        p.add_argument("--temperature", type=float, default=1.0)
        p.add_argument("--output", default=None, help="JSONL output file (default: stdout)")
    gen = sub.choices["generate"]
    gen.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    gen.add_argument("--prompts", default=None, help="JSONL file of {'prompt': ...} rows")
    gen.add_argument("--chat", action="store_true", help="wrap --prompt strings as a user message")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--num-return-sequences", type=int, default=1)
    gen.add_argument("--greedy", action="store_true")
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--tool-parser", default="hermes")
    score = sub.choices["score"]
    score.add_argument("--pairs", required=True, help="JSONL file of {'prompt': ..., 'response': ...} rows")
    args = parser.parse_args(argv)

    from tqdm.auto import tqdm

    if args.command == "generate":
        rows = [{"prompt": [{"role": "user", "content": p}] if args.chat else p} for p in args.prompt]
        rows += _read_jsonl(args.prompts, ["prompt"]) if args.prompts else []
        if not rows:
            parser.error("give --prompt or --prompts")
    else:
        rows = _read_jsonl(args.pairs, ["prompt", "response"])
    module = load_module(args.model, args.adapter, args.backend, args.dtype, getattr(args, "tool_parser", "json"))
    out = open(args.output, "w") if args.output else sys.stdout  # noqa: SIM115 - closed below when a file
    try:
        for batch in tqdm(list(_batches(rows, args.batch_size)), desc=args.command, unit="batch", file=sys.stderr):
            prompts = [r["prompt"] for r in batch]
            if args.command == "generate":
                result = module.generate(
                    prompts,
                    max_new_tokens=args.max_new_tokens,
                    temperature=args.temperature,
                    do_sample=not args.greedy,
                    num_return_sequences=args.num_return_sequences,
                    seed=args.seed,
                )
                n = args.num_return_sequences
                for i, text in enumerate(result.texts):
                    calls = [c.__dict__ for c in module.parse_tool_calls(text)]
                    record = {"prompt": prompts[i // n], "completion": text, "tool_calls": calls}
                    out.write(json.dumps({**record, "finish_reason": result.metadata["finish_reasons"][i]}) + "\n")
            else:
                import torch

                with torch.no_grad():
                    logprobs, mask = module.get_logprobs(
                        prompts, [r["response"] for r in batch], temperature=args.temperature, return_mask=True
                    )
                for row, lp, m in zip(batch, logprobs, mask):
                    values = lp[m].tolist()
                    out.write(json.dumps({**row, "logprobs": values, "sum_logprob": sum(values)}) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
