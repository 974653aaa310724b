"""A wheel builds from the repository and holds the package for users, without the repository's scripts."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_wheel_builds_with_the_package_and_its_extras(tmp_path):
    source = tmp_path / "src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "outputs"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), "."],
        cwd=source,
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("trl_inference_ext-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "trl_inference_ext/module.py" in names and "trl_inference_ext/tools/parsers/hermes.py" in names
    assert not [n for n in names if n.startswith(("recipes/", "examples/", "tests/", "benchmarks/"))]
    metadata = next(zipfile.ZipFile(wheel).read(n).decode() for n in names if n.endswith("METADATA"))
    assert "Requires-Python: >=3.10" in metadata
    assert "Provides-Extra: peft" in metadata and "Provides-Extra: vllm" in metadata
    entry_points = next(zipfile.ZipFile(wheel).read(n).decode() for n in names if n.endswith("entry_points.txt"))
    assert "trl-inference = trl_inference_ext.cli:main" in entry_points
