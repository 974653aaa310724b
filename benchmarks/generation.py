"""Generation benchmark: GRPO-shaped rollouts (prompts x samples), rows measured side by side in one run.

Rows, same weights, same prompts, same sampling (temperature 1.0, top-k off, top-p 1.0):

- (a) `TRL HF generate`: what `GRPOTrainer` runs when `use_vllm=False` (a faithful minimal copy, see
  `trl_hf_generate`): every prompt repeated `num_generations` times, left-padded, one `model.generate` call,
  completions cut after the first EOS. No log-probs (TRL recomputes them in the training forward).
- (b) `InferenceModule HF`: this project's Hugging Face backend, each distinct prompt passed once with
  `num_return_sequences`, sampled-token log-probs returned.
- (c) `InferenceModule vLLM`: this project's vLLM backend (in-process engine, in its own subprocess so that its
  thread settings cannot touch the other rows), same call; engine start-up is reported but not timed.

With `--lora R` the policy is what `GRPOTrainer(peft_config=LoraConfig(...))` trains: the model wrapped in a PEFT
LoRA adapter of rank R on q/k/v/o (`lora_alpha = 2R`, `lora_B` drawn small and non-zero, as after some training).
Row (a) then generates with that PEFT model (TRL's path for a LoRA policy), (b) and (c) keep the plain model, and two
rows are added on the PEFT model:

- (d) `InferenceModule HF, LoRA folded`: the Hugging Face backend's default, the adapter folded into a decode-time
  weight copy (`backends/hf/lora_fold.py`);
- (e) `InferenceModule HF, LoRA unfolded`: the same with `fold_lora=False`, through PEFT's LoRA layers.

Models:

- default: a random-weight causal LM built offline from a Qwen2-0.5B-shaped config (vocab 151,936, hidden 896,
  24 layers; `--layers` keeps fewer). An EOS is planted (see `plant_eos`) so that completion lengths vary.
- `--quick`: a small model of the same architecture (2 layers, hidden 256, vocab 8,192) and a smaller workload.
- `--model smollm2`: the embedded SmolLM2-135M-Instruct (`trl_inference_ext.default_model`), short chat prompts.

    python benchmarks/generation.py --quick              # under 2 minutes on 2 cores
    python benchmarks/generation.py --model smollm2      # 8 chat prompts x 4 samples, 64 new tokens
    python benchmarks/generation.py --layers 4           # 8 prompts (64-512 tokens) x 8 samples, 128 new tokens
    python benchmarks/generation.py --model smollm2 --lora 16 --no-vllm   # a LoRA policy next to the plain model
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import multiprocessing as mp
import os
import random
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from benchmarks._results import QWEN2_0_5B, append_results

ROW_A, ROW_B, ROW_C = "(a) TRL HF generate", "(b) InferenceModule HF", "(c) InferenceModule vLLM"
ROW_D, ROW_E = "(d) InferenceModule HF, LoRA folded", "(e) InferenceModule HF, LoRA unfolded"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
LORA_B_STD = 0.02
LOGPROB_TOLERANCE = 1e-4
QUICK_SHAPE: dict[str, Any] = dict(
    vocab_size=8192,
    hidden_size=256,
    intermediate_size=1024,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    tie_word_embeddings=True,
)
SMOLLM2_PROMPTS = (
    "What is the capital of France?",
    "Give me three tips for staying healthy.",
    "Write a haiku about the sea.",
    "Explain what a prime number is.",
    "What is 12 times 7?",
    "Name a famous painting and its painter.",
    "Why is the sky blue?",
    "Suggest a name for a pet turtle.",
)


@dataclass(frozen=True)
class Workload:
    """Rollout shape: prompts, samples per prompt, prompt lengths (random models) and token budget."""

    num_prompts: int
    num_generations: int
    min_prompt_len: int
    max_prompt_len: int
    max_new_tokens: int


FULL = Workload(num_prompts=8, num_generations=8, min_prompt_len=64, max_prompt_len=512, max_new_tokens=128)
QUICK = Workload(num_prompts=4, num_generations=4, min_prompt_len=16, max_prompt_len=64, max_new_tokens=32)
SMOLLM2 = Workload(num_prompts=8, num_generations=4, min_prompt_len=0, max_prompt_len=0, max_new_tokens=64)
SMOLLM2_QUICK = Workload(num_prompts=4, num_generations=2, min_prompt_len=0, max_prompt_len=0, max_new_tokens=32)


# ------------------------------------------------------------------------------------------------ random model
def plant_eos(model: Any, eos_token_id: int, calibration_ids: Any, target: float, constant: float = 0.1) -> float:
    """Makes EOS a token the random model samples with a per-step probability of about `target`.

    With random weights every logit is small and EOS (one of ~150k tokens) is practically never sampled. Scaling
    the EOS row alone does not work well: its logit must sit ~9 nats above the others, which amplifies every
    fluctuation of the hidden state, so some sequences would stop at once and others never. Instead one hidden
    dimension `k` is made constant: the input embeddings get the value `constant` in column `k`, and no attention or
    MLP block writes to `k` (row `k` of every `o_proj` and `down_proj` is zeroed). After the final RMSNorm,
    `h[k] = constant / rms(residual)`, which varies by a few percent only. Every token's logit gets the same
    `constant * h[k]` (no effect on the softmax) except EOS, whose entry in column `k` is set to `b`, bisected on
    the calibration sequences so that the mean EOS probability is `target`. The embeddings are tied (Qwen2-0.5B), so
    this edits the input embedding of EOS too, which never matters: EOS ends a completion.

    Args:
        model: A `Qwen2ForCausalLM` (or a causal LM with the same module names), edited in place.
        eos_token_id (`int`): The token to plant.
        calibration_ids (`torch.Tensor`): `[B, T]` random token ids (EOS-free) to calibrate on.
        target (`float`): Mean per-step EOS probability to reach, e.g. 0.03.
        constant (`float`, *optional*, defaults to 0.1): Value of the constant hidden dimension at the input.

    Returns:
        `float`: The mean EOS probability reached on the calibration positions.
    """
    import torch

    k = 0
    embeddings = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    with torch.no_grad():
        embeddings[:, k] = constant
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[k] = 0.0
            layer.mlp.down_proj.weight[k] = 0.0
        skip = min(16, calibration_ids.shape[1] // 4)
        hidden = model.model(input_ids=calibration_ids).last_hidden_state[:, skip:].reshape(-1, head.shape[1])
        # Log-partition over the other tokens and the EOS logit without its column-k term, in chunks of positions.
        others, eos_base = [], []
        for chunk in hidden.split(256):
            logits = chunk @ head.T
            logits[:, eos_token_id] = -math.inf
            others.append(torch.logsumexp(logits, dim=-1))
            eos_base.append(chunk @ head[eos_token_id] - head[eos_token_id, k] * chunk[:, k])
        log_z, base, h_k = torch.cat(others), torch.cat(eos_base), hidden[:, k]

        def mean_prob(b: float) -> float:
            return torch.sigmoid(base + b * h_k - log_z).mean().item()

        lo, hi = -1e4, 1e4  # h[k] > 0, so the mean probability increases with b
        for _ in range(100):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if mean_prob(mid) < target else (lo, mid)
        head[eos_token_id, k] = hi  # tied: the same tensor as `embeddings` for Qwen2-0.5B
    return mean_prob(hi)


def build_random_model(folder: Path, shape: dict[str, Any], layers: int, eos_prob: float, seed: int) -> dict:
    """Builds, plants EOS into and saves a seeded random-weight float32 `Qwen2ForCausalLM` with a tiny tokenizer.

    Returns:
        `dict`: Facts for the notes (reached EOS probability, tokenizer length, build seconds).
    """
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from trl_inference_ext.testing import SPECIAL_TOKENS, build_tiny_tokenizer

    start = time.perf_counter()
    tokenizer = build_tiny_tokenizer(seed, vocab_size=min(shape["vocab_size"], 8192))
    config = Qwen2Config(
        num_hidden_layers=layers,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **shape,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).float().eval()
    generator = torch.Generator().manual_seed(seed + 1)
    calibration = torch.randint(len(SPECIAL_TOKENS), len(tokenizer), (4, 256), generator=generator)
    reached = plant_eos(model, tokenizer.eos_token_id, calibration, eos_prob)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return {"eos_prob": reached, "tokenizer_len": len(tokenizer), "build_s": time.perf_counter() - start}


def random_prompts(workload: Workload, tokenizer_len: int, seed: int) -> list[list[int]]:
    """Prompts of random token ids (no special tokens), lengths spread evenly over the workload's range."""
    from trl_inference_ext.testing import SPECIAL_TOKENS

    rng = random.Random(seed)
    n = workload.num_prompts
    lengths = [
        round(workload.min_prompt_len + i * (workload.max_prompt_len - workload.min_prompt_len) / max(1, n - 1))
        for i in range(n)
    ]
    rng.shuffle(lengths)
    return [[rng.randrange(len(SPECIAL_TOKENS), tokenizer_len) for _ in range(length)] for length in lengths]


def chat_prompts(tokenizer: Any, count: int) -> list[list[int]]:
    """Short user questions through the tokenizer's chat template, as token ids."""
    return [
        list(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=True
            )["input_ids"]
        )
        for text in SMOLLM2_PROMPTS[:count]
    ]


def lora_policy(folder: Path | str, rank: int, seed: int) -> Any:
    """The model at `folder` wrapped in a PEFT LoRA adapter on q/k/v/o, as `GRPOTrainer(peft_config=...)` makes it.

    `lora_alpha = 2 * rank` and `lora_dropout = 0.05` (identity in eval mode); `lora_B` is drawn from
    `N(0, LORA_B_STD^2)` instead of PEFT's zeros, so that the adapter changes outputs a little, as after some training.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=0.05, target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM"
    )
    model = get_peft_model(base, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * LORA_B_STD)
    return model.eval()


# --------------------------------------------------------------------------------------------------------- rows
def eos_token_ids_of(model: Any) -> list[int]:
    """EOS ids as `GRPOTrainer.__init__` reads them: the model's generation config, as a list."""
    eos = model.generation_config.eos_token_id
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def trl_hf_generate(
    model: Any, tokenizer: Any, prompts: list[list[int]], num_generations: int, max_new_tokens: int
) -> list[list[int]]:
    """Row (a): GRPOTrainer's `use_vllm=False` generation path, as a faithful minimal copy of TRL 1.16.

    The `GenerationConfig` is the one `GRPOTrainer.__init__` builds (`trl/trainer/grpo_trainer.py` lines ~1154-1175,
    with GRPOConfig's defaults temperature 1.0, top_p 1.0, top_k 0, min_p None, repetition_penalty 1.0,
    cache_implementation None); the rest follows `_generate_single_turn` (lines ~1763-1889): left-pad the prompts
    (each repeated `num_generations` times consecutively, as `RepeatSampler` yields them), one `model.generate`
    under `torch.no_grad()`, then keep each completion up to and including its first EOS. TRL computes no log-probs
    here; it recomputes them in the training forward pass.

    Returns:
        `list[list[int]]`: Completion token ids, prompt-major, `num_generations` per prompt.
    """
    import torch
    from transformers import GenerationConfig
    from trl.trainer.utils import pad

    eos_token_ids = eos_token_ids_of(model)
    generation_config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos_token_ids,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        min_p=None,
        repetition_penalty=1.0,
        cache_implementation=None,
        disable_compile=True,
    )
    prompt_tensors = [torch.tensor(p) for p in prompts for _ in range(num_generations)]
    padded_ids = pad(prompt_tensors, padding_value=tokenizer.pad_token_id, padding_side="left")
    attention_mask = pad([torch.ones_like(t) for t in prompt_tensors], padding_value=0, padding_side="left")
    with torch.no_grad():
        prompt_completion_ids = model.generate(
            input_ids=padded_ids, attention_mask=attention_mask, generation_config=generation_config
        )
    completion_ids = prompt_completion_ids[:, padded_ids.size(1) :]
    is_eos = torch.isin(completion_ids, torch.tensor(eos_token_ids))
    eos_idx = torch.full((is_eos.size(0),), is_eos.size(1), dtype=torch.long)
    eos_idx[is_eos.any(dim=1)] = is_eos.int().argmax(dim=1)[is_eos.any(dim=1)]
    sequence_indices = torch.arange(is_eos.size(1)).expand(is_eos.size(0), -1)
    completion_mask = sequence_indices <= eos_idx.unsqueeze(1)
    return [c[m].tolist() for c, m in zip(completion_ids, completion_mask)]


def module_generate(module: Any, prompts: list[list[int]], num_generations: int, max_new_tokens: int) -> Any:
    """Rows (b) and (c): `InferenceModule.generate` with each distinct prompt once and sampled-token log-probs."""
    return module.generate(
        prompts,
        num_return_sequences=num_generations,
        temperature=1.0,
        max_new_tokens=max_new_tokens,
        return_logprobs=True,
        use_cache=False,
    )


def summarize(
    completions: list[list[int]], eos_token_ids: list[int], seconds: float, cpu_seconds: float
) -> dict[str, Any]:
    """Completion tokens (EOS included), tokens/s, mean length and share of completions ended by EOS.

    `cpu_seconds` is the CPU time of the process that generated (all its threads): with 2 threads on 2 idle cores it
    is about twice the wall time; much less means the run waited on other processes.
    """
    tokens = sum(len(c) for c in completions)
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "mean_len": tokens / len(completions),
        "eos_share": sum(bool(c) and c[-1] in eos_token_ids for c in completions) / len(completions),
        "sequences": len(completions),
    }


# ------------------------------------------------------------------------------------------- vLLM worker process
def _vllm_worker(folder: str, prompts: list[list[int]], workload: Workload, eos: list[int], conn: Any) -> None:
    """Owns the vLLM engine for row (c); answers `"warmup"`, `"run"` and `"sample"` until it receives `None`."""
    try:
        import torch

        from trl_inference_ext import InferenceModule

        start = time.perf_counter()
        module = InferenceModule(
            folder, backend="vllm", dtype="float32", enforce_eager=True, kv_cache_memory_bytes=1 << 30, seed=0
        )
        conn.send({"startup_s": time.perf_counter() - start, "threads": torch.get_num_threads()})
        last = None
        while (command := conn.recv()) is not None:
            if command == "warmup":
                module_generate(module, [p[:8] for p in prompts[:2]], 2, 4)
                conn.send({})
            elif command == "run":
                begin, cpu = time.perf_counter(), time.process_time()
                last = module_generate(module, prompts, workload.num_generations, workload.max_new_tokens)
                conn.send(summarize(last.token_ids, eos, time.perf_counter() - begin, time.process_time() - cpu))
            elif command == "sample" and last is not None:
                conn.send([(i // workload.num_generations, last.token_ids[i], last.logprobs[i]) for i in (0, 1)])
            else:
                conn.send({"error": f"unknown command {command!r}"})
    except Exception:
        conn.send({"error": traceback.format_exc()})


class VLLMRow:
    """Parent-side handle of the vLLM worker subprocess."""

    def __init__(self, folder: str, prompts: list[list[int]], workload: Workload, eos: list[int]) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_vllm_worker, args=(folder, prompts, workload, eos, child), daemon=True)
        self.proc.start()
        self.info = self.ask(None)

    def ask(self, command: str | None) -> Any:
        """Sends `command` (or only waits, for `None`) and returns the worker's answer."""
        if command is not None:
            self.conn.send(command)
        while not self.conn.poll(5):
            if not self.proc.is_alive():
                raise RuntimeError(f"the vLLM worker exited with code {self.proc.exitcode}")
        answer = self.conn.recv()
        if isinstance(answer, dict) and "error" in answer:
            raise RuntimeError(f"the vLLM worker failed:\n{answer['error']}")
        return answer

    def close(self) -> None:
        """Stops the worker."""
        if self.proc.is_alive():
            self.conn.send(None)
            self.proc.join(timeout=60)


# ------------------------------------------------------------------------------------------------------- driver
def check_logprobs(module: Any, prompts: list[list[int]], samples: list[tuple[int, list[int], Any]]) -> float:
    """Max |returned log-prob - `get_logprobs`| over the given (prompt index, token ids, log-probs) samples."""
    import torch

    worst = 0.0
    with torch.no_grad():
        for prompt_index, ids, logprobs in samples:
            if not ids:
                continue
            scored = module.get_logprobs([prompts[prompt_index]], [ids])[0, : len(ids)]
            worst = max(worst, (scored - torch.as_tensor(logprobs)).abs().max().item())
    return worst


def profile_row(run: Callable[[], dict[str, Any]], name: str, top: int = 25) -> None:
    """Runs `run` once under cProfile and prints the top functions by cumulative and by own time."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    r = run()
    profiler.disable()
    print(f"\ncProfile of row ({name}): {r['tokens']} tokens in {r['seconds']:.2f} s (profiled)", flush=True)
    stats = pstats.Stats(profiler, stream=sys.stdout).strip_dirs()
    stats.sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(top)


def format_table(results: dict[str, list[dict[str, Any]]], workload: Workload, threads: int, row_a: str = ROW_A) -> str:
    """Markdown table: best-of-N tokens/s per row and the ratios against (a) (named `row_a`) and (c).

    In the per-run column, `*` marks a run whose CPU time was under 0.75 x `threads` x its wall time: it waited on
    other processes (with OpenMP threads spinning at barriers, such runs can be many times slower).
    """
    best = {row: max(runs, key=lambda r: r["tokens_per_s"]) for row, runs in results.items()}
    lines = [
        "| row | completion tokens/s (best) | wall s (that run) | CPU s (that run) | tokens (that run) | mean "
        "completion length (all runs) | ended by EOS | vs (a) | vs (c) | tokens/s of each run |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row, runs in results.items():
        r = best[row]
        mean_len = sum(x["tokens"] for x in runs) / sum(x["sequences"] for x in runs)
        eos_share = sum(x["eos_share"] for x in runs) / len(runs)
        vs_a = f"{r['tokens_per_s'] / best[row_a]['tokens_per_s']:.2f}" if row_a in best else "n/a"
        vs_c = f"{r['tokens_per_s'] / best[ROW_C]['tokens_per_s']:.2f}" if ROW_C in best else "n/a"
        each = ", ".join(
            f"{x['tokens_per_s']:.1f}" + "*" * (x["cpu_seconds"] < 0.75 * threads * x["seconds"]) for x in runs
        )
        lines.append(
            f"| {row} | {r['tokens_per_s']:.1f} | {r['seconds']:.2f} | {r['cpu_seconds']:.2f} | {r['tokens']} | "
            f"{mean_len:.1f} / {workload.max_new_tokens} | {eos_share:.0%} | {vs_a} | {vs_c} | {each} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model and workload, under 2 minutes on 2 cores")
    parser.add_argument("--model", choices=("random", "smollm2"), default="random", help="which model to run")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers of the random model (default 24)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per row (default 2, 5 with --quick)")
    parser.add_argument("--eos-prob", type=float, default=None, help="planted per-step EOS probability (random)")
    parser.add_argument("--no-vllm", action="store_true", help="skip row (c)")
    parser.add_argument(
        "--rows",
        default=None,
        help="rows to time, e.g. 'bc' (default 'abc', 'abcde' with --lora; (b) always runs, (d) too with --lora)",
    )
    parser.add_argument(
        "--lora",
        type=int,
        default=None,
        metavar="R",
        help="also a PEFT LoRA policy of rank R on q/k/v/o: (a) runs on it, rows (d) folded and (e) unfolded are added",
    )
    parser.add_argument("--no-write", action="store_true", help="print only, do not append to RESULTS.md")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--profile",
        choices=("a", "b", "d", "e"),
        default=None,
        help="after timing, cProfile one more call of row (a), (b), (d) or (e)",
    )
    args = parser.parse_args()
    if args.lora is not None and args.lora < 1:
        parser.error("--lora must be a rank >= 1")
    if args.rows is None:
        args.rows = "abcde" if args.lora else "abc"
    if args.profile in ("d", "e") and not args.lora:
        parser.error("--profile d/e needs --lora")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_inference_ext import InferenceModule
    from trl_inference_ext.backends.hf import HuggingFaceBackend

    repeats = args.repeats or (5 if args.quick else 2)
    use_vllm = "c" in args.rows and not args.no_vllm and importlib.util.find_spec("vllm") is not None
    tmp = tempfile.TemporaryDirectory(prefix="generation_bench_")
    notes: list[str] = []
    if args.model == "smollm2":
        from trl_inference_ext.default_model import default_model_path

        workload = SMOLLM2_QUICK if args.quick else SMOLLM2
        folder = default_model_path()
        title = "SmolLM2-135M-Instruct (embedded default model), float32"
        tokenizer = AutoTokenizer.from_pretrained(folder)
        prompts = chat_prompts(tokenizer, workload.num_prompts)
        notes.append("Prompts: short user questions through the SmolLM2 chat template (its default system prompt).")
    else:
        quick = args.quick
        workload = QUICK if quick else FULL
        shape = QUICK_SHAPE if quick else QWEN2_0_5B
        layers = args.layers or (2 if quick else 24)
        eos_prob = args.eos_prob or (0.05 if quick else 0.03)
        folder = Path(tmp.name) / "model"
        facts = build_random_model(folder, shape, layers, eos_prob, args.seed)
        kind = "small Qwen2 (quick)" if quick else "Qwen2-0.5B-shaped"
        title = (
            f"{kind} random weights, vocab {shape['vocab_size']:,}, hidden {shape['hidden_size']}, {layers} "
            f"decoder layer(s), float32"
        )
        tokenizer = AutoTokenizer.from_pretrained(folder)
        prompts = random_prompts(workload, facts["tokenizer_len"], args.seed)
        notes.append(
            f"Model built offline in {facts['build_s']:.0f} s; EOS planted with a per-step probability of "
            f"{facts['eos_prob']:.3f} on calibration positions (see `plant_eos`). Prompts: random ids of the "
            f"{facts['tokenizer_len']}-token tokenizer."
        )
        if not quick and layers != 24:
            notes.append(f"`--layers {layers}`: the real Qwen2-0.5B has 24 decoder layers; kept {layers} for CPU time.")
    lengths = sorted(len(p) for p in prompts)
    load_before = os.getloadavg()[0]
    print(f"{title}\nprompt lengths {lengths}, {workload}", flush=True)

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    hf_module = InferenceModule.from_model(model, tokenizer, cache_size=0)
    hf_load_s = time.perf_counter() - start
    eos = sorted({tokenizer.eos_token_id, *eos_token_ids_of(model)} - {None})
    n, max_new = workload.num_generations, workload.max_new_tokens
    policy, row_a = model, ROW_A
    lora_modules: dict[str, Any] = {}
    if args.lora:
        policy, row_a = lora_policy(folder, args.lora, args.seed), f"{ROW_A}, LoRA policy"
        for row, fold in ((ROW_D, "auto"), (ROW_E, False)):
            if row == ROW_D or "e" in args.rows:
                backend = HuggingFaceBackend(policy, tokenizer, fold_lora=fold)
                lora_modules[row] = InferenceModule.from_backend(backend, cache_size=0)

    def run_a() -> dict[str, Any]:
        begin, cpu = time.perf_counter(), time.process_time()
        completions = trl_hf_generate(policy, tokenizer, prompts, n, max_new)
        return summarize(completions, eos, time.perf_counter() - begin, time.process_time() - cpu)

    last_b: list[Any] = []

    def run_b() -> dict[str, Any]:
        begin, cpu = time.perf_counter(), time.process_time()
        result = module_generate(hf_module, prompts, n, max_new)
        seconds, cpu_seconds = time.perf_counter() - begin, time.process_time() - cpu
        last_b[:] = [result]
        return summarize(result.token_ids, eos, seconds, cpu_seconds)

    last_lora: dict[str, Any] = {}

    def lora_runner(row: str) -> Callable[[], dict[str, Any]]:
        def run() -> dict[str, Any]:
            begin, cpu = time.perf_counter(), time.process_time()
            result = module_generate(lora_modules[row], prompts, n, max_new)
            seconds, cpu_seconds = time.perf_counter() - begin, time.process_time() - cpu
            last_lora[row] = result
            return summarize(result.token_ids, eos, seconds, cpu_seconds)

        return run

    vllm_row = VLLMRow(str(folder), prompts, workload, eos) if use_vllm else None
    runners: dict[str, Callable[[], dict[str, Any]]] = {row_a: run_a} if "a" in args.rows else {}
    runners[ROW_B] = run_b  # the correctness guard needs it
    if vllm_row is not None:
        runners[ROW_C] = lambda: vllm_row.ask("run")
    for row in lora_modules:
        runners[row] = lora_runner(row)
    try:
        # Warm-up: one small call per row.
        warm = [p[:8] for p in prompts[:2]]
        trl_hf_generate(policy, tokenizer, warm, 2, 4)
        module_generate(hf_module, warm, 2, 4)
        for lora_module in lora_modules.values():
            module_generate(lora_module, warm, 2, 4)
        if vllm_row is not None:
            vllm_row.ask("warmup")
        results: dict[str, list[dict[str, Any]]] = {row: [] for row in runners}
        names = list(runners)
        for rep in range(repeats):
            order = names[rep % len(names) :] + names[: rep % len(names)]  # rotate to spread drift
            for row in order:
                torch.manual_seed(args.seed + rep)
                results[row].append(runners[row]())
                r = results[row][-1]
                print(
                    f"  run {rep + 1}/{repeats} {row}: {r['tokens']} tokens in {r['seconds']:.2f} s "
                    f"({r['cpu_seconds']:.2f} CPU s) = "
                    f"{r['tokens_per_s']:.1f} tokens/s, mean length {r['mean_len']:.1f}",
                    flush=True,
                )
        # Correctness guard: (b)'s log-probs are those `get_logprobs` gives for the same ids.
        result = last_b[0]
        picks = sorted(range(len(result.token_ids)), key=lambda i: -len(result.token_ids[i]))[:2]
        samples = [(i // n, result.token_ids[i], result.logprobs[i]) for i in picks]
        diff_b = check_logprobs(hf_module, prompts, samples)
        print(f"(b) log-probs vs get_logprobs, max |diff| over 2 sequences: {diff_b:.2e}", flush=True)
        if diff_b > LOGPROB_TOLERANCE:
            raise SystemExit(f"(b) log-probs differ from get_logprobs by {diff_b:.2e} > {LOGPROB_TOLERANCE}")
        diff_c = check_logprobs(hf_module, prompts, vllm_row.ask("sample")) if vllm_row is not None else None
        if diff_c is not None:
            print(f"(c) vLLM log-probs vs HF get_logprobs, max |diff| over 2 sequences: {diff_c:.2e}", flush=True)
        # The same guard for (d), against `get_logprobs` through PEFT's own LoRA layers (scoring never folds).
        diff_d = None
        if ROW_D in last_lora:
            result = last_lora[ROW_D]
            picks = sorted(range(len(result.token_ids)), key=lambda i: -len(result.token_ids[i]))[:2]
            samples = [(i // n, result.token_ids[i], result.logprobs[i]) for i in picks]
            diff_d = check_logprobs(lora_modules[ROW_D], prompts, samples)
            print(f"(d) log-probs vs get_logprobs on the PEFT model, max |diff|: {diff_d:.2e}", flush=True)
            if diff_d > LOGPROB_TOLERANCE:
                raise SystemExit(f"(d) log-probs differ from get_logprobs by {diff_d:.2e} > {LOGPROB_TOLERANCE}")
            if lora_modules[ROW_D].backend.lora_fold.folded_layers == 0:
                raise SystemExit("(d) did not fold: the decode-time copy did not fit in the free memory")
        if args.profile:
            profile_rows = {"a": run_a, "b": run_b, "d": runners.get(ROW_D), "e": runners.get(ROW_E)}
            profile_run = profile_rows[args.profile]
            if profile_run is not None:
                profile_row(profile_run, args.profile)
    finally:
        if vllm_row is not None:
            vllm_row.close()
        tmp.cleanup()

    load_after = os.getloadavg()[0]
    table = format_table(results, workload, torch.get_num_threads(), row_a=row_a)
    print(table)
    summary = {row: [{k: round(v, 3) for k, v in r.items()} for r in runs] for row, runs in results.items()}
    print(json.dumps(summary))
    vllm_note = (
        f"(c): engine start-up {vllm_row.info['startup_s']:.0f} s (not timed; `enforce_eager=True`, KV cache 1 GiB), "
        f"torch threads in its process {vllm_row.info['threads']}; its sampled log-probs differ from HF "
        f"`get_logprobs` by at most {diff_c:.1e} on 2 sequences (information only)."
        if vllm_row is not None
        else "(c) not run (`--no-vllm`, `--rows` without c, or vLLM not installed)."
    )
    if args.lora:
        fold = lora_modules[ROW_D].backend.lora_fold
        notes.append(
            f"`--lora {args.lora}`: (a), (d) and (e) generate with a PEFT LoRA policy, rank {args.lora}, alpha "
            f"{2 * args.lora}, on {'/'.join(LORA_TARGETS)} (`lora_B` ~ N(0, {LORA_B_STD}^2)); (b) and (c) with the "
            f"plain model. (d) folds the adapter into a decode-time copy of {fold.folded_layers} layers "
            f"({fold.folded_bytes / 2**20:.0f} MiB; {fold.fold_count} layer folds over all its runs, i.e. once: the "
            f"weights never change here); (e) runs PEFT's unmerged LoRA layers (`fold_lora=False`). Guard: (d) "
            f"log-probs equal `get_logprobs` on the PEFT model within {diff_d:.1e}."
        )
    notes += [
        f"Workload: {workload.num_prompts} prompts (lengths {lengths[0]}-{lengths[-1]}) x {n} samples, up to "
        f"{max_new} new tokens, temperature 1.0, top-k off, top-p 1.0. Tokens/s counts real completion tokens "
        f"(EOS included); best of {repeats} timed run(s) per row after one small warm-up call, row order rotated "
        f"between runs; torch threads {torch.get_num_threads()}. Model load (HF) {hf_load_s:.1f} s, not timed. "
        f"1-minute load average {load_before:.1f} before, {load_after:.1f} after (the machine is shared: other "
        f"processes slow single runs, hence best-of and the per-run column, where `*` marks a run whose CPU s was "
        f"under 0.75 x threads x wall s, i.e. one that waited on other processes).",
        "(a) is a faithful minimal copy of TRL 1.16's `GRPOTrainer` generation path with `use_vllm=False` (the "
        "`GenerationConfig` of `grpo_trainer.py` ~1154-1175 and `_generate_single_turn` ~1763-1889): prompts repeated "
        "`num_generations` times, left-padded, one `model.generate`, cut after the first EOS; it returns no "
        "log-probs (TRL recomputes them in the training forward). (b) and (c) return sampled-token log-probs.",
        "(b) runs `backends/hf/decoding.py`: each distinct prompt prefilled once for its n samples, prompts prefilled "
        "per length bucket, finished rows dropped from batch and cache, inverse-CDF sampling, and on CPU "
        "grouped-query SDPA without KV copies and weight-major products for few rows (`backends/hf/cpu_kernels.py`).",
        f"Guard: (b) log-probs equal `get_logprobs` on the same ids within {diff_b:.1e} (tolerance "
        f"{LOGPROB_TOLERANCE:g}, 2 longest sequences).",
        vllm_note,
    ]
    print("\n".join(notes))
    if not args.no_write:
        append_results(
            f"Generation, GRPO shape: {title}",
            table,
            notes="\n".join(f"- {line}" for line in notes),
            packages=("trl_inference_ext",),
        )


if __name__ == "__main__":
    main()
