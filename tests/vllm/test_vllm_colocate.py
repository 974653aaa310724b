"""One device for trainer and engine: memory shares, the trainer's config, sleep mode and weight pushes.

The options and the trainer's settings are checked against a real `trl.GRPOConfig`; the order of sleep, wake, weight
push, prefix-cache reset and generation is recorded on a real in-process vLLM CPU engine, through a thin recorder
around its `vllm.LLM` object. vLLM's CPU build refuses `enable_sleep_mode` (vllm/config/model.py, "Sleep mode is
not supported on current platform.") and its workers turn `LLM.sleep()` into a warning (vllm/v1/worker/cpu_worker.py),
so the order test switches the option on after the engine started: the engine then really pauses and resumes, and
what is checked is the order of calls, not freed memory (the GPU script checks that).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from trl_inference_ext.backends.vllm.backend import VLLMBackend, defers_start
from trl_inference_ext.backends.vllm.options import VLLMOptions, engine_memory_settings, memory_fraction
from trl_inference_ext.errors import InvalidValueError, OperationError, UnsupportedError
from trl_inference_ext.testing import require_vllm
from trl_inference_ext.trl.colocate import (
    awake_for_rollout,
    check_started_engine,
    follow_trainer_memory,
    needs_weight_reload,
    trainer_engine_settings,
)
from trl_inference_ext.trl.gather import push_model_weights
from trl_inference_ext.types import SamplingConfig

ENGINE = {"dtype": "float32", "kv_cache_memory_bytes": 64 << 20, "enforce_eager": True, "max_model_len": 256}
PROMPT = list(range(5, 40))
GiB = 1 << 30


def _config(**kwargs: Any) -> Any:
    from trl import GRPOConfig

    return GRPOConfig(output_dir="/tmp/unused", report_to=[], use_cpu=True, **kwargs)


# --------------------------------------------------------------------------------------------- memory share
@pytest.mark.parametrize("share", [0.3, 1, 1.0, 2, 20 * GiB])
def test_a_share_is_a_fraction_or_a_size_in_bytes(share):
    assert VLLMOptions(gpu_memory_utilization=share).gpu_memory_utilization == share


@pytest.mark.parametrize("share", [0, 0.0, -1, 1.5, True, "20GiB", "0.5"])
def test_other_shares_are_refused_naming_both_forms(share):
    with pytest.raises(InvalidValueError, match=r"`gpu_memory_utilization` must be in \(0, 1\] .* bytes"):
        VLLMOptions(gpu_memory_utilization=share)


def test_a_size_in_bytes_is_the_share_of_the_device_it_is():
    assert memory_fraction(0.25, None) == 0.25
    assert memory_fraction(20 * GiB, 80 * GiB) == 0.25
    with pytest.raises(InvalidValueError, match="more than the GPU holds"):
        memory_fraction(90 * GiB, 80 * GiB)
    with pytest.raises(InvalidValueError, match="no GPU here"):
        memory_fraction(20 * GiB, None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU build's rule")
def test_a_size_in_bytes_sizes_the_kv_cache_on_the_cpu_build():
    require_vllm()
    assert engine_memory_settings(256 << 20, None) == {"kv_cache_memory_bytes": 256 << 20}
    assert engine_memory_settings(256 << 20, 64 << 20) == {"kv_cache_memory_bytes": 64 << 20}
    assert engine_memory_settings(0.3, None) == {"gpu_memory_utilization": 0.3}


def test_which_options_were_set_is_remembered():
    options = VLLMOptions()
    assert not options.memory_is_set and not options.is_set("enable_sleep_mode")
    options = VLLMOptions(kv_cache_memory_bytes=1 << 20, enable_sleep_mode=False)
    assert options.memory_is_set and options.is_set("enable_sleep_mode")


def test_the_trainer_settings_come_from_a_real_grpo_config():
    assert trainer_engine_settings(_config()) == {"gpu_memory_utilization": 0.3, "enable_sleep_mode": False}
    args = _config(vllm_gpu_memory_utilization=0.5, vllm_enable_sleep_mode=True)
    assert trainer_engine_settings(args) == {"gpu_memory_utilization": 0.5, "enable_sleep_mode": True}
    with pytest.raises(InvalidValueError, match=r"GRPOConfig.vllm_gpu_memory_utilization` must be in \(0, 1\]"):
        trainer_engine_settings(_config(vllm_gpu_memory_utilization=1.5))


def test_an_engine_that_started_with_more_than_the_config_allows_names_what_to_change():
    wanted = trainer_engine_settings(_config())  # 0.3
    with pytest.raises(InvalidValueError, match=r"gpu_memory_utilization=0.9.*vllm_gpu_memory_utilization=0.3") as info:
        check_started_engine({"gpu_memory_utilization": 0.9}, {"gpu_memory_utilization": 0.3}, 80 * GiB)
    assert "gpu_memory_utilization=0.3" in str(info.value) and "GRPOConfig" in str(info.value)
    check_started_engine({"gpu_memory_utilization": 0.3}, {"gpu_memory_utilization": 0.3}, 80 * GiB)
    check_started_engine({"gpu_memory_utilization": 0.2}, {"gpu_memory_utilization": 24 * GiB}, 80 * GiB)
    with pytest.raises(InvalidValueError, match="vllm_gpu_memory_utilization"):
        check_started_engine({"gpu_memory_utilization": 0.5}, {"gpu_memory_utilization": 24 * GiB}, 80 * GiB)
    with pytest.raises(InvalidValueError, match=r"without sleep mode.*enable_sleep_mode=True"):
        check_started_engine({"gpu_memory_utilization": 0.3}, {**wanted, "enable_sleep_mode": True}, 80 * GiB)


# ------------------------------------------------------------------------------------------ sleep mode options
def test_sleep_mode_options():
    assert VLLMOptions(enable_sleep_mode=False).enable_sleep_mode is False
    with pytest.raises(TypeError, match="`enable_sleep_mode` must be a bool"):
        VLLMOptions(enable_sleep_mode=1)
    with pytest.raises(InvalidValueError, match=r"`sleep_level` must be 1 .* or 2"):  # checked before the platform
        VLLMOptions(enable_sleep_mode=True, sleep_level=3)
    VLLMOptions(sleep_level=3)  # unused without sleep mode
    with pytest.raises(InvalidValueError, match="--enable-sleep-mode"):
        VLLMOptions(enable_sleep_mode=True, base_url="http://127.0.0.1:8000")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU build's rule")
def test_sleep_mode_is_refused_on_the_cpu_build_before_any_model_work():
    require_vllm()
    with pytest.raises(UnsupportedError, match=r"Sleep mode needs a GPU.*enable_sleep_mode"):
        VLLMOptions(enable_sleep_mode=True)
    with pytest.raises(UnsupportedError, match="Sleep mode needs a GPU"):
        VLLMBackend("unused-model", enable_sleep_mode=True)


# ------------------------------------------------------------------------------------------------ real engine
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    from trl_inference_ext.testing import build_tiny_model

    return str(
        build_tiny_model(tmp_path_factory.mktemp("colocate") / "model", vocab_size=512, max_position_embeddings=256)
    )


@pytest.fixture(scope="module")
def engine(model_dir: str) -> Iterator[VLLMBackend]:
    require_vllm()
    backend = VLLMBackend(model_dir, **ENGINE)
    yield backend
    backend.close()


class Recorder:
    """Delegates to the real `vllm.LLM` and records the calls that matter for the order of a training step."""

    RECORDED = ("sleep", "wake_up", "reset_prefix_cache", "collective_rpc", "generate")

    def __init__(self, llm: Any, calls: list[str]) -> None:
        self._llm, self._calls = llm, calls

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._llm, name)
        if name not in self.RECORDED:
            return value

        def call(*args: Any, **kwargs: Any) -> Any:
            detail = ""
            if name == "sleep":
                detail = f"({kwargs.get('level')})"
            elif name == "wake_up":
                detail = f"({args[0] if args else kwargs.get('tags')})"
            elif name == "collective_rpc":
                detail = f"({args[0]})"
            self._calls.append(name + detail)
            return value(*args, **kwargs)

        return call


@pytest.fixture
def recorded(engine: VLLMBackend) -> Iterator[list[str]]:
    calls: list[str] = []
    connection = engine.connection
    real = connection.llm
    connection.llm = Recorder(real, calls)
    options = engine.options
    try:
        yield calls
    finally:
        engine.wake_up()  # the next test finds the engine awake, its scheduler running
        connection.llm = real
        engine.options = options
        engine._weights_lost = False


def _with_sleep_mode(engine: VLLMBackend, level: int) -> None:
    """Sleep mode on an engine that already started (the CPU build refuses to start one with it: see the module)."""
    options = copy.copy(engine.options)
    object.__setattr__(options, "enable_sleep_mode", True)
    object.__setattr__(options, "sleep_level", level)
    engine.options = options


def _trained_model(model_dir: str, scale: float) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    return model


def _steps(calls: list[str]) -> list[str]:
    """The recorded calls with repeats in a row collapsed (a push resets the prefix cache in the engine connection and
    again when the version is bumped; once is what matters)."""
    return [c for i, c in enumerate(calls) if i == 0 or calls[i - 1] != c]


def _rollout(engine: VLLMBackend, model: torch.nn.Module | None) -> None:
    """One rollout as `rollout_func` runs it: awake, push (when the step changed), generate."""
    with awake_for_rollout(engine):
        if model is not None or needs_weight_reload(engine):
            engine.load_weights_from_model(model)
        engine.generate([PROMPT], SamplingConfig(max_new_tokens=3, temperature=0.0))


def test_every_weight_change_resets_the_prefix_cache_before_the_next_request(engine, recorded, model_dir):
    engine.load_weights_from_model(_trained_model(model_dir, 1.1))
    engine.generate([PROMPT], SamplingConfig(max_new_tokens=2, temperature=0.0))
    engine.mark_weights_updated()
    assert _steps(recorded) == [
        "collective_rpc(reload_weights)",
        "reset_prefix_cache",
        "generate",
        "reset_prefix_cache",
    ]


@pytest.mark.parametrize("level", [1, 2])
def test_order_of_sleep_wake_push_and_prefix_reset_across_steps(engine, recorded, model_dir, level):
    _with_sleep_mode(engine, level)
    model = _trained_model(model_dir, 1.2)
    _rollout(engine, model)  # step 1: the engine was awake
    assert engine.sleeping
    first = _steps(recorded)
    recorded.clear()
    _rollout(engine, model)  # step 2: wakes its weights, is pushed, wakes its KV cache, generates, sleeps
    assert first == [
        "collective_rpc(reload_weights)",
        "reset_prefix_cache",
        "generate",
        f"sleep({level})",
    ]
    assert _steps(recorded) == [
        "wake_up(['weights'])",
        "collective_rpc(reload_weights)",
        "reset_prefix_cache",
        "wake_up(['kv_cache'])",
        "generate",
        f"sleep({level})",
    ]


def test_a_rollout_without_a_push_after_a_level_2_sleep_is_refused(engine, recorded, model_dir):
    _with_sleep_mode(engine, 2)
    _rollout(engine, _trained_model(model_dir, 1.0))
    assert needs_weight_reload(engine)
    with pytest.raises(OperationError, match="discarded its weights; push weights"):
        engine.generate([PROMPT], SamplingConfig(max_new_tokens=2, temperature=0.0))
    engine.load_weights_from_model(_trained_model(model_dir, 1.0))  # the push wakes the weights and loads them
    assert not needs_weight_reload(engine)
    engine.generate([PROMPT], SamplingConfig(max_new_tokens=2, temperature=0.0))
    assert _steps(recorded)[-3:] == ["reset_prefix_cache", "wake_up(['kv_cache'])", "generate"]


def test_on_the_cpu_build_the_trainer_share_is_ignored_and_its_sleep_mode_refused(engine, caplog):
    if torch.cuda.is_available():
        pytest.skip("the CPU build's rule")
    assert not defers_start(engine.options) and engine.started
    before = dict(engine.engine_memory or {})
    with caplog.at_level(logging.INFO, logger="trl_inference_ext.trl.colocate"):
        follow_trainer_memory(engine, _config(vllm_gpu_memory_utilization=0.3))
        follow_trainer_memory(engine, _config(vllm_gpu_memory_utilization=0.3))
    assert engine.engine_memory == before and engine.options.gpu_memory_utilization is None
    with pytest.raises(UnsupportedError, match=r"vllm_enable_sleep_mode=False"):
        follow_trainer_memory(engine, _config(vllm_enable_sleep_mode=True))


def test_a_streamed_push_carries_the_weights_into_the_engine(engine, model_dir):
    from transformers import AutoModelForCausalLM

    trained = _trained_model(model_dir, 1.3)
    version = engine.weights_version
    names = [n for n, _ in trained.named_parameters()]
    seen: list[str] = []

    def stream() -> Iterator[tuple[str, torch.Tensor]]:
        for name, param in trained.named_parameters():
            seen.append(name)
            yield name, param.detach().clone()  # a fresh full tensor each time, as a gather makes it

    assert engine.load_weight_stream(names, stream()) == version + 1
    assert seen == names  # consumed once, in order
    with torch.no_grad():
        logits = trained(torch.tensor([PROMPT])).logits[0, :-1]
    reference = torch.log_softmax(logits, -1).gather(-1, torch.tensor(PROMPT[1:])[:, None])[:, 0]
    assert torch.allclose(torch.tensor(engine.connection.prompt_logprobs([PROMPT])[0]), reference, atol=1e-3)
    # An unsharded model goes the usual way (`load_weights_from_model`).
    assert push_model_weights(engine, AutoModelForCausalLM.from_pretrained(model_dir)) == version + 2
    with pytest.raises(InvalidValueError, match="unknown to the vLLM model"):
        engine.load_weight_stream(["model.nope.weight"], iter([]))
