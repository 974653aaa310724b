"""trl-inference: generate or score from the command line, JSONL in and out.

  trl-inference generate --model PATH [--adapter DIR] --prompt "What is 2+2?" [--chat] [--max-new-tokens 64]
  trl-inference generate --model PATH --prompt "2+2?" --chat --chat-template-kwargs '{"enable_thinking": false}'
  trl-inference generate --model default --prompts prompts.jsonl --output out.jsonl --num-return-sequences 4
  trl-inference score --model PATH --pairs pairs.jsonl --output scores.jsonl
  trl-inference serve MODEL [--port 8000] [--lora-rank 16]     (a vLLM server for training; see serve --help)

Prompt files hold one JSON object per line with a "prompt" (a string, token ids or chat messages); pair files add
a "response" (a string or token ids). "--model default" is the embedded SmolLM2-135M-Instruct; "--adapter" loads a
PEFT adapter (e.g. a GRPO run's output). An existing --output file is resumed; "<command> --help" says how.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any

from .cli_io import (
    Row,
    check_output_path,
    one_line,
    prompt_problem,
    read_jsonl,
    response_problem,
    scan_output,
)
from .errors import InputError, InvalidValueError
from .tools.parsers import PARSER_NAMES

USAGE_ERROR = 2
"""Exit code for a bad command line or bad input (as argparse uses)."""
INTERRUPTED = 130
"""Exit code after Ctrl-C: 128 + SIGINT."""
BROKEN_PIPE = 141
"""Exit code when stdout's reader has gone (`trl-inference generate ... | head -1`): 128 + SIGPIPE."""

_RESUME_HELP = (
    "JSONL output file (default: stdout). If it exists, the run resumes: input rows whose output rows are all in it "
    "are skipped, and an unfinished end (a line cut short, or a prompt with only some of its samples, as a killed "
    "run leaves) is removed and redone, after the whole input has been checked. A file that does not match this "
    "input and these settings is an error (--overwrite starts over). Sampling settings are not recorded in the "
    "file: resume with the same ones."
)
_GENERATE_EPILOG = """\
output: one JSON object per line, per completion, in input order:
  index, sample, prompt, completion, tool_calls, finish_reason
  [prompt_token_ids, token_ids with --return-token-ids] [logprobs with --return-logprobs]
"index" is the 0-based position of the prompt in the input (--prompt values first, then --prompts rows).
"""
_SCORE_EPILOG = """\
output: one JSON object per line, per pair, in input order: the pair's fields plus
  index (0-based position of the pair in --pairs), logprobs (one per response token), sum_logprob
A text response is tokenised on its own, without special tokens, which can give other tokens than were sampled:
to score exactly what `generate` sampled, pass its prompt_token_ids and token_ids (--return-token-ids).
"""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's line breaks and shows each option's default, unless it has none (None/off/empty)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default == []:
            return action.help
        return super()._get_help_string(action)


def _number(kind: type, minimum: float, strict: bool = False) -> Callable[[str], Any]:
    """An argparse `type` parsing `kind` (int or float) and checking it is >= `minimum` (> when `strict`)."""
    bound = f"{'>' if strict else '>='} {minimum}"

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"must be {'an integer' if kind is int else 'a number'}, got {text!r}"
            ) from None
        if value != value or value < minimum or (strict and value == minimum):  # value != value: NaN
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text!r}")
        return value

    return parse


def _template_kwargs(text: str) -> dict[str, Any]:
    """An argparse `type` parsing `--chat-template-kwargs`: a JSON object of chat-template variables."""
    from .tokenization import check_chat_template_kwargs

    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r} ({e.msg})") from None
    if not isinstance(value, dict):
        example = json.dumps({"enable_thinking": False})
        raise argparse.ArgumentTypeError(f"must be a JSON object (e.g. '{example}'), got {text!r}")
    try:
        return check_chat_template_kwargs(value, "--chat-template-kwargs")
    except (TypeError, ValueError) as e:
        raise argparse.ArgumentTypeError(one_line(e)) from None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `trl-inference` (subcommands `generate` and `score`)."""
    parser = argparse.ArgumentParser(prog="trl-inference", description=__doc__, formatter_class=_HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser(
        "generate", help="generate completions", epilog=_GENERATE_EPILOG, formatter_class=_HelpFormatter
    )
    score = sub.add_parser("score", help="score responses", epilog=_SCORE_EPILOG, formatter_class=_HelpFormatter)
    sub.add_parser("serve", help="start a vLLM server for training (see `trl-inference serve --help`)", add_help=False)
    for p in (gen, score):
        p.add_argument("--model", required=True, help="local model folder, or 'default' (the embedded model)")
        p.add_argument("--adapter", default=None, help="PEFT adapter folder to load on top of the model")
        p.add_argument("--backend", default="huggingface", choices=["huggingface", "vllm"], help="inference backend")
        p.add_argument(
            "--dtype", default="float32", choices=["auto", "float16", "bfloat16", "float32"], help="model dtype"
        )
        p.add_argument("--batch-size", type=_number(int, 1), default=8, help="input rows per model call")
        p.add_argument(
            "--chat-template-kwargs",
            type=_template_kwargs,
            default=None,
            metavar="JSON",
            help="JSON object of extra chat-template variables for chat prompts, as TRL's "
            "GRPOConfig.chat_template_kwargs (e.g. '{\"enable_thinking\": false}' for Qwen3)",
        )
        p.add_argument("--output", default=None, help=_RESUME_HELP)
        p.add_argument(
            "--overwrite", action="store_true", help="replace an existing --output file instead of resuming it"
        )
    gen.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    gen.add_argument("--prompts", default=None, help="JSONL file of {'prompt': ...} rows")
    gen.add_argument(
        "--chat",
        action="store_true",
        help="send string prompts (from --prompt and --prompts) as one user message through the chat template; "
        "chat messages and token ids are sent as they are",
    )
    gen.add_argument(
        "--max-new-tokens", type=_number(int, 1), default=256, help="token budget per completion (as `generate`)"
    )
    gen.add_argument("--num-return-sequences", type=_number(int, 1), default=1, help="completions per prompt")
    gen.add_argument("--temperature", type=_number(float, 0.0), default=1.0, help="sampling temperature")
    gen.add_argument("--greedy", action="store_true", help="greedy decoding (ignores --temperature)")
    gen.add_argument(
        "--seed", type=_number(int, 0), default=None, help="seed for reproducible sampling (default: unseeded)"
    )
    gen.add_argument(
        "--tool-parser",
        default="auto",
        choices=PARSER_NAMES,
        help="format of the tool calls parsed ('auto': the one the model's chat template teaches)",
    )
    gen.add_argument(
        "--return-token-ids", action="store_true", help="add 'prompt_token_ids' and 'token_ids' to each output row"
    )
    gen.add_argument(
        "--return-logprobs",
        action="store_true",
        help="add 'logprobs' to each output row: the log-prob of each completion token under the distribution it "
        "was sampled from (temperature applied; temperature 1 with --greedy)",
    )
    score.add_argument("--pairs", required=True, help="JSONL file of {'prompt': ..., 'response': ...} rows")
    score.add_argument(
        "--temperature", type=_number(float, 0.0, strict=True), default=1.0, help="temperature applied to the logits"
    )
    return parser


def load_module(
    model: str,
    adapter: str | None,
    backend: str,
    dtype: str,
    tool_parser: str,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> Any:
    """Builds an `InferenceModule` (`default` is the embedded model), attaching a PEFT adapter when given."""
    from . import InferenceModule
    from .model_source import resolve_model_name

    model = resolve_model_name(model)
    if adapter is None:
        return InferenceModule(
            model, backend=backend, dtype=dtype, tool_parser=tool_parser, chat_template_kwargs=chat_template_kwargs
        )
    if backend != "huggingface":
        raise InvalidValueError("`--adapter` needs the huggingface backend (merge the adapter to serve it with vLLM).")
    from peft import PeftModel
    from transformers import AutoTokenizer

    from .backends.hf.backend import HuggingFaceBackend

    base = HuggingFaceBackend.from_pretrained(model, dtype=dtype).model
    tokenizer = AutoTokenizer.from_pretrained(adapter if (Path(adapter) / "tokenizer_config.json").exists() else model)
    return InferenceModule.from_model(
        PeftModel.from_pretrained(base, adapter),
        tokenizer,
        tool_parser=tool_parser,
        chat_template_kwargs=chat_template_kwargs,
    )


# ----------------------------------------------------------------------------------------------------- input rows
def _generate_rows(args: argparse.Namespace) -> list[Row]:
    rows = [Row(i, f"--prompt #{i + 1}", {"prompt": p}) for i, p in enumerate(args.prompt)]
    for row in rows:
        problem = prompt_problem(row.data["prompt"])
        if problem:
            raise InputError(f"{row.source}: {problem}")
    if args.prompts:
        rows += read_jsonl(args.prompts, {"prompt": prompt_problem}, start=len(rows))
    if args.chat:
        rows = [
            Row(r.index, r.source, {**r.data, "prompt": [{"role": "user", "content": r.data["prompt"]}]})
            if isinstance(r.data["prompt"], str)
            else r
            for r in rows
        ]
    return rows


_SCORE_FIELDS = ("index", "logprobs", "sum_logprob")


def _score_rows(args: argparse.Namespace) -> list[Row]:
    rows = read_jsonl(args.pairs, {"prompt": prompt_problem, "response": response_problem})
    for row in rows:
        taken = [k for k in _SCORE_FIELDS if k in row.data]
        if taken:
            raise InputError(f"{row.source}: field(s) {', '.join(taken)} are written by `score`; rename them")
    return rows


def _generate_keys(args: argparse.Namespace) -> list[str]:
    keys = ["index", "sample", "prompt", "completion", "tool_calls", "finish_reason"]
    keys += ["prompt_token_ids", "token_ids"] if args.return_token_ids else []
    return keys + (["logprobs"] if args.return_logprobs else [])


def _fields_problem(record: dict[str, Any], keys: set[str]) -> str:
    missing, extra = sorted(keys - set(record)), sorted(set(record) - keys)
    problems = [f"no {', '.join(missing)} field(s)"] if missing else []
    return "; ".join(problems + ([f"unexpected field(s) {', '.join(extra)}"] if extra else []))


def _matcher(args: argparse.Namespace) -> Callable[[dict[str, Any], Row, int], str | None]:
    """How `scan_output` checks that an existing output record belongs to an input row under these settings."""
    if args.command == "generate":
        keys = set(_generate_keys(args))

        def matches(record: dict[str, Any], row: Row, k: int) -> str | None:
            if set(record) != keys:
                return _fields_problem(record, keys) + " (--return-token-ids / --return-logprobs?)"
            if record["sample"] != k:
                return f"`sample` is {record['sample']!r} where {k} comes next (--num-return-sequences?)"
            return None if record["prompt"] == row.data["prompt"] else "another `prompt` (--chat?)"

        return matches

    def matches_pair(record: dict[str, Any], row: Row, k: int) -> str | None:
        if set(record) != {*row.data, *_SCORE_FIELDS}:
            return _fields_problem(record, {*row.data, *_SCORE_FIELDS})
        changed = [f for f, v in row.data.items() if record[f] != v]
        return f"another {', '.join(f'`{f}`' for f in changed)}" if changed else None

    return matches_pair


# ------------------------------------------------------------------------------------------------------ encoding
def _encode(module: Any, rows: Sequence[Row], with_response: bool) -> list[tuple[list[int], list[int] | None]]:
    """Token ids of each row's prompt (and response), checked against the model before anything is generated."""
    import jinja2

    from .tokenization import encode_prompt, encode_response

    vocab, limit, template_kwargs = module.vocab_size, module.backend.max_context_length, module.chat_template_kwargs
    encoded = []
    for row in rows:
        try:
            prompt = encode_prompt(
                module.tokenizer, row.data["prompt"], "prompt", vocab_size=vocab, chat_template_kwargs=template_kwargs
            )
            response = None
            if with_response:
                response = encode_response(module.tokenizer, row.data["response"], "response", vocab_size=vocab)
        except (ValueError, TypeError, KeyError, jinja2.TemplateError) as e:
            raise InputError(f"{row.source}: {one_line(e)}") from None
        if not prompt:
            raise InputError(f"{row.source}: `prompt` is empty after tokenisation")
        if limit is not None and response is None and len(prompt) >= limit:
            raise InputError(
                f"{row.source}: `prompt` has {len(prompt)} tokens, which leaves no room to generate within the "
                f"model's context length of {limit}"
            )
        if limit is not None and response is not None and len(prompt) + len(response) > limit:
            raise InputError(
                f"{row.source}: `prompt` + `response` have {len(prompt) + len(response)} tokens, more than the "
                f"model's context length of {limit}"
            )
        encoded.append((prompt, response))
    return encoded


# -------------------------------------------------------------------------------------------------------- running
def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _generate_records(module: Any, args: argparse.Namespace, batch: Sequence[tuple[Row, Any]]) -> list[dict]:
    n = args.num_return_sequences
    result = module.generate(
        [ids for _, (ids, _) in batch],
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        do_sample=not args.greedy,
        num_return_sequences=n,
        seed=args.seed,
        return_logprobs=args.return_logprobs,
    )
    records = []
    for i, text in enumerate(result.texts):
        row, (prompt_ids, _) = batch[i // n]
        record: dict[str, Any] = {
            "index": row.index,
            "sample": i % n,
            "prompt": row.data["prompt"],
            "completion": text,
            "tool_calls": [asdict(c) for c in module.parse_tool_calls(text)],
            "finish_reason": result.metadata["finish_reasons"][i],
        }
        if args.return_token_ids:
            record["prompt_token_ids"] = list(prompt_ids)
            record["token_ids"] = list(result.token_ids[i])
        if args.return_logprobs:
            record["logprobs"] = result.logprobs[i].tolist()
        records.append(record)
    return records


def _score_records(module: Any, args: argparse.Namespace, batch: Sequence[tuple[Row, Any]]) -> list[dict]:
    import torch

    with torch.no_grad():
        logprobs, mask = module.get_logprobs(
            [p for _, (p, _) in batch], [r for _, (_, r) in batch], temperature=args.temperature, return_mask=True
        )
    records = []
    for (row, _), lp, m in zip(batch, logprobs, mask):
        values = lp[m].tolist()
        records.append({**row.data, "index": row.index, "logprobs": values, "sum_logprob": sum(values)})
    return records


def _open_output(args: argparse.Namespace, keep: int) -> IO[str]:
    if args.output is None:
        return sys.stdout
    if args.overwrite:
        return open(args.output, "w", encoding="utf-8")
    if Path(args.output).exists():
        os.truncate(args.output, keep)  # drop an unfinished tail
    return open(args.output, "a", encoding="utf-8")


def _run(args: argparse.Namespace) -> int:
    generate = args.command == "generate"
    rows = _generate_rows(args) if generate else _score_rows(args)
    per_row = args.num_return_sequences if generate else 1
    pending, keep = list(rows), 0
    if args.output is not None:
        check_output_path(args.output, [p for p in (getattr(args, "prompts", None), getattr(args, "pairs", None)) if p])
        if not args.overwrite:
            resume = scan_output(args.output, rows, per_row, _matcher(args))
            pending, keep = [r for r in rows if r.index not in resume.done], resume.keep
            if resume.size:
                redo = f"; redoing {resume.dropped_lines} unfinished line(s)" if resume.keep < resume.size else ""
                print(
                    f"{args.output}: resuming: {len(resume.done)} of {len(rows)} input rows already done{redo}",
                    file=sys.stderr,
                )
            if not pending:
                print(f"{args.output}: nothing left to do (--overwrite starts over)", file=sys.stderr)
                return 0
    try:
        module = load_module(
            args.model,
            args.adapter,
            args.backend,
            args.dtype,
            getattr(args, "tool_parser", "json"),
            args.chat_template_kwargs,
        )
    except (OSError, ValueError, ImportError) as e:
        raise InputError(f"cannot load --model {args.model}{f' --adapter {args.adapter}' * bool(args.adapter)}: "
                         f"{one_line(e)}") from None  # fmt: skip
    work = list(zip(pending, _encode(module, pending, with_response=not generate)))
    records_of = _generate_records if generate else _score_records

    from tqdm.auto import tqdm

    out = _open_output(args, keep)
    try:
        for batch in tqdm(list(_batches(work, args.batch_size)), desc=args.command, unit="batch", file=sys.stderr):
            out.write("".join(json.dumps(r) + "\n" for r in records_of(module, args, batch)))
            out.flush()
    finally:
        if out is not sys.stdout:
            out.close()
    return 0


def _discard_stdout() -> None:
    """Points the stdout file descriptor at the null device, once its reader has gone.

    What is left in `sys.stdout`'s buffer is then flushed there when the interpreter exits, instead of raising
    `BrokenPipeError` again (which Python would report on stderr, exiting with 120).
    """
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # no stdout, or one without a descriptor (an in-process caller's)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `trl-inference`.

    When stdout is a pipe whose reader stops reading (`trl-inference generate ... | head -1`), the run ends quietly
    at its next write, with no traceback, and returns 141 (`BROKEN_PIPE`): the status a shell reports for a C tool
    that SIGPIPE ends there (`yes | head -1`), which scripts using `set -o pipefail` already expect from such a
    pipeline. Python ignores SIGPIPE and raises `BrokenPipeError` instead, so the status is returned rather than
    left to the signal. 141 is chosen over 1 so that "the reader went away" stays apart from a real failure (and
    from 2 and 130 below) while still saying the output is incomplete. This covers `serve` too.

    Args:
        argv (`Sequence[str]`, *optional*): The arguments (default: `sys.argv[1:]`).

    Returns:
        `int`: 0 on success; 2 (`USAGE_ERROR`) for a bad command line or bad input, reported in one line on stderr
        (argparse exits with 2 itself for unknown or malformed options); 130 (`INTERRUPTED`) after Ctrl-C; 141
        (`BROKEN_PIPE`) when stdout's reader has gone. `serve` otherwise returns the statuses of the launcher's `main`.
    """
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    except BrokenPipeError:
        _discard_stdout()
        return BROKEN_PIPE


def _main(argv: list[str]) -> int:
    """`main` but for broken pipes: dispatches `serve` to its launcher, runs `generate` and `score`."""
    if argv[:1] == ["serve"]:  # the launcher has its own parser (and passes what follows `--` on to vLLM)
        from .backends.vllm.server.launcher import main as serve_main

        return serve_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "generate" and not args.prompt and not args.prompts:
        parser.error("generate: give --prompt or --prompts")
    try:
        return _run(args)
    except InputError as e:
        print(f"{parser.prog} {args.command}: error: {e}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        if args.output:
            print(f"interrupted; rerun the same command to resume {args.output}", file=sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())
