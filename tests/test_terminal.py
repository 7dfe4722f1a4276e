"""Real-terminal tests: the REPL in a pseudo-terminal (pexpect), talking over HTTP to the
local stand-in, as a person would use it. Each test checks that the child really exited.

Each child pays seconds for the SDK import, so there are few of them, one per kind of
terminal behaviour (the REPL's logic is tested in-process in test_repl.py). The stand-in
holds batches until the test releases them and a FIFO tells when a tool really runs: what
the user sees is waited for, never slept for."""

from __future__ import annotations

import os
import sqlite3
import sys
from pathlib import Path

import pexpect
import pytest

from tests import fake_api as fa
from tests.support import read_fifo

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.terminal
PROMPT = "›"
# A new interpreter pays seconds for the SDK import, more on a busy machine.
STARTUP_S = 60


@pytest.fixture
def api():
    with fa.FakeAPI() as server:
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
        [str(ROOT / "batching_harness.py"), "--workdir", str(work), "--poll-interval", "0.2",
         *args],
        env=env,
        cwd=str(work),
        encoding="utf-8",
        timeout=STARTUP_S,
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
    api.hold = True
    child = spawn(api, tmp_path)
    child.expect("sandbox")
    child.expect_exact(PROMPT)
    child.sendline("run: echo hello-from-the-tool")
    child.expect("submitted")
    # The spinner's elapsed counter moves while the batch is in progress.
    child.expect(r"waiting 0:0(\d)")
    child.expect(f"waiting 0:0{int(child.match.group(1)) + 1}")
    api.hold = False
    api.release()
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


def test_banner_then_commands_and_exit(api, tmp_path):
    child = spawn(api, tmp_path, "--no-sandbox", "--model", "claude-haiku-5-5")
    child.expect("claude-haiku-5-5")
    child.expect(str(tmp_path / "work"))
    child.expect(r"OFF \(--no-sandbox\)")
    child.expect(str(tmp_path / "home"))
    child.expect_exact(PROMPT)
    child.sendline("/stat")
    child.expect("did you mean /stats")
    child.expect_exact(PROMPT)
    child.sendline("/help")
    child.expect("/resume")
    child.expect_exact(PROMPT)
    child.sendline("/exit")
    assert finish(child) == 0


def test_ctrl_c_stops_only_a_running_tool_and_cancels_a_batch(api, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    os.mkfifo(work / "started")
    child = spawn(api, tmp_path)
    child.expect_exact(PROMPT)
    # During a tool: Ctrl-C stops that command; the turn goes on and the model is told.
    child.sendline("run: echo up > started; sleep 60")
    read_fifo(work / "started", STARTUP_S)
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
    assert api.count("create") == 2 and api.count("cancel") == 0
    # During a batch: Ctrl-C, then c, cancels it.
    api.hold = True
    child.sendline("run: echo never")
    child.expect("waiting")
    api.wait_for_batches(3, timeout_s=STARTUP_S)
    api.wait_for("list", api.count("list") + 1, timeout_s=STARTUP_S)  # the REPL is waiting on this batch
    child.sendintr()
    child.expect("c cancel")
    child.send("c")
    child.expect("cancel requested")
    api.release()  # a held batch that was cancelled ends canceled
    child.expect("canceled")
    child.expect_exact(PROMPT)
    child.sendeof()
    assert finish(child) == 0
    assert api.count("cancel") == 1 and api.count("create") == 3


def test_ctrl_c_then_d_detaches_and_resume_collects(api, tmp_path):
    api.hold = True
    child = spawn(api, tmp_path, "--no-sandbox")  # the two tests above run srt in a terminal
    child.expect_exact(PROMPT)
    child.sendline("run: echo detached-work")
    child.expect("waiting")
    api.wait_for("list", 1, timeout_s=STARTUP_S)  # the REPL is waiting on the batch
    child.sendintr()
    child.expect("d detach")
    child.send("d")
    child.expect(r"--resume (\S+) .*--no-sandbox")  # the printed command keeps the flag
    session_id = child.match.group(1)
    assert finish(child) == 0
    assert api.count("cancel") == 0

    api.hold = False
    api.release()
    child = spawn(api, tmp_path, "--resume", session_id, "--no-sandbox")
    child.expect("detached-work")
    child.expect("Done.")
    child.expect_exact(PROMPT)
    child.sendeof()
    assert finish(child) == 0
    assert len(api.batch_ids()) == 2  # the detached turn was never submitted twice
    db = sqlite3.connect(tmp_path / "home" / "journal.db")
    roles = [r[0] for r in db.execute("SELECT role FROM messages ORDER BY id")]
    assert roles == ["user", "assistant", "user", "assistant"]
