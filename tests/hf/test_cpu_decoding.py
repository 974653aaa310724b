"""CPU decoding kernels: the same numbers as transformers' `sdpa` and `F.linear`, switched on only in scope."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from trl_inference_ext import InferenceModule
from trl_inference_ext.backends.hf.cpu_kernels import (
    GROUPED_SDPA,
    WEIGHT_MAJOR_MAX_ROWS,
    WEIGHT_MAJOR_MIN_NUMEL,
    WeightMajorLinear,
    cpu_decoding,
    grouped_sdpa_attention,
    weight_major_applies,
    weight_major_linear,
)
from trl_inference_ext.testing import build_tiny_model


@pytest.fixture(scope="module")
def gqa_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("gqa") / "model"
    return str(build_tiny_model(path, hidden_size=128, num_heads=4, num_key_value_heads=2, seed=3))


class Attention(torch.nn.Module):
    num_key_value_groups = 3
    is_causal = True


@pytest.mark.parametrize("with_mask", [True, False])
@pytest.mark.parametrize("q_len", [1, 5])
def test_matches_transformers_sdpa(with_mask: bool, q_len: int):
    torch.manual_seed(0)
    kv_len = 7 if with_mask else q_len
    query = torch.randn(3, 6, q_len, 8)
    key, value = torch.randn(3, 2, kv_len, 8), torch.randn(3, 2, kv_len, 8)
    mask = None
    if with_mask:
        mask = torch.ones(3, 1, q_len, kv_len, dtype=torch.bool).tril(diagonal=kv_len - q_len)
        mask[0, :, :, :2] = False  # left padding of the first row
    ours, _ = grouped_sdpa_attention(Attention(), query, key, value, mask, scaling=0.3)
    reference, _ = sdpa_attention_forward(Attention(), query, key, value, mask, scaling=0.3)
    assert ours.shape == reference.shape == (3, q_len, 6, 8)
    # Two attention kernels (grouped against repeated key/value heads) whose float32 reductions may run in another
    # order on another CPU: 1e-5 on outputs of magnitude about 1, where a wrong mask or head grouping is off by 0.1.
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)


def test_switch_is_scoped_and_used_while_sampling(gqa_model_dir: str):
    inference = InferenceModule(gqa_model_dir, dtype="float32", device="cpu")
    model = inference.backend.model
    assert model.config._attn_implementation == "sdpa"
    seen: list[str] = []
    handle = model.model.layers[0].register_forward_hook(lambda *_: seen.append(model.config._attn_implementation))
    try:
        result = inference.generate(
            ["a b c", "d e f g h i"],
            max_new_tokens=12,
            temperature=0.8,
            num_return_sequences=2,
            seed=0,
            return_logprobs=True,
        )
    finally:
        handle.remove()
    assert seen and set(seen) == {GROUPED_SDPA}
    assert model.config._attn_implementation == "sdpa"
    # Sampled log-probs still equal an independent scoring pass (which runs transformers' own sdpa).
    prompts = [p for p in result.metadata["prompt_token_ids"] for _ in range(2)]
    with torch.no_grad():
        scored = inference.get_logprobs(prompts, result.token_ids, temperature=0.8)
    for i, logprobs in enumerate(result.logprobs):
        torch.testing.assert_close(scored[i, : len(logprobs)], logprobs, rtol=0, atol=1e-4)


def test_switch_restores_on_error_and_leaves_other_implementations(gqa_model_dir: str):
    model = AutoModelForCausalLM.from_pretrained(gqa_model_dir, dtype=torch.float32)
    with pytest.raises(RuntimeError), cpu_decoding(model):
        assert model.config._attn_implementation == GROUPED_SDPA
        raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"
    eager = AutoModelForCausalLM.from_pretrained(gqa_model_dir, dtype=torch.float32, attn_implementation="eager")
    with cpu_decoding(eager):
        assert eager.config._attn_implementation == "eager"


@pytest.mark.parametrize("shape", [(3, 64), (2, 1, 64), (4, 2, 64)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_weight_major_linear_matches_linear(shape: tuple[int, ...], with_bias: bool):
    torch.manual_seed(0)
    x, weight = torch.randn(*shape), torch.randn(96, 64)
    bias = torch.randn(96) if with_bias else None
    out = weight_major_linear(x, weight, bias)
    assert out.shape == (*shape[:-1], 96) and out.is_contiguous()
    # 64-term float32 dot products of magnitude ~8 summed in another order: 1e-4 holds on any CPU
    torch.testing.assert_close(out, torch.nn.functional.linear(x, weight, bias), rtol=1e-5, atol=1e-4)


def test_weight_major_routing_rules():
    big = torch.randn(WEIGHT_MAJOR_MIN_NUMEL // 64, 64)
    assert weight_major_applies(torch.randn(2, 1, 64), big)
    assert weight_major_applies(torch.randn(WEIGHT_MAJOR_MAX_ROWS, 64), big, torch.randn(big.shape[0]))
    assert not weight_major_applies(torch.randn(WEIGHT_MAJOR_MAX_ROWS + 1, 64), big)  # prefill-sized
    assert not weight_major_applies(torch.randn(2, 64), torch.randn(8, 64))  # small weight
    assert not weight_major_applies(torch.randn(2, 64, dtype=torch.float64), big.double())
    assert not weight_major_applies(torch.randn(2, 64, requires_grad=True), big)  # autograd keeps F.linear
    with torch.no_grad():
        assert weight_major_applies(torch.randn(2, 64, requires_grad=True), big)


def test_weight_major_mode_keeps_results_and_gradients():
    torch.manual_seed(0)
    big = torch.randn(WEIGHT_MAJOR_MIN_NUMEL // 64, 64)
    x = torch.randn(3, 64, requires_grad=True)
    with WeightMajorLinear():
        routed = torch.nn.functional.linear(x.detach(), big)
        recorded = torch.nn.functional.linear(x, big)
        recorded.sum().backward()
    torch.testing.assert_close(routed, torch.nn.functional.linear(x.detach(), big), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(x.grad, big.sum(0).expand(3, -1), rtol=1e-4, atol=1e-3)
