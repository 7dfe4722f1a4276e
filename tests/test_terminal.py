"""Real-terminal tests: the REPL in a pseudo-terminal (pexpect), talking over HTTP to the
local stand-in, as a person would use it. Each test checks that the child really exited."""

from __future__ import annotations

import os
import sqlite3
import sys
from pathlib import Path

import pexpect
import pytest

from tests import fake_api as fa

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.terminal
PROMPT = "›"


@pytest.fixture
def api():
    with fa.FakeAPI(latency_s=2.5) as server:
        yield server


def spawn(api, tmp_path: Path, *args: str) -> pexpect.spawn:
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "TERM": "xterm-256color",
        "LANG": "C.UTF-8",
        "PROMPT_TOOLKIT_NO_CPR": "1",
        "NO_COLOR": "1",
        "ANTHROPIC_API_KEY": "test-key",
        "ANTHROPIC_BASE_URL": api.base_url,
        "BATCHING_HARNESS_HOME": str(tmp_path / "home"),
    }
    child = pexpect.spawn(
        sys.executable,
        [str(ROOT / "batching_harness.py"), "--workdir", str(work), *args],
        env=env,
        cwd=str(work),
        encoding="utf-8",
        timeout=30,
        dimensions=(40, 160),
    )
    child.logfile_read = open(tmp_path / "terminal.log", "a")  # noqa: SIM115 - closed by pexpect
    return child


def finish(child: pexpect.spawn) -> int:
    child.expect(pexpect.EOF, timeout=20)
    child.wait()  # close() alone may kill a child that is still tearing down
    child.close()
    assert not child.isalive()
    return child.exitstatus


def test_turn_with_tool_then_stats_then_ctrl_d(api, tmp_path):
    child = spawn(api, tmp_path)
    child.expect("sandbox")
    child.expect_exact(PROMPT)
    child.sendline("run: echo hello-from-the-tool")
    child.expect("submitted")
    # The spinner's elapsed counter moves while the batch is in progress.
    child.expect(r"waiting 0:0[01]")
    child.expect(r"waiting 0:0[12]")
    child.expect("succeeded after")
    child.expect(r"bash .*echo hello-from-the-tool.*exit 0")
    child.expect("hello-from-the-tool")
    child.expect("Done.")
    child.expect_exact(PROMPT)
    child.sendline("/stats")
    child.expect("session cost")
    child.expect(r"total: paid \$")
    child.expect("How these figures are computed")
    child.expect_exact(PROMPT)
    child.sendeof()
    assert finish(child) == 0
    assert api.count("create") == 2


def test_unknown_command_hint_and_help(api, tmp_path):
    child = spawn(api, tmp_path)
    child.expect_exact(PROMPT)
    child.sendline("/stat")
    child.expect("did you mean /stats")
    child.expect_exact(PROMPT)
    child.sendline("/help")
    child.expect("/resume")
    child.expect_exact(PROMPT)
    child.sendline("/exit")
    assert finish(child) == 0


def test_ctrl_c_then_c_cancels_the_batch(api, tmp_path):
    api.latency_s = 60
    child = spawn(api, tmp_path)
    child.expect_exact(PROMPT)
    child.sendline("run: echo never")
    child.expect(r"waiting 0:01")
    child.sendintr()
    child.expect("c cancel")
    child.send("c")
    child.expect("cancel requested")
    child.expect("canceled")
    child.expect_exact(PROMPT)
    child.sendeof()
    assert finish(child) == 0
    assert api.count("cancel") == 1


def test_ctrl_c_then_d_detaches_and_resume_collects(api, tmp_path):
    api.latency_s = 6
    child = spawn(api, tmp_path)
    child.expect_exact(PROMPT)
    child.sendline("run: echo detached-work")
    child.expect(r"waiting 0:01")
    child.sendintr()
    child.expect("d detach")
    child.send("d")
    child.expect(r"--resume (\S+)")
    session_id = child.match.group(1)
    assert finish(child) == 0
    assert api.count("cancel") == 0

    child = spawn(api, tmp_path, "--resume", session_id)
    child.expect("detached-work", timeout=30)
    child.expect("Done.")
    child.expect_exact(PROMPT)
    child.sendeof()
    assert finish(child) == 0
    assert len(api.batch_ids()) == 2  # the detached turn was never submitted twice
    db = sqlite3.connect(tmp_path / "home" / "journal.db")
    roles = [r[0] for r in db.execute("SELECT role FROM messages ORDER BY id")]
    assert roles == ["user", "assistant", "user", "assistant"]


def test_banner_says_model_workdir_sandbox_and_state(api, tmp_path):
    child = spawn(api, tmp_path, "--no-sandbox", "--model", "claude-haiku-5-5")
    child.expect("claude-haiku-5-5")
    child.expect(str(tmp_path / "work"))
    child.expect(r"OFF \(--no-sandbox\)")
    child.expect(str(tmp_path / "home"))
    child.expect_exact(PROMPT)
    child.sendeof()
    assert finish(child) == 0


def test_ctrl_c_while_a_tool_runs_stops_only_that_tool(api, tmp_path):
    api.latency_s = 0.5
    child = spawn(api, tmp_path)
    child.expect_exact(PROMPT)
    child.sendline("run: sleep 60")
    child.expect("running")
    child.expect("sleep 60")
    import time

    time.sleep(1.5)
    child.sendintr()
    child.expect("interrupted")
    child.expect("The tool reported an error")  # the model got the result and answered
    child.expect_exact(PROMPT)
    child.sendline("/model claude-sonnet-5-5")
    child.expect("cache starts over")
    child.expect_exact(PROMPT)
    child.sendline("/clear")
    child.expect("new conversation")
    child.expect_exact(PROMPT)
    child.sendeof()
    assert finish(child) == 0
    assert api.count("create") == 2
