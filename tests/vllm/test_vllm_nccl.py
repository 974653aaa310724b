"""Weight pushes over vLLM's NCCL weight-transfer engine (`weight_transfer="nccl"`).

The push itself needs CUDA on both sides: it runs where a GPU and the CUDA build of vLLM are present (a real
`trl-inference serve --weight-transfer nccl` server on this machine's GPU, a policy on the same GPU) and is skipped
with the reason elsewhere. Without CUDA, the option fails at construction with what to use instead.
"""

from __future__ import annotations

import pytest
import torch

from trl_inference_ext.backends.vllm.backend import VLLMBackend
from trl_inference_ext.testing import free_port, require_vllm
from trl_inference_ext.types import SamplingConfig

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (NCCL)")
API_KEY = "nccl-test-key"
GREEDY = SamplingConfig(max_new_tokens=10, do_sample=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error shown where there is no CUDA")
def test_nccl_without_cuda_says_what_to_use(tiny_model_dir):
    with pytest.raises(RuntimeError, match=r"needs a CUDA GPU.*'http' or 'filesystem'"):
        VLLMBackend(tiny_model_dir, base_url="http://127.0.0.1:9", weight_transfer="nccl")


def test_nccl_is_a_server_mode_option(tiny_model_dir):
    with pytest.raises(ValueError, match="server mode"):
        VLLMBackend(tiny_model_dir, weight_transfer="nccl")


@pytest.mark.gpu
@requires_gpu
def test_nccl_push_into_a_gpu_server(tiny_model_dir):
    """Two pushes over one NCCL group: each lands (checksums), is served (greedy tokens equal the policy's)."""
    require_vllm()
    from transformers import AutoModelForCausalLM

    from trl_inference_ext.backends.hf.backend import HuggingFaceBackend
    from trl_inference_ext.backends.vllm.client import VLLMServerClient
    from trl_inference_ext.backends.vllm.server.launcher import ServeConfig, ServerProcess

    config = ServeConfig(
        model=tiny_model_dir,
        port=free_port(),
        api_key=API_KEY,
        dtype="float32",
        enforce_eager=True,
        gpu_memory_utilization=0.2,
        weight_transfer="nccl",
    )
    server = ServerProcess(config)
    backend = None
    try:
        server.wait_healthy(600)
        backend = VLLMBackend(tiny_model_dir, base_url=config.url, api_key=API_KEY, weight_transfer="nccl")
        client = VLLMServerClient(config.url, tiny_model_dir, api_key=API_KEY)
        started = client.weight_checksums()
        prompt_ids = [backend.tokenizer(p)["input_ids"] for p in ("what is one plus two", "the weather in the city")]
        for seed in (1, 2):
            policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).cuda()
            generator = torch.Generator(device="cuda").manual_seed(seed)
            with torch.no_grad():
                for p in policy.parameters():
                    p.add_(0.05 * torch.randn(p.shape, generator=generator, device="cuda"))
            backend.load_weights_from_model(policy)
            assert backend.last_push is not None and backend.last_push.servers == [config.url]
            assert client.weight_version() == backend.served_weights
            assert client.weight_checksums() != started
            with torch.no_grad():
                expected = [
                    o.token_ids for o in HuggingFaceBackend(policy, backend.tokenizer).generate(prompt_ids, GREEDY)
                ]
            assert [o.token_ids for o in backend.generate(prompt_ids, GREEDY)] == expected
    finally:
        if backend is not None:
            backend.close()
        server.stop()
