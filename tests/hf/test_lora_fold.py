"""Decode-time LoRA folding: the same tokens and log-probs as PEFT's unmerged layers, the PEFT weights untouched."""

from __future__ import annotations

import threading
from contextlib import contextmanager

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_inference_ext import InferenceModule
from trl_inference_ext.backends.hf import lora_fold
from trl_inference_ext.backends.hf.backend import HuggingFaceBackend
from trl_inference_ext.backends.hf.lora_fold import LoraFold

PROMPTS = ["what is two plus three", "search the city weather today", "one"]
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft_model(model_dir: str, seed: int = 0, **lora):
    """A float32 PEFT LoRA model with non-zero `lora_B` (the adapter changes outputs)."""
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    config = dict(r=4, lora_alpha=16, target_modules=ALL_LINEAR, init_lora_weights=False)
    return get_peft_model(base, LoraConfig(**{**config, **lora}))


def modules(model, tokenizer):
    """(folding module, unfolded module) on the same model object."""
    folded = InferenceModule.from_backend(HuggingFaceBackend(model, tokenizer, fold_lora=True), cache_size=0)
    unfolded = InferenceModule.from_backend(HuggingFaceBackend(model, tokenizer, fold_lora=False), cache_size=0)
    return folded, unfolded


def lora_layer_count(model) -> int:
    from peft.tuners.lora.layer import Linear

    return sum(type(m) is Linear for m in model.modules())


def greedy(module, **kwargs):
    return module.generate(PROMPTS, max_new_tokens=12, do_sample=False, return_logprobs=True, **kwargs)


def assert_same_greedy(folded, unfolded, **kwargs):
    a, b = greedy(folded, **kwargs), greedy(unfolded, **kwargs)
    assert a.token_ids == b.token_ids
    for x, y in zip(a.logprobs, b.logprobs):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=0)
    return a


def patched_forwards(model) -> list[tuple[str, object]]:
    """Modules with a forward set on the instance (Accelerate patches some; the fold must leave none of its own)."""
    return [(name, m.__dict__["forward"]) for name, m in model.named_modules() if "forward" in m.__dict__]


def snapshot(model) -> dict[str, object]:
    state = {name: tensor.detach().clone() for name, tensor in model.state_dict(keep_vars=True).items()}
    return {"state": state, "forwards": patched_forwards(model)}


def assert_untouched(model, before: dict[str, object]) -> None:
    after = model.state_dict(keep_vars=True)
    assert after.keys() == before["state"].keys()
    for name, tensor in after.items():
        assert torch.equal(tensor, before["state"][name]), name
    assert patched_forwards(model) == before["forwards"]


@pytest.fixture
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_fold_matches_unfolded_and_leaves_weights_bit_for_bit(tiny_model_dir, tokenizer):
    model = peft_model(tiny_model_dir)
    before = snapshot(model)
    folded, unfolded = modules(model, tokenizer)
    fold = folded.backend.lora_fold
    result = assert_same_greedy(folded, unfolded)
    assert fold.routed_layers == fold.folded_layers == lora_layer_count(model) == 14
    expected_bytes = sum(m.base_layer.weight.numel() * 4 for m in model.modules() if hasattr(m, "lora_A"))
    assert fold.folded_bytes == expected_bytes
    assert unfolded.backend.lora_fold.routed_layers == 0
    # The adapter really matters: the base model answers differently.
    with model.disable_adapter():
        base_ids = greedy(unfolded).token_ids
    assert base_ids != result.token_ids
    # Sampled-token log-probs equal get_logprobs on the PEFT model (through PEFT's own layers).
    sampled = folded.generate(PROMPTS, max_new_tokens=16, temperature=0.8, top_k=50, return_logprobs=True, seed=3)
    assert fold.folded_layers == 14
    with torch.no_grad():
        scored = unfolded.get_logprobs(PROMPTS, sampled.token_ids, temperature=0.8, top_k=50)
    for i, (ids, logprobs) in enumerate(zip(sampled.token_ids, sampled.logprobs)):
        torch.testing.assert_close(scored[i, : len(ids)], logprobs, atol=1e-4, rtol=0)
    assert_untouched(model, before)


def test_refolds_after_optimizer_step_only(tiny_model_dir, tokenizer):
    model = peft_model(tiny_model_dir, lora_dropout=0.1)  # dropout is the identity while generating (eval mode)
    model.train()
    folded, unfolded = modules(model, tokenizer)
    fold = folded.backend.lora_fold
    assert_same_greedy(folded, unfolded)
    assert fold.fold_count == 14 and model.training  # training mode restored after generation
    greedy(folded)
    folded.generate(PROMPTS, max_new_tokens=4, temperature=1.0)
    assert fold.fold_count == 14  # nothing changed: no new fold

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    ids = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    model(**ids, labels=ids["input_ids"]).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    assert_same_greedy(folded, unfolded)
    assert fold.fold_count == 28  # every LoRA weight moved: each layer folded once more
    greedy(folded)
    assert fold.fold_count == 28

    with torch.no_grad():  # a base weight changes: the backend's weights version moves, so everything is refolded
        model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.mul_(1.5)
    assert_same_greedy(folded, unfolded)
    assert fold.fold_count == 42


def test_fold_tracks_each_layers_tensors(tiny_model_dir):
    model = peft_model(tiny_model_dir).eval()
    fold = LoraFold(model, True)
    ids = torch.tensor([[5, 6, 7, 8]])
    with fold.applied():
        pass
    assert fold.fold_count == 14
    layer = model.base_model.model.model.layers[1].mlp.up_proj
    with torch.no_grad():
        layer.lora_B["default"].weight.add_(0.25)  # in place: the version counter moves
        expected = model(input_ids=ids).logits
        with fold.applied():
            assert fold.fold_count == 15  # that layer only
            torch.testing.assert_close(model(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
        layer.lora_A["default"].weight.data = layer.lora_A["default"].weight.data * 2  # out of place: new storage
        layer.scaling["default"] = 0.5  # what `set_scale` changes
        expected = model(input_ids=ids).logits
        with fold.applied():
            assert fold.fold_count == 16
            torch.testing.assert_close(model(input_ids=ids).logits, expected, atol=1e-5, rtol=0)


def test_backend_refolds_on_explicit_weights_update(tiny_model_dir, tokenizer):
    model = peft_model(tiny_model_dir)
    folded, _ = modules(model, tokenizer)
    greedy(folded)
    count = folded.backend.lora_fold.fold_count
    folded.backend.mark_weights_updated()  # e.g. after an out-of-place weight swap
    greedy(folded)
    assert folded.backend.lora_fold.fold_count == 2 * count


def test_reference_context_generates_with_the_base_model(tiny_model_dir, tokenizer):
    model = peft_model(tiny_model_dir)
    before = snapshot(model)
    folded, _ = modules(model, tokenizer)
    plain = InferenceModule(tiny_model_dir, device="cpu", dtype="float32", cache_size=0)
    base = greedy(plain)
    policy = greedy(folded)
    with folded.backend.reference_context():
        reference = greedy(folded)
    fold = folded.backend.lora_fold
    assert fold.routed_layers == 14 and fold.folded_layers == 0  # routed to the base weights, no copy needed
    with model.disable_adapter():
        disabled = greedy(folded)
    assert reference.token_ids == disabled.token_ids == base.token_ids != policy.token_ids
    for x, y in zip(reference.logprobs, base.logprobs):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=0)
    assert greedy(folded).token_ids == policy.token_ids  # adapters back on
    assert fold.fold_count == 14  # the copy was kept through the reference blocks
    assert_untouched(model, before)


def test_multiple_adapters(tiny_model_dir, tokenizer):
    model = peft_model(tiny_model_dir, target_modules=["q_proj", "v_proj"])
    torch.manual_seed(1)
    model.add_adapter("second", LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]))
    for module in model.modules():  # give the second adapter non-zero B too
        if hasattr(module, "lora_B") and "second" in module.lora_B:
            torch.nn.init.normal_(module.lora_B["second"].weight, std=0.5)
    before = snapshot(model)
    folded, unfolded = modules(model, tokenizer)
    fold = folded.backend.lora_fold
    first = assert_same_greedy(folded, unfolded)
    assert fold.folded_layers == 4  # "default" is active on q/v of 2 layers; up_proj has only "second"
    assert fold.routed_layers == 6
    model.set_adapter("second")
    second = assert_same_greedy(folded, unfolded)
    assert fold.folded_layers == 6 and second.token_ids != first.token_ids
    model.base_model.set_adapter(["default", "second"])  # both active: their deltas add up
    assert_same_greedy(folded, unfolded)
    model.set_adapter("default")
    assert greedy(folded).token_ids == first.token_ids
    assert_untouched(model, before)  # set_adapter flips requires_grad, never values


@pytest.mark.parametrize(
    "lora",
    [
        dict(use_rslora=True, lora_alpha=3),
        dict(lora_bias=True),
        dict(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
        dict(target_modules=["q_proj", "lm_head", "embed_tokens"]),
    ],
    ids=["rslora", "lora_bias", "modules_to_save", "lm_head_and_embedding"],
)
def test_scaling_bias_and_other_modules(tiny_model_dir, tokenizer, lora):
    model = peft_model(tiny_model_dir, **lora)
    if "lora_bias" in lora:
        for module in model.modules():
            if hasattr(module, "lora_B"):
                torch.nn.init.normal_(module.lora_B["default"].bias, std=0.5)
    if "modules_to_save" in lora:
        with torch.no_grad():
            model.base_model.model.lm_head.modules_to_save["default"].weight.mul_(-1.0)
    before = snapshot(model)
    folded, unfolded = modules(model, tokenizer)
    assert_same_greedy(folded, unfolded)
    assert folded.backend.lora_fold.folded_layers == lora_layer_count(model) > 0
    assert_untouched(model, before)


def test_unsupported_configurations_fall_back(tiny_model_dir, tokenizer):
    model = peft_model(tiny_model_dir, use_dora=True)
    folded, unfolded = modules(model, tokenizer)
    assert_same_greedy(folded, unfolded)
    assert folded.backend.lora_fold.routed_layers == 0 and folded.backend.lora_fold.fold_count == 0

    model = peft_model(tiny_model_dir, target_modules=["q_proj", "v_proj"])
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    calls: list[int] = []
    handle = layer.base_layer.register_forward_hook(lambda *_: calls.append(1))  # a hook must keep running
    folded, unfolded = modules(model, tokenizer)
    try:
        assert_same_greedy(folded, unfolded)
        assert folded.backend.lora_fold.routed_layers == 3 and calls
    finally:
        handle.remove()

    model = peft_model(tiny_model_dir, target_modules=["q_proj", "v_proj"])
    model.base_model.model.model.layers[1].self_attn.v_proj.lora_B["default"].weight.data = torch.empty(0)  # ZeRO-3
    model.base_model.model.model.layers[0].self_attn.v_proj.base_layer.weight.data = torch.empty(0)
    fold = LoraFold(model, True)
    with fold.applied():
        pass
    assert fold.routed_layers == fold.folded_layers == 2

    fold = LoraFold(peft_model(tiny_model_dir, lora_dropout=0.5), True)
    fold.model.train()  # training-mode dropout is random: nothing may be folded
    with fold.applied():
        pass
    assert fold.routed_layers == 0


def test_merged_adapter_is_left_to_peft(tiny_model_dir, tokenizer):
    model = peft_model(tiny_model_dir, target_modules=["q_proj"])
    model.merge_adapter()
    folded, unfolded = modules(model, tokenizer)
    assert_same_greedy(folded, unfolded)
    assert folded.backend.lora_fold.routed_layers == 0


def test_auto_folds_only_within_free_memory(tiny_model_dir, tokenizer, monkeypatch):
    model = peft_model(tiny_model_dir)
    backend = HuggingFaceBackend(model, tokenizer)
    assert backend.fold_lora == "auto"
    module = InferenceModule.from_backend(backend, cache_size=0)
    greedy(module)
    assert backend.lora_fold.folded_layers == 14  # 128 KiB: fits in any machine's free memory
    monkeypatch.setattr(lora_fold, "free_memory", lambda device: backend.lora_fold.folded_bytes)
    reference = greedy(module)
    assert backend.lora_fold.routed_layers == 0 and backend.lora_fold.folded_bytes == 0  # copy dropped
    monkeypatch.setattr(lora_fold, "free_memory", lambda device: None)
    assert greedy(module).token_ids == reference.token_ids and backend.lora_fold.routed_layers == 0
    backend.fold_lora = True
    assert greedy(module).token_ids == reference.token_ids and backend.lora_fold.folded_layers == 14
    backend.fold_lora = False
    assert backend.lora_fold.folded_bytes == 0
    with pytest.raises(ValueError, match="fold_lora"):
        backend.fold_lora = "yes"
    with pytest.raises(ValueError, match="fold_lora"):
        HuggingFaceBackend(model, tokenizer, fold_lora=1)
    with pytest.raises(ValueError, match="fold_lora"):
        InferenceModule(tiny_model_dir, device="cpu", fold_lora="always")
    assert InferenceModule(tiny_model_dir, device="cpu", fold_lora=False).backend.fold_lora is False
    assert InferenceModule.from_model(model, tokenizer, fold_lora=False).backend.fold_lora is False
    assert InferenceModule.from_model(model, tokenizer).backend.fold_lora == "auto"


def test_routing_is_per_thread_and_exception_safe(tiny_model_dir, tokenizer):
    model = peft_model(tiny_model_dir, target_modules=["q_proj"]).eval()
    fold = LoraFold(model, True)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    calls: list[str] = []
    with fold.applied():
        handle = layer.lora_A["default"].register_forward_hook(lambda *_: calls.append(threading.current_thread().name))
        try:
            with torch.no_grad():
                here = model(input_ids=ids).logits
                other = threading.Thread(target=lambda: model(input_ids=ids), name="other")
                other.start()
                other.join()
        finally:
            handle.remove()
    assert calls == ["other"]  # PEFT's layer ran in the other thread only
    torch.testing.assert_close(here, expected, atol=1e-5, rtol=0)
    with pytest.raises(RuntimeError, match="boom"), fold.applied(), fold.applied():  # nested blocks, then an error
        raise RuntimeError("boom")
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert lora_fold.routed_layers() == 0


def test_grpo_trainer_step_generates_from_the_fold(tiny_model_dir, tmp_path, monkeypatch):
    """A real GRPOTrainer step with LoRA and our rollout_func: folded, log-probs exact, PEFT weights untouched."""
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    from trl_inference_ext.trl import rollout_func

    blocks: list[tuple[int, int]] = []
    applied = LoraFold.applied

    def spy(self, *args, **kwargs):
        with applied(self, *args, **kwargs):
            blocks.append((self.folded_layers, self.fold_count))
            yield

    monkeypatch.setattr(LoraFold, "applied", contextmanager(spy))
    rollout = rollout_func()
    checks: list[float] = []

    def checked(prompts, trainer):
        before = snapshot(trainer.model)
        out = rollout(prompts, trainer)
        assert_untouched(trainer.model, before)
        scorer = InferenceModule.from_backend(
            HuggingFaceBackend(trainer.model, trainer.processing_class, fold_lora=False), cache_size=0
        )
        with torch.no_grad():
            scored = scorer.get_logprobs(out["prompt_ids"], out["completion_ids"], temperature=trainer.args.temperature)
        checks.extend(
            (scored[i, : len(lp)] - torch.tensor(lp)).abs().max().item() for i, lp in enumerate(out["logprobs"]) if lp
        )
        return out

    config = trl.GRPOConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        num_generations=2,
        per_device_train_batch_size=4,
        max_completion_length=12,
        temperature=0.7,
        learning_rate=5e-2,
        report_to="none",
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        seed=0,
    )
    trainer = trl.GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
        reward_funcs=[lambda completions, **kw: [float(i % 2) for i in range(len(completions))]],
        args=config,
        train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS[:2] * 4}),
        processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
        rollout_func=checked,
    )
    trainer.train()
    assert len(blocks) == 2 and all(folded == 4 for folded, _ in blocks)
    assert checks and max(checks) < 1e-4
