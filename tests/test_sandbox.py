"""The escape suite: real srt + bubblewrap, no mocks. Each test tries something a hostile
command would, then checks the outcome ON THE HOST (files, processes, a listener), not only
the message the model got."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path

import batching_harness_sandbox as sb
import pytest

from tests.sandbox_helpers import (
    bash,
    fake_home,
    make_policy,
    pids_running,
    placeholders_in,
    sandbox_missing_reason,
    start_bash_in_child,
    toolbox,
    wait_until,
)

pytestmark = [
    pytest.mark.sandbox,
    pytest.mark.skipif(sandbox_missing_reason() is not None, reason=str(sandbox_missing_reason())),
]


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return fake_home(tmp_path, monkeypatch)


@pytest.fixture
def policy(tmp_path: Path, home: Path) -> sb.SandboxPolicy:
    return make_policy(tmp_path)


@pytest.fixture
def tools(policy: sb.SandboxPolicy):
    with toolbox(policy) as t:
        yield t


@pytest.fixture
def work(policy: sb.SandboxPolicy) -> Path:
    return policy.workdir


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    place = tmp_path / "outside"
    place.mkdir()
    (place / "target.txt").write_text("original\n")
    return place


def make_repo(path: Path) -> Path:
    """A minimal repository laid out by hand: the tests never run git on the host either."""
    for sub in ("objects", "refs/heads", "hooks", "info"):
        (path / ".git" / sub).mkdir(parents=True, exist_ok=True)
    (path / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (path / ".git" / "config").write_text(
        "[core]\n\trepositoryformatversion = 0\n\tfilemode = true\n\tbare = false\n"
    )
    return path / ".git"


# -- filesystem -------------------------------------------------------------------------------


def test_writes_outside_the_workdir_fail_and_nothing_appears_on_the_host(tools, work, home):
    marker = f"escape-{os.getpid()}-{time.monotonic_ns()}"
    targets = [Path("/tmp") / marker, home / marker, Path("/etc") / marker]
    result = bash(tools, "; ".join(f"echo x > {t}" for t in targets) + "; echo done")
    assert "Read-only file system" in result.output
    assert [t for t in targets if t.exists()] == []


def test_symlinks_symlinked_dirs_dotdot_and_mv_do_not_lead_out(tools, work, outside):
    (work / "link.txt").symlink_to(outside / "target.txt")
    (work / "linkdir").symlink_to(outside)
    (work / "mine.txt").write_text("mine\n")
    bash(
        tools,
        "echo pwned > link.txt; echo pwned > linkdir/new.txt; echo pwned > ../outside/new2.txt",
    )
    bash(tools, f"mv mine.txt {outside}/; mv {outside}/target.txt ./stolen.txt")
    assert (outside / "target.txt").read_text() == "original\n"
    assert sorted(p.name for p in outside.iterdir()) == ["target.txt"]
    # mv across the mount boundary copies then unlinks: reading is allowed, unlinking is not.
    assert (work / "mine.txt").exists()


def test_a_hard_link_to_an_outside_file_cannot_be_made(tools, work, outside):
    result = bash(tools, f"ln {outside}/target.txt hard.txt && echo pwned > hard.txt")
    assert result.is_error
    assert not (work / "hard.txt").exists()
    assert (outside / "target.txt").read_text() == "original\n"


def test_deny_read_paths_look_empty_inside(tools, work, home, policy):
    (home / "ssh-link").symlink_to(home / ".ssh" / "id_test")
    (policy.state_dir / "journal.db").write_text("FAKE-TRANSCRIPT")
    result = bash(
        tools,
        f"cat ~/.ssh/id_test ~/ssh-link ~/.aws/credentials {policy.state_dir}/journal.db; "
        "ls -A ~/.ssh; head -c 200 /etc/shadow",
    )
    for secret in ("FAKE-SSH-KEY", "FAKE-AWS-KEY", "FAKE-TRANSCRIPT", "root:"):
        assert secret not in result.output
    assert (home / ".ssh" / "id_test").read_text() == "FAKE-SSH-KEY\n"  # untouched on the host


def test_secrets_in_the_parent_environment_are_not_visible_inside(policy, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-FAKE-SECRET")
    monkeypatch.setenv("FOO_TOKEN", "FAKE-TOKEN-VALUE")
    monkeypatch.setenv("DB_PASSWORD", "FAKE-PASSWORD")
    with toolbox(policy) as tools:
        result = bash(tools, "env; cat /proc/self/environ | tr '\\0' '\\n'; cat /proc/1/environ")
    assert not result.is_error or "environ" in result.output
    for secret in ("sk-ant-FAKE-SECRET", "FAKE-TOKEN-VALUE", "FAKE-PASSWORD"):
        assert secret not in result.output
    assert "ANTHROPIC_API_KEY" not in result.output and "FOO_TOKEN" not in result.output


def test_files_srt_guards_in_the_workdir_cannot_be_written(tools, work):
    git_dir = make_repo(work)
    config_before = (git_dir / "config").read_bytes()
    result = bash(
        tools,
        "echo evil > .bashrc; echo evil > .git/hooks/pre-commit; echo '[core]' >> .git/config; "
        "echo evil > .gitconfig; echo done",
    )
    assert "done" in result.output
    assert not (work / ".bashrc").exists() and not (work / ".gitconfig").exists()
    assert list((git_dir / "hooks").iterdir()) == []
    assert (git_dir / "config").read_bytes() == config_before


def test_file_size_limit_stops_a_runaway_write(tmp_path, home):
    with toolbox(make_policy(tmp_path, max_file_bytes=1 << 20)) as tools:
        result = bash(tools, "head -c 2G /dev/zero > big; echo status=$?")
    assert os.path.getsize(tmp_path / "work" / "big") == 1 << 20
    assert "status=153" in result.output  # 128 + SIGXFSZ: the write was stopped, not finished


def test_the_child_sees_hard_resource_limits(tools, policy):
    """The fork-bomb and runaway guards srt does not set, read back as the command sees them
    (RLIMIT_NPROC only binds a non-root caller, so it is only set and checked for one)."""
    result = bash(
        tools, "echo f=$(ulimit -H -f) t=$(ulimit -H -t) c=$(ulimit -H -c) u=$(ulimit -u)"
    )
    fields = dict(part.split("=") for part in result.output.split())
    assert fields["f"] == str(policy.max_file_bytes // 1024)
    assert fields["t"] == str(20 + sb._CPU_SLACK_S)
    assert fields["c"] == "0"
    if os.geteuid() != 0:
        assert fields["u"] == str(sb._NPROC_LIMIT)
    raised = bash(tools, "ulimit -f unlimited && echo raised")
    assert raised.is_error and "raised" not in raised.output


# -- network ----------------------------------------------------------------------------------


@pytest.fixture
def listener():
    """A TCP listener on the host's loopback that records every connection (bounded: it stops
    with the test)."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    accepted: list[str] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            accepted.append("connected")
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1], accepted
    stop.set()
    thread.join(2)
    server.close()


def test_no_network_not_even_the_hosts_loopback(tools, listener):
    port, accepted = listener
    result = bash(
        tools,
        f"(exec 3<>/dev/tcp/127.0.0.1/{port}) && echo REACHED-TCP; "
        f"curl -sS -m 3 http://127.0.0.1:{port}/ && echo REACHED-CURL; "
        "getent hosts example.com && echo RESOLVED; true",
    )
    assert "REACHED" not in result.output and "RESOLVED" not in result.output
    assert accepted == []


def test_allowed_domains_go_through_srts_proxy_and_others_are_refused(tmp_path, home):
    with toolbox(make_policy(tmp_path, allow_domains=("allowed.invalid",))) as tools:
        env = bash(tools, "env")
        refused = bash(
            tools, "curl -s -m 5 -o /dev/null -w '%{http_code}' http://denied.invalid/; true"
        )
    assert "HTTPS_PROXY=http://" in env.output and "HTTP_PROXY=http://" in env.output
    assert refused.output.strip() == "403"  # the proxy refused it by name: nothing was dialed


# -- processes --------------------------------------------------------------------------------


def test_timeout_kills_the_whole_tree_and_the_next_command_works(tmp_path, home):
    with toolbox(make_policy(tmp_path), timeout_s=2) as tools:
        started = time.monotonic()
        result = bash(tools, "echo started; sleep 987101 & sleep 987102")
        elapsed = time.monotonic() - started
        assert result.is_error and result.exit_code is None
        assert "timed out after 2 s" in result.output and "started" in result.output
        assert elapsed < 2 + sb._KILL_GRACE_S + 2
        assert pids_running("sleep", "987101") == [] and pids_running("sleep", "987102") == []
        assert bash(tools, "echo next").output == "next"


def test_a_bounded_fork_loop_is_cut_off_entirely_at_the_timeout(tmp_path, home):
    with toolbox(make_policy(tmp_path), timeout_s=2) as tools:
        result = bash(tools, "for i in $(seq 40); do (sleep 987201 &); done; sleep 987202")
    assert "timed out" in result.output
    assert pids_running("sleep", "987201") == [] and pids_running("sleep", "987202") == []


def test_a_background_process_does_not_outlive_its_command(tools):
    started = time.monotonic()
    result = bash(tools, "sleep 987301 & echo launched")
    assert result.output == "launched" and time.monotonic() - started < 5
    assert pids_running("sleep", "987301") == []


def test_ctrl_c_stops_only_the_running_command_and_is_reported(tools):
    """Ctrl-C must end the command (and its tree) and come back as a result: re-raised, it
    would abort the whole turn and lose the other tool results."""
    assert bash(tools, "true").exit_code == 0  # the first-use probe is done before the timer
    timer = threading.Timer(1.0, os.kill, args=(os.getpid(), signal.SIGINT))
    timer.start()
    try:
        result = bash(tools, "echo started; sleep 987601 & sleep 987602")
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped the bash tool")
    finally:
        timer.cancel()
    assert result.is_error and result.exit_code is None
    assert "started" in result.output and "Ctrl-C" in result.output
    assert pids_running("sleep", "987601") == [] and pids_running("sleep", "987602") == []
    assert bash(tools, "echo next").output == "next"


def test_host_processes_are_invisible_and_cannot_be_signalled(tools):
    victim = subprocess.Popen(["sleep", "987401"])
    try:
        result = bash(tools, f"kill -9 {victim.pid}; ps -e -o pid= | wc -l")
        time.sleep(0.2)
        assert victim.poll() is None, "a sandboxed command killed a host process"
        assert "No such process" in result.output
    finally:
        victim.kill()
        victim.wait()


# -- leftovers ---------------------------------------------------------------------------------


def test_a_killed_command_leaves_no_placeholders_and_git_add_works(tmp_path, home):
    policy = make_policy(tmp_path)
    make_repo(policy.workdir)
    (policy.workdir / "real.txt").write_text("tracked\n")
    with toolbox(policy, timeout_s=1.5) as tools:
        killed = bash(tools, "sleep 987501")
        assert "timed out" in killed.output
        assert placeholders_in(policy.workdir) == []
        assert list(tools.bash._srt_tmp.iterdir()) == []  # srt-mux-*.sock and friends
        added = bash(tools, "git add -A && git status --short")
    assert not added.is_error, added.output
    assert added.output.splitlines() == ["A  real.txt"]
    assert sb._GIT_EXCLUDE_HEADER in (policy.workdir / ".git/info/exclude").read_text()
    assert placeholders_in(policy.workdir) == []


def test_close_removes_the_private_temp_dir(policy):
    tools_ = sb.Toolbox(sb.BashTool(policy), sb.EditorTool(policy), tool_timeout_s=10)
    private = tools_.bash._private
    bash(tools_, "mktemp")
    tools_.close()
    assert not private.exists()


# -- git redirects -----------------------------------------------------------------------------


def test_a_planted_commondir_is_removed_and_reported(tools, work):
    git_dir = make_repo(work)
    result = bash(tools, "mkdir -p evil && printf '../evil\\n' > .git/commondir; echo planted")
    assert not (git_dir / "commondir").exists()
    assert any("commondir" in w for w in result.warnings)
    assert "[harness]" in result.output and "commondir" in result.output


def test_a_gitdir_file_replacing_dot_git_is_removed(tools, work):
    result = bash(tools, "mkdir -p /tmp/x 2>/dev/null; printf 'gitdir: evil-git\\n' > .git")
    assert not os.path.lexists(work / ".git")
    assert any("redirected git" in w for w in result.warnings)


def test_a_new_repo_with_fsmonitor_keeps_its_config_minus_the_command(tools, work):
    result = bash(
        tools,
        "git init -q . && git config core.fsmonitor 'touch /tmp/pwned' "
        "&& git config user.name tester && cat .git/config >/dev/null",
    )
    config = (work / ".git" / "config").read_text()
    assert "fsmonitor" not in config
    assert "repositoryformatversion" in config and "tester" in config
    assert any("core.fsmonitor" in w for w in result.warnings)


def test_hooks_and_config_of_a_nested_repo_below_srts_scan_depth_are_undone(tools, work):
    nested = work / "a" / "b" / "c"
    git_dir = make_repo(nested)
    config_before = (git_dir / "config").read_bytes()
    result = bash(
        tools,
        "printf '#!/bin/sh\\ntouch /tmp/pwned\\n' > a/b/c/.git/hooks/pre-commit "
        "&& printf '[core]\\n\\thooksPath = /tmp/evil\\n' >> a/b/c/.git/config && echo planted",
    )
    assert "planted" in result.output  # srt let it through: this is what the harness undoes
    assert list((git_dir / "hooks").iterdir()) == []
    assert (git_dir / "config").read_bytes() == config_before
    assert len(result.warnings) == 2


def test_a_nested_dot_git_swapped_for_a_link_is_removed_not_followed(tools, work, outside):
    git_dir = make_repo(work / "a" / "b" / "c")  # deeper than srt's scan: srt does not pin it
    (git_dir / "hooks").rmdir()  # so `.git/hooks` is a placeholder candidate
    (outside / "hooks").write_text("")  # an empty file the clean-up must not reach through a link
    swap = f"mv a/b/c/.git a/b/c/old-git && ln -s {outside} a/b/c/.git && echo swapped"
    result = bash(tools, swap)
    assert "swapped" in result.output
    assert not os.path.lexists(work / "a" / "b" / "c" / ".git")
    assert (outside / "hooks").exists() and (outside / "target.txt").exists()
    assert any("redirected git" in w for w in result.warnings)


def test_an_unchanged_repo_raises_no_warning(tools, work):
    make_repo(work)
    (work / ".git" / "hooks" / "pre-commit").write_text("#!/bin/sh\nexit 0\n")
    result = bash(tools, "echo hello > f.txt && git status --short >/dev/null")
    assert result.warnings == ()
    assert (work / ".git" / "hooks" / "pre-commit").exists()


def test_the_guard_looks_git_up_only_for_a_repo_that_changed(work, monkeypatch):
    """Finding git on PATH cost every call ~1 ms; only a changed config needs it."""
    make_repo(work)
    looked_up: list[Path] = []
    monkeypatch.setattr(sb, "_host_git", lambda workdir: looked_up.append(workdir))
    before = sb._snapshot(work, 1000)
    assert sb._undo_git(work, before, sb._snapshot(work, 1000)) == [] and looked_up == []
    (work / ".git" / "commondir").write_text("elsewhere\n")
    assert sb._undo_git(work, before, sb._snapshot(work, 1000)) and looked_up == [work]
    assert not (work / ".git" / "commondir").exists()


# -- one command at a time ---------------------------------------------------------------------


def test_two_bash_tools_on_one_workdir_take_turns(policy):
    with toolbox(policy) as first, toolbox(policy) as second:
        finished: dict[str, float] = {}

        def run(name: str, tools_: sb.Toolbox, command: str) -> None:
            bash(tools_, command)
            finished[name] = time.monotonic()

        slow = threading.Thread(target=run, args=("slow", first, "sleep 2; echo slow"))
        slow.start()
        time.sleep(0.5)
        run("quick", second, "echo quick")
        slow.join()
    assert finished["quick"] > finished["slow"]


def test_waiting_longer_than_the_timeout_for_the_workdir_is_an_error(policy):
    with toolbox(policy) as first, toolbox(policy, timeout_s=1) as second:
        slow = threading.Thread(target=bash, args=(first, "sleep 3"))
        slow.start()
        time.sleep(0.5)
        result = bash(second, "touch should-not-exist")
        slow.join()
    assert result.is_error and "one at a time" in result.output
    assert not (policy.workdir / "should-not-exist").exists()


# -- a command that outlived its harness --------------------------------------------------------

ORPHAN_SLEEP = "4.987801"  # seconds, and a command line no other process on the host has


def dead_pid() -> int:
    gone = subprocess.Popen(["true"])
    gone.wait()
    return gone.pid


def write_run_record(
    policy: sb.SandboxPolicy, pgid: int, private: Path, existed: tuple[str, ...] = ()
) -> None:
    """The record a harness killed mid-command leaves beside the work-dir lock."""
    candidates = tuple(str(policy.workdir / name) for name in sb._SRT_PLACEHOLDERS)
    record = sb._RunRecord(
        pgid, dead_pid(), True, str(private), "sleep 30; echo done", candidates, existed
    )
    sb._lock_path(policy).parent.mkdir(parents=True, exist_ok=True)
    sb._write_run_record(sb._run_record_path(policy), record)


def test_a_command_left_running_by_a_killed_harness_is_stopped_before_the_next(tmp_path, home):
    """Regression: kill -9 of the harness mid-command left srt's tree running (srt has a
    session of its own, and the work-dir lock died with the harness), so the resumed harness
    ran the command a second time beside it: `done` twice in out.txt, an empty .claude/ left
    in the work dir, the private temp dir leaked."""
    policy = make_policy(tmp_path)
    work = policy.workdir
    child, private = start_bash_in_child(policy, f"sleep {ORPHAN_SLEEP}; echo done >> out.txt")
    try:
        assert wait_until(lambda: pids_running("sleep", ORPHAN_SLEEP), 15)
        would_write_at = time.monotonic() + float(ORPHAN_SLEEP)
        assert ".claude" in placeholders_in(work)  # srt's mount points are up
    finally:
        child.kill()
        child.wait()
    assert pids_running("sleep", ORPHAN_SLEEP) != []  # the orphan: what the reviewer saw

    try:
        with toolbox(policy) as tools:
            result = bash(tools, "echo resumed >> out.txt")
    finally:
        private_left = private.exists()
        shutil.rmtree(private, ignore_errors=True)  # should it fail: leak nothing into /tmp
    assert not private_left
    assert pids_running("sleep", ORPHAN_SLEEP) == []
    stopped = [w for w in result.warnings if "stopped a command left running" in w]
    assert len(stopped) == 1 and f"sleep {ORPHAN_SLEEP}" in stopped[0]
    assert placeholders_in(work) == []
    assert [p.name for p in sb._lock_path(policy).parent.iterdir()] == [sb._lock_path(policy).name]
    time.sleep(max(0.0, would_write_at + 1.0 - time.monotonic()))
    assert (work / "out.txt").read_text() == "resumed\n"


def test_a_recorded_group_that_is_not_ours_is_never_signalled(tmp_path, home):
    """Pids are recycled: a recorded pgid alone proves nothing. A group is stopped only when
    one of its processes names the dead run's private temp dir."""
    policy = make_policy(tmp_path)
    bystander = subprocess.Popen(["sleep", "987911"], start_new_session=True)
    try:
        write_run_record(policy, bystander.pid, tmp_path / "batching-harness-bash-gone")
        with toolbox(policy) as tools:
            result = bash(tools, "echo ok")
        time.sleep(0.2)
        assert bystander.poll() is None, "a process that was not ours was killed"
        assert result.output == "ok" and result.warnings == ()
        assert not sb._run_record_path(policy).exists()
    finally:
        bystander.kill()
        bystander.wait()


def test_placeholders_of_a_dead_run_are_removed_but_the_users_files_kept(tmp_path, home):
    policy = make_policy(tmp_path)
    work = policy.workdir
    private = tmp_path / "batching-harness-bash-dead"
    (private / "srt").mkdir(parents=True)
    for name in (".bashrc", ".gitconfig"):  # empty and read-only, as srt makes them
        (work / name).touch()
        (work / name).chmod(0o444)
    (work / ".claude").mkdir()
    (work / ".profile").write_text("export KEEP=1\n")  # the user's, read-only but not empty
    (work / ".profile").chmod(0o444)
    (work / ".zshrc").touch()  # the user's: empty, but writable
    write_run_record(policy, dead_pid(), private, (str(work / ".gitconfig"),))
    with toolbox(policy) as tools:
        result = bash(tools, "true")
    assert placeholders_in(work) == [".zshrc", ".profile", ".gitconfig"]
    assert (work / ".profile").read_text() == "export KEEP=1\n"
    assert not private.exists()
    (removed,) = [w for w in result.warnings if "removed empty placeholders" in w]
    assert ".bashrc" in removed and ".claude" in removed and ".zshrc" not in removed


def test_the_startup_probe_stops_a_leftover_and_the_next_command_tells_the_user(tmp_path, home):
    """The probe at start-up takes the lock first: it must not run srt beside a leftover, and
    what it stopped must still reach the user, once. Here the leader dies on SIGTERM and the
    rest of its group is recognised by its environment."""
    policy = make_policy(tmp_path)
    private = tmp_path / "batching-harness-bash-orphan"
    private.mkdir()
    orphan = subprocess.Popen(
        ["bash", "-c", "sleep 987921; echo done >> out.txt"], cwd=policy.workdir,
        env={**os.environ, "CLAUDE_CODE_TMPDIR": str(private / "tmp")}, start_new_session=True,
    )  # fmt: skip
    try:
        assert wait_until(lambda: pids_running("sleep", "987921"), 5)
        write_run_record(policy, orphan.pid, private)
        sb.probe_sandbox(policy)
        assert pids_running("sleep", "987921") == []
        with toolbox(policy) as tools:
            first, second = bash(tools, "true"), bash(tools, "true")
        assert any("stopped a command left running" in w for w in first.warnings)
        assert second.warnings == ()
        assert not (policy.workdir / "out.txt").exists()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(orphan.pid, signal.SIGKILL)  # the sleep too, should the test fail
        orphan.wait()


def test_without_proc_the_ps_listing_gives_groups_and_command_lines():
    """macOS has no /proc: there the record is checked against `ps` instead."""
    if shutil.which("ps") is None:
        pytest.skip("no ps here")
    proc = subprocess.Popen(["sleep", "987931"], start_new_session=True)
    try:
        listed = sb._ps_processes()
        assert listed is not None
        assert [p for p in listed if p.pid == p.pgid == proc.pid and b"sleep 987931" in p.text]
    finally:
        proc.kill()
        proc.wait()


# -- availability: fail closed, with the exact fix ----------------------------------------------


def test_missing_srt_is_reported_with_the_install_command(tmp_path, home):
    policy = make_policy(tmp_path, srt_path=tmp_path / "nowhere" / ".bin" / "srt")
    with pytest.raises(sb.SandboxUnavailable) as raised:
        sb.probe_sandbox(policy)
    assert "does not exist" in raised.value.detail and raised.value.fix.startswith("npm ci")
    with toolbox(policy) as tools:
        result = bash(tools, "touch ran")
    assert result.is_error and "npm ci" in result.output
    assert not (policy.workdir / "ran").exists()  # fail closed: nothing ran unsandboxed
    failing = {c.name: c for c in sb.doctor_checks(policy) if not c.ok}
    assert "srt" in failing and failing["srt"].fix.startswith("npm ci")


def test_missing_bwrap_is_reported_with_the_packages_to_install(tmp_path, home, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    os.symlink(shutil_which("node"), bin_dir / "node")  # node, but no bwrap, socat or rg
    monkeypatch.setenv("PATH", str(bin_dir))
    policy = make_policy(tmp_path)
    with pytest.raises(sb.SandboxUnavailable) as raised:
        sb.probe_sandbox(policy)
    assert "bwrap" in raised.value.detail and "bubblewrap" in raised.value.fix
    failing = {c.name: c for c in sb.doctor_checks(policy) if not c.ok}
    assert "bwrap" in failing and "bubblewrap" in failing["bwrap"].fix
    assert "sandbox probe" in failing


def test_srt_installed_inside_the_workdir_is_refused(tmp_path, home):
    policy = make_policy(tmp_path)
    planted = policy.workdir / "node_modules" / ".bin" / "srt"
    planted.parent.mkdir(parents=True)
    planted.symlink_to(sb._default_srt_path())
    with pytest.raises(sb.SandboxUnavailable, match="inside the work directory"):
        sb.probe_sandbox(sb.SandboxPolicy(policy.workdir, policy.state_dir, srt_path=planted))


def test_probe_and_doctor_pass_on_this_machine(policy):
    sb.probe_sandbox(policy)
    checks = sb.doctor_checks(policy)
    assert [c for c in checks if not c.ok] == []
    assert {"srt", "node", "bwrap", "socat", "rg", "sandbox probe"} <= {c.name for c in checks}
    assert placeholders_in(policy.workdir) == []


def shutil_which(name: str) -> str:
    import shutil

    found = shutil.which(name)
    assert found is not None, f"{name} is needed for this test"
    return found


def test_settings_file_is_complete_and_not_writable_inside(tools, work):
    settings = tools.bash._settings
    result = bash(tools, f"echo '{{}}' > {settings}; echo x > {tools.bash._srt_tmp}/x")
    assert "Read-only file system" in result.output
    assert stat.S_ISREG(os.lstat(settings).st_mode) and settings.read_text().startswith("{")
    assert '"allowWrite"' in settings.read_text()
