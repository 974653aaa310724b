"""Scoring benchmark: peak memory and time of per-token log-probs, side by side in one run.

Rows, same model, same inputs, each in a fresh subprocess so peak RSS is its own:

- `log_softmax.gather`: `model(ids).logits` -> `log_softmax(-1).gather(...)` (the straightforward way);
- `trl selective_log_softmax`: `model(ids).logits` -> TRL's `selective_log_softmax`;
- `InferenceModule.get_logprobs`: this project (decoder hidden states, LM head applied per chunk of positions).

The model is a random-weight causal LM built offline from a Qwen2-0.5B-shaped config (vocab 151,936, hidden 896);
`--layers` keeps fewer decoder layers than the real 24 so CPU runs finish (the rows differ only after the decoder).

    python benchmarks/scoring.py            # B x T = 8 x 512 and 4 x 2048
    python benchmarks/scoring.py --quick    # 2 x 256 and 1 x 1024, under 2 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._results import QWEN2_0_5B, append_results, current_rss_mib, peak_rss_mib

ROWS = ("log_softmax.gather", "trl selective_log_softmax", "InferenceModule.get_logprobs")


def _run(row: str, batch: int, seq: int, layers: int, repeats: int, queue: mp.Queue) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from trl_inference_ext import InferenceModule
    from trl_inference_ext.testing import build_tiny_tokenizer

    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = Qwen2ForCausalLM(Qwen2Config(num_hidden_layers=layers, **QWEN2_0_5B)).eval()
    tokenizer = build_tiny_tokenizer()
    vocab = QWEN2_0_5B["vocab_size"]
    prompt_len = seq // 4
    ids = torch.randint(0, vocab, (batch, seq))
    prompts = ids[:, :prompt_len].tolist()
    responses = ids[:, prompt_len:].tolist()
    targets = ids[:, prompt_len:]

    def straightforward() -> torch.Tensor:
        logits = model(input_ids=ids).logits[:, prompt_len - 1 : -1]
        return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[..., None]).squeeze(-1)

    def trl_selective() -> torch.Tensor:
        from trl.trainer.utils import selective_log_softmax

        logits = model(input_ids=ids).logits[:, prompt_len - 1 : -1]
        return selective_log_softmax(logits, targets)

    module = InferenceModule.from_model(model, tokenizer)

    def ours() -> torch.Tensor:
        return module.get_logprobs(prompts, responses)  # type: ignore[return-value]

    fn = {ROWS[0]: straightforward, ROWS[1]: trl_selective, ROWS[2]: ours}[row]
    base_rss, base_peak = current_rss_mib(), peak_rss_mib()
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - start)
            del out
    peak = peak_rss_mib()
    queue.put(
        {"row": row, "peak_delta_mib": max(0.0, peak - base_rss), "peak_grew": peak > base_peak, "time_s": min(times)}
    )


def measure(row: str, batch: int, seq: int, layers: int, repeats: int) -> dict:
    ctx = mp.get_context("spawn")
    queue: mp.Queue = ctx.Queue()
    proc = ctx.Process(target=_run, args=(row, batch, seq, layers, repeats, queue))
    proc.start()
    while True:
        try:
            result = queue.get(timeout=5)
            break
        except Exception:  # queue.Empty: check the worker is still alive
            if not proc.is_alive():
                raise RuntimeError(f"benchmark worker for {row!r} exited with code {proc.exitcode}") from None
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, under 2 minutes on 2 cores")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 2, 1 with --quick)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per row (min is reported)")
    parser.add_argument("--no-write", action="store_true", help="print only, do not append to RESULTS.md")
    args = parser.parse_args()
    shapes = [(2, 256), (1, 1024)] if args.quick else [(8, 512), (4, 2048)]
    layers = args.layers or (1 if args.quick else 2)
    repeats = args.repeats or (1 if args.quick else 2)

    lines = [
        "| B x T | row | peak RSS delta (MiB) | time (s) | memory vs gather | memory vs selective | time vs fastest |",
        "|---|---|---|---|---|---|---|",
    ]
    summary = {}
    for batch, seq in shapes:
        results = {r: measure(r, batch, seq, layers, repeats) for r in ROWS}
        fastest = min(r["time_s"] for r in results.values())
        for row, r in results.items():
            mem_gather = r["peak_delta_mib"] / max(results[ROWS[0]]["peak_delta_mib"], 1e-9)
            mem_sel = r["peak_delta_mib"] / max(results[ROWS[1]]["peak_delta_mib"], 1e-9)
            lines.append(
                f"| {batch} x {seq} | {row} | {r['peak_delta_mib']:.0f} | {r['time_s']:.2f} | {mem_gather:.3f} | "
                f"{mem_sel:.3f} | {r['time_s'] / fastest:.2f} |"
            )
        summary[f"{batch}x{seq}"] = {
            k: {"mib": round(v["peak_delta_mib"]), "s": round(v["time_s"], 3)} for k, v in results.items()
        }
        print("\n".join(lines[-3:]), flush=True)
    table = "\n".join(lines)
    print(table)
    print(json.dumps(summary))
    if not args.no_write:
        append_results(
            f"Scoring (vocab 151,936, Qwen2-0.5B-shaped, {layers} decoder layer(s), float32)",
            table,
            notes="Peak RSS delta: process peak while scoring minus resident memory before it; one subprocess per row.",
        )


if __name__ == "__main__":
    main()
