"""Scoring: exactness against a naive reference, shapes, masks, gradients and the chunked kernels."""

from __future__ import annotations

import pytest
import torch

from trl_inference_ext.scoring import kl_penalty, logprobs_from_hidden, process_logits, selective_logprobs
from trl_inference_ext.testing import truncation_near_tie

PROMPTS = ["what is two plus three", "search the city"]
RESPONSES = [" the answer is five", " weather today"]


def naive_logprobs(module, prompt_ids, response_ids, temperature=1.0):
    model = module.backend.model
    out = []
    for p, r in zip(prompt_ids, response_ids):
        ids = torch.tensor([p + r])
        logits = model(input_ids=ids).logits[0, len(p) - 1 : len(p) + len(r) - 1].float() / temperature
        out.append(torch.log_softmax(logits, -1).gather(-1, torch.tensor(r)[:, None]).squeeze(-1))
    return out


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_get_logprobs_matches_naive(inference, temperature):
    tok = inference.tokenizer
    prompt_ids = [tok(p)["input_ids"] for p in PROMPTS]
    response_ids = [tok(r, add_special_tokens=False)["input_ids"] for r in RESPONSES]
    with torch.no_grad():
        scored, mask = inference.get_logprobs(PROMPTS, RESPONSES, temperature=temperature, return_mask=True)
        expected = naive_logprobs(inference, prompt_ids, response_ids, temperature)
    assert scored.shape == (2, max(len(r) for r in response_ids))
    assert mask.dtype == torch.bool
    for i, exp in enumerate(expected):  # batched and padded against one unpadded sequence at a time: 1e-4
        torch.testing.assert_close(scored[i, : len(exp)], exp, atol=1e-4, rtol=0)
        assert torch.all(scored[i, len(exp) :] == 0)
        assert mask[i].sum().item() == len(exp)


def test_strings_and_token_ids_agree(inference):
    tok = inference.tokenizer
    prompt_ids = [tok(p)["input_ids"] for p in PROMPTS]
    response_ids = [tok(r, add_special_tokens=False)["input_ids"] for r in RESPONSES]
    with torch.no_grad():
        a = inference.get_logprobs(PROMPTS, RESPONSES)
        b = inference.get_logprobs(prompt_ids, response_ids)
    torch.testing.assert_close(a, b)


def test_log_softmax_of_logits_equals_logprobs(inference):
    """`get_logits` (full logits) and `get_logprobs` (chunked over the LM head) agree wherever truncation is clear."""
    tok = inference.tokenizer
    with torch.no_grad():
        raw = inference.get_logits(PROMPTS, RESPONSES)
        for kwargs in ({}, {"temperature": 0.7, "top_k": 20}, {"top_p": 0.8}):
            logits = inference.get_logits(PROMPTS, RESPONSES, **kwargs)
            logprobs, mask = inference.get_logprobs(PROMPTS, RESPONSES, return_mask=True, **kwargs)
            targets = torch.zeros_like(logprobs, dtype=torch.long)
            for i, r in enumerate(RESPONSES):
                ids = tok(r, add_special_tokens=False)["input_ids"]
                targets[i, : len(ids)] = torch.tensor(ids)
            assert logits.shape == (*logprobs.shape, len(tok))
            gathered = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
            # positions whose kept set is within float error of a tie may keep other tokens on the two paths
            truncation = {k: v for k, v in kwargs.items() if k != "temperature"}
            clear = mask & ~truncation_near_tie(raw, kwargs.get("temperature", 1.0), **truncation)
            assert clear.sum() >= mask.sum() // 2
            torch.testing.assert_close(gathered[clear], logprobs[clear], atol=1e-4, rtol=0)


def test_gradients_flow_through_get_logprobs(tiny_model_dir):
    from trl_inference_ext import InferenceModule

    module = InferenceModule(tiny_model_dir, device="cpu", dtype="float32")
    logprobs, mask = module.get_logprobs(PROMPTS, RESPONSES, return_mask=True)
    loss = -(logprobs * mask).sum()
    loss.backward()
    grads = [p.grad for p in module.backend.model.parameters()]
    assert all(g is not None for g in grads)
    assert module.backend.model.lm_head.weight.grad.abs().sum() > 0


def test_chunked_kernels_match_full_computation():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 50) * 3
    index = torch.randint(0, 50, (3, 7))
    for kwargs in (
        {},
        {"temperature": 0.5},
        {"top_k": 5},
        {"top_p": 0.6},
        {"temperature": 2.0, "top_k": 10, "top_p": 0.9},
    ):
        full = torch.log_softmax(process_logits(logits, **kwargs), -1).gather(-1, index[..., None]).squeeze(-1)
        chunked = selective_logprobs(logits, index, chunk_bytes=4 * 50 * 2, **kwargs)  # two rows per chunk
        torch.testing.assert_close(chunked, full)
    head = torch.nn.Linear(8, 50, bias=False)
    hidden = torch.randn(3, 7, 8, requires_grad=True)
    via_hidden = logprobs_from_hidden(hidden, head, index, chunk_bytes=4 * 50 * 3)
    direct = torch.log_softmax(head(hidden), -1).gather(-1, index[..., None]).squeeze(-1)
    torch.testing.assert_close(via_hidden, direct)
    (g1,) = torch.autograd.grad(via_hidden.sum(), hidden)
    (g2,) = torch.autograd.grad(direct.sum(), hidden)
    torch.testing.assert_close(g1, g2)


def test_process_logits_truncation():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    assert torch.isinf(process_logits(logits, top_k=2)[0, 2:]).all()
    assert torch.isfinite(process_logits(logits, top_k=2)[0, :2]).all()
    probs = torch.softmax(logits, -1)[0]
    kept = torch.isfinite(process_logits(logits, top_p=float(probs[0]) + 1e-3)[0])
    assert kept.tolist() == [True, True, False, False, False]
    assert torch.isfinite(process_logits(logits, top_p=1e-6)).sum() == 1
    with pytest.raises(ValueError, match="temperature"):
        process_logits(logits, temperature=0.0)


def test_kl_estimators():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-1.5, -1.0, -0.5])
    k1 = kl_penalty(logp, ref, "k1")
    k3 = kl_penalty(logp, ref, "k3")
    torch.testing.assert_close(k1, logp - ref)
    assert torch.all(k3 >= 0) and k3[2] == 0
    torch.testing.assert_close(kl_penalty(logp, ref, "k2"), 0.5 * (logp - ref) ** 2)
    assert kl_penalty(logp, ref, "k3", mask=torch.tensor([1.0, 0.0, 1.0]))[1] == 0
    with pytest.raises(ValueError, match="estimator"):
        kl_penalty(logp, ref, "k4")
