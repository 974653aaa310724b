"""What only a GPU can show, in one short run (under 10 minutes on one H100-class GPU): one line per check.

```
python benchmarks/gpu_check.py            # all checks
python benchmarks/gpu_check.py --only colocate,bf16
```

Checks (each in its own process, so each measures its own peak and one crash cannot hide the others):

- `colocate-sleep-off` / `colocate-sleep-on`: GRPO steps with a LoRA policy and an in-process vLLM engine on the
  trainer's GPU, the engine following `GRPOConfig.vllm_gpu_memory_utilization` (and `vllm_enable_sleep_mode`); the
  line gives the device's peak memory in use and whether sleep freed memory for the trainer.
- `bf16-agreement`: a bf16 engine's sampled log-probs against `get_logprobs` of the same tokens. Tolerance: bf16 keeps
  8 bits of mantissa (relative error 2**-8 = 0.0039 per logit), and the sampler and the prompt-scoring path reduce
  in different orders, so a log-prob may move by a few hundredths of a nat: mean |diff| <= 0.02 and max |diff| <= 0.15.
- `nccl-push`: a push over vLLM's NCCL weight transfer into a `trl-inference serve` server on this machine.
- `zero3-push` / `fsdp2-push`: the GRPO recipe's step under `accelerate launch` (DeepSpeed ZeRO-3, FSDP2), the
  weights gathered one parameter at a time (`trl.gather.push_model_weights`) and pushed into an in-process engine.

Each line reads `PASS name: details`, `FAIL name: reason` or `SKIP name: reason`; the exit status is 1 if any failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CHECKS = ("colocate-sleep-off", "colocate-sleep-on", "bf16-agreement", "nccl-push", "zero3-push", "fsdp2-push")
PER_CHECK_SECONDS = 150
MEAN_TOLERANCE = 0.02
MAX_TOLERANCE = 0.15
GiB = 1 << 30


# --------------------------------------------------------------------------------------------------- helpers
def _model(folder: Path) -> str:
    """A small Llama model (about 30M parameters, head size 64) built locally: no hub access on GPU machines."""
    from trl_inference_ext.testing import build_tiny_model

    if not (folder / "config.json").exists():
        build_tiny_model(
            folder, vocab_size=4096, hidden_size=512, num_layers=8, num_heads=8, max_position_embeddings=512
        )
    return str(folder)


def _dataset(n: int = 32) -> Any:
    from datasets import Dataset

    return Dataset.from_dict({"prompt": [f"count from {i} to {i + 5}:" for i in range(n)]})


def _reward(completions: list[Any], **kwargs: Any) -> list[float]:
    return [float(len(str(c))) / 100.0 for c in completions]


class MemoryProbe:
    """The device's peak memory in use (all processes' allocations, vLLM's included), sampled in a thread."""

    def __init__(self) -> None:
        import threading

        import torch

        self.peak, self._stop = 0, threading.Event()
        self.total = torch.cuda.mem_get_info()[1]

        def sample() -> None:
            while not self._stop.is_set():
                free, _ = torch.cuda.mem_get_info()
                self.peak = max(self.peak, self.total - free)
                time.sleep(0.05)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak / GiB


def colocated_rollout(inner: Any, inference: Any) -> Any:
    """`rollout_func` with the colocation steps around it: the trainer's share, then awake for the rollout."""
    from trl_inference_ext.trl.colocate import awake_for_rollout, follow_trainer_memory

    def rollout(prompts: list[Any], trainer: Any) -> dict[str, Any]:
        follow_trainer_memory(inference, trainer.args)
        with awake_for_rollout(inference):
            return inner(prompts, trainer)

    return rollout


def sharded_rollout(inner: Any, inference: Any) -> Any:
    """`rollout_func` that pushes a sharded trainer's weights one parameter at a time before generating."""
    from trl.models import unwrap_model_for_generation

    from trl_inference_ext.trl.gather import push_model_weights

    def rollout(prompts: list[Any], trainer: Any) -> dict[str, Any]:
        step = int(trainer.state.global_step)
        if inner._synced_step != step:
            with unwrap_model_for_generation(
                trainer.model_wrapped, trainer.accelerator, gather_deepspeed3_params=False
            ) as model:
                push_model_weights(inference.backend, model, push=True)
            inner._synced_step = step
        return inner(prompts, trainer)

    return rollout


def _grpo(model_dir: str, out: str, rollout: Any, *, lora: bool, sleep: bool, steps: int = 3) -> Any:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(
        output_dir=out,
        report_to=[],
        max_steps=steps,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=64,
        learning_rate=1e-4,
        bf16=True,
        logging_steps=1,
        save_strategy="no",
        vllm_gpu_memory_utilization=0.3,
        vllm_enable_sleep_mode=sleep,
    )
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="bfloat16")
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[_reward],
        args=args,
        train_dataset=_dataset(),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        peft_config=peft_config,
        rollout_func=rollout,
    )
    trainer.train()
    return trainer


# ---------------------------------------------------------------------------------------------------- checks
def check_colocate(work: Path, sleep: bool) -> str:
    import torch

    from trl_inference_ext import InferenceModule
    from trl_inference_ext.trl import rollout_func

    model_dir = _model(work / "model")
    inference = InferenceModule(model_dir, backend="vllm", dtype="bfloat16", enforce_eager=True, max_model_len=512)
    backend = inference.backend
    assert not backend.started, "the engine should wait for the trainer's share"
    probe = MemoryProbe()
    freed = ""
    rollout = colocated_rollout(rollout_func(inference=inference), inference)
    _grpo(model_dir, str(work / "out"), rollout, lora=True, sleep=sleep)
    peak = probe.stop()
    share = backend.engine_memory
    if sleep:
        free_asleep = torch.cuda.mem_get_info()[0]
        backend.wake_up()
        free_awake = torch.cuda.mem_get_info()[0]
        backend.sleep()
        freed = f", sleep frees {(free_asleep - free_awake) / GiB:.2f} GiB"
        if free_asleep <= free_awake:
            raise AssertionError(f"sleep freed nothing (free asleep {free_asleep}, awake {free_awake})")
    if share is None or abs(share.get("gpu_memory_utilization", 0) - 0.3) > 1e-6:
        raise AssertionError(f"the engine did not take the trainer's share: {share}")
    inference.backend.close()
    return f"3 GRPO steps, LoRA, engine share {share}, peak {peak:.2f} GiB of {probe.total / GiB:.0f}{freed}"


def check_bf16(work: Path) -> str:
    import torch

    from trl_inference_ext import InferenceModule

    model_dir = _model(work / "model")
    inference = InferenceModule(
        model_dir, backend="vllm", dtype="bfloat16", gpu_memory_utilization=0.3, enforce_eager=True, max_model_len=512
    )
    prompts = [f"count from {i} to {i + 5}:" for i in range(16)]
    result = inference.generate(prompts, max_new_tokens=48, temperature=0.8, return_logprobs=True, seed=0)
    assert result.token_ids is not None and result.logprobs is not None
    scored = inference.get_logprobs(prompts, result.token_ids, temperature=0.8)
    diffs = []
    for i, sampled in enumerate(result.logprobs):
        diffs.append((scored[i, : len(sampled)] - sampled).abs())
    diff = torch.cat(diffs)
    inference.backend.close()
    mean, worst = float(diff.mean()), float(diff.max())
    line = f"{diff.numel()} tokens, mean |diff| {mean:.4f} (<= {MEAN_TOLERANCE}), max {worst:.4f} (<= {MAX_TOLERANCE})"
    if mean > MEAN_TOLERANCE or worst > MAX_TOLERANCE:
        raise AssertionError(line)
    return line


def check_nccl(work: Path) -> str:
    import torch
    from transformers import AutoModelForCausalLM

    from trl_inference_ext.backends.vllm.backend import VLLMBackend
    from trl_inference_ext.backends.vllm.client import VLLMServerClient
    from trl_inference_ext.backends.vllm.server.launcher import ServeConfig, ServerProcess
    from trl_inference_ext.testing import free_port

    model_dir = _model(work / "model")
    config = ServeConfig(
        model=model_dir,
        port=free_port(),
        api_key="gpu-check",
        dtype="bfloat16",
        enforce_eager=True,
        gpu_memory_utilization=0.3,
        weight_transfer="nccl",
    )
    server = ServerProcess(config)
    try:
        server.wait_healthy(300)
        backend = VLLMBackend(model_dir, base_url=config.url, api_key="gpu-check", weight_transfer="nccl")
        client = VLLMServerClient(config.url, model_dir, api_key="gpu-check")
        before = client.weight_checksums()
        policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda()
        with torch.no_grad():
            for p in policy.parameters():
                p.mul_(1.01)
        started = time.perf_counter()
        backend.load_weights_from_model(policy)
        seconds = time.perf_counter() - started
        if client.weight_checksums() == before or client.weight_version() != backend.served_weights:
            raise AssertionError("the server does not hold the pushed weights")
        pushed = backend.last_push.bytes_sent if backend.last_push else 0
        backend.close()
        return f"{pushed / 2**20:.0f} MiB in {seconds:.2f} s, checksums and version changed"
    finally:
        server.stop()


def check_sharded(work: Path, kind: str) -> str:
    """Runs this script's `--worker` under `accelerate launch` with the recipe's ZeRO-3 or FSDP2 config."""
    if kind == "zero3":
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            return "SKIP: deepspeed is not installed (pip install deepspeed)"
    config = REPO / "recipes" / "accelerate" / f"{'zero3' if kind == 'zero3' else 'fsdp2'}.yaml"
    result = work / "result.json"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", "1",
        str(Path(__file__).resolve()), "--worker", kind, "--work", str(work), "--result", str(result),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=PER_CHECK_SECONDS, cwd=REPO)
    if done.returncode != 0 or not result.exists():
        raise AssertionError(f"exit {done.returncode}: {(done.stderr or done.stdout)[-600:]}")
    report = json.loads(result.read_text())
    if not report["pushes"]:
        raise AssertionError(f"no weight push happened: {report}")
    return f"{report['steps']} GRPO steps, {report['pushes']} pushes (gathered one parameter at a time), {report}"


def sharded_worker(work: Path, kind: str, result: Path) -> None:
    from trl_inference_ext import InferenceModule
    from trl_inference_ext.trl import rollout_func

    model_dir = _model(work / "model")
    inference = InferenceModule(
        model_dir, backend="vllm", dtype="bfloat16", gpu_memory_utilization=0.25, enforce_eager=True, max_model_len=512
    )
    inner = rollout_func(inference=inference)
    trainer = _grpo(model_dir, str(work / "out"), sharded_rollout(inner, inference), lora=False, sleep=False, steps=2)
    if trainer.accelerator.is_main_process:
        report = {"steps": int(trainer.state.global_step), "pushes": inference.backend.weights_version, "kind": kind}
        result.write_text(json.dumps(report))
    inference.backend.close()


def _run_check(name: str, work: Path) -> str:
    if name == "colocate-sleep-off":
        return check_colocate(work, sleep=False)
    if name == "colocate-sleep-on":
        return check_colocate(work, sleep=True)
    if name == "bf16-agreement":
        return check_bf16(work)
    if name == "nccl-push":
        return check_nccl(work)
    return check_sharded(work, "zero3" if name == "zero3-push" else "fsdp2")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help=f"comma-separated subset of {', '.join(CHECKS)}")
    parser.add_argument("--check", help=argparse.SUPPRESS)  # run one check in this process
    parser.add_argument("--worker", choices=["zero3", "fsdp2"], help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.worker:
        sharded_worker(Path(args.work), args.worker, Path(args.result))
        return 0
    if args.check:
        line = _run_check(args.check, Path(args.work))
        print(("SKIP " if line.startswith("SKIP") else "PASS ") + f"{args.check}: {line.removeprefix('SKIP: ')}")
        return 0
    import torch

    if not torch.cuda.is_available():
        print("SKIP all: no CUDA GPU here")
        return 0
    chosen = [c for c in CHECKS if not args.only or any(c.startswith(o) for o in args.only.split(","))]
    failed = False
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as root:
        model = Path(root) / "shared"
        model.mkdir()
        for name in chosen:
            work = Path(root) / name
            work.mkdir()
            (work / "model").symlink_to(model, target_is_directory=True)
            command = [sys.executable, str(Path(__file__).resolve()), "--check", name, "--work", str(work)]
            started = time.perf_counter()
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=PER_CHECK_SECONDS, cwd=REPO)
                lines = [ln for ln in done.stdout.splitlines() if ln.startswith(("PASS ", "SKIP "))]
                if done.returncode == 0 and lines:
                    print(f"{lines[-1]} [{time.perf_counter() - started:.0f} s]", flush=True)
                    continue
                reason = (done.stderr or done.stdout).strip().splitlines()[-1:] or [f"exit {done.returncode}"]
                print(f"FAIL {name}: {reason[0][:300]}", flush=True)
            except subprocess.TimeoutExpired:
                print(f"FAIL {name}: over {PER_CHECK_SECONDS} s", flush=True)
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
