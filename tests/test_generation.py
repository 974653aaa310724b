"""Generation on the Hugging Face backend: result structure, grouping, finish reasons, exact log-probs."""

from __future__ import annotations

import pytest
import torch

from trl_inference_ext import GenerationResult, InferenceModule

PROMPTS = ["what is one plus two", "tell me about the weather in the city today please", "add"]


def test_single_string_is_a_batch_of_one(inference):
    result = inference.generate("the answer is", max_new_tokens=5, do_sample=False)
    assert isinstance(result, GenerationResult)
    assert len(result.texts) == 1 and len(result.token_ids) == 1
    assert len(result.token_ids[0]) <= 5


def test_result_fields_and_metadata(inference):
    result = inference.generate(
        PROMPTS, max_new_tokens=6, temperature=0.7, seed=1, return_logprobs=True, return_logits=True
    )
    vocab = len(inference.tokenizer)
    assert len(result.texts) == len(PROMPTS)
    for ids, lp, lg, text in zip(result.token_ids, result.logprobs, result.logits, result.texts):
        assert lp.dim() == 1 and lp.shape[0] == len(ids) and lp.dtype == torch.float32
        assert lg.shape == (len(ids), vocab)
        assert torch.all(lp <= 0)
        assert text == inference._decode(ids)
    meta = result.metadata
    assert meta["prompt_lengths"] == [len(inference.tokenizer(p)["input_ids"]) for p in PROMPTS]
    assert meta["temperature"] == 0.7 and meta["backend"] == "huggingface"
    assert meta["finish_reasons"] == ["length"] * 3 or set(meta["finish_reasons"]) <= {"length", "stop"}
    assert meta["weights_version"] == inference.weights_version
    assert result.logprobs is not None


def test_logprobs_and_logits_absent_unless_requested(inference):
    result = inference.generate(PROMPTS[:1], max_new_tokens=3, do_sample=False)
    assert result.logprobs is None and result.logits is None and result.token_ids


def test_num_return_sequences_is_prompt_major(inference):
    single = [inference.generate(p, max_new_tokens=6, do_sample=False, use_cache=False).token_ids[0] for p in PROMPTS]
    grouped = inference.generate(PROMPTS, max_new_tokens=6, do_sample=False, num_return_sequences=3, use_cache=False)
    assert len(grouped.token_ids) == 9
    for i, ids in enumerate(single):
        assert grouped.token_ids[3 * i : 3 * i + 3] == [ids] * 3


def test_samples_differ_within_a_group(inference):
    result = inference.generate(PROMPTS[0], max_new_tokens=12, num_return_sequences=4, seed=0)
    assert len({tuple(ids) for ids in result.token_ids}) > 1


def test_seed_makes_sampling_reproducible(inference):
    a = inference.generate(PROMPTS, max_new_tokens=8, seed=123, use_cache=False)
    b = inference.generate(PROMPTS, max_new_tokens=8, seed=123, use_cache=False)
    c = inference.generate(PROMPTS, max_new_tokens=8, seed=124, use_cache=False)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_length_finish_reason(inference):
    result = inference.generate(PROMPTS, max_new_tokens=2, do_sample=False)
    for ids, reason in zip(result.token_ids, result.metadata["finish_reasons"]):
        assert reason == "stop" or len(ids) == 2


def test_eos_stops_generation(tiny_model_dir):
    module = InferenceModule(tiny_model_dir, device="cpu", dtype="float32", cache_size=0)
    model, tok = module.backend.model, module.tokenizer
    first = module.generate(PROMPTS[0], max_new_tokens=1, do_sample=False).token_ids[0][0]
    with torch.no_grad():  # make EOS the greedy continuation: its output row becomes a scaled copy of the argmax row
        model.lm_head.weight[tok.eos_token_id] = model.lm_head.weight[first] * 4
    result = module.generate(PROMPTS[0], max_new_tokens=5, do_sample=False)
    assert result.token_ids[0] == [tok.eos_token_id]
    assert result.metadata["finish_reasons"] == ["stop"]
    assert result.texts == [""]


def test_stop_strings(inference):
    full = inference.generate(PROMPTS[1], max_new_tokens=16, do_sample=False, use_cache=False)
    text = full.texts[0]
    assert len(text) > 6
    stop = text[3:6]
    stopped = inference.generate(PROMPTS[1], max_new_tokens=16, do_sample=False, stop=[stop], use_cache=False)
    assert stopped.metadata["finish_reasons"] == ["stop"]
    assert stop in stopped.texts[0]
    assert len(stopped.token_ids[0]) < len(full.token_ids[0])
    assert full.token_ids[0][: len(stopped.token_ids[0])] == stopped.token_ids[0]


@pytest.mark.parametrize(
    "sampling",
    [
        {"do_sample": False},
        {"temperature": 0.7, "seed": 3},
        {"temperature": 0.7, "top_k": 20, "seed": 4},
        {"temperature": 1.0, "top_p": 0.8, "seed": 5},
    ],
    ids=["greedy", "t0.7", "t0.7-topk20", "topp0.8"],
)
def test_sampled_logprobs_equal_scoring(inference, sampling):
    """The log-prob reported at sampling time equals `get_logprobs` on the same ids (float32, 1e-4)."""
    result = inference.generate(PROMPTS, max_new_tokens=10, num_return_sequences=2, return_logprobs=True, **sampling)
    meta = result.metadata
    prompts = [p for p in meta["prompt_token_ids"] for _ in range(2)]
    with torch.no_grad():
        scored, mask = inference.get_logprobs(
            prompts,
            result.token_ids,
            temperature=meta["temperature"],
            top_k=meta["top_k"],
            top_p=meta["top_p"],
            return_mask=True,
        )
    for i, lp in enumerate(result.logprobs):
        n = len(result.token_ids[i])
        assert mask[i].sum().item() == n
        torch.testing.assert_close(scored[i, :n], lp, atol=1e-4, rtol=0)
        assert torch.all(torch.isfinite(lp))


def test_inverse_cdf_sampler_matches_the_distribution():
    from trl_inference_ext.backends.hf_decoding import sample_from_logits

    logits = torch.tensor([[2.0, 0.0, float("-inf"), 1.0, -1.0]]).repeat(40_000, 1)
    generator = torch.Generator().manual_seed(0)
    draws = sample_from_logits(logits, generator)
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    torch.testing.assert_close(freq, torch.softmax(logits[0], -1), atol=0.01, rtol=0)
    assert freq[2] == 0  # a masked token is never drawn
    again = sample_from_logits(logits[:100], torch.Generator().manual_seed(0))
    assert torch.equal(again, draws[:100])  # seeded
