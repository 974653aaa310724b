"""`trl-inference generate` / `score` on a tiny model: outputs, one-line input errors, resuming, extra columns."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trl_inference_ext.cli import BROKEN_PIPE, main

PROMPTS = ["add two", "the city", "what is the answer", "count to ten", "name a tool"]
GREEDY = ["--greedy", "--max-new-tokens", "5", "--batch-size", "1"]  # one prompt per call: same numerics every run


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def last_error(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1] if err else ""


def test_generate_and_score(tiny_model_dir, tmp_path):
    out = tmp_path / "gen.jsonl"
    assert main(["generate", "--model", tiny_model_dir, "--prompt", "add two", "--prompt", "the city", "--greedy",
                 "--max-new-tokens", "5", "--num-return-sequences", "2", "--output", str(out)]) == 0  # fmt: skip
    rows = read_jsonl(out)
    assert [r["prompt"] for r in rows] == ["add two", "add two", "the city", "the city"]
    assert [(r["index"], r["sample"]) for r in rows] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert rows[0]["completion"] == rows[1]["completion"] and rows[0]["finish_reason"] in {"stop", "length"}
    assert set(rows[0]) == {"index", "sample", "prompt", "completion", "tool_calls", "finish_reason"}
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps({"prompt": r["prompt"], "response": r["completion"]}) for r in rows))
    scores = tmp_path / "scores.jsonl"
    assert main(["score", "--model", tiny_model_dir, "--pairs", str(pairs), "--output", str(scores)]) == 0
    scored = read_jsonl(scores)
    assert all(s["sum_logprob"] <= 0 and len(s["logprobs"]) > 0 for s in scored)
    assert [s["index"] for s in scored] == [0, 1, 2, 3] and scored[2]["response"] == rows[2]["completion"]
    before = scores.read_bytes()
    assert main(["score", "--model", tiny_model_dir, "--pairs", str(pairs), "--output", str(scores)]) == 0
    assert scores.read_bytes() == before  # complete: nothing redone


def test_adapter_changes_outputs(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False),
    )
    model.save_pretrained(tmp_path / "adapter")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "add two", "response": " the answer"}))
    for name, extra in (("base", []), ("tuned", ["--adapter", str(tmp_path / "adapter")])):
        assert (
            main(["score", "--model", tiny_model_dir, "--pairs", str(pairs), "--output", str(tmp_path / name), *extra])
            == 0
        )
    base, tuned = (json.loads((tmp_path / n).read_text())["sum_logprob"] for n in ("base", "tuned"))
    assert abs(base - tuned) > 1e-3


def test_bad_input_is_one_line_with_file_and_line(tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "ok"}) + "\n\n" + json.dumps({"question": "x"}) + "\n")
    assert main(["generate", "--model", tiny_model_dir, "--prompts", str(bad)]) == 2
    assert last_error(capsys) == f"trl-inference generate: error: {bad}:3: missing field(s) prompt (has question)"

    bad.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"prompt": 7}) + "\n")
    assert main(["generate", "--model", tiny_model_dir, "--prompts", str(bad)]) == 2
    assert f"{bad}:2: `prompt` must be a non-empty string, a list of token ids or a list of chat messages" in (
        last_error(capsys)
    )

    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "a", "response": {}}])
    assert main(["score", "--model", tiny_model_dir, "--pairs", pairs]) == 2
    assert f"{pairs}:2: `response` must be a non-empty string or a list of token ids" in last_error(capsys)

    with pytest.raises(SystemExit) as exit_info:  # usage errors: argparse's exit code 2
        main(["generate", "--model", tiny_model_dir])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        main(["generate", "--model", tiny_model_dir, "--prompt", "x", "--max-new-tokens", "0"])
    assert "--max-new-tokens: must be >= 1" in last_error(capsys)


def test_user_errors_have_no_traceback(tiny_model_dir, tmp_path):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"prompt": "fine"}\n{"prompt": "broken\n')
    missing = tmp_path / "missing.jsonl"
    cli = [sys.executable, "-m", "trl_inference_ext.cli", "generate", "--model", tiny_model_dir, "--prompts"]
    for path, message in ((missing, f"{missing}: file not found"), (bad, f"{bad}:3: invalid JSON")):
        run = subprocess.run([*cli, str(path)], capture_output=True, text=True, timeout=120)
        assert run.returncode == 2 and run.stdout == ""
        assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
        assert message in run.stderr


def first_line_then_close(command: list[str], tmp_path: Path) -> tuple[bytes, int, str]:
    """Runs `command` with its stdout read up to one line, then closed (as `command | head -1` does).

    Returns:
        `tuple[bytes, int, str]`: The line read, the exit status and what the command wrote on stderr.
    """
    import fcntl

    read_end, write_end = os.pipe()
    if hasattr(fcntl, "F_SETPIPE_SZ"):  # Linux: one page, so that even 64 KiB-page systems hold little
        with contextlib.suppress(OSError):
            fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)
    errors = tmp_path / "stderr.txt"
    try:
        with open(errors, "wb") as stderr:  # a file, not a pipe: stderr never blocks the command
            process = subprocess.Popen(command, stdout=write_end, stderr=stderr)
    finally:
        os.close(write_end)  # the command's copy is then the only writer
    with os.fdopen(read_end, "rb") as reader:
        first = reader.readline()
    status = process.wait(timeout=600)  # only against a hang: the command ends at its next write
    return first, status, errors.read_text(errors="replace")


def assert_quiet_broken_pipe(status: int, stderr: str) -> None:
    assert status == BROKEN_PIPE == 141, stderr
    for noise in ("Traceback", "BrokenPipeError", "Exception ignored"):
        assert noise not in stderr, stderr


@pytest.mark.skipif(os.name != "posix", reason="POSIX pipes and exit statuses")
def test_generate_into_closed_pipe_ends_quietly(tiny_model_dir: str, tmp_path: Path) -> None:
    # 4 prompts x 64 samples, each row echoing a 400-token prompt twice (prompt, prompt_token_ids): about 1 MB, many
    # times what a pipe and the reader's buffer hold, so the CLI writes again after the reader has gone, however fast
    # either side runs.
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": list(range(100 + i, 500 + i))} for i in range(4)])
    command = [sys.executable, "-m", "trl_inference_ext.cli", "generate", "--model", tiny_model_dir,
               "--prompts", prompts, "--greedy", "--max-new-tokens", "1", "--num-return-sequences", "64",
               "--batch-size", "1", "--return-token-ids"]  # fmt: skip
    first, status, stderr = first_line_then_close(command, tmp_path)
    assert first.endswith(b"\n"), stderr
    row = json.loads(first)
    assert (row["index"], row["sample"], row["prompt"]) == (0, 0, list(range(100, 500)))
    assert_quiet_broken_pipe(status, stderr)


@pytest.mark.skipif(os.name != "posix", reason="POSIX pipes and exit statuses")
def test_serve_output_into_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    # `serve` prints its banner to stdout once vLLM is up; a stand-in launcher prints 2 MB through the same path.
    code = """
import sys
from trl_inference_ext.backends.vllm.server import launcher

def banner(argv):
    for i in range(20000):
        print(f"{i:08d} " + "x" * 100)
    return 0

launcher.main = banner
from trl_inference_ext.cli import main
raise SystemExit(main(["serve", "model"]))
"""
    first, status, stderr = first_line_then_close([sys.executable, "-c", code], tmp_path)
    assert first == b"00000000 " + b"x" * 100 + b"\n", stderr
    assert_quiet_broken_pipe(status, stderr)


@pytest.mark.parametrize(
    "bad_row",
    [{"prompt": ""}, {"prompt": [1, 2, 10**6]}],  # caught reading the file / caught against the model's vocabulary
    ids=["empty-prompt", "token-id-out-of-vocab"],
)
def test_bad_later_row_writes_nothing(tiny_model_dir, tmp_path, capsys, bad_row):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS * 2] + [bad_row])
    out = tmp_path / "out.jsonl"
    args = ["generate", "--model", tiny_model_dir, "--prompts", prompts, *GREEDY, "--output", str(out)]
    assert main(args) == 2
    assert f"{prompts}:11: " in last_error(capsys)
    assert not out.exists()
    out.write_text("")  # an existing (resumable) output is left as it was, too
    assert main(args) == 2 and out.read_text() == ""
    assert main([*args, "--overwrite"]) == 2 and out.read_text() == ""


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory):
    """A complete greedy run with 2 samples per prompt: (its output lines, its arguments without --output)."""
    folder = tmp_path_factory.mktemp("reference")
    prompts = write_jsonl(folder / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    out = folder / "out.jsonl"
    args = ["generate", "--model", tiny_model_dir, "--prompts", prompts, *GREEDY, "--num-return-sequences", "2"]
    assert main([*args, "--output", str(out)]) == 0
    lines = out.read_text().splitlines(keepends=True)
    assert len(lines) == 2 * len(PROMPTS)
    return lines, args


def sentinel(line):
    """The same output row with a completion no model run writes: it survives only if the row is skipped."""
    return json.dumps({**json.loads(line), "completion": "SENTINEL"}) + "\n"


def test_resume_skips_complete_rows(reference, tmp_path, capsys):
    lines, args = reference
    out = tmp_path / "out.jsonl"
    out.write_text("".join(sentinel(line) for line in lines[:4]))  # prompts 0 and 1 done
    assert main([*args, "--output", str(out)]) == 0
    assert "resuming: 2 of 5 input rows already done" in capsys.readouterr().err
    result = out.read_text().splitlines(keepends=True)
    assert result[:4] == [sentinel(line) for line in lines[:4]]  # kept, not regenerated
    assert result[4:] == lines[4:]  # the 3 other prompts generated, as in one run

    stat = out.stat()
    assert main([*args, "--output", str(out)]) == 0  # complete: left as it is
    assert "nothing left to do" in capsys.readouterr().err
    assert out.read_text().splitlines(keepends=True) == result and out.stat().st_mtime_ns == stat.st_mtime_ns

    assert main([*args, "--output", str(out), "--overwrite"]) == 0
    assert out.read_text().splitlines(keepends=True) == lines


def test_resume_redoes_unfinished_tail(reference, tmp_path, capsys):
    lines, args = reference
    out = tmp_path / "out.jsonl"
    # prompt 0 complete; prompt 1 has its first sample and half of its second line, as a killed run leaves it
    out.write_text(sentinel(lines[0]) + sentinel(lines[1]) + sentinel(lines[2]) + lines[3][: len(lines[3]) // 2])
    assert main([*args, "--output", str(out)]) == 0
    assert "1 of 5 input rows already done; redoing 2 unfinished line(s)" in capsys.readouterr().err
    assert out.read_text().splitlines(keepends=True) == [sentinel(lines[0]), sentinel(lines[1]), *lines[2:]]


def test_resume_refuses_other_output(reference, tmp_path, capsys):
    lines, args = reference
    out = tmp_path / "out.jsonl"
    other = [json.dumps({**json.loads(line), "prompt": "something else"}) + "\n" for line in lines[:2]]
    for content, message in (
        ("".join(other), "out.jsonl:1: another `prompt`"),
        ("".join(lines[:2]) + "not json\n" + lines[2], "out.jsonl:3: not valid JSON"),
        (lines[0] + lines[2], "prompts.jsonl:1 has only 1 of its 2 rows before this"),
    ):
        out.write_text(content)
        assert main([*args, "--output", str(out)]) == 2
        error = last_error(capsys)
        assert message in error and "--overwrite" in error
        assert out.read_text() == content
    # the same file with --return-logprobs: rows lack the column, so they are not this run's
    out.write_text("".join(lines[:2]))
    assert main([*args, "--output", str(out), "--return-logprobs"]) == 2
    assert "no logprobs field(s)" in last_error(capsys)
    out.write_text("".join(lines[:2]))
    assert main([*args, "--output", str(out), "--num-return-sequences", "1"]) == 2
    assert "a row too many for input" in last_error(capsys)


def test_chat_applies_to_prompts_file(tiny_model_dir, inference, tmp_path):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "add two"}]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "the city"}, {"prompt": messages}])
    out = tmp_path / "out.jsonl"
    assert (
        main(["generate", "--model", tiny_model_dir, "--prompts", prompts, "--chat", *GREEDY, "--output", str(out)])
        == 0
    )
    rows = read_jsonl(out)
    expected_prompts = [[{"role": "user", "content": "the city"}], messages]
    assert [r["prompt"] for r in rows] == expected_prompts
    for row, prompt in zip(rows, expected_prompts):
        api = inference.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=False)
        assert row["completion"] == api.texts[0]


def test_token_ids_and_logprobs_match_python_api(tiny_model_dir, inference, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS[:3]])
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--model", tiny_model_dir, "--prompts", prompts, *GREEDY, "--output", str(out),
                 "--return-token-ids", "--return-logprobs"]) == 0  # fmt: skip
    rows = read_jsonl(out)
    assert len(rows) == 3
    for row, prompt in zip(rows, PROMPTS):
        api = inference.generate(prompt, max_new_tokens=5, do_sample=False, return_logprobs=True, use_cache=False)
        assert row["prompt_token_ids"] == api.metadata["prompt_token_ids"][0]
        assert row["token_ids"] == api.token_ids[0] and row["completion"] == api.texts[0]
        assert len(row["logprobs"]) == len(row["token_ids"])
        assert row["logprobs"] == pytest.approx(api.logprobs[0].tolist(), abs=1e-5)
    # the ids score exactly what was sampled: `score` gives the sampling log-probs back
    pairs = write_jsonl(
        tmp_path / "pairs.jsonl", [{"prompt": r["prompt_token_ids"], "response": r["token_ids"]} for r in rows]
    )
    scores = tmp_path / "scores.jsonl"
    assert main(["score", "--model", tiny_model_dir, "--pairs", pairs, "--output", str(scores)]) == 0
    for row, scored in zip(rows, read_jsonl(scores)):
        assert scored["logprobs"] == pytest.approx(row["logprobs"], abs=1e-4)


def test_help_shows_defaults_and_resume(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("token budget per completion (as `generate`) (default: 256)", "(default: 8)", "(default: auto)",
                  "(default: float32)", "(default: stdout)", "If it exists, the run resumes", "--overwrite",
                  "--return-token-ids", "--return-logprobs"):  # fmt: skip
        assert shown in text
    with pytest.raises(SystemExit):
        main(["score", "--help"])
    assert "temperature applied to the logits (default: 1.0)" in " ".join(capsys.readouterr().out.split())


def test_console_script_help():
    script = os.path.join(os.path.dirname(sys.executable), "trl-inference")
    if not os.path.exists(script):
        pytest.skip("the package is not installed with its console script")
    run = subprocess.run([script, "generate", "--help"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "(default: 256)" in " ".join(run.stdout.split())
