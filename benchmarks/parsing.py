"""Tool-call parsing benchmark: throughput of every parser on realistic and on adversarial text.

- realistic: model-like outputs of a few KB (prose, markdown, an occasional code block or `<think>` section) holding
  0-3 calls in the parser's own format; MB/s over all samples, best of a few repeats, in CPU time (so that other
  load on a shared machine does not skew it) and in wall-clock time.
- adversarial: 1 MB inputs built to make naive parsers quadratic or recursive (`{{{{...`, endless `<tool_call>`
  openings, `[[[[...]]]]`, `f(f(f(...`, huge strings, floods of small objects, tags inside qwen3_xml values...);
  the slowest input per parser is reported, with how its time grows from 256 KB to 1 MB (4x: linear), and the full
  matrix below the summary.

    python benchmarks/parsing.py            # 2000 realistic samples per parser, 3 repeats
    python benchmarks/parsing.py --quick    # 300 samples, 1 repeat: well under a minute

The tables are printed and appended to `benchmarks/RESULTS.md`.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._results import append_results
from trl_inference_ext.tools.parsers import PARSER_NAMES, ToolParser, get_format, get_parser

MB = 1 << 20
TARGET_MB_S = 20.0
MIN_GROWTH_S = 0.02
"""Adversarial inputs parsed faster than this at 1 MB are left out of the growth column (timer noise)."""

_WORDS = (
    "the model should first check whether the user's request needs a tool call or can be answered directly "
    "results may vary depending on the query (for example, a search with filters) and it's worth noting that "
    "values like 3.14, -7 and 1e5 appear in prose too; see [the docs](https://example.com/docs) for details"
).split()

_TOOL_NAMES = ("search", "get_weather", "run_python", "read_file", "calendar.create_event")


def _prose(rng: random.Random, words: int) -> str:
    sentences = []
    while words > 0:
        count = min(words, rng.randint(8, 20))
        words -= count
        sentence = " ".join(rng.choice(_WORDS) for _ in range(count))
        sentences.append(sentence[0].upper() + sentence[1:] + rng.choice((".", ".", "!", "?", ":")))
    text = " ".join(sentences)
    if rng.random() < 0.3:
        text += "\n\n- first point (see above)\n- second point: `x = f(y)`\n"
    if rng.random() < 0.15:
        text += '\n```python\nconfig = {"retries": 3, "mode": "fast"}\nprint(config["mode"])\n```\n'
    return text


def _arguments(rng: random.Random) -> dict[str, Any]:
    pool: list[tuple[str, Any]] = [
        ("query", rng.choice(("Python tutorials", 'say "hi"', "naïve café ☕", "path\\to\\file"))),
        ("max_results", rng.randint(1, 50)),
        ("temperature", round(rng.uniform(-5, 40), 2)),
        ("verbose", rng.random() < 0.5),
        ("cursor", None),
        ("tags", ["a", "b", rng.randint(0, 9)]),
        ("filters", {"lang": "en", "years": [2020, 2024], "strict": False}),
    ]
    return dict(rng.sample(pool, rng.randint(0, len(pool))))


def realistic_samples(fmt: str, count: int, seed: int = 0) -> tuple[list[str], int]:
    """Model-like outputs whose calls are written by the renderer of format `fmt`, and the number of calls they hold.

    `auto` samples use the format `auto` prompts with (`registry.DEFAULT_FORMAT`).
    """
    rng = random.Random(seed)
    samples, total_calls = [], 0
    for _ in range(count):
        calls = [(rng.choice(_TOOL_NAMES), _arguments(rng)) for _ in range(rng.choice((0, 1, 1, 2, 3)))]
        total_calls += len(calls)
        parts = []
        if rng.random() < 0.3:
            parts.append(f"<think>\n{_prose(rng, 80)}\n</think>\n")
        parts.append(_prose(rng, rng.randint(200, 600)))
        if calls:
            parts.append("\n\n" + get_format(fmt).render(calls) + "\n")
        if rng.random() < 0.3:
            parts.append(_prose(rng, 40))
        samples.append("".join(parts))
    return samples, total_calls


_QWEN3_VALUE = "<tool_call>\n<function=f>\n<parameter=x>\n"


def adversarial_inputs(size: int = MB) -> dict[str, str]:
    """Inputs of about `size` characters (1 MB by default) that make naive parsers quadratic, recursive or slow."""
    return {
        "open_braces": "{" * size,
        "open_brackets": "[" * size,
        "deep_nesting": "[" * (size // 2) + "]" * (size // 2),
        "tool_call_openings": "<tool_call>" * (size // 11),
        "f_openings": "f(" * (size // 2),
        "f_kw_openings": "f(a=" * (size // 4),
        "long_string": '{"name": "a", "arguments": {"x": "' + "a" * size,
        "escaped_quotes": '{"name": "a", "arguments": {"x": "' + '\\"' * (size // 2),
        "quotes": "{" + '"' * size,
        "empty_objects": "{}" * (size // 2),
        "unclosed_calls": '{"name":"a",' * (size // 12),
        "name_key_flood": '{"name": 1, "x": 2}' * (size // 19),
        "invalid_calls": '{"name": "a", "arguments": {"x": 1,}}' * (size // 37),
        "mistral_names": "[TOOL_CALLS]" + "a{" * (size // 2),
        "invoke_openings": '<invoke name="a"><parameter name="x">' * (size // 37),
        "qwen3_openings": "<tool_call><function=a><parameter=b>" * (size // 36),
        "think_openings": "<think>" * (size // 7),
        "identifier": "a" * size,
        "qwen3_value_parameters": _QWEN3_VALUE + "<parameter=a>" * (size // 13),
        "qwen3_value_closes": _QWEN3_VALUE + "</parameter> x" * (size // 14),
        "qwen3_value_quoted_tags": _QWEN3_VALUE + '"<parameter=a>"' * (size // 15),
        "qwen3_value_regions": _QWEN3_VALUE + "<function=a><tool_call>" * (size // 46) + "</function>" * (size // 22),
        "qwen3_unclosed_values": "<tool_call><function=f><parameter=a>1<parameter=b>2</function>" * (size // 62),
    }


def _best_time(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Best CPU time and best wall time over `repeats` runs, in seconds."""
    best_cpu = best_wall = float("inf")
    for _ in range(repeats):
        cpu, wall = time.process_time(), time.perf_counter()
        fn()
        best_cpu = min(best_cpu, time.process_time() - cpu)
        best_wall = min(best_wall, time.perf_counter() - wall)
    return best_cpu, best_wall


def _growth(parser: ToolParser, timings: dict[str, float], full: dict[str, str], quarter: dict[str, str]) -> float:
    """Largest ratio of the CPU time on a 1 MB input to the time on its 256 KB version: 4 is linear, 16 quadratic.

    Only inputs that took at least `MIN_GROWTH_S` at 1 MB (`timings`) are measured again, both sizes best of 3;
    faster ones are timer noise. Returns `nan` when no input is left.
    """
    ratios = []
    for key, seconds in timings.items():
        if seconds >= MIN_GROWTH_S:
            large, small = (
                _best_time(lambda t=inputs[key]: parser.parse(t, strict=True), 3)[0] for inputs in (full, quarter)
            )
            ratios.append(large / max(small, 1e-4))
    return max(ratios, default=float("nan"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer samples and repeats (under a minute)")
    args = parser.parse_args()
    count, repeats = (300, 1) if args.quick else (2000, 3)

    adversarial = adversarial_inputs()
    quarter = adversarial_inputs(MB // 4)
    summary = [
        "| parser | realistic MB/s (CPU) | realistic MB/s (wall) | samples | avg KB/sample | ok calls found / expected "
        "| adversarial worst MB/s (CPU) | worst input (ms CPU) | adversarial growth, 4x size (linear: 4) |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    matrix_rows = []
    for name in PARSER_NAMES:
        tool_parser = get_parser(name)
        samples, expected = realistic_samples(name, count)
        size = sum(len(sample.encode()) for sample in samples)
        found = sum(len([call for call in tool_parser.parse(sample, strict=True) if call.ok]) for sample in samples)
        cpu, wall = _best_time(lambda p=tool_parser, s=samples: [p.parse(x, strict=True) for x in s], repeats)
        realistic = size / MB / cpu
        timings = {
            key: _best_time(lambda p=tool_parser, t=text: p.parse(t, strict=True), repeats)[0]
            for key, text in adversarial.items()
        }
        worst = max(timings, key=timings.__getitem__)
        growth = _growth(tool_parser, timings, adversarial, quarter)
        worst_mb_s = len(adversarial[worst].encode()) / MB / timings[worst]
        flag = "" if realistic >= TARGET_MB_S else " (below target)"
        summary.append(
            f"| {name} | {realistic:.1f}{flag} | {size / MB / wall:.1f} | {count} | {size / count / 1024:.1f} "
            f"| {found} / {expected} | {worst_mb_s:.1f} | {worst} ({timings[worst] * 1000:.0f}) | {growth:.1f} |"
        )
        matrix_rows.append((name, timings))
        print(summary[-1], flush=True)

    keys = list(adversarial)
    matrix = ["| input | " + " | ".join(name for name, _ in matrix_rows) + " |"]
    matrix.append("|---|" + "---:|" * len(matrix_rows))
    for key in keys:
        matrix.append(f"| {key} | " + " | ".join(f"{t[key] * 1000:.0f}" for _, t in matrix_rows) + " |")
    table = (
        "\n".join(summary) + "\n\nAdversarial inputs (1 MB each), CPU milliseconds per parse:\n\n" + "\n".join(matrix)
    )
    print()
    print(table)
    notes = (
        f"Target: >= {TARGET_MB_S:.0f} MB/s on realistic text per parser, measured in CPU time (`time.process_time`, "
        "best of the repeats) so that other load on a shared machine does not skew it; the wall-clock column is "
        "given for reference. Growth: the largest ratio, over the adversarial inputs that take at least "
        f"{MIN_GROWTH_S * 1000:.0f} ms at 1 MB, of the CPU time at 1 MB to the time at 256 KB, both best of 3 (4 for "
        "linear work, 16 for quadratic; about 1 where the calls cap, `MAX_CALLS`, is reached); nan: no input took that "
        "long. Calls are written by each format's renderer (`tools.parsers.registry.FORMATS`); `auto` "
        "samples use the hermes format (read by its first format, qwen3_xml). Every parse is strict, so a parser that "
        "raises stops the benchmark."
    )
    append_results("Tool-call parsing" + (" (--quick)" if args.quick else ""), table, notes)


if __name__ == "__main__":
    main()
