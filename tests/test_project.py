"""The front door stays true: CI runs the README's test line, and the code passes ruff."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _readme_setup_lines() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    return re.findall(r"```sh\n(.+?)\n```", readme)[:2]


def test_ci_runs_exactly_the_readme_test_line():
    start_line, test_line = _readme_setup_lines()
    assert "batching-harness" in start_line and "pytest" in test_line
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_line in ci_lines


def test_sandbox_runtime_is_pinned_exactly():
    import json

    pinned = json.loads((ROOT / "sandbox" / "package.json").read_text())["dependencies"]
    version = pinned["@anthropic-ai/sandbox-runtime"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", version), "pin an exact version, not a range"
    assert tuple(map(int, version.split("."))) >= (0, 0, 83)
    assert (ROOT / "sandbox" / "package-lock.json").exists()


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is not installed")
def test_ruff_is_clean():
    result = subprocess.run(["ruff", "check", "batching_harness.py", "tests"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
