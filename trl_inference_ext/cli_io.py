"""Files of the `trl-inference` command: validated JSONL input rows and resumable JSONL output.

Every problem with the user's files is an `InputError` whose message starts with `file:line`, so the command can
report it in one line. Input is read and checked in full before any output is written. An output file that already
exists is scanned by `scan_output`: input rows whose output rows are all there are skipped, and an unfinished tail
(a line cut short by a killed run, or a prompt with only some of its samples) is cut off and redone.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

from .errors import InputError


@dataclass(frozen=True)
class Row:
    """One input row.

    Attributes:
        index (`int`): 0-based position among all input rows; written to the output as `index`.
        source (`str`): Where the row came from, for error messages: `"file.jsonl:12"` or `"--prompt #2"`.
        data (`dict[str, Any]`): The row's fields.
    """

    index: int
    source: str
    data: dict[str, Any]


def one_line(error: BaseException) -> str:
    """The message of `error` with its whitespace (newlines included) collapsed, so it prints as one line."""
    return " ".join(str(error).split()) or type(error).__name__


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_message(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and isinstance(value.get("role"), str)
        and (value.get("content") is None or isinstance(value["content"], (str, list)))
    )


def prompt_problem(value: Any) -> str | None:
    """Why `value` cannot be a prompt, or `None` when it can.

    A prompt is a non-empty string, a non-empty list of token ids, or a non-empty list of chat messages
    (objects with a string `role`; the chat template reads the rest).
    """
    if isinstance(value, str):
        return None if value else "`prompt` is an empty string"
    if isinstance(value, list) and value:
        if all(_is_int(t) for t in value):
            return None
        if all(_is_message(m) for m in value):
            return None
    return (
        "`prompt` must be a non-empty string, a list of token ids or a list of chat messages "
        f'({{"role": ..., "content": ...}}), got {_describe(value)}'
    )


def response_problem(value: Any) -> str | None:
    """Why `value` cannot be a response to score (a non-empty string or list of token ids), or `None`."""
    if isinstance(value, str):
        return None if value else "`response` is an empty string"
    if isinstance(value, list) and value and all(_is_int(t) for t in value):
        return None
    return f"`response` must be a non-empty string or a list of token ids, got {_describe(value)}"


def _describe(value: Any) -> str:
    text = json.dumps(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def read_jsonl(path: str, checks: dict[str, Callable[[Any], str | None]], start: int = 0) -> list[Row]:
    """Reads and validates a JSONL file of objects; blank lines are skipped.

    Args:
        path (`str`): The file.
        checks (`dict[str, Callable]`): For each required field, a function returning why a value is invalid
            (or `None`).
        start (`int`, *optional*, defaults to 0): Index of the file's first row (rows given before it elsewhere).

    Returns:
        `list[Row]`: The rows, indexed from `start`.

    Raises:
        InputError: If the file cannot be read, is empty, or a line is not valid JSON, not an object, lacks a
            field or has an invalid one; the message names `path:line`.
    """
    try:
        with open(path, "rb") as f:
            raw_lines = f.read().split(b"\n")
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, not a JSONL file") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or one_line(e)}") from None
    rows: list[Row] = []
    for n, raw in enumerate(raw_lines, 1):
        where = f"{path}:{n}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"{where}: not valid UTF-8 (byte {e.start + 1})") from None
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: invalid JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(data, dict):
            raise InputError(f"{where}: expected a JSON object, got {type(data).__name__}")
        missing = [k for k in checks if k not in data]
        if missing:
            raise InputError(f"{where}: missing field(s) {', '.join(missing)} (has {', '.join(data) or 'none'})")
        for problem in (check(data[k]) for k, check in checks.items()):
            if problem:
                raise InputError(f"{where}: {problem}")
        rows.append(Row(start + len(rows), where, data))
    if not rows:
        raise InputError(f"{path}: no rows (the file is empty)")
    return rows


@dataclass(frozen=True)
class Resume:
    """What an existing output file already holds.

    Attributes:
        done (`frozenset[int]`): Indices of the input rows whose output rows are all in the file.
        keep (`int`): Bytes at the start of the file to keep; what follows is an unfinished tail to redo.
        size (`int`): Size of the file in bytes (0 when it does not exist).
        dropped_lines (`int`): Lines in the unfinished tail.
    """

    done: frozenset[int]
    keep: int
    size: int
    dropped_lines: int


Matcher = Callable[[dict[str, Any], Row, int], "str | None"]
"""`matches(record, row, k)`: why output record `record`, the `k`-th for input row `row`, was not written from this
input with these settings, or `None` when it was."""


def scan_output(path: str, rows: Sequence[Row], per_row: int, matches: Matcher) -> Resume:
    """Scans an existing output file to resume a run.

    Output rows of one input row are written together, `per_row` of them in order, each with its input row's
    `index`. Complete groups are kept. Only the end of the file may be unfinished: a last line without its newline
    or not valid JSON (a killed run), then the rows of one input row with fewer than `per_row` of them.

    Args:
        path (`str`): The output file; a missing file is an empty one.
        rows (`Sequence[Row]`): The input rows, `rows[i].index == i`.
        per_row (`int`): Output rows per input row.
        matches (`Matcher`): Checks that a record belongs to its input row under the current settings.

    Raises:
        InputError: If the file cannot be read, or holds something other than this command's output for this input
            and these settings (the message names `path:line` and suggests `--overwrite`).
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return Resume(frozenset(), 0, 0, 0)
    except IsADirectoryError:
        raise InputError(f"--output {path}: is a directory") from None
    except OSError as e:
        raise InputError(f"--output {path}: cannot read: {e.strerror or one_line(e)}") from None
    hint = "it is not this command's output for this input and these settings; pass --overwrite to replace it"
    done: set[int] = set()
    group: int | None = None  # input index of the unfinished group
    count = 0  # its records so far
    keep = offset = 0
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    for n, raw in enumerate(lines, 1):
        last = n == len(lines)
        end = offset + len(raw) + 1
        if last and not data.endswith(b"\n"):
            break  # cut short by a killed run
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            if last:
                break
            raise InputError(f"{path}:{n}: not valid JSON; {hint}") from None
        index = record.get("index") if isinstance(record, dict) else None
        if not _is_int(index) or not 0 <= index < len(rows):
            raise InputError(f"{path}:{n}: no `index` of an input row (0 to {len(rows) - 1}); {hint}")
        if group is not None and index != group:
            where = rows[group].source
            raise InputError(f"{path}:{n}: input {where} has only {count} of its {per_row} rows before this; {hint}")
        if index in done:
            raise InputError(f"{path}:{n}: a row too many for input {rows[index].source}; {hint}")
        problem = matches(record, rows[index], count)
        if problem:
            raise InputError(f"{path}:{n}: {problem} (input {rows[index].source}); {hint}")
        group, count = index, count + 1
        if count == per_row:
            done.add(index)
            group, count, keep = None, 0, end
        offset = end
    dropped = data[keep:].count(b"\n") + (not data.endswith(b"\n") and len(data) > keep)
    return Resume(frozenset(done), keep, len(data), dropped)


def check_output_path(path: str, inputs: Sequence[str]) -> None:
    """Checks that `path` can be written and is none of the input files.

    Raises:
        InputError: If its folder does not exist, it is a folder, it cannot be written, or it is one of `inputs`.
    """
    target = Path(path)
    if not target.parent.is_dir():
        raise InputError(f"--output {path}: folder {str(target.parent)!r} not found")
    if target.is_dir():
        raise InputError(f"--output {path}: is a directory")
    if not os.access(target if target.exists() else target.parent, os.W_OK):
        raise InputError(f"--output {path}: permission denied")
    for source in inputs:
        if target.exists() and os.path.samefile(target, source):
            raise InputError(f"--output {path}: is the input file; choose another output")
