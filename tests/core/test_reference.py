"""Reference scoring by PEFT adapter toggling, with no second copy of the weights."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_inference_ext import InferenceModule

PROMPTS = ["what is two plus three", "search the city"]
RESPONSES = [" the answer is five", " weather today"]
LORA = dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)


@pytest.fixture
def peft_module(tiny_model_dir):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(**LORA))  # init_lora_weights=False: non-zero B, adapter changes outputs
    return InferenceModule.from_model(model, AutoTokenizer.from_pretrained(tiny_model_dir))


def plain_logprobs(tiny_model_dir):
    plain = InferenceModule(tiny_model_dir, device="cpu", dtype="float32")
    with torch.no_grad():
        return plain.get_logprobs(PROMPTS, RESPONSES)


def test_reference_equals_base_model(peft_module, tiny_model_dir):
    model = peft_module.backend.model
    n_params = sum(p.numel() for p in model.parameters())
    flags = [p.requires_grad for p in model.parameters()]
    with torch.no_grad():
        policy = peft_module.get_logprobs(PROMPTS, RESPONSES)
    ref = peft_module.reference().get_logprobs(PROMPTS, RESPONSES)
    base = plain_logprobs(tiny_model_dir)
    torch.testing.assert_close(ref, base, atol=1e-4, rtol=0)  # the PEFT wrapper and the plain model: two code paths
    assert (policy - base).abs().max() > 0.1  # the adapter really changes the policy (measured 2.3)
    assert not ref.requires_grad
    # adapters are back on, nothing was copied, trainable flags unchanged
    with torch.no_grad():
        torch.testing.assert_close(peft_module.get_logprobs(PROMPTS, RESPONSES), policy)
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert [p.requires_grad for p in model.parameters()] == flags
    logits = peft_module.reference().get_logits(PROMPTS, RESPONSES)
    assert logits.shape[:2] == ref.shape


def test_named_frozen_adapter_as_reference(peft_module, tiny_model_dir):
    model = peft_module.backend.model
    torch.manual_seed(1)
    model.add_adapter("ref", LoraConfig(**LORA))
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with torch.no_grad():
        policy = peft_module.get_logprobs(PROMPTS, RESPONSES)
        model.set_adapter("ref")
        expected = peft_module.get_logprobs(PROMPTS, RESPONSES)
        model.set_adapter("default")
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
    ref = peft_module.reference("ref").get_logprobs(PROMPTS, RESPONSES)
    torch.testing.assert_close(ref, expected, atol=1e-4, rtol=0)
    assert (ref - policy).abs().max() > 0.1  # measured 1.9
    assert model.active_adapter == "default"
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    with pytest.raises(ValueError, match="adapter_name"):
        peft_module.reference("missing")


def test_reference_requires_adapters(inference):
    with pytest.raises(ValueError, match="PEFT"):
        inference.reference()


def test_generation_cache_respects_adapter_state(peft_module):
    model = peft_module.backend.model
    with_adapter = peft_module.generate(PROMPTS, max_new_tokens=6, do_sample=False)
    with model.disable_adapter():
        without = peft_module.generate(PROMPTS, max_new_tokens=6, do_sample=False)
    assert not without.metadata["cached"]
    assert peft_module.generate(PROMPTS, max_new_tokens=6, do_sample=False).token_ids == with_adapter.token_ids


def test_base_model_and_hidden_path_see_through_peft(tiny_model_dir):
    from trl_inference_ext.backends.adapters import base_model
    from trl_inference_ext.backends.hf.backend import hidden_path

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    assert base_model(wrapped) is model and base_model(model) is model
    decoder, head = hidden_path(wrapped)
    assert decoder is model.get_decoder() and head is model.get_output_embeddings()
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(head(decoder(input_ids=ids).last_hidden_state), wrapped(input_ids=ids).logits)
    model.config.logit_scale = 2.0  # logits would no longer be lm_head(decoder(...))
    assert hidden_path(wrapped) is None
