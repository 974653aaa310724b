"""Chunked prefill on vLLM's CPU build: rollout throughput with it on (vLLM's default) and off (this package's).

The CPU build crashes on a chunked prefill of a seeded request (`backends.vllm.cpu_scheduler_settings`), so the
backend turns chunked prefill off there. This measures what that costs, side by side in one run: two in-process
engines on the embedded SmolLM2-135M-Instruct (float32, eager), the same unseeded GRPO-shaped batches alternating
between them, median tokens/s of `--repeats` batches each.

    python benchmarks/chunked_prefill.py            # 8 prompts x 4 samples x 64 tokens, and 32 x 4 x 64
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._results import append_results
from benchmarks.generation import SMOLLM2_PROMPTS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="batches per engine and shape")
    parser.add_argument("--no-write", action="store_true", help="print only, do not append to RESULTS.md")
    args = parser.parse_args()

    from trl_inference_ext.backends.vllm import VLLMBackend
    from trl_inference_ext.model_source import resolve_model_name
    from trl_inference_ext.types import SamplingConfig

    folder = resolve_model_name("default")
    engines = {
        chunked: VLLMBackend(
            folder,
            dtype="float32",
            enforce_eager=True,
            kv_cache_memory_bytes=512 << 20,
            max_model_len=1024,
            enable_chunked_prefill=chunked,
        )
        for chunked in (True, False)
    }
    tok = engines[True].tokenizer
    prompts = [tok(p)["input_ids"] for p in SMOLLM2_PROMPTS]
    sampling = SamplingConfig(max_new_tokens=64, temperature=0.7, num_return_sequences=4)
    lines = ["| prompts x samples x tokens | chunked on tok/s | chunked off tok/s | off / on |", "|---|---:|---:|---:|"]
    for count in (8, 32):
        batch = [prompts[i % len(prompts)] for i in range(count)]
        rates: dict[bool, list[float]] = {True: [], False: []}
        for engine in engines.values():
            engine.generate(batch[:2], SamplingConfig(max_new_tokens=4))  # warm-up
        for _ in range(args.repeats):
            for chunked, engine in engines.items():
                started = time.perf_counter()
                outputs = engine.generate(batch, sampling)
                rates[chunked].append(sum(len(o.token_ids) for o in outputs) / (time.perf_counter() - started))
        on, off = statistics.median(rates[True]), statistics.median(rates[False])
        lines.append(f"| {count} x 4 x 64 | {on:.1f} | {off:.1f} | {off / on:.2f} |")
        print(lines[-1], flush=True)
    table = "\n".join(lines)
    notes = (
        f"Two in-process engines (SmolLM2-135M-Instruct, float32, `enforce_eager=True`, 512 MiB KV cache each) in one "
        f"process, the same unseeded batch alternating between them, median of {args.repeats} batches; T=0.7."
    )
    print(table)
    if not args.no_write:
        append_results("Chunked prefill on the vLLM CPU build", table, notes)


if __name__ == "__main__":
    main()
