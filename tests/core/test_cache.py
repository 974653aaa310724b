"""The generation cache: what may be served, and invalidation on every weight change."""

from __future__ import annotations

import torch

from trl_inference_ext import InferenceModule

PROMPTS = ["what is one plus two", "search"]


def fresh(tiny_model_dir, **kwargs) -> InferenceModule:
    return InferenceModule(tiny_model_dir, device="cpu", dtype="float32", **kwargs)


def test_greedy_requests_are_cached(tiny_model_dir):
    module = fresh(tiny_model_dir)
    first = module.generate(PROMPTS, max_new_tokens=4, do_sample=False)
    second = module.generate(PROMPTS, max_new_tokens=4, do_sample=False)
    assert not first.metadata["cached"] and second.metadata["cached"]
    assert first.token_ids == second.token_ids
    second.token_ids[0].append(-1)  # callers may mutate results without corrupting the cache
    assert module.generate(PROMPTS, max_new_tokens=4, do_sample=False).token_ids == first.token_ids
    bypass = module.generate(PROMPTS, max_new_tokens=4, do_sample=False, use_cache=False)
    assert not bypass.metadata["cached"]
    other = module.generate(PROMPTS, max_new_tokens=5, do_sample=False)
    assert not other.metadata["cached"]


def test_seeded_cached_unseeded_never(tiny_model_dir):
    module = fresh(tiny_model_dir)
    module.generate(PROMPTS, max_new_tokens=4, seed=7)
    assert module.generate(PROMPTS, max_new_tokens=4, seed=7).metadata["cached"]
    module.generate(PROMPTS, max_new_tokens=12)
    results = [module.generate(PROMPTS, max_new_tokens=12) for _ in range(3)]
    assert not any(r.metadata["cached"] for r in results)
    # Fresh samples, not one served three times: two unseeded draws of both prompts coincide with probability below
    # 4e-7 * 6e-7 (each prompt's 12-token pair collision: EOS drawn first plus a Monte Carlo estimate of the rest).
    assert len({tuple(map(tuple, r.token_ids)) for r in results}) > 1
    assert len(module.cache) == 1


def test_cache_size_zero_disables(tiny_model_dir):
    module = fresh(tiny_model_dir, cache_size=0)
    module.generate(PROMPTS, max_new_tokens=3, do_sample=False)
    assert not module.generate(PROMPTS, max_new_tokens=3, do_sample=False).metadata["cached"]
    assert len(module.cache) == 0


def test_lru_eviction_and_clear(tiny_model_dir):
    module = fresh(tiny_model_dir, cache_size=2)
    for p in ("a", "b", "c"):
        module.generate(p, max_new_tokens=2, do_sample=False)
    assert len(module.cache) == 2
    assert not module.generate("a", max_new_tokens=2, do_sample=False).metadata["cached"]
    assert module.generate("c", max_new_tokens=2, do_sample=False).metadata["cached"]
    module.clear_cache()
    assert len(module.cache) == 0


def test_optimizer_step_invalidates(tiny_model_dir):
    module = fresh(tiny_model_dir)
    model = module.backend.model
    before = module.generate(PROMPTS, max_new_tokens=6, do_sample=False)
    version = module.weights_version
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.5)
    logprobs, mask = module.get_logprobs(PROMPTS, before.token_ids, return_mask=True)
    (-(logprobs * mask).sum()).backward()
    optimizer.step()
    assert module.weights_version > version
    after = module.generate(PROMPTS, max_new_tokens=6, do_sample=False)
    assert not after.metadata["cached"]
    assert after.metadata["weights_version"] == module.weights_version


def test_explicit_mark_weights_updated(tiny_model_dir):
    module = fresh(tiny_model_dir)
    module.generate(PROMPTS, max_new_tokens=3, do_sample=False)
    version = module.weights_version
    module.mark_weights_updated()
    assert module.weights_version == version + 1
    assert not module.generate(PROMPTS, max_new_tokens=3, do_sample=False).metadata["cached"]


def test_load_state_dict_invalidates(tiny_model_dir):
    module = fresh(tiny_model_dir)
    module.generate(PROMPTS, max_new_tokens=3, do_sample=False)
    model = module.backend.model
    state = {k: v.clone() + 0.01 for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    assert not module.generate(PROMPTS, max_new_tokens=3, do_sample=False).metadata["cached"]
