"""Builders shared by the tool and sandbox tests: real srt, real files, checks made on the host."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import batching_harness_sandbox as sb
import pytest

import batching_harness as bh

EDITOR = "str_replace_based_edit_tool"


def sandbox_missing_reason() -> str | None:
    """Why the real sandbox cannot run here, or None. CI installs all of it, so there the
    sandbox tests run; a developer without it sees exactly what to install."""
    if not sys.platform.startswith("linux"):
        return "the escape suite targets Linux (bubblewrap)"
    if not sb._default_srt_path().exists():
        return "srt is not installed: npm ci --prefix sandbox"
    missing = [tool for tool in ("bwrap", "socat", "rg") if shutil.which(tool) is None]
    if missing:
        return f"not on PATH: {', '.join(missing)} (apt-get install bubblewrap socat ripgrep)"
    return None


def make_policy(tmp_path: Path, **overrides: Any) -> sb.SandboxPolicy:
    workdir, state = tmp_path / "work", tmp_path / "state"
    workdir.mkdir(exist_ok=True)
    state.mkdir(exist_ok=True)
    return sb.SandboxPolicy(workdir=workdir, state_dir=state, **overrides)


@contextmanager
def toolbox(
    policy: sb.SandboxPolicy, timeout_s: float = 20, *, probed: bool = False
) -> Iterator[sb.Toolbox]:
    """probed=True skips the first-use probe (one srt run less) where a test is not about it."""
    tools = sb.Toolbox(sb.BashTool(policy), sb.EditorTool(policy), tool_timeout_s=timeout_s)
    tools.bash._sandbox_checked = probed
    try:
        yield tools
    finally:
        tools.close()


def bash(tools: sb.Toolbox, command: str) -> sb.ToolResult:
    return tools.run("bash", {"command": command})


def edit(tools: sb.Toolbox, **tool_input: Any) -> sb.ToolResult:
    return tools.run(EDITOR, tool_input)


def pids_running(*argv: str) -> list[int]:
    """Host pids whose command line is exactly argv (read from /proc, as the host sees it)."""
    wanted = "\0".join(argv) + "\0"
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace")
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if cmdline == wanted and state != "Z":  # a zombie is dead, only not yet reaped
            found.append(int(entry))
    return found


def still_running_after(argv: tuple[str, ...], timeout_s: float = 5.0) -> list[int]:
    """pids_running(*argv) once they had `timeout_s` to die: a SIGKILLed process leaves
    /proc only when the kernel next runs it, which on a loaded machine is not at once."""
    deadline = time.monotonic() + timeout_s
    while (found := pids_running(*argv)) and time.monotonic() < deadline:
        time.sleep(0.02)
    return found


def placeholders_in(workdir: Path) -> list[str]:
    """srt's placeholder names present in the work dir (as the host sees it)."""
    return [name for name in sb._SRT_PLACEHOLDERS if os.path.lexists(workdir / name)]


# A harness process in miniature: one BashTool running one command, killable from the test.
_CHILD_SCRIPT = """
import sys
import batching_harness  # first: it loads the sandbox module beside it, not an installed one
import batching_harness_sandbox as sb
tool = sb.BashTool(sb.SandboxPolicy(workdir=sys.argv[1], state_dir=sys.argv[2]))
print(tool._private, flush=True)
tool.run(sys.argv[3], 60)
"""


def start_bash_in_child(policy: sb.SandboxPolicy, command: str) -> tuple[subprocess.Popen[str], Path]:
    """A child Python process running `command` through its own BashTool (as the harness
    does), and that tool's private temp dir."""
    root = Path(bh.__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD_SCRIPT, str(policy.workdir), str(policy.state_dir), command],
        cwd=root, env=env, stdout=subprocess.PIPE, text=True,
    )
    assert child.stdout is not None
    return child, Path(child.stdout.readline().strip())


def wait_until(condition: Callable[[], object], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


needs_sandbox = pytest.mark.skipif(
    sandbox_missing_reason() is not None, reason=str(sandbox_missing_reason())
)
"""Mark a test that runs the real srt + bubblewrap: skipped, saying what to install, without."""


def fake_home(tmp_path: Path, monkeypatch: Any) -> Path:
    """A throwaway HOME holding fake credentials (an ssh key, AWS credentials), so deny-read
    checks never touch the real one; tests' `home` fixtures return it."""
    fake = tmp_path / "home"
    for rel, text in ((".ssh/id_test", "FAKE-SSH-KEY"), (".aws/credentials", "FAKE-AWS-KEY")):
        (fake / rel).parent.mkdir(parents=True, exist_ok=True)
        (fake / rel).write_text(text + "\n")
    monkeypatch.setenv("HOME", str(fake))
    return fake
