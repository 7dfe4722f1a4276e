"""Real-terminal tests: the REPL in a pseudo-terminal (pexpect), talking over HTTP to the
local stand-in, as a person would use it. Each test checks that the child really exited.

Each child pays seconds for the SDK import, so there are few of them, one per kind of
terminal behaviour (the REPL's logic is tested in-process in test_repl.py). The stand-in
holds batches until the test releases them and a FIFO tells when a tool really runs: what
the user sees is waited for, never slept for."""

from __future__ import annotations

import os
import re
import secrets
import shlex
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pexpect
import pytest

from tests import fake_api as fa
from tests.support import read_fifo
from tests.zygote import spawn_in_terminal

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.terminal
PROMPT = "›"
# A new interpreter pays seconds for the SDK import, more on a busy machine.
STARTUP_S = 60


@pytest.fixture
def api():
    with fa.FakeAPI() as server:
        yield server


def child_env(api, tmp_path: Path) -> dict[str, str]:
    return {
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


def harness_argv(tmp_path: Path, *args: str) -> list[str]:
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    return [str(ROOT / "batching_harness.py"), "--workdir", str(work), "--poll-interval", "0.2",
            *args]


def spawn(api, tmp_path: Path, *args: str, script: bool = False) -> pexpect.spawn:
    """The REPL on a pseudo-terminal of 40 x 160: forked from the zygote (the SDK imported
    already, about 2 s a start saved), or with `script` as a person starts it,
    `python batching_harness.py`."""
    work = tmp_path / "work"
    argv = harness_argv(tmp_path, *args)
    if script:
        child = pexpect.spawn(sys.executable, argv, env=child_env(api, tmp_path),
                              cwd=str(work), encoding="utf-8", timeout=STARTUP_S,
                              dimensions=(40, 160))
    else:
        child = spawn_in_terminal(argv[1:], env=child_env(api, tmp_path), cwd=work,
                                  timeout=STARTUP_S, dimensions=(40, 160))
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
    child = spawn(api, tmp_path, script=True)  # the one a person types: the script itself
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
    # The picker shows what is typed (it was read with echo off: the early prompt's mode).
    child.sendline("/resume")
    child.expect_exact("Enter: stay here")
    child.send("zz")
    child.expect_exact("zz")
    child.send("\r")
    child.expect("no session 'zz'")
    child.expect_exact(PROMPT)
    # Typed ahead in one go: the picker gets its answer (a plain input() never saw what the
    # prompt had read ahead, and the answer became the next prompt).
    child.send("/resume\ryy\r")
    child.expect("no session 'yy'")
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


# -- tmux: a terminal with a screen to read, that reflows lines on a resize as most do -------


class TmuxPane:
    """The harness in a tmux pane of its own server (a socket in tmp_path, killed at the end).
    pexpect sees a byte stream; what a person sees is the screen: where a notice landed,
    whether a resize left stacked spinner lines (tmux re-wraps lines on a resize, as most
    terminal emulators do). The screen is read until it shows what is expected, with a
    deadline, as pexpect's expect does; the exit status is written to a file."""

    def __init__(self, tmp_path: Path, env: dict[str, str], argv: list[str], *,
                 width: int, height: int = 30) -> None:
        self.socket = str(tmp_path / f"tmux-{secrets.token_hex(3)}")  # gone with tmp_path
        self.status = tmp_path / "exit-status"
        inner = " ".join(["env", "-i", *(shlex.quote(f"{k}={v}") for k, v in env.items()
                                         if k != "TERM"),
                          "TERM=screen", shlex.quote(sys.executable), *map(shlex.quote, argv)])
        # The shell outlives a Ctrl-C sent to the pane (the harness gets it) to write the status.
        script = (f"trap : INT; {inner} 2>>{shlex.quote(str(tmp_path / 'stderr.log'))}; "
                  f"echo $? > {self.status}")
        self._tmux("new-session", "-d", "-s", "t", "-x", str(width), "-y", str(height),
                   "sh", "-c", script)

    def _tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-S", self.socket, "-f", "/dev/null", *args],
                              check=True, capture_output=True, text=True).stdout

    def screen(self) -> list[str]:
        return self._tmux("capture-pane", "-p", "-t", "t").rstrip("\n").split("\n")

    def wait_for(self, shows: Callable[[list[str]], object], timeout_s: float = STARTUP_S,
                 what: str = "") -> list[str]:
        deadline = time.monotonic() + timeout_s
        while True:
            screen = self.screen()
            if shows(screen):
                return screen
            if time.monotonic() > deadline:
                raise AssertionError(f"the screen never showed {what or shows}:\n" +
                                     "\n".join(screen))
            time.sleep(0.05)  # the next look at the screen, not time for the harness

    def wait_for_text(self, text: str, timeout_s: float = STARTUP_S) -> list[str]:
        return self.wait_for(lambda screen: any(text in line for line in screen), timeout_s,
                             repr(text))

    def keys(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", "t", *keys)

    def type(self, text: str) -> None:
        self._tmux("send-keys", "-t", "t", "-l", text)

    def resize(self, width: int) -> None:
        self._tmux("resize-window", "-t", "t", "-x", str(width))

    def exit_status(self, timeout_s: float = 20) -> int:
        deadline = time.monotonic() + timeout_s
        while not self.status.exists() or not self.status.read_text().strip():
            assert time.monotonic() < deadline, "the harness did not exit:\n" + "\n".join(
                self.screen())
            time.sleep(0.05)
        return int(self.status.read_text())

    def close(self) -> None:
        subprocess.run(["tmux", "-S", self.socket, "kill-server"], capture_output=True)


@pytest.fixture
def tmux_pane(tmp_path):
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed (apt-get install tmux)")
    panes: list[TmuxPane] = []

    def start(api, *args: str, width: int = 120) -> TmuxPane:
        pane = TmuxPane(tmp_path, child_env(api, tmp_path), harness_argv(tmp_path, *args),
                        width=width)
        panes.append(pane)
        return pane

    yield start
    for pane in panes:
        pane.close()


def prompt_line(screen: list[str]) -> str:
    """The last line on the screen with something on it (the prompt, when one is up)."""
    return ([line for line in screen if line.strip()] or [""])[-1]


def test_notices_from_other_threads_go_above_the_prompt_and_leave_the_typed_text_whole(
        api, tmux_pane):
    """Issue 14.13: notices landed on the prompt line, in the middle of the text being
    typed. Here the poller's thread has news while the user types at the prompt: a retry
    of its list call, then the end of a batch that was hurried (its answer is waste)."""
    api.hold, api.cancel_succeeds = True, True
    api.script.extend([fa.text("the sync answer"), fa.text("the unused batch answer"),
                       fa.text("answered")])
    pane = tmux_pane(api, "--no-sandbox")
    pane.wait_for(lambda screen: prompt_line(screen) == PROMPT, what="the prompt")
    pane.type("go")
    pane.keys("Enter")
    pane.wait_for_text("waiting")
    api.wait_for("list", 1, timeout_s=STARTUP_S)  # the REPL waits on the batch
    pane.keys("C-c")
    pane.wait_for_text("s send now")
    pane.type("s")
    pane.wait_for_text("the sync answer")
    pane.wait_for(lambda screen: prompt_line(screen) == PROMPT, what="the prompt")
    pane.type("half typed")  # the poller still watches the hurried batch meanwhile
    pane.wait_for(lambda screen: prompt_line(screen) == f"{PROMPT} half typed", what="typing")
    typing = f"{PROMPT} half typed"

    def above_the_prompt(notice: str) -> list[str]:
        """The notice on a line of its own, the prompt redrawn under it, typed text whole."""
        return pane.wait_for(lambda screen: prompt_line(screen) == typing and any(
            notice in line and "half typed" not in line for line in screen), what=notice)

    api.inject("list", "429", retry_after=0)
    above_the_prompt("rate limited (429)")
    api.hold = False
    api.release()
    screen = above_the_prompt("answer not used (waste)")
    assert sum(line.startswith(PROMPT) for line in screen) == 2  # "› go" and this one
    pane.type(" and sent")
    pane.keys("Enter")
    pane.wait_for_text("answered")
    sent = api.model_requests[-1].params["messages"][-1]["content"][-1]["text"]
    assert sent == "half typed and sent"
    pane.wait_for(lambda screen: prompt_line(screen) == PROMPT, what="the prompt")
    pane.keys("C-d")
    assert pane.exit_status() == 0


def test_a_resize_during_the_spinner_leaves_one_live_line_fitted_to_the_width(
        api, tmux_pane):
    """Issue 14.17: narrowing the terminal while a batch was waited on left a stacked copy
    of the spinner line per resize (the terminal re-wrapped the old line onto two rows and
    only the last was erased). After each resize the screen holds ONE spinner line, as
    wide as the terminal at most, and the turn ends normally."""
    api.hold = True
    api.script.append(fa.text("the answer after the resizes"))
    pane = tmux_pane(api, "--no-sandbox", width=120)
    pane.wait_for(lambda screen: prompt_line(screen) == PROMPT, what="the prompt")
    pane.type("go")
    pane.keys("Enter")
    pane.wait_for_text("waiting")
    pane.type("typed meanwhile")
    pane.wait_for_text("typed, for the next prompt: typed meanwhile")
    spinner = re.compile(r"^\S waiting \d+:\d\d")
    for width in (70, 45, 100, 60):
        pane.resize(width)
        pane.wait_for(lambda screen, w=width: (
            sum(bool(spinner.match(line)) for line in screen) == 1
            and all(len(line) <= w for line in screen if spinner.match(line))),
            what=f"one spinner line at {width} columns")
    api.release()
    pane.wait_for_text("the answer after the resizes")
    screen = pane.wait_for(lambda screen: prompt_line(screen) == f"{PROMPT} typed meanwhile")
    assert not any(spinner.match(line) for line in screen)
    assert not (pane.status.parent / "stderr.log").read_text().strip()
    pane.keys("C-u", "C-d")
    assert pane.exit_status() == 0
