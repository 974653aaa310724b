"""Bad input gets a clear error naming the argument, before any model work."""

from __future__ import annotations

import pytest

from trl_inference_ext import InferenceModule, SamplingConfig


@pytest.fixture
def no_model_calls(inference, monkeypatch):
    """Fails the test if the backend is reached: errors must come before any model work."""

    def forbidden(*args, **kwargs):
        raise AssertionError("the backend was called")

    for name in ("generate", "score_logprobs", "score_logits"):
        monkeypatch.setattr(inference.backend, name, forbidden)
    return inference


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"temperature": -0.1}, ValueError, "temperature"),
        ({"temperature": float("nan")}, ValueError, "temperature"),
        ({"temperature": "hot"}, TypeError, "temperature"),
        ({"top_p": 0.0}, ValueError, "top_p"),
        ({"top_p": 1.5}, ValueError, "top_p"),
        ({"top_k": -2}, ValueError, "top_k"),
        ({"top_k": 0}, ValueError, "top_k"),
        ({"top_k": 2.5}, TypeError, "top_k"),
        ({"max_new_tokens": 0}, ValueError, "max_new_tokens"),
        ({"num_return_sequences": 0}, ValueError, "num_return_sequences"),
        ({"seed": -1}, ValueError, "seed"),
        ({"stop": [""]}, TypeError, "stop"),
        ({"do_sample": "yes"}, TypeError, "do_sample"),
        ({"max_length": 5}, TypeError, "max_length"),
    ],
)
def test_bad_sampling_arguments(no_model_calls, kwargs, error, match):
    with pytest.raises(error, match=match):
        no_model_calls.generate("hello", **kwargs)


@pytest.mark.parametrize(
    ("prompts", "error", "match"),
    [
        ([], ValueError, "prompts"),
        ([3.5], TypeError, r"prompts\[0\]"),
        (["ok", None], TypeError, r"prompts\[1\]"),
        (42, TypeError, "prompts"),
        ([[1, 2, -1]], ValueError, r"prompts\[0\]"),
        ([[1, 10**9]], ValueError, r"prompts\[0\]"),
        ([""], ValueError, r"prompts\[0\]"),
    ],
)
def test_bad_prompts(no_model_calls, prompts, error, match):
    with pytest.raises(error, match=match):
        no_model_calls.generate(prompts, max_new_tokens=2)


def test_prompt_longer_than_context(no_model_calls):
    limit = no_model_calls.backend.max_context_length
    with pytest.raises(ValueError, match=r"prompts\[0\].*context length"):
        no_model_calls.generate([[5] * limit], max_new_tokens=2)
    with pytest.raises(ValueError, match="context length"):
        no_model_calls.get_logprobs([[5] * (limit - 2)], [[5] * 3])


def test_scoring_argument_errors(no_model_calls):
    with pytest.raises(ValueError, match="same length"):
        no_model_calls.get_logprobs(["a", "b"], ["x"])
    with pytest.raises(ValueError, match="responses"):
        no_model_calls.get_logprobs(["a"], [])
    with pytest.raises(TypeError, match=r"responses\[0\]"):
        no_model_calls.get_logits(["a"], [1.5])
    with pytest.raises(ValueError, match="temperature"):
        no_model_calls.get_logprobs("a", "b", temperature=0)
    with pytest.raises(ValueError, match="top_p"):
        no_model_calls.get_logprobs("a", "b", top_p=2.0)


def test_constructor_errors(tiny_model_dir):
    with pytest.raises(ValueError, match="backend"):
        InferenceModule(tiny_model_dir, backend="tensorrt")
    with pytest.raises(ValueError, match="dtype"):
        InferenceModule(tiny_model_dir, dtype="float8")
    with pytest.raises(ValueError, match="device"):
        InferenceModule(tiny_model_dir, device="tpu")
    with pytest.raises(ValueError, match="tool_parser"):
        InferenceModule(tiny_model_dir, tool_parser="yaml")
    with pytest.raises(ValueError, match="cache_size"):
        InferenceModule(tiny_model_dir, cache_size=-1)


def test_tool_parser_attribute_is_validated(inference):
    with pytest.raises(ValueError, match="tool_parser"):
        inference.tool_parser_type = "yaml"


def test_sampling_config_defaults_match_original_api():
    config = SamplingConfig()
    assert (config.max_new_tokens, config.temperature, config.top_p, config.top_k) == (256, 1.0, 1.0, -1)
    assert config.do_sample and config.num_return_sequences == 1
    assert not config.return_logits and not config.return_logprobs


def test_prompt_near_the_context_limit_says_how_many_tokens_it_can_generate(tiny_model_dir, caplog):
    # A module of its own: the warning comes once per module.
    inference = InferenceModule(tiny_model_dir, device="cpu", dtype="float32")
    limit = inference.backend.max_context_length
    prompt = [5] * (limit - 3)
    with caplog.at_level("WARNING", logger="trl_inference_ext"):
        result = inference.generate([prompt, [5, 6]], max_new_tokens=8, do_sample=False, use_cache=False)
    assert result.metadata["max_new_tokens"] == [3, 8]
    assert len(result.token_ids[0]) <= 3
    assert "can generate 3 of the 8 new tokens" in caplog.text
