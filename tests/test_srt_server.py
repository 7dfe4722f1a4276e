"""The long-lived srt helper (sandbox/srt_server.mjs): one per BashTool, reused across calls,
replaced when it dies, and never a way to run a command unsandboxed. Real srt + bubblewrap;
outcomes are checked on the host (files, processes, environments), not only in the output."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
from pathlib import Path

import batching_harness_sandbox as sb
import pytest

from tests.sandbox_helpers import (
    bash,
    fake_home,
    make_policy,
    needs_sandbox,
    pids_running,
    placeholders_in,
    start_bash_in_child,
    toolbox,
    wait_until,
)

pytestmark = [pytest.mark.sandbox, needs_sandbox]


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return fake_home(tmp_path, monkeypatch)


@pytest.fixture
def policy(tmp_path: Path, home: Path) -> sb.SandboxPolicy:
    return make_policy(tmp_path, srt_server=True)


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    place = tmp_path / "outside"
    place.mkdir()
    return place


def escape_attempt(outside: Path) -> str:
    """A command that, unsandboxed, would leave a file outside and print the key."""
    return f"touch {outside}/pwned; cat ~/.ssh/id_test; echo ran"


def assert_sandboxed(result: sb.ToolResult, outside: Path) -> None:
    assert "ran" in result.output, result.output
    assert "Read-only file system" in result.output
    assert "FAKE-SSH-KEY" not in result.output
    assert not (outside / "pwned").exists()


def helper_pids(tool: sb.BashTool) -> list[int]:
    """Host processes running srt_server.mjs for this BashTool (its settings file names it)."""
    found = []
    for proc in sb._processes() or []:
        argv = proc.text.split(b"\0")
        if str(sb._SRT_SERVER_SCRIPT).encode() in argv and str(tool._settings).encode() in argv:
            found.append(proc.pid)
    return found


# -- reuse, replacement -------------------------------------------------------------------------


def test_one_helper_serves_every_call_and_close_ends_it(policy, outside):
    with toolbox(policy, probed=True) as tools:
        results = [bash(tools, f"echo call-{i}") for i in range(4)]
        pid = tools.bash._server.proc.pid
        assert helper_pids(tools.bash) == [pid]  # one process for all of them
        assert_sandboxed(bash(tools, escape_attempt(outside)), outside)
        assert tools.bash._server.proc.pid == pid
    assert [r.output for r in results] == [f"call-{i}" for i in range(4)]
    assert all(r.warnings == () for r in results)
    assert not sb._alive(pid)
    assert [p for p in sb._processes() or [] if p.pgid == pid] == []  # its socat bridges too


def test_a_killed_helper_is_replaced_and_the_call_is_still_sandboxed(policy, outside):
    with toolbox(policy, probed=True) as tools:
        assert bash(tools, "echo first").output == "first"
        old = tools.bash._server.proc
        os.kill(old.pid, signal.SIGKILL)
        old.wait()
        result = bash(tools, escape_attempt(outside))
        new_pid = tools.bash._server.proc.pid
        assert_sandboxed(result, outside)
        assert new_pid != old.pid and helper_pids(tools.bash) == [new_pid]
        assert result.warnings == ()  # replaced quietly: the call itself went through it
        assert [p for p in sb._processes() or [] if p.pgid == old.pid] == []  # bridges reaped
        assert bash(tools, "echo again").output == "again"
        assert tools.bash._server.proc.pid == new_pid


def test_ctrl_c_while_waiting_for_the_helper_ends_it_and_the_next_call_gets_a_new_one(
    policy, monkeypatch
):
    """A reply left unread would answer the next request: an interrupted request ends the
    helper instead."""
    with toolbox(policy, probed=True) as tools:
        bash(tools, "true")
        server = tools.bash._server

        def interrupted(deadline: float) -> dict:
            raise KeyboardInterrupt

        monkeypatch.setattr(server, "_read", interrupted)
        result = bash(tools, "touch ran")
        assert result.is_error and "interrupted" in result.output
        assert not server.alive() and not (policy.workdir / "ran").exists()
        assert bash(tools, "echo next").output == "next"
        assert tools.bash._server is not server



def test_the_helper_asks_which_for_the_shell_once_not_per_call(policy, tmp_path, monkeypatch):
    """srt looks up `bash` with a `which` process on every wrap (3 ms of ~19): the helper keeps
    the first answer. The lookup itself is still Node's, on the helper's PATH."""
    bin_dir, log = tmp_path / "bin", tmp_path / "which.log"
    bin_dir.mkdir()
    real = shutil.which("which")
    (bin_dir / "which").write_text(f'#!/bin/sh\necho "$@" >> {log}\nexec {real} "$@"\n')
    (bin_dir / "which").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    with toolbox(policy, probed=True) as tools:
        outputs = [bash(tools, f"echo call-{i}").output for i in range(3)]
        assert tools.bash._server is not None
    assert outputs == ["call-0", "call-1", "call-2"]
    asked = log.read_text().split("\n")
    assert asked.count("bash") == 1, asked

# -- fail closed ---------------------------------------------------------------------------------

_FAKE_PRELUDE = """
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as readline from 'node:readline';
const send = m => process.stdout.write(JSON.stringify(m) + '\\n');
const sha = createHash('sha256').update(fs.readFileSync(process.argv[3])).digest('hex');
const ready = { ready: true, pid: process.pid, version: '0.0.83', settings_sha256: sha };
const lines = readline.createInterface({ input: process.stdin });
"""
_FAKE_HELPERS = {
    # Each stands for a way the real one could break; none may lead to an unsandboxed run.
    "exits at once": "process.exit(3);",
    "prints noise": "process.stdout.write('hello\\n'); lines.on('line', () => {});",
    "loaded other settings": "send({ ...ready, settings_sha256: 'x' }); lines.on('line', () => {});",
    "is an old srt": "send({ ...ready, version: '0.0.78' }); lines.on('line', () => {});",
    "hands the command back unwrapped": (
        "send(ready); lines.on('line', l => { const r = JSON.parse(l);"
        " if (r.op === 'wrap') send({ id: r.id, ok: true, wrapped: r.command }); });"
    ),
    "answers another request": (
        "send(ready); lines.on('line', l => { const r = JSON.parse(l); if (r.op === 'wrap')"
        " send({ id: r.id + 1, ok: true, wrapped: 'bwrap --new-session --die-with-parent x' }); });"
    ),
    "dies mid-call": "send(ready); lines.on('line', () => process.exit(1));",
}


@pytest.mark.parametrize("fault", list(_FAKE_HELPERS))
def test_a_broken_helper_falls_back_to_the_cli_never_to_no_sandbox(
    policy, outside, tmp_path, monkeypatch, fault
):
    script = tmp_path / "fake_srt_server.mjs"
    script.write_text(_FAKE_PRELUDE + _FAKE_HELPERS[fault])
    monkeypatch.setattr(sb, "_SRT_SERVER_SCRIPT", script)
    with toolbox(policy, probed=True) as tools:
        result = bash(tools, escape_attempt(outside))
        marker = tools.bash._private.name.encode()  # in its leader's environment
        # Started before the wrap failed, the leader ran nothing, and ended with the call.
        leaders = [p.pid for p in sb._processes() or []
                   if sb._LEADER_SCRIPT.encode() in p.text.split(b"\0") and marker in p.text]  # fmt: skip
    assert_sandboxed(result, outside)  # the per-call srt CLI ran it
    (note,) = result.warnings
    assert "srt helper" in note and "per-call srt CLI" in note, note
    assert leaders == []


def test_after_three_failures_in_a_row_every_call_takes_the_cli(policy, tmp_path, monkeypatch):
    """A helper that can never start must not cost a failed start on every call."""
    script = tmp_path / "fake_srt_server.mjs"
    script.write_text("process.exit(3);")
    monkeypatch.setattr(sb, "_SRT_SERVER_SCRIPT", script)
    with toolbox(policy, probed=True) as tools:
        notes = [bash(tools, "true").warnings for _ in range(4)]
    assert [len(n) for n in notes] == [1, 1, 1, 0]
    assert "every bash call now runs" in notes[2][0]


def test_the_switch_turns_the_helper_off(tmp_path, home):
    assert sb._srt_server_default({"BATCHING_HARNESS_SRT_SERVER": "0"}) is False
    assert sb._srt_server_default({}) is True
    with toolbox(make_policy(tmp_path, srt_server=False), probed=True) as tools:
        assert bash(tools, "echo via-cli").output == "via-cli"
        assert tools.bash._server is None and helper_pids(tools.bash) == []



# -- the leader: started while srt wraps, it runs only the wrapped line ------------------------


def run_leader(tmp_path: Path, payload: bytes | None) -> int:
    """The leader shell as BashTool starts it (no cgroup), fed `payload` (None: nothing)."""
    proc = subprocess.Popen(["/bin/sh", "-c", sb._LEADER_SCRIPT, "sh"], cwd=tmp_path,
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    proc.communicate(payload or b"", timeout=10)
    return proc.returncode


def test_the_leader_runs_nothing_unless_it_gets_the_whole_command(tmp_path):
    """The leader starts before srt has wrapped the command: a failed wrap or a harness killed
    mid-write must leave it nothing to run, not a shorter command."""
    assert run_leader(tmp_path, None) == 125
    whole = ["exec <>/dev/null", "{", "touch ran; (exit 7)", "}", "exit $?", ""]
    cut = "\n".join(whole[:3]).encode()  # the braces never close: a syntax error
    assert run_leader(tmp_path, cut) == 2 and not (tmp_path / "ran").exists()
    assert run_leader(tmp_path, "\n".join(whole).encode()) == 7 and (tmp_path / "ran").exists()


def test_a_wrapped_command_runs_in_the_cgroup_with_stdin_from_dev_null_and_no_other_fds(policy):
    with toolbox(policy, probed=True) as tools:
        result = bash(tools, "ls /proc/self/fd; readlink /proc/self/fd/0; cat /proc/self/cgroup")
        cgroup = tools.bash._cgroup
        assert tools.bash._server is not None
    lines = result.output.splitlines()
    assert lines[:5] == ["0", "1", "2", "3", "/dev/null"], result.output  # 3: ls's own listing
    if cgroup is not None:  # where the machine lets the harness make one
        name = next(iter(cgroup.dirs.values())).name
        hierarchies = ("0::",) if cgroup.version == 2 else (":pids:", ":memory:")
        ours = [line for line in lines[5:] if any(h in line for h in hierarchies)]
        assert len(ours) == len(hierarchies), result.output
        assert all(line.endswith(f"/{name}") for line in ours), result.output

# -- the same guarantees as the CLI ------------------------------------------------------------


def test_timeout_kills_the_tree_and_the_helper_lives_on(tmp_path, home):
    with toolbox(make_policy(tmp_path, srt_server=True), timeout_s=2, probed=True) as tools:
        bash(tools, "true")
        pid = tools.bash._server.proc.pid
        result = bash(tools, "echo started; sleep 987701 & sleep 987702")
        assert "timed out after 2 s" in result.output and "started" in result.output
        assert pids_running("sleep", "987701") == [] and pids_running("sleep", "987702") == []
        assert placeholders_in(tmp_path / "work") == []
        assert bash(tools, "echo next").output == "next"
        assert tools.bash._server.proc.pid == pid


def test_secrets_reach_neither_the_helper_nor_the_command(policy, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-FAKE-SECRET")
    monkeypatch.setenv("FOO_TOKEN", "FAKE-TOKEN-VALUE")
    with toolbox(policy, probed=True) as tools:
        result = bash(tools, "env; tr '\\0' '\\n' < /proc/self/environ")
        helper_env = Path(f"/proc/{tools.bash._server.proc.pid}/environ").read_bytes()
    for secret in ("sk-ant-FAKE-SECRET", "FAKE-TOKEN-VALUE", "ANTHROPIC_API_KEY", "FOO_TOKEN"):
        assert secret not in result.output
        assert secret.encode() not in helper_env  # its proxy runs on the host: no key there


def test_concurrent_calls_from_many_threads(tmp_path, home):
    """Several agents' tools at once (their own work dirs) and several threads on one tool:
    every call answers its own command, calls in one work dir never overlap, and each
    BashTool keeps exactly one helper."""
    for i in range(3):
        (tmp_path / f"agent{i}").mkdir()
    policies = [make_policy(tmp_path / f"agent{i}", srt_server=True) for i in range(3)]
    outputs: dict[tuple[int, int, int], str] = {}
    pids: dict[int, set[int]] = {i: set() for i in range(len(policies))}
    errors: list[BaseException] = []

    def worker(agent: int, tools: sb.Toolbox, thread: int) -> None:
        try:
            for call in range(3):
                tag = f"{agent}-{thread}-{call}"
                result = bash(tools, f"echo begin >> log; echo {tag}; echo end >> log")
                outputs[(agent, thread, call)] = result.output
                pids[agent].add(tools.bash._server.proc.pid)
        except BaseException as exc:  # reported below, with the thread's own traceback
            errors.append(exc)

    with toolbox(policies[0], probed=True) as t0, toolbox(policies[1], probed=True) as t1, \
            toolbox(policies[2], probed=True) as t2:  # fmt: skip
        threads = [threading.Thread(target=worker, args=(a, tools, n))
                   for a, tools in enumerate((t0, t1, t2)) for n in range(2)]  # fmt: skip
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []
    assert outputs == {key: "-".join(map(str, key)) for key in outputs} and len(outputs) == 18
    assert all(len(found) == 1 for found in pids.values())
    assert len(set().union(*pids.values())) == 3  # one helper per BashTool
    for p in policies:
        assert (p.workdir / "log").read_text() == "begin\nend\n" * 6  # one command at a time


def test_a_dead_harness_leaves_srts_mounts_in_place_until_its_command_ends(
    tmp_path, home, monkeypatch
):
    """srt removes the sandbox's mount points when its helper ends; with the harness killed
    mid-command, the helper must wait for that command first, or the command could write
    .bashrc (the deny detaches with its mount point)."""
    monkeypatch.delenv("BATCHING_HARNESS_SRT_SERVER", raising=False)  # the child's default
    policy = make_policy(tmp_path, srt_server=True)
    work = policy.workdir
    os.mkfifo(work / "go.fifo")
    # Output to files only: its stdout was a pipe to the dead harness (SIGPIPE).
    command = "touch started; read x < go.fifo; { echo evil > .bashrc; } 2> err.txt; touch done"
    child, private = start_bash_in_child(policy, command)
    try:
        assert wait_until(lambda: (work / "started").exists(), 30)
    finally:
        child.kill()
        child.wait()
    settings = str(policy.state_dir / "sandbox" / f"{private.name}.json").encode()
    helpers = [p.pid for p in sb._processes() or [] if settings in p.text.split(b"\0")]
    assert len(helpers) == 1
    assert ".bashrc" in placeholders_in(work)  # still mounted: the helper waits
    fifo = os.open(work / "go.fifo", os.O_WRONLY | os.O_NONBLOCK)  # ENXIO, not a hang, if no reader
    os.write(fifo, b"go\n")
    os.close(fifo)
    assert wait_until(lambda: (work / "done").exists(), 30)
    assert ".bashrc: Permission denied" in (work / "err.txt").read_text()  # the deny held
    assert wait_until(lambda: not sb._alive(helpers[0]), 30)  # it ends with the command
    assert not (work / ".bashrc").exists() or (work / ".bashrc").read_text() == ""
    assert placeholders_in(work) == []
    with toolbox(policy, probed=True) as tools:  # the next harness cleans up after the dead one
        assert bash(tools, "echo resumed").output == "resumed"
    assert not private.exists()
