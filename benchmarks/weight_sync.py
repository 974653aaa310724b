"""Weight-sync benchmark: seconds and bytes per push to a running vLLM server, side by side in one run.

For each model, one server is started with `trl-inference serve` settings (LoRA enabled) and the trainer side pushes:

- full weights over HTTP chunks (`weight_transfer="http"`, no shared filesystem) and through a shared folder
  (`weight_transfer="filesystem"`, safetensors + reload);
- the LoRA adapter alone (rank `--lora-rank` on q/k/v/o, as the GRPO recipe trains) over both transports.

Each row is the median of `--repeats` pushes: wall time of the whole push, the longest time the server was paused,
and the tensor bytes sent. Then rollout throughput for one GRPO-shaped workload with one server and with two, each
server pinned to its own cores (`VLLM_CPU_OMP_THREADS_BIND`), which is what one vs two GPU servers look like here.

Models: the embedded SmolLM2-135M-Instruct (`smollm2`) and a random-weight Qwen2-0.5B-shaped model (`qwen2-0.5b`,
`--layers` of its 24 decoder layers).

    python benchmarks/weight_sync.py                 # both models, 24 layers, 3 repeats, throughput
    python benchmarks/weight_sync.py --quick         # SmolLM2 + 4-layer Qwen2 shape, 2 repeats, short workload
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._results import QWEN2_0_5B, append_results
from trl_inference_ext.testing import free_port

API_KEY = "weight-sync-benchmark"
KV_CACHE_BYTES = 512 * 2**20


def _core_sets(servers: int) -> list[str]:
    """`VLLM_CPU_OMP_THREADS_BIND` values giving each server its own share of this process's cores."""
    cores = sorted(os.sched_getaffinity(0))
    per = max(1, len(cores) // servers)
    return [",".join(str(c) for c in cores[i * per : (i + 1) * per] or cores[-1:]) for i in range(servers)]


def start_server(folder: str, cores: str, lora_rank: int, log: Path) -> Any:
    """A server for `folder` pinned to `cores`, healthy when returned."""
    from trl_inference_ext.backends.vllm.server.launcher import ServeConfig, ServerProcess

    config = ServeConfig(
        model=folder,
        port=free_port(),
        api_key=API_KEY,
        lora_rank=lora_rank,
        dtype="float32",
        enforce_eager=True,
        kv_cache_memory_bytes=KV_CACHE_BYTES,
    )
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cores  # read by the server process it starts
    try:
        with open(log, "ab") as f:
            server = ServerProcess(config, log=f)
    finally:
        os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
    try:
        server.wait_healthy(900)
    except BaseException:
        server.stop()
        raise
    return server


def model_folder(name: str, layers: int, work: Path) -> str:
    """The folder of benchmark model `name` (built for the random Qwen2 shape)."""
    if name == "smollm2":
        from trl_inference_ext.model_source import resolve_model_name

        return resolve_model_name("default")
    from benchmarks.generation import build_random_model

    folder = work / f"qwen2-0.5b-{layers}l"
    build_random_model(folder, QWEN2_0_5B, layers, eos_prob=0.01, seed=0)
    return str(folder)


def measure_pushes(folder: str, server_url: str, lora_rank: int, repeats: int, shared: Path) -> list[dict[str, Any]]:
    """Median seconds, pause and bytes per push, for full weights and the adapter, over both transports."""
    import torch
    from transformers import AutoModelForCausalLM

    from benchmarks.generation import lora_policy
    from trl_inference_ext.backends.vllm import VLLMBackend

    full = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    adapter = lora_policy(folder, lora_rank, seed=0)
    rows = []
    for transfer in ("http", "filesystem"):
        options: dict[str, Any] = {"weight_transfer_dir": str(shared)} if transfer == "filesystem" else {}
        backend = VLLMBackend(folder, base_url=server_url, api_key=API_KEY, timeout=1800, **options)
        for what, model in (("full weights", full), ("LoRA adapter", adapter)):
            runs = []
            for _ in range(repeats):
                backend.load_weights_from_model(model)
                report = backend.last_push
                assert report is not None and report.servers == [server_url], report
                runs.append(report)
            if what == "LoRA adapter":
                assert backend.adapter is not None, "the adapter was not pushed as an adapter"
            rows.append(
                {
                    "transport": transfer,
                    "what": what,
                    "seconds": statistics.median(r.seconds for r in runs),
                    "pause": statistics.median(r.pause_seconds for r in runs),
                    "bytes": runs[-1].bytes_sent,
                }
            )
            print(f"  {transfer:10s} {what:13s} {rows[-1]['seconds']:.3f} s, {rows[-1]['bytes'] / 2**20:.1f} MiB")
    return rows


def measure_throughput(
    folder: str, urls: list[str], prompts: int, generations: int, tokens: int, repeats: int
) -> dict[str, Any]:
    """Tokens per second of one rollout batch through the servers at `urls` (prompt groups spread over them)."""
    from trl_inference_ext.backends.vllm import VLLMBackend
    from trl_inference_ext.types import SamplingConfig

    backend = VLLMBackend(folder, base_url=urls, api_key=API_KEY, timeout=1800)
    tok = backend.tokenizer
    batch = [tok(f"Question {i}: what is {i} plus {i * 7 % 13}? Explain.")["input_ids"] for i in range(prompts)]
    sampling = SamplingConfig(
        max_new_tokens=tokens, temperature=1.0, num_return_sequences=generations, return_logprobs=True, seed=0
    )
    backend.generate(batch[:2], SamplingConfig(max_new_tokens=4))  # warm-up
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        outputs = backend.generate(batch, sampling)
        rates.append(sum(len(o.token_ids) for o in outputs) / (time.perf_counter() - started))
    return {"servers": len(urls), "tokens_per_s": statistics.median(rates)}


def _failure(exc: Exception, work: Path, name: str) -> str:
    """What failed, with the last error line of the servers' logs (the logs are in a folder removed at the end)."""
    last = ""
    for log in sorted(work.glob(f"{name}-*.log")):
        lines = [x for x in log.read_text(errors="replace").splitlines() if "Error" in x]
        last = lines[-1].strip() if lines else last
    return f"{type(exc).__name__}: {str(exc)[:160]}" + (f"; server log: {last[:300]}" if last else "")


def run(
    names: list[str],
    layers: int,
    repeats: int,
    args: argparse.Namespace,
    workload: tuple[int, int, int],
    work: Path,
    cores: list[str],
) -> tuple[list[tuple[str, dict[str, Any]]], list[tuple[str, dict[str, Any]]]]:
    """Push and throughput rows for each model (one server per model, a second one for the throughput rows)."""
    prompts, generations, tokens = workload
    sync_rows: list[tuple[str, dict[str, Any]]] = []
    throughput: list[tuple[str, dict[str, Any]]] = []
    for name in names:
        folder = model_folder(name, layers, work)
        label = name if name == "smollm2" else f"qwen2-0.5b shape, {layers} layers"
        print(f"{label}: starting a server ...", flush=True)
        first = start_server(folder, cores[0], args.lora_rank, work / f"{name}-a.log")
        second = None
        try:
            url_a = first.config.url
            for row in measure_pushes(folder, url_a, args.lora_rank, repeats, work / "shared"):
                sync_rows.append((label, row))
            if not args.no_throughput:
                try:
                    one = measure_throughput(folder, [url_a], prompts, generations, tokens, repeats)
                    throughput.append((label, one))
                    second = start_server(folder, cores[1], args.lora_rank, work / f"{name}-b.log")
                    urls = [url_a, second.config.url]
                    throughput.append((label, measure_throughput(folder, urls, prompts, generations, tokens, repeats)))
                except Exception as exc:  # recorded with the server's last words; the push rows still count
                    throughput.append((label, {"servers": 2 if second else 1, "error": _failure(exc, work, name)}))
                    print(f"  throughput failed: {throughput[-1][1]['error']}", flush=True)
        finally:
            first.stop()
            if second is not None:
                second.stop()
    return sync_rows, throughput


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4-layer Qwen2 shape, 2 repeats, short workload")
    parser.add_argument("--models", default="smollm2,qwen2-0.5b", help="comma-separated: smollm2, qwen2-0.5b")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers of the Qwen2 shape (default 24)")
    parser.add_argument("--repeats", type=int, default=None, help="pushes per row (default 3, 2 with --quick)")
    parser.add_argument("--lora-rank", type=int, default=16, help="rank of the pushed adapter")
    parser.add_argument("--no-throughput", action="store_true", help="skip the one- vs two-server rollout rows")
    parser.add_argument("--no-write", action="store_true", help="print only, do not append to RESULTS.md")
    args = parser.parse_args()
    layers = args.layers or (4 if args.quick else 24)
    repeats = args.repeats or (2 if args.quick else 3)
    prompts, generations, tokens = (8, 4, 32) if args.quick else (16, 8, 128)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    work = Path(tempfile.mkdtemp(prefix="weight_sync_bench_"))
    os.environ["TRL_INFERENCE_ADAPTER_DIR"] = str(work / "received")  # where the servers write pushed adapters
    cores = _core_sets(2)
    try:
        sync_rows, throughput = run(names, layers, repeats, args, (prompts, generations, tokens), work, cores)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the random model and the servers' logs

    lines = [
        "| model | transport | pushed | seconds per sync | of which paused | MiB sent per server |",
        "|---|---|---|---:|---:|---:|",
    ]
    for label, row in sync_rows:
        lines.append(
            f"| {label} | {row['transport']} | {row['what']} | {row['seconds']:.3f} | {row['pause']:.3f} | "
            f"{row['bytes'] / 2**20:.1f} |"
        )
    table = "\n".join(lines)
    notes = [
        f"Median of {repeats} pushes per row into one vLLM CPU server (float32, LoRA rank {args.lora_rank} on "
        "q/k/v/o). "
        "'seconds per sync' is the whole push as the trainer waits for it (send, then pause + load + prefix-cache "
        "reset + resume); 'paused' is the part during which the server did not schedule."
    ]
    if throughput:
        rows = ["| model | servers | cores each | rollout tokens/s | x one server |", "|---|---:|---:|---:|---:|"]
        base: dict[str, float] = {}
        for label, row in throughput:
            if "error" in row:
                rows.append(f"| {label} | {row['servers']} | | failed: {row['error']} | |")
                continue
            base.setdefault(label, row["tokens_per_s"])
            ratio = row["tokens_per_s"] / base[label]
            cores_each = len(cores[0].split(","))
            rows.append(f"| {label} | {row['servers']} | {cores_each} | {row['tokens_per_s']:.0f} | {ratio:.2f} |")
        table += "\n\n" + "\n".join(rows)
        notes.append(
            f"Rollout workload: {prompts} prompts x {generations} samples x up to {tokens} tokens at temperature 1, "
            "prompt groups spread over the servers (least outstanding work first). Each server is pinned to its own "
            "cores, so two servers on this machine means half the cores each, not twice the hardware: the ratio "
            "measures what the spreading costs or saves. With N GPU servers, each of which would take the whole "
            "batch alone, rollout time divides by up to N while the weight sync time above is paid once per step "
            "(pushes to all servers run concurrently)."
        )
    print(table)
    if not args.no_write:
        append_results("Weight sync" + (" (--quick)" if args.quick else ""), table, "\n\n".join(notes))


if __name__ == "__main__":
    main()
