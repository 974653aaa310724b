"""Shared fixtures: tiny local models built once per session (no hub access)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _forget_generated_texts():
    """Each test starts with an empty index of generated texts (`sampled_texts`): how a string is scored must not
    depend on what an earlier test happened to generate."""
    from trl_inference_ext.sampled_texts import SAMPLED_TEXTS

    SAMPLED_TEXTS.clear()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    from trl_inference_ext.testing import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="session")
def inference(tiny_model_dir: str):
    from trl_inference_ext import InferenceModule

    return InferenceModule(tiny_model_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def tool_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny model fitted to call `add` with Hermes-style `<tool_call>` tags, then answer from the result."""
    from tool_fixtures import add, tool_conversation

    from trl_inference_ext.testing import build_tiny_model, fit_conversations

    folder = build_tiny_model(tmp_path_factory.mktemp("tool") / "model", seed=1)
    return str(fit_conversations(folder, [tool_conversation(2, 3)], tools=[add], steps=120))


@pytest.fixture(scope="session")
def fresh_python() -> Callable[[str], str]:
    """Runs Python code in a new interpreter from the repository's root (this one may hold modules other tests
    imported) and returns what it printed; a failing run fails the test with its stderr."""

    def run(code: str) -> str:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    return run
