"""Real tools that misbehave in every way a tool can, for the executor tests.

They live in an importable module so that `spawn`ed worker processes can load them.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import subprocess
import sys
import time


def multiply(a: int, b: int) -> int:
    """Multiplies two integers.

    Args:
        a: First number.
        b: Second number.
    """
    return a * b


async def async_add(a: int, b: int) -> int:
    """Adds two integers after yielding to the event loop.

    Args:
        a: First number.
        b: Second number.
    """
    await asyncio.sleep(0.01)
    return a + b


def sleep_for(seconds: float) -> str:
    """Sleeps, then says so.

    Args:
        seconds: How long to sleep.
    """
    time.sleep(seconds)
    return "slept"


async def async_sleep_for(seconds: float) -> str:
    """Sleeps without blocking the event loop.

    Args:
        seconds: How long to sleep.
    """
    await asyncio.sleep(seconds)
    return "slept"


def busy_loop(seconds: float) -> int:
    """Spins in pure Python.

    Args:
        seconds: How long to spin.
    """
    end, n = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        n += 1
    return n


def exit_process(code: int) -> None:
    """Ends the interpreter at once, skipping all cleanup.

    Args:
        code: Exit status.
    """
    os._exit(code)


def read_null_pointer() -> bytes:
    """Reads address 0 (a segmentation fault)."""
    return ctypes.string_at(0)


def send_sigsegv() -> None:
    """Sends this process a SIGSEGV."""
    os.kill(os.getpid(), signal.SIGSEGV)


def allocate(megabytes: int) -> int:
    """Allocates (and zero-fills) one block of memory.

    Args:
        megabytes: Size of the block.
    """
    return len(bytearray(megabytes * 2**20)) // 2**20


def allocate_gradually(megabytes: int) -> int:
    """Allocates memory one mebibyte at a time, keeping all of it.

    Args:
        megabytes: How much to allocate in all.
    """
    blocks = [bytearray(2**20) for _ in range(megabytes)]
    return len(blocks)


def huge_output(chars: int) -> str:
    """Returns a very long text.

    Args:
        chars: Length of the text.
    """
    return "x" * chars


def raise_error(message: str) -> None:
    """Raises a ValueError.

    Args:
        message: The error message.
    """
    raise ValueError(message)


def call_sys_exit() -> None:
    """Raises SystemExit, as `sys.exit` does."""
    sys.exit(3)


GRANDCHILD_MARK = "faulty-tools-grandchild"


def start_child_and_hang() -> str:
    """Starts a long-running child process (its command line ends with `GRANDCHILD_MARK`), then hangs."""
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", GRANDCHILD_MARK])
    time.sleep(600)
    return "never"


def crashing_add(a: int, b: int) -> int:
    """Adds two integers by crashing the interpreter.

    Args:
        a: First number.
        b: Second number.
    """
    os.kill(os.getpid(), signal.SIGSEGV)
    return a + b


def slow_add(a: int, b: int) -> int:
    """Adds two integers, eventually.

    Args:
        a: First number.
        b: Second number.
    """
    time.sleep(60)
    return a + b
