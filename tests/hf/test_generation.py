"""Generation on the Hugging Face backend: result structure, grouping, finish reasons, exact log-probs."""

from __future__ import annotations

import pytest
import torch

from trl_inference_ext import GenerationResult, InferenceModule
from trl_inference_ext.testing import greedy_margin, truncation_near_tie

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
    eos = inference.tokenizer.eos_token_id
    for ids, reason in zip(result.token_ids, meta["finish_reasons"]):  # whichever tokens were drawn
        assert (reason == "stop" and ids[-1] == eos) or (reason == "length" and len(ids) == 6 and eos not in ids)
    assert meta["weights_version"] == inference.weights_version
    assert result.logprobs is not None


def test_logprobs_and_logits_absent_unless_requested(inference):
    result = inference.generate(PROMPTS[:1], max_new_tokens=3, do_sample=False)
    assert result.logprobs is None and result.logits is None and result.token_ids


def test_num_return_sequences_is_prompt_major(inference):
    single = [inference.generate(p, max_new_tokens=6, do_sample=False, use_cache=False).token_ids[0] for p in PROMPTS]
    assert greedy_margin(inference, PROMPTS, single) > 1e-3  # no near-tie a float error could flip (measured 0.017)
    grouped = inference.generate(PROMPTS, max_new_tokens=6, do_sample=False, num_return_sequences=3, use_cache=False)
    assert len(grouped.token_ids) == 9
    for i, ids in enumerate(single):
        assert grouped.token_ids[3 * i : 3 * i + 3] == [ids] * 3


def test_samples_differ_within_a_group(inference):
    # Two 12-token samples of this prompt at temperature 1 coincide with probability about 4e-7 (EOS drawn first,
    # 2.6e-7, plus a Monte Carlo estimate of the rest over 3000 samples), so all four do far less often.
    result = inference.generate(PROMPTS[0], max_new_tokens=12, num_return_sequences=4, seed=0)
    assert len({tuple(ids) for ids in result.token_ids}) > 1


def test_seed_makes_sampling_reproducible(inference):
    a = inference.generate(PROMPTS, max_new_tokens=8, seed=123, use_cache=False)
    b = inference.generate(PROMPTS, max_new_tokens=8, seed=123, use_cache=False)
    c = inference.generate(PROMPTS, max_new_tokens=8, seed=124, use_cache=False)
    assert a.token_ids == b.token_ids
    # Another seed gives the same three completions with probability below 1e-12 (each prompt's pair collision is
    # at most 7e-6: EOS drawn first plus a Monte Carlo estimate of the rest).
    assert a.token_ids != c.token_ids


def test_length_finish_reason(inference):
    result = inference.generate(PROMPTS, max_new_tokens=2, do_sample=False)
    eos = inference.tokenizer.eos_token_id
    for ids, reason in zip(result.token_ids, result.metadata["finish_reasons"]):
        assert (reason == "stop" and ids[-1] == eos) or (reason == "length" and len(ids) == 2)


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
    """The log-prob reported at sampling time equals `get_logprobs` on the same ids (float32, 1e-4).

    Where the sampled path put a top-k / top-p kept set within float error of a tie (about 1 position in 150 for
    top-k 20, 1 in 3 for top-p 0.8 here, wherever the random stream leads), the two paths may keep different tokens:
    those positions are skipped, and at least 10 of the 60 positions must remain.
    """
    result = inference.generate(PROMPTS, max_new_tokens=10, num_return_sequences=2, return_logprobs=True, **sampling)
    meta = result.metadata
    prompts = [p for p in meta["prompt_token_ids"] for _ in range(2)]
    truncation = {"top_k": meta["top_k"], "top_p": meta["top_p"]}
    with torch.no_grad():
        scored, mask = inference.get_logprobs(
            prompts, result.token_ids, temperature=meta["temperature"], return_mask=True, **truncation
        )
        raw = inference.get_logits(prompts, result.token_ids)
    checked = 0
    for i, lp in enumerate(result.logprobs):
        n = len(result.token_ids[i])
        assert mask[i].sum().item() == n
        assert torch.all(torch.isfinite(lp)) and torch.all(torch.isfinite(scored[i, :n]))
        keep = ~truncation_near_tie(raw[i, :n], meta["temperature"] or 1.0, **truncation)
        torch.testing.assert_close(scored[i, :n][keep], lp[keep], atol=1e-4, rtol=0)
        checked += int(keep.sum())
    assert checked >= 10


def test_inverse_cdf_sampler_matches_the_distribution():
    from trl_inference_ext.backends.hf.decoding import sample_from_logits

    logits = torch.tensor([[2.0, 0.0, float("-inf"), 1.0, -1.0]]).repeat(200_000, 1)
    generator = torch.Generator().manual_seed(0)
    draws = sample_from_logits(logits, generator)
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    # 200k draws: a frequency's standard deviation is at most 0.5 / sqrt(2e5) = 0.0011, so 0.01 is 8.9 sigma for any
    # random stream, while a sampler off by one token or ignoring a logit misses by more than 0.1.
    torch.testing.assert_close(freq, torch.softmax(logits[0], -1), atol=0.01, rtol=0)
    assert freq[2] == 0  # a masked token is never drawn
    again = sample_from_logits(logits[:100], torch.Generator().manual_seed(0))
    assert torch.equal(again, draws[:100])  # seeded


def test_length_buckets_bound_padding():
    from trl_inference_ext.backends.hf.decoding import length_buckets

    lengths = [320, 128, 384, 192, 64, 256, 512, 448, 500]
    buckets = length_buckets(lengths, ratio=0.8)
    assert sorted(i for b in buckets for i in b) == list(range(len(lengths)))
    for bucket in buckets:
        longest = max(lengths[i] for i in bucket)
        assert lengths[bucket[0]] == longest and all(lengths[i] >= 0.8 * longest for i in bucket)
    assert buckets[0] == [6, 8, 7]
    assert length_buckets([10, 10, 9]) == [[0, 1, 2]]


def test_bucketed_prefill_matches_prompts_run_alone(inference):
    """Mixed lengths (several prefill buckets, one merged cache) give what each prompt gives alone."""
    prompts = ["hi", "what is one plus two and then three and four and five", "tell me about the weather"]
    together = inference.generate(prompts, max_new_tokens=8, do_sample=False, return_logprobs=True, use_cache=False)
    assert greedy_margin(inference, prompts, together.token_ids) > 1e-3  # no near-tie (measured 0.008)
    for i, prompt in enumerate(prompts):
        alone = inference.generate([prompt], max_new_tokens=8, do_sample=False, return_logprobs=True, use_cache=False)
        assert alone.token_ids[0] == together.token_ids[i]
        torch.testing.assert_close(alone.logprobs[0], together.logprobs[i], atol=1e-4, rtol=0)


def test_sliding_window_model_keeps_the_padded_prefill(tiny_model_dir, tmp_path):
    """A model whose cache has sliding-window layers is prefilled in one padded batch and still scores exactly."""
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    from trl_inference_ext.backends.hf.decoding import uses_plain_dynamic_cache

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = MistralConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, sliding_window=6, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = MistralForCausalLM(config).eval()
    assert not uses_plain_dynamic_cache(model)
    module = InferenceModule.from_model(model, tokenizer)
    prompts = ["hi", "what is one plus two and then three and four and five and six"]
    result = module.generate(prompts, max_new_tokens=10, temperature=0.9, seed=0, return_logprobs=True)
    with torch.no_grad():
        scored = module.get_logprobs(result.metadata["prompt_token_ids"], result.token_ids, temperature=0.9)
    for i, logprobs in enumerate(result.logprobs):
        torch.testing.assert_close(scored[i, : len(logprobs)], logprobs, atol=1e-4, rtol=0)
