"""Min-p and the repetition penalty on the Hugging Face backend: sampled log-probs equal scoring, against transformers'
own processors, in vLLM's order (penalty, temperature, min-p, top-k, top-p)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from trl_inference_ext.scoring import TokenHistory, logprobs_from_hidden, process_logits, selective_logprobs
from trl_inference_ext.testing import truncation_near_tie
from trl_inference_ext.types import SamplingConfig

PROMPTS = ["what is one plus two", "tell me about the weather in the city today please", "add add add"]
N = 2


def _scored(inference, result, **settings):
    """Prompt ids per sequence, and `get_logprobs` / `get_logits` under the settings `result.metadata` recorded."""
    meta = result.metadata
    prompts = [p for p in meta["prompt_token_ids"] for _ in range(meta["num_return_sequences"])]
    recorded = {k: meta[k] for k in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")}
    with torch.no_grad():
        scored, mask = inference.get_logprobs(prompts, result.token_ids, return_mask=True, **recorded)
        logits = inference.get_logits(prompts, result.token_ids, **recorded)
        # before truncation, after the penalty: where the kept sets are read from
        penalised = inference.get_logits(prompts, result.token_ids, repetition_penalty=meta["repetition_penalty"])
    return prompts, scored, mask, logits, penalised, recorded


@pytest.mark.parametrize(
    "sampling",
    [
        {"min_p": 0.1, "seed": 3},
        {"repetition_penalty": 1.3, "seed": 4},
        {"repetition_penalty": 0.8, "temperature": 0.9, "seed": 5},
        {"temperature": 0.7, "top_k": 20, "top_p": 0.9, "min_p": 0.1, "repetition_penalty": 1.3, "seed": 6},
        {"do_sample": False, "repetition_penalty": 1.3},
    ],
    ids=["minp0.1", "rep1.3", "rep0.8-t0.9", "all", "greedy-rep1.3"],
)
def test_sampled_logprobs_equal_scoring(inference, sampling):
    """The reported log-prob of each sampled token equals `get_logprobs` (and `get_logits`) with the same settings.

    float32 on both paths, computed from the same weights through different kernels: differences are a few 1e-6
    (measured at most 2.4e-6 here), so 1e-4 leaves a wide margin. Positions whose min-p / top-k / top-p kept set is
    within float error of a tie may keep other tokens on the two paths and are skipped (`truncation_near_tie`).
    """
    result = inference.generate(PROMPTS, max_new_tokens=12, num_return_sequences=N, return_logprobs=True, **sampling)
    meta = result.metadata
    assert meta["repetition_penalty"] == sampling.get("repetition_penalty", 1.0)
    assert meta["min_p"] == (0.0 if sampling.get("do_sample") is False else sampling.get("min_p", 0.0))
    _, scored, mask, logits, penalised, recorded = _scored(inference, result)
    truncation = {k: recorded[k] for k in ("top_k", "top_p", "min_p")}
    checked = 0
    for i, (ids, lp) in enumerate(zip(result.token_ids, result.logprobs)):
        n = len(ids)
        assert mask[i].sum().item() == n and torch.isfinite(lp).all()
        keep = ~truncation_near_tie(penalised[i, :n], recorded["temperature"], **truncation)
        torch.testing.assert_close(scored[i, :n][keep], lp[keep], atol=1e-4, rtol=0)
        from_logits = torch.log_softmax(logits[i, :n], -1).gather(-1, torch.tensor(ids)[:, None]).squeeze(-1)
        torch.testing.assert_close(from_logits[keep], lp[keep], atol=1e-4, rtol=0)
        checked += int(keep.sum())
    assert checked >= 20


def _reference_logprobs(model, prompt_ids, response_ids, temperature, top_k, top_p, min_p, repetition_penalty):
    """Log-probs from transformers' own processors, one sequence and one position at a time, in vLLM's order."""
    processors = LogitsProcessorList()
    if repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(repetition_penalty))
    if temperature != 1.0:
        processors.append(TemperatureLogitsWarper(temperature))
    if min_p > 0:
        processors.append(MinPLogitsWarper(min_p))
    if top_k > 0:
        processors.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p))
    rows, raws = [], []
    for p, r in zip(prompt_ids, response_ids):
        full = torch.tensor([p + r])
        logits = model(input_ids=full).logits[0].float()
        values, raw = [], []
        for t in range(len(r)):
            position = len(p) + t - 1
            scores = processors(full[:, : position + 1], logits[position][None].clone())
            values.append(torch.log_softmax(scores, -1)[0, r[t]])
            raw.append(logits[position])
        rows.append(torch.stack(values))
        raws.append(torch.stack(raw))
    return rows, raws


@pytest.mark.parametrize(
    "settings",
    [
        {"temperature": 1.0, "top_k": -1, "top_p": 1.0, "min_p": 0.1, "repetition_penalty": 1.0},
        {"temperature": 1.0, "top_k": -1, "top_p": 1.0, "min_p": 0.0, "repetition_penalty": 1.3},
        {"temperature": 0.7, "top_k": 20, "top_p": 0.9, "min_p": 0.1, "repetition_penalty": 1.3},
    ],
    ids=["minp", "rep", "all"],
)
def test_scoring_matches_transformers_processors(inference, settings):
    """`get_logprobs` applies the same formulas as transformers' `RepetitionPenaltyLogitsProcessor` (prompt and
    response before the position), `TemperatureLogitsWarper`, `MinPLogitsWarper`, `TopKLogitsWarper` and
    `TopPLogitsWarper`, in vLLM's order; near-tie positions skipped as above."""
    tok = inference.tokenizer
    prompt_ids = [tok(p)["input_ids"] for p in PROMPTS]
    response_ids = [tok(r, add_special_tokens=False)["input_ids"] for r in [" one two one two", " the the", " add add"]]
    with torch.no_grad():
        scored = inference.get_logprobs(prompt_ids, response_ids, **settings)
        expected, raws = _reference_logprobs(inference.backend.model, prompt_ids, response_ids, **settings)
    checked = 0
    for i, (exp, raw) in enumerate(zip(expected, raws)):
        seen = TokenHistory.from_sequences(
            [prompt_ids[i] + response_ids[i]],
            raw.shape[-1],
            torch.zeros(len(exp), dtype=torch.long),
            torch.arange(len(exp)) + len(prompt_ids[i]),
        ).seen_all()
        penalised = process_logits(raw, repetition_penalty=settings["repetition_penalty"], seen=seen)
        keep = ~truncation_near_tie(
            penalised, settings["temperature"], settings["top_k"], settings["top_p"], min_p=settings["min_p"]
        )
        torch.testing.assert_close(scored[i, : len(exp)][keep], exp[keep], atol=1e-4, rtol=0)
        checked += int(keep.sum())
    assert checked >= 5


def test_min_p_removes_tokens(inference):
    """Every token sampled with `min_p` has at least `min_p` times the largest probability (before min-p), and
    min-p drops tokens at every position; the dropped ones are exactly those below the threshold."""
    min_p = 0.1
    result = inference.generate(
        PROMPTS, max_new_tokens=12, num_return_sequences=4, min_p=min_p, seed=0, return_logprobs=True
    )
    prompts = [p for p in result.metadata["prompt_token_ids"] for _ in range(4)]
    with torch.no_grad():
        before = inference.get_logits(prompts, result.token_ids)
        after = inference.get_logits(prompts, result.token_ids, min_p=min_p)
    vocab = before.shape[-1]
    for i, ids in enumerate(result.token_ids):
        n = len(ids)
        logp = torch.log_softmax(before[i, :n], -1)
        # float error on a logit is a few 1e-6: a ratio within 1e-4 of the threshold counts as on it
        ratio = (logp.gather(-1, torch.tensor(ids)[:, None]).squeeze(-1) - logp.max(-1).values).exp()
        assert torch.all(ratio >= min_p * (1 - 1e-4)), ratio.min()
        kept = torch.isfinite(after[i, :n])
        assert torch.all(kept.sum(-1) < vocab)  # something was dropped at every position
        threshold = logp.max(-1, keepdim=True).values + math.log(min_p)
        disagree = kept != (logp >= threshold)  # only within float error of the threshold
        assert torch.all((logp - threshold).abs()[disagree] < 1e-4)
    assert sum(len(ids) for ids in result.token_ids) >= 20


def test_repetition_penalty_direction(inference):
    """A penalty > 1 divides the positive logits and multiplies the negative ones of every id in the prompt and the
    response before the position, leaves the other ids alone, and so lowers the probability mass on seen ids; a
    penalty < 1 raises it."""
    tok = inference.tokenizer
    prompt = tok(PROMPTS[2])["input_ids"]
    response = tok(" add one add one", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        raw = inference.get_logits([prompt], [response])[0]
        strong = inference.get_logits([prompt], [response], repetition_penalty=1.5)[0]
        weak = inference.get_logits([prompt], [response], repetition_penalty=0.8)[0]
    for t in range(len(response)):
        seen = torch.zeros(raw.shape[-1], dtype=torch.bool)
        seen[torch.tensor(prompt + response[:t])] = True
        expected = torch.where(raw[t] > 0, raw[t] / 1.5, raw[t] * 1.5)
        torch.testing.assert_close(strong[t][seen], expected[seen], atol=1e-5, rtol=1e-6)
        torch.testing.assert_close(strong[t][~seen], raw[t][~seen], atol=1e-6, rtol=0)
        mass = [torch.softmax(x[t], -1)[seen].sum().item() for x in (weak, raw, strong)]
        assert mass[0] > mass[1] > mass[2], mass
    # position t penalises `response[:t]`: the first response token is penalised at position 1 but not at 0
    first = response[0]
    if first not in prompt:
        assert abs(strong[0, first] - raw[0, first]) < 1e-6 and abs(strong[1, first] - raw[1, first]) > 1e-3


def test_greedy_takes_the_argmax_after_the_penalty(inference):
    result = inference.generate(PROMPTS, max_new_tokens=10, do_sample=False, repetition_penalty=2.0, use_cache=False)
    with torch.no_grad():
        logits = inference.get_logits(result.metadata["prompt_token_ids"], result.token_ids, repetition_penalty=2.0)
    for i, ids in enumerate(result.token_ids):
        row = logits[i, : len(ids)]
        chosen = row.gather(-1, torch.tensor(ids)[:, None]).squeeze(-1)
        assert torch.all(chosen >= row.max(-1).values - 1e-4)  # an argmax, up to float error on near ties


def test_chunked_scoring_with_history_matches_full_computation():
    torch.manual_seed(0)
    vocab, sequences = 40, [[1, 2, 3, 2, 5, 7, 7], [4, 4, 9, 1, 0]]
    prompt_lengths = [3, 2]
    width = max(len(s) - p for s, p in zip(sequences, prompt_lengths))
    sequence = torch.arange(2)[:, None].expand(2, width)
    length = torch.tensor(prompt_lengths)[:, None] + torch.arange(width)[None, :]
    history = TokenHistory.from_sequences(sequences, vocab, sequence, length)
    seen = history.seen_all()
    for s, p in zip(range(2), prompt_lengths):  # seen before position j: the first p + j tokens
        for j in range(len(sequences[s]) - p):
            expected = torch.zeros(vocab, dtype=torch.bool)
            expected[torch.tensor(sequences[s][: p + j])] = True
            assert torch.equal(seen[s, j], expected)
    logits = torch.randn(2, width, vocab) * 3
    index = torch.randint(0, vocab, (2, width))
    settings = {"temperature": 0.8, "top_k": 10, "top_p": 0.9, "min_p": 0.05, "repetition_penalty": 1.4}
    top = (settings["temperature"], settings["top_k"], settings["top_p"])
    extra = {"min_p": settings["min_p"], "repetition_penalty": settings["repetition_penalty"]}
    full = process_logits(logits, *top, seen=seen, **extra)
    expected = torch.log_softmax(full, -1).gather(-1, index[..., None]).squeeze(-1)
    chunked = selective_logprobs(logits, index, *top, chunk_bytes=4 * vocab * 3, history=history, **extra)
    torch.testing.assert_close(chunked, expected)
    head = torch.nn.Linear(8, vocab, bias=False)
    hidden = torch.randn(2, width, 8, requires_grad=True)
    via_hidden = logprobs_from_hidden(hidden, head, index, *top, chunk_bytes=4 * vocab * 3, history=history, **extra)
    direct = torch.log_softmax(process_logits(head(hidden), *top, seen=seen, **extra), -1)
    direct = direct.gather(-1, index[..., None]).squeeze(-1)
    finite = torch.isfinite(direct)
    torch.testing.assert_close(via_hidden[finite], direct[finite])
    (g1,) = torch.autograd.grad(via_hidden[finite].sum(), hidden)  # checkpointed chunks recompute the penalty
    (g2,) = torch.autograd.grad(direct[finite].sum(), hidden)
    torch.testing.assert_close(g1, g2)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"min_p": 1.5}, ValueError, r"`min_p` must be in \[0, 1\]"),
        ({"min_p": -0.1}, ValueError, r"`min_p` must be in \[0, 1\]"),
        ({"min_p": float("nan")}, ValueError, "`min_p`"),
        ({"min_p": "0.1"}, TypeError, "`min_p` must be a float"),
        ({"repetition_penalty": 0.0}, ValueError, "`repetition_penalty` must be a finite float > 0"),
        ({"repetition_penalty": -1.3}, ValueError, "`repetition_penalty` must be a finite float > 0"),
        ({"repetition_penalty": float("inf")}, ValueError, "`repetition_penalty`"),
        ({"repetition_penalty": True}, TypeError, "`repetition_penalty` must be a float"),
    ],
)
def test_invalid_values_raise_before_model_work(inference, kwargs, error, match):
    with pytest.raises(error, match=match):
        SamplingConfig(**kwargs)
    with pytest.raises(error, match=match):
        inference.generate(PROMPTS[0], max_new_tokens=2, **kwargs)
    with pytest.raises(error, match=match):
        inference.get_logprobs(PROMPTS[0], [1, 2], **kwargs)


def test_penalty_without_history_is_refused():
    with pytest.raises(ValueError, match="seen"):
        process_logits(torch.zeros(1, 5), repetition_penalty=1.2)
    with pytest.raises(ValueError, match="history"):
        selective_logprobs(torch.zeros(1, 5), torch.zeros(1, dtype=torch.long), repetition_penalty=1.2)
