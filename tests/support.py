"""Builders shared by the harness tests: a real Agent wired to the local API stand-in."""

from __future__ import annotations

import dataclasses
import io
import os
import select
import sys
import time
from pathlib import Path
from typing import Any

import batching_harness_sandbox as sb

import batching_harness as bh


@dataclasses.dataclass
class Rig:
    """An Agent with real collaborators: journal on disk, SDK over HTTP to the stand-in."""

    agent: bh.Agent
    journal: bh.Journal
    events: list[Any]
    workdir: Path
    home: Path
    interrupts: list[str]
    clock: Any = None

    def texts(self) -> list[str]:
        return [e.text for e in self.events if isinstance(e, bh.AssistantText)]

    def notices(self) -> list[str]:
        return [e.text for e in self.events if isinstance(e, bh.Notice)]

    def messages(self) -> list[dict[str, Any]]:
        return self.journal.messages(self.agent.session.id, self.agent.session.conversation)

    def requests(self) -> list[bh.RequestRow]:
        return self.journal.requests(self.agent.session.id)


def journal_in_flight(rig: Rig, batch_id: str | None, submitted_at: float | None = None,
                      *, custom_id: str | None = None) -> None:
    """Record a prompt and a request for it as if a batch had been submitted and left
    (batch_id None: killed during the create, its outcome unknown)."""
    session_id = rig.agent.session.id
    rig.journal.add_user_content(session_id, 0, [{"type": "text", "text": "x"}])
    rig.journal.begin_request(bh.RequestRow(
        custom_id=custom_id or f"bh_{batch_id}", session_id=session_id, conversation=0,
        n_messages=1, model="claude-opus-5-5", cache_ttl="1h", max_tokens=10,
        request_hash="h", attempt=1, state="submitted" if batch_id else "submitting",
        batch_id=batch_id, submitted_at=time.time() if submitted_at is None else submitted_at))


def detach_first_turn(rig: Rig, prompt: str = "go") -> None:
    """Send a prompt and answer the first Ctrl-C menu with 'detach' (the rig's script)."""
    import pytest

    def interrupt(_s: float) -> None:
        raise KeyboardInterrupt

    rig.clock.on_wait = interrupt
    with pytest.raises(bh.Detached):
        rig.agent.prompt(prompt)


class TestClock(bh.Clock):
    """Real time (plus `offset_s`), but no sleep longer than 50 ms (back-offs and poll gaps
    shrink); `on_wait`, when set, runs each time the agent waits on its ticket: where a
    test's Ctrl-C lands."""

    __test__ = False  # a helper, not a test class, wherever a test module imports it

    def __init__(self) -> None:
        self.on_wait: Any = None
        self.offset_s = 0.0  # a test moves the harness's clock forward without sleeping

    def now(self) -> float:
        return time.time() + self.offset_s

    def sleep(self, seconds: float) -> None:
        time.sleep(min(max(seconds, 0.0), 0.05))

    def wait(self, event: Any, timeout_s: float) -> bool:
        if self.on_wait is not None:
            self.on_wait(timeout_s)
        return event.wait(min(max(timeout_s, 0.0), 0.05))


def make_channel(api: Any, *, retry_attempts: int = 4, timeout_s: float = 60.0,
                 poll_interval_s: float = 0.02) -> bh.BatchChannel:
    clock = TestClock()
    batch_api = bh.BatchAPI(
        bh.make_client_factory("test-key", api.base_url, timeout_s=timeout_s),
        retry=bh.RetryPolicy(max_attempts=retry_attempts, base_delay_s=0.01, max_delay_s=0.05),
        clock=clock, budget=bh.RequestBudget(1000, clock))
    return bh.BatchChannel(batch_api, poll_interval_s=poll_interval_s, clock=clock)


def make_rig(api: Any, tmp_path: Path, *, sandbox: bool = False, retry_attempts: int = 4,
             interrupts: list[str] | None = None, session: bh.SessionRow | None = None,
             poll_interval_s: float = 0.02, **settings: Any) -> Rig:
    home, workdir = tmp_path / "home", tmp_path / "work"
    home.mkdir(exist_ok=True)
    workdir.mkdir(exist_ok=True)
    journal = bh.Journal(home / "journal.db")
    policy = sb.SandboxPolicy(workdir=workdir.resolve(), state_dir=home.resolve(),
                              enabled=sandbox)
    toolbox = sb.Toolbox(sb.BashTool(policy), sb.EditorTool(policy), tool_timeout_s=20)
    channel = make_channel(api, retry_attempts=retry_attempts, poll_interval_s=poll_interval_s)
    settings.setdefault("model", "claude-opus-5-5")
    events: list[Any] = []
    answers = list(interrupts or [])
    session = session or journal.create_session(workdir.resolve(), settings["model"])
    clock = TestClock()
    agent = bh.Agent(journal, channel, toolbox, bh.AgentSettings(**settings), session,
                     emit=events.append, ask_interrupt=lambda _b: answers.pop(0), clock=clock)
    rig = Rig(agent, journal, events, workdir, home, answers, clock)
    OPEN_TOOLBOXES.append(toolbox)
    return rig


OPEN_TOOLBOXES: list[Any] = []


def harness_env(tmp_path: Path, api: Any = None) -> dict[str, str]:
    """The environment of a harness run whose state lives under tmp_path (never ~)."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path),
           "LANG": "C.UTF-8", "BATCHING_HARNESS_HOME": str(tmp_path / "home")}
    if api is not None:
        env.update(ANTHROPIC_API_KEY="test-key", ANTHROPIC_BASE_URL=api.base_url)
    return env


@dataclasses.dataclass(frozen=True)
class MainRun:
    status: int
    out: str
    err: str


def run_main(tmp_path: Path, *args: str, api: Any = None, stdin: str = "",
             columns: int = 160) -> MainRun:
    """`batching-harness --workdir tmp_path/work ARGS` through `main(argv, environ)` in this
    process: what the command line prints and returns, without paying a new interpreter and
    the SDK's import (about 4 s of CPU) for each run. A real process is needed only where
    the process itself is under test (SIGKILL, a terminal); those tests spawn one."""
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    out, err = io.StringIO(), io.StringIO()
    saved = sys.stdin, sys.stdout, sys.stderr, os.environ.get("COLUMNS")
    sys.stdin, sys.stdout, sys.stderr = io.StringIO(stdin), out, err
    os.environ["COLUMNS"] = str(columns)  # rich sizes its tables from it, as in a terminal
    try:
        status = bh.main(["--workdir", str(work), *args], harness_env(tmp_path, api))
    finally:
        sys.stdin, sys.stdout, sys.stderr = saved[:3]
        if saved[3] is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = saved[3]
    return MainRun(status, out.getvalue(), err.getvalue())


def read_fifo(path: Path, timeout_s: float = 30.0) -> str:
    """What a tool command wrote to the FIFO at `path` (made with os.mkfifo): the test
    blocks until the command really runs, with no sleep and no polling."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        ready, _, _ = select.select([fd], [], [], timeout_s)
        assert ready, f"nothing was written to {path} within {timeout_s:g} s"
        return os.read(fd, 4096).decode()
    finally:
        os.close(fd)


def request_row(session: bh.SessionRow, **kw: Any) -> bh.RequestRow:
    """A request row for store tests: defaults for every field, overridden by `kw`."""
    base: dict[str, Any] = dict(
        custom_id=bh.new_custom_id(), session_id=session.id, conversation=0, n_messages=1,
        model="claude-opus-5-5", cache_ttl="1h", max_tokens=100, request_hash="h", attempt=1,
        state="submitting", batch_id=None, submitted_at=time.time(), estimate_usd=0.01)
    base.update(kw)
    return bh.RequestRow(**base)

