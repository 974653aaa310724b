"""Weights of an FSDP2-sharded trainer, gathered one parameter at a time and pushed: two real processes over gloo.

`accelerate` does not launch FSDP without GPUs, but torch's own FSDP2 (`fully_shard`) runs on CPU over gloo: each
process loads the same tiny Llama model, shards it, and gathers it back with `gathered_parameters`; then each runs
`push_model_weights(..., push=False)`, the path of a rank that only takes part in the gathers when the servers are
shared. The streamed push into a real engine is tested in tests/vllm/test_vllm_colocate.py.
"""

from __future__ import annotations

import os
import socket
import sys

import pytest
import torch

from trl_inference_ext.testing import build_tiny_model

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, folder: str, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM

    from trl_inference_ext.trl.gather import gathered_parameters, is_sharded, push_model_weights

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        with torch.no_grad():  # trained weights differ from the checkpoint the engine starts from
            for p in model.parameters():
                p.mul_(1.5)
        expected = {n: p.detach().clone() for n, p in model.named_parameters()}
        mesh = init_device_mesh("cpu", (WORLD,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        assert is_sharded(model)
        local = {n: p.to_local().numel() for n, p in model.named_parameters()}
        equal, largest = {}, 0
        for name, full in gathered_parameters(model):
            equal[name] = bool(torch.equal(full, expected[name]))
            largest = max(largest, full.numel())
        result = {"equal": equal, "sharded": sum(local.values()) < sum(t.numel() for t in expected.values())}
        # A rank that pushes nothing (shared servers, not the main process) still takes part in every gather.
        result["version"] = push_model_weights(None, model, push=False)
        torch.save(result, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _run(tmp_path, folder: str) -> list[dict]:
    import torch.multiprocessing as mp

    out = str(tmp_path / "result")
    mp.start_processes(_worker, args=(folder, _free_port(), out), nprocs=WORLD, start_method="spawn")
    return [torch.load(f"{out}.{r}", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(
        build_tiny_model(tmp_path_factory.mktemp("fsdp2") / "model", vocab_size=512, max_position_embeddings=256)
    )


@pytest.mark.skipif(sys.platform != "linux", reason="gloo over TCP on Linux")
def test_gathered_tensors_equal_the_unsharded_model_on_every_rank(tmp_path, model_dir):
    results = _run(tmp_path, model_dir)
    for result in results:
        assert result["sharded"]  # each rank held shards, not the model
        assert result["equal"] and all(result["equal"].values())
        assert result["version"] is None
