"""Tool execution as a security boundary: real tools that hang, exit, segfault, exhaust memory or flood the output.

The faulty tools live in `faulty_tools.py` so that spawned worker processes can import them. Timings are bounded with
generous margins (machines differ): the claim is "about one deadline", not an exact duration.
"""

from __future__ import annotations

import os
import sys
import time
import types

import faulty_tools as ft
import pytest
from tool_fixtures import add

from trl_inference_ext import InferenceModule, ToolCall
from trl_inference_ext.tools.execution import MAX_OUTPUT_CHARS, ToolExecutor
from trl_inference_ext.tools.loop import run_tool_loop
from trl_inference_ext.tools.worker import TRUNCATION_MARK
from trl_inference_ext.trl import rollout_func

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc; memory caps need Linux")

DEADLINE = 3.0
MARGIN = 10.0
MiB = 2**20
FAULTY = {
    name: getattr(ft, name)
    for name in (
        "multiply",
        "async_add",
        "sleep_for",
        "async_sleep_for",
        "busy_loop",
        "exit_process",
        "read_null_pointer",
        "send_sigsegv",
        "allocate",
        "allocate_gradually",
        "huge_output",
        "raise_error",
        "call_sys_exit",
        "start_child_and_hang",
    )
}


def call(name: str, **arguments) -> ToolCall:
    return ToolCall(name, arguments, "", 0, 0)


def processes() -> list[tuple[int, int, str, str]]:
    """`(pid, ppid, state, command line)` of every process this user can see."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        out.append((int(entry), int(fields[1]), fields[0], cmdline))
    return out


def leftovers() -> list[tuple[int, int, str, str]]:
    """Our tool workers, zombie children, and processes a tool started, that are still around."""
    me = os.getpid()
    return [
        p for p in processes() if (p[1] == me and ("spawn_main" in p[3] or p[2] == "Z")) or ft.GRANDCHILD_MARK in p[3]
    ]


@pytest.fixture
def no_process_left():
    """Asserts that the test leaves no new worker, zombie or tool-started process behind."""
    before = {p[0] for p in leftovers()}
    yield
    end = time.monotonic() + 10.0
    while (left := [p for p in leftovers() if p[0] not in before]) and time.monotonic() < end:
        time.sleep(0.1)
    assert left == []


@linux_only
def test_fault_batch_in_worker_processes(capsys, no_process_left):
    calls = [
        call("multiply", a=2, b=3),
        call("sleep_for", seconds=120),
        call("exit_process", code=3),
        call("async_add", a=1, b=2),
        call("read_null_pointer"),
        call("send_sigsegv"),
        call("multiply", a=4, b=5),
        call("allocate", megabytes=4096),
        call("allocate", megabytes=8),
        call("huge_output", chars=5_000_000),
        call("raise_error", message="bad input"),
        call("call_sys_exit"),
        call("async_sleep_for", seconds=120),
        call("busy_loop", seconds=120),
        call("start_child_and_hang"),
        call("multiply", a=6, b=7),
    ]
    executor = ToolExecutor(
        FAULTY, timeout=DEADLINE, max_workers=len(calls), memory_limit=512 * MiB, max_output_chars=1000
    )
    try:
        warm = executor.run([call("multiply", a=i, b=i) for i in range(len(calls))])  # every worker started
        assert [r.content for r in warm] == [str(i * i) for i in range(len(calls))]

        start = time.perf_counter()
        results = executor.run(calls)
        fault_wall = time.perf_counter() - start
        assert fault_wall < DEADLINE + MARGIN

        by_kind = [(r.name, r.ok, r.error) for r in results]
        assert by_kind == [
            ("multiply", True, None),
            ("sleep_for", False, "timeout"),
            ("exit_process", False, "crashed"),
            ("async_add", True, None),
            ("read_null_pointer", False, "crashed"),
            ("send_sigsegv", False, "crashed"),
            ("multiply", True, None),
            ("allocate", False, "memory"),
            ("allocate", True, None),
            ("huge_output", True, None),
            ("raise_error", False, "exception"),
            ("call_sys_exit", False, "exception"),
            ("async_sleep_for", False, "timeout"),
            ("busy_loop", False, "timeout"),
            ("start_child_and_hang", False, "timeout"),
            ("multiply", True, None),
        ]
        assert [results[i].content for i in (0, 3, 6, 8, 15)] == ["6", "3", "20", "8", "42"]
        assert "exited with code 3" in results[2].content
        assert "SIGSEGV" in results[4].content and "SIGSEGV" in results[5].content
        assert "out of memory" in results[7].content
        assert results[9].content == "x" * 1000 + TRUNCATION_MARK
        assert "ValueError: bad input" in results[10].content
        assert f"timed out after {DEADLINE:g}s" in results[1].content

        # The killed and crashed workers were replaced: the executor serves the next batch, with one deadline again.
        start = time.perf_counter()
        again = executor.run([call("multiply", a=7, b=8), call("sleep_for", seconds=120), call("async_add", a=2, b=2)])
        next_wall = time.perf_counter() - start
        assert [(r.content, r.error) for r in again] == [
            ("56", None),
            (f"Error: tool 'sleep_for' timed out after {DEADLINE:g}s.", "timeout"),
            ("4", None),
        ]
        assert next_wall < DEADLINE + MARGIN
    finally:
        executor.close()
    with capsys.disabled():
        print(
            f"\nfault batch of {len(calls)} calls: {fault_wall:.2f}s; next batch: {next_wall:.2f}s (deadline {DEADLINE}s)"
        )


@linux_only
def test_worker_processes_queue_calls_within_one_deadline(no_process_left):
    """Fewer workers than calls: calls wait for a free worker, and the turn still ends at its one deadline."""
    hanging = 5  # one timeout per hanging call would take 5 x 3s, past the bound below
    calls = [call("multiply", a=i, b=2) for i in range(6)] + [call("sleep_for", seconds=120)] * hanging
    with ToolExecutor(FAULTY, timeout=DEADLINE, max_workers=4) as executor:
        executor.run([call("multiply", a=1, b=1)] * 4)  # start the workers
        start = time.perf_counter()
        results = executor.run(calls)
        wall = time.perf_counter() - start
    assert [r.content for r in results[:6]] == [str(2 * i) for i in range(6)]
    assert [r.error for r in results[6:]] == ["timeout"] * hanging  # the fifth never found a free worker
    assert wall < DEADLINE + MARGIN < hanging * DEADLINE


@linux_only
def test_memory_cap_stops_a_tool_that_fills_memory_step_by_step(no_process_left):
    with ToolExecutor(FAULTY, timeout=60.0, max_workers=2, memory_limit=128 * MiB) as executor:
        filled, fits = executor.run(
            [call("allocate_gradually", megabytes=2048), call("allocate_gradually", megabytes=16)]
        )
        assert (filled.ok, filled.error, fits.content) == (False, "memory", "16")
        assert executor.run([call("allocate_gradually", megabytes=16)])[0].content == "16"  # a fresh worker


def test_threads_share_one_deadline_per_turn():
    hanging, timeout = 12, 1.0
    calls = [call("sleep_for", seconds=30)] * (hanging - 1) + [
        call("async_sleep_for", seconds=30),
        call("multiply", a=3, b=4),
        call("huge_output", chars=10**6),
    ]
    executor = ToolExecutor(FAULTY, timeout=timeout, max_workers=16, isolation="thread", max_output_chars=50)
    start = time.perf_counter()
    results = executor.run(calls)
    wall = time.perf_counter() - start
    executor.close()
    assert wall < timeout + MARGIN / 2 < hanging * timeout  # one deadline for the turn, not one per call
    assert [r.error for r in results] == ["timeout"] * hanging + [None, None]
    assert results[-2].content == "12" and results[-1].content == "x" * 50 + TRUNCATION_MARK


def test_process_isolation_refuses_tools_it_cannot_send():
    def local_tool(x: int) -> int:
        return x

    for fn in (lambda x: x, local_tool):
        with pytest.raises(TypeError, match=r"Tool 'bad' cannot be sent to a worker process.*isolation='thread'"):
            ToolExecutor({"bad": fn})
    with ToolExecutor({"ok": local_tool}, isolation="thread") as executor:
        assert executor.run([call("ok", x=2)])[0].content == "2"


@linux_only
def test_worker_that_cannot_import_a_tool_raises(no_process_left):
    ghost = types.ModuleType("ghost_tools")  # importable here, not in a new interpreter
    ghost.multiply = types.FunctionType(ft.multiply.__code__, {}, "multiply")
    ghost.multiply.__module__ = "ghost_tools"
    sys.modules["ghost_tools"] = ghost
    try:
        executor = ToolExecutor({"multiply": ghost.multiply})
        with pytest.raises(RuntimeError, match=r"could not load the tools.*ghost_tools"):
            executor.run([call("multiply", a=1, b=2)])
        with pytest.raises(RuntimeError, match="closed"):
            executor.run([call("multiply", a=1, b=2)])
    finally:
        del sys.modules["ghost_tools"]


def test_executor_arguments_are_checked():
    with pytest.raises(ValueError, match="tool_isolation"):
        ToolExecutor({}, isolation="fork")
    with pytest.raises(ValueError, match="tool_memory_limit"):
        ToolExecutor({}, isolation="thread", memory_limit=MiB)
    with pytest.raises(ValueError, match="tool_memory_limit"):
        ToolExecutor({}, memory_limit=0)
    with pytest.raises(ValueError, match="max_tool_output_chars"):
        ToolExecutor({}, max_output_chars=0)
    with pytest.raises(ValueError, match="max_workers"):
        ToolExecutor({}, max_workers=0)
    with ToolExecutor({}) as executor:  # no call, no worker
        assert executor.run([]) == [] and executor.max_output_chars == MAX_OUTPUT_CHARS


@pytest.fixture(scope="module")
def tool_inference(tool_model_dir):
    return InferenceModule(tool_model_dir, device="cpu", dtype="float32", tool_parser="hermes")


PROMPT = [{"role": "user", "content": "add 2 and 3"}]


@linux_only
def test_tool_loop_in_worker_processes(tool_inference, no_process_left):
    (rollout,) = run_tool_loop(
        tool_inference, [PROMPT], tools=[add], do_sample=False, max_new_tokens=120, tool_isolation="process"
    )
    assert [r.content for r in rollout.tool_results] == ["5"] and rollout.finish_reason == "stop"

    # The same model, its call now served by a tool that segfaults: both rollouts get an error and go on.
    crashed = run_tool_loop(
        tool_inference,
        [PROMPT, PROMPT],
        tools=[add],
        functions={"add": ft.crashing_add},
        do_sample=False,
        max_new_tokens=120,
        tool_isolation="process",
        tool_memory_limit=256 * MiB,
    )
    for r in crashed:
        assert [(t.ok, t.error) for t in r.tool_results] == [(False, "crashed")]
        assert "SIGSEGV" in r.tool_results[0].content and r.finish_reason in ("stop", "length")
        assert r.env_mask.count(0) > 0  # the error message was shown to the model as a tool result


def test_tool_loop_runs_a_turns_calls_under_one_deadline(tool_inference):
    """Every rollout of the batch calls a tool that hangs: the turn takes one deadline, not one per rollout."""
    n, timeout = 5, 4.0

    def loop(tool):
        start = time.perf_counter()
        rollouts = run_tool_loop(
            tool_inference,
            [PROMPT] * n,
            tools=[add],
            functions={"add": tool},
            do_sample=False,
            max_new_tokens=120,
            max_tool_turns=1,
            tool_timeout=timeout,
            tool_isolation="thread",
        )
        return rollouts, time.perf_counter() - start

    failing, generation = loop(ft.raise_error)  # fails at once (unexpected arguments): the time generation takes
    hanging, wall = loop(ft.slow_add)
    assert [[t.error for t in r.tool_results] for r in failing] == [["exception"]] * n
    assert [[t.error for t in r.tool_results] for r in hanging] == [["timeout"]] * n
    assert wall - generation < (n - 1) * timeout  # about one deadline (4s); one per rollout would be 5 x 4s


@linux_only
def test_rollout_func_builds_one_executor_for_all_steps(tool_inference, no_process_left):
    with pytest.raises(ValueError, match="tool_isolation"):
        rollout_func(tools=[add], tool_isolation="subinterpreter")
    with pytest.raises(ValueError, match="tool_memory_limit"):
        rollout_func(tools=[add], tool_isolation="thread", tool_memory_limit=MiB)
    assert rollout_func(tools=[add], tool_isolation="thread").tool_executor.isolation == "thread"

    fn = rollout_func(tools=[add], tool_timeout=5.0, tool_memory_limit=256 * MiB, max_tool_output_chars=100)
    executor = fn.tool_executor
    assert (executor.isolation, executor.timeout, executor.memory_limit) == ("process", 5.0, 256 * MiB)
    try:
        for _ in range(2):  # two "steps": the same executor and its workers serve both
            out = fn._rollouts(tool_inference, [PROMPT, PROMPT], {"max_new_tokens": 120, "do_sample": False})
            assert [[t["content"] for t in results] for results in out["tool_results"]] == [["5"], ["5"]]
        assert fn.tool_executor is executor
    finally:
        fn.close()
