"""Issue 13's escape suite: code planted in the work dir that would later run on the HOST, a
rewritable policy, dangerous work dirs, the editor's race, output floods, terminal injection,
unbounded resources and a world-readable state dir. Each test runs the real srt + bubblewrap
where a command is involved, then checks the outcome on the host: host git is run for real
and a marker file must not appear."""

from __future__ import annotations

import dataclasses
import os
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import batching_harness_sandbox as sb
import pytest

from tests.sandbox_helpers import (
    bash,
    edit,
    fake_home,
    make_policy,
    needs_sandbox,
    pids_running,
    toolbox,
    wait_until,
)

needs_git = pytest.mark.skipif(
    sb._host_git(Path("/nonexistent")) is None, reason="git is not installed"
)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return fake_home(tmp_path, monkeypatch)


@pytest.fixture
def policy(tmp_path: Path, home: Path) -> sb.SandboxPolicy:
    return make_policy(tmp_path)


@pytest.fixture
def tools(policy: sb.SandboxPolicy):
    with toolbox(policy, probed=True) as t:
        yield t


@pytest.fixture
def work(policy: sb.SandboxPolicy) -> Path:
    return policy.workdir


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    """Where planted code would leave its trace if the host ever ran it."""
    return tmp_path / "PWNED"


def host_git(cwd: Path, *args: str, home: Path) -> subprocess.CompletedProcess[str]:
    """git as the user runs it on the host, after the sandboxed command is done."""
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "GIT_CONFIG_NOSYSTEM": "1",
           "GIT_TERMINAL_PROMPT": "0", "GIT_AUTHOR_NAME": "u", "GIT_AUTHOR_EMAIL": "u@x",
           "GIT_COMMITTER_NAME": "u", "GIT_COMMITTER_EMAIL": "u@x"}  # fmt: skip
    return subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip


def git_keys(config: Path) -> list[str]:
    """The config's entries as git itself reads them."""
    entries = sb._git_config_entries(config.read_bytes(), sb._host_git(Path("/nonexistent")))
    assert entries is not None
    return [key for key, _ in entries]


def make_repo(path: Path) -> Path:
    for sub in ("objects", "refs/heads", "hooks"):
        (path / ".git" / sub).mkdir(parents=True, exist_ok=True)
    (path / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (path / ".git" / "config").write_text("[core]\n\trepositoryformatversion = 0\n\tbare = false\n")
    return path / ".git"


# -- 1. git config is read the way git reads it ------------------------------------------------


@needs_sandbox
@needs_git
def test_config_hidden_by_a_carriage_return_or_a_continuation_runs_nothing_on_host_git(
    tools, work, home, marker
):
    """Regression: a header after a \\r inside a comment (Python's splitlines() breaks there,
    git does not) or a backslash continuation made the old parser see another section than
    git, and `git status` on the host ran the planted core.fsmonitor."""
    cr = f"[core]\\n# note\\r[user]\\n\\tfsmonitor = touch {marker}-cr\\n"
    cont = f"[core]\\n\\tname = x \\\\\\n[user]\\n\\tfsmonitor = touch {marker}-cont\\n"
    result = bash(tools, f"git init -q . && printf '{cr}' >> .git/config && mkdir -p a/b/c "
                         f"&& git init -q a/b/c && printf '{cont}' >> a/b/c/.git/config")
    assert not result.is_error, result.output
    for repo in (work, work / "a/b/c"):
        host_git(repo, "status", home=home)
        assert "core.fsmonitor" not in git_keys(repo / ".git" / "config")
    assert not Path(f"{marker}-cr").exists() and not Path(f"{marker}-cont").exists()
    assert sum("core.fsmonitor" in w for w in result.warnings) == 2


# -- 2. an allow-list, not a deny-list ------------------------------------------------------


@needs_sandbox
@needs_git
def test_config_keys_outside_the_allow_list_are_reverted_and_both_sides_told(
    tools, work, home, marker
):
    """Keys the old deny-list missed ran code on `git fetch` / `git commit` (uploadpack,
    gpg.ssh.defaultKeyCommand, an ext:: URL, an alias). Only harmless keys survive."""
    planted = {
        "user.name": "tester", "remote.origin.url": "../src", "branch.main.remote": "origin",
        "remote.origin.uploadpack": f"touch {marker}-fetch; git-upload-pack",
        "gpg.format": "ssh", "commit.gpgsign": "true",
        "gpg.ssh.defaultKeyCommand": f"touch {marker}-commit", "protocol.ext.allow": "always",
        "remote.evil.url": f"ext::sh -c touch% {marker}-ext", "alias.st": f"!touch {marker}",
        "url.ext::sh -c touch.insteadOf": "https://", "core.editor": f"touch {marker}",
    }  # fmt: skip
    sets = " && ".join(f"git -C r config {k!r} {v!r}" for k, v in planted.items())
    result = bash(tools, f"git init -q src && git init -q r && {sets} && echo planted")
    assert "planted" in result.output
    keys = git_keys(work / "r" / ".git" / "config")
    assert {"user.name", "remote.origin.url", "branch.main.remote"} <= set(keys)
    assert not set(keys) & {k.lower() for k in planted if k.split(".")[0] not in ("user", "branch")
                            and k != "remote.origin.url"}  # fmt: skip
    host_git(work / "r", "fetch", "-q", "origin", home=home)
    host_git(work / "r", "fetch", "-q", "evil", home=home)
    host_git(work / "r", "commit", "-q", "--allow-empty", "-m", "x", home=home)
    assert list(marker.parent.glob(f"{marker.name}*")) == []
    (note,) = [w for w in result.warnings if "r/.git/config" in w]
    assert "remote.origin.uploadpack" in note and "gpg.ssh.defaultkeycommand" in note
    assert f"[harness] {note}" in result.output  # the model reads it too


def test_the_allow_list_keeps_plain_urls_only():
    ok = ["https://github.com/a/b.git", "git@github.com:a/b.git", "ssh://git@host/x", "../x",
          "/srv/repo.git", "file:///srv/r"]  # fmt: skip
    bad = ["ext::sh -c x", "fd::3", "ssh://-oProxyCommand=x/y", "-u x", "evil::x", "x y",
           "git@-oProxyCommand=x:y"]  # fmt: skip
    assert all(sb._harmless_config("remote.o.url", u) for u in ok)
    assert not any(sb._harmless_config("remote.o.url", u) for u in bad)
    assert not sb._harmless_config("remote.o.uploadpack", "x")
    assert not sb._harmless_config("core.fsmonitor", "x")


# -- 3. every git directory, found by its shape ---------------------------------------------


@needs_sandbox
@needs_git
def test_submodule_git_dirs_and_bare_repos_anywhere_are_guarded(tools, work, home, marker):
    """Regression: `.git/modules/*/config` and hooks were writable and ran code on the host;
    a bare repository made by bash (HEAD, objects/, refs/, config) kept its pager."""
    make_repo(work)
    module = work / ".git" / "modules" / "sub"
    for sub in ("objects", "refs/heads", "hooks"):
        (module / sub).mkdir(parents=True)
    (module / "HEAD").write_text("ref: refs/heads/main\n")
    (module / "config").write_text("[core]\n\trepositoryformatversion = 0\n\tworktree = ../../../sub\n")
    (work / "sub").mkdir()
    (work / "sub" / ".git").write_text("gitdir: ../.git/modules/sub\n")
    result = bash(tools, (
        f"printf '\\tfsmonitor = touch {marker}-sub\\n' >> .git/modules/sub/config && "
        f"printf '#!/bin/sh\\ntouch {marker}-hook\\n' > .git/modules/sub/hooks/post-checkout && "
        "mkdir -p deep/bare/objects deep/bare/refs && echo 'ref: refs/heads/main' > deep/bare/HEAD "
        f"&& printf '[core]\\n\\tbare = true\\n\\tpager = touch {marker}-pager\\n' > deep/bare/config"
    ))
    host_git(work / "sub", "status", home=home)
    assert not Path(f"{marker}-sub").exists()
    assert list((module / "hooks").iterdir()) == []
    assert "core.worktree" in git_keys(module / "config")  # the user's own key stays
    assert git_keys(work / "deep" / "bare" / "config") == ["core.bare"]
    assert any(".git/modules/sub/config" in w for w in result.warnings)
    assert any("deep/bare/config" in w and "core.pager" in w for w in result.warnings)


@needs_git
def test_a_bare_repo_laid_out_by_four_editor_creates_keeps_no_pager(tools, work, home):
    """The editor runs on the host: the same guard runs around each of its writes, and once
    a directory has a repository's shape, nothing in it can be written."""
    for path, text in (("eb/config", "[core]\n\tpager = touch x\n"), ("eb/objects/k", ""),
                       ("eb/refs/k", ""), ("eb/HEAD", "ref: refs/heads/main\n")):  # fmt: skip
        last = edit(tools, command="create", path=path, file_text=text)
    assert git_keys(work / "eb" / "config") == []
    assert any("core.pager" in w for w in last.warnings)
    again = edit(tools, command="create", path="eb/config", file_text="[core]\n\tpager = x\n")
    assert again.is_error and "git directory" in again.output


@needs_sandbox
def test_past_the_scan_cap_bash_and_the_editor_fail_closed(tmp_path, home):
    policy = make_policy(tmp_path, git_scan_max_dirs=30)
    with toolbox(policy, probed=True) as tools:
        grown = bash(tools, "mkdir -p d{1..40} && echo made")
        assert any("NOT checked" in w for w in grown.warnings)
        refused = bash(tools, "touch ran")
        written = edit(tools, command="create", path="f.txt", file_text="x")
    assert refused.is_error and "fails closed" in refused.output
    assert written.is_error and "fails closed" in written.output
    assert not (policy.workdir / "ran").exists() and not (policy.workdir / "f.txt").exists()


# -- 4. the policy file is out of the sandbox's reach -------------------------------------------


@needs_sandbox
def test_the_srt_settings_live_in_the_state_dir_and_cannot_be_rewritten(tools, policy):
    settings = tools.bash._settings
    assert sb._is_within(settings, policy.state_dir) and stat.S_IMODE(settings.stat().st_mode) == 0o600
    before = settings.read_bytes()
    result = bash(tools, f"echo '{{}}' > {settings}; mkdir -p {settings.parent}/x; echo done")
    assert "done" in result.output
    assert settings.read_bytes() == before and not (settings.parent / "x").exists()


def test_a_temp_dir_inside_the_work_dir_is_refused(policy, monkeypatch):
    """Regression: with TMPDIR under the project, a command rewrote srt's settings file and
    the next command read ~/.ssh and wrote outside."""
    inner = policy.workdir / "tmp"
    inner.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(inner))
    with toolbox(policy) as tools:
        refused = bash(tools, "touch ran")
    assert refused.is_error and "contains the temp directory" in refused.output
    # Even a user who allows a dangerous work dir does not get a rewritable sandbox.
    allowed = dataclasses.replace(policy, allow_dangerous_workdir=True)
    with toolbox(allowed) as tools:
        result = bash(tools, "touch ran")
    assert result.is_error and "TMPDIR" in result.output
    assert not (policy.workdir / "ran").exists()


# -- 5. dangerous work directories --------------------------------------------------------------


def test_dangerous_work_dirs_are_refused_unless_the_flag_is_given(tmp_path, home):
    state = tmp_path / "state"
    refused = {
        "/": "system", "/etc": "system", "/usr/lib": "system", str(home): "home directory",
        str(home / ".config" / "x"): "~/.config", str(tmp_path): "home directory",
        str(tmp_path / "state" / "x"): "state directory", str(tmp_path / "proj"): "state directory",
        sys.prefix: "Python environment", str(Path(sb.__file__).parent): "harness's own code",
    }  # fmt: skip
    for workdir, why in refused.items():
        with pytest.raises(sb.WorkdirRefused) as raised:
            sb.check_workdir(workdir, state_dir=tmp_path / "proj" / "s" if "proj" in workdir else state)
        assert why in str(raised.value) and sb.DANGEROUS_WORKDIR_FLAG in str(raised.value)
        assert "\n" not in str(raised.value)
        sb.check_workdir(workdir, state_dir=state, allow_dangerous=True)  # the user's choice
    sb.check_workdir(tmp_path / "project", state_dir=state)  # an ordinary project is fine


def test_the_tools_themselves_refuse_a_home_work_dir(tmp_path, home):
    """Regression: --workdir $HOME let bash write ~/.bash_login and ~/.config/git/config."""
    policy = sb.SandboxPolicy(workdir=home, state_dir=tmp_path / "state")
    with toolbox(policy) as tools:
        ran = bash(tools, "echo evil > .bash_login")
        wrote = edit(tools, command="create", path=".local/bin/git", file_text="evil")
    assert ran.is_error and sb.DANGEROUS_WORKDIR_FLAG in ran.output
    assert wrote.is_error and sb.DANGEROUS_WORKDIR_FLAG in wrote.output
    assert not (home / ".bash_login").exists() and not (home / ".local").exists()
    assert not sb._check_workdir(policy).ok


# -- 6. files the host executes ---------------------------------------------------------------


@needs_sandbox
def test_claude_settings_are_put_back_and_other_host_run_files_are_named(tools, work):
    (work / ".claude").mkdir()  # the user's: srt leaves it writable
    (work / "sub" / ".claude").mkdir(parents=True)
    (work / "sub" / ".claude" / "settings.json").write_text('{"user": true}\n')
    result = bash(tools, (
        "mkdir -p .devcontainer; echo '{\"hooks\": 1}' > .claude/settings.json; "
        "echo '{\"hooks\": 2}' > sub/.claude/settings.json; echo x > sub/.claude/settings.local.json; "
        "printf 'all:\\n\\ttrue\\n' > Makefile; echo 'export X=1' > .envrc; "
        "echo '{}' > .devcontainer/devcontainer.json; echo ok"
    ))
    assert "ok" in result.output
    assert not (work / ".claude" / "settings.json").exists()
    assert (work / "sub" / ".claude" / "settings.json").read_text() == '{"user": true}\n'
    assert not (work / "sub" / ".claude" / "settings.local.json").exists()
    assert (work / "Makefile").exists()  # noticed, not removed: the user may want it
    (noticed,) = [w for w in result.warnings if "review them" in w]
    assert all(n in noticed for n in ("Makefile", ".envrc", ".devcontainer/devcontainer.json"))
    assert any("Claude Code runs hooks" in w for w in result.warnings)


def test_the_editor_refuses_claude_settings_and_names_host_run_files(tools, work):
    for path in (".claude/settings.json", "a/.Claude/Settings.local.json"):
        result = edit(tools, command="create", path=path, file_text="{}")
        assert result.is_error and "Claude Code" in result.output, path
    made = edit(tools, command="create", path="Makefile", file_text="all:\n")
    assert not made.is_error and any("Makefile" in w for w in made.warnings)


# -- 7. the editor: no check-then-use race, the work-dir lock, case-insensitive names -------------


@pytest.mark.parametrize("openat2", [True, False], ids=["openat2", "fd-walk"])
def test_a_directory_swapped_for_a_link_after_the_check_is_not_followed(
    tools, work, tmp_path, home, monkeypatch, openat2
):
    """Regression: the editor resolved the path, then opened it by name; a directory swapped
    for a link in between made writes land outside (2 of 30 in the attack). The swap is made
    here exactly in that gap."""
    if not openat2:
        monkeypatch.setattr(sb, "_openat2", lambda *a: None)
    outside = tmp_path / "outside"
    outside.mkdir()
    (work / "d").mkdir()
    (work / "d" / "f.txt").write_text("mine\n")
    (home / ".ssh" / "f.txt").write_text("FAKE-SSH-KEY\n")

    def swap_after(method, target):
        def checked(raw, *rest):
            if (work / "d").is_symlink():  # the real directory back for the check
                (work / "d").unlink()
                (work / "d.real").rename(work / "d")
            real = method(raw, *rest)
            (work / "d").rename(work / "d.real")  # then the swap, right after it
            (work / "d").symlink_to(target)
            return real
        return checked

    editor = tools.editor
    monkeypatch.setattr(editor, "_writable", swap_after(sb.EditorTool._writable.__get__(editor), outside))
    created = edit(tools, command="create", path="d/new.txt", file_text="pwned")
    replaced = edit(tools, command="str_replace", path="d/f.txt", old_str="mine", new_str="x")
    monkeypatch.setattr(editor, "_readable", swap_after(sb.EditorTool._readable.__get__(editor), home / ".ssh"))
    viewed = edit(tools, command="view", path="d/f.txt")
    for result in (created, replaced, viewed):
        assert result.is_error and "link" in result.output, result.output
    assert list(outside.iterdir()) == [] and "FAKE-SSH-KEY" not in viewed.output


@needs_sandbox
def test_the_editor_waits_for_a_running_bash_command(tools, work, tmp_path):
    """The editor takes the work-dir lock bash takes: a command swapping a directory for a
    link in a loop cannot run beside it."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (work / "d").mkdir()
    loop = (f"touch started; for i in $(seq 100); do mv d d.x && ln -s {outside} d && rm d "
            "&& mv d.x d; done")  # fmt: skip
    swapper = threading.Thread(target=bash, args=(tools, loop))
    swapper.start()
    try:
        assert wait_until(lambda: (work / "started").exists(), 20)
        results = [edit(tools, command="create", path=f"d/f{i}.txt", file_text="x") for i in range(10)]
    finally:
        swapper.join()
    assert all(not r.is_error for r in results), [r.output for r in results if r.is_error]
    assert list(outside.iterdir()) == [] and len(list((work / "d").iterdir())) == 10


def test_protected_names_hold_in_any_letter_case(tools, work):
    for path in (".GIT/config", ".Git/hooks/pre-commit", ".BASHRC", "x/.GitConfig",
                 ".VSCode/tasks.json", ".CLAUDE/commands/x.md"):  # fmt: skip
        result = edit(tools, command="create", path=path, file_text="evil")
        assert result.is_error and "refused" in result.output, path


def test_the_editor_reports_a_busy_work_dir_instead_of_racing(tools, work, policy, monkeypatch):
    monkeypatch.setattr(sb, "_EDITOR_LOCK_WAIT_S", 0.2)
    held = sb._acquire_lock(sb._lock_path(policy), 1)
    assert held is not None
    try:
        result = edit(tools, command="create", path="f.txt", file_text="x")
    finally:
        os.close(held)
    assert result.is_error and "busy" in result.output and not (work / "f.txt").exists()


# -- 8. output caps that hold -------------------------------------------------------------------


def test_view_and_str_replace_of_huge_single_line_files_stay_small(tools, work):
    """Regression: view of a 15 MiB one-line file returned all of it ($55 in one call)."""
    (work / "min.js").write_text("x" * (15 << 20))
    (work / "two.js").write_text("a" * (2 << 20) + "MARK" + "b" * 100)
    viewed = edit(tools, command="view", path="min.js")
    replaced = edit(tools, command="str_replace", path="two.js", old_str="MARK", new_str="M2")
    many = edit(tools, command="str_replace", path="min.js", old_str="x", new_str="y")
    for result in (viewed, replaced, many):
        assert len(result.output) < sb._EDITOR_MAX_CHARS + 1000
    assert "characters on this line cut" in viewed.output
    assert "characters on this line cut" in replaced.output
    assert many.is_error and "more" in many.output


# -- 9. nothing printed may drive the terminal ----------------------------------------------------


@needs_sandbox
def test_escape_sequences_from_tools_files_and_names_reach_the_screen_inert(tools, work):
    make_repo(work / "a" / "b" / "c")
    (work / "evil.txt").write_text("\x1b]52;c;cHduZWQ=\x07\x1b[2K\x1b[1A\r\u2713 all tests passed\n")
    result = bash(tools, (
        "cat evil.txt; printf '\\033]0;title\\007nul:\\000:end\\n'; "
        "touch \"a/b/c/.git/hooks/$(printf 'x\\033[2J')\""
    ))
    viewed = edit(tools, command="view", path="evil.txt")
    line = sb.describe_tool_call("bash", {"command": "echo \x1b]0;t\x07 \x9b2J"})
    shown = [sb.terminal_safe(result.output), sb.terminal_safe(viewed.output), line,
             *result.warnings]  # fmt: skip
    for text in shown:
        assert not any(ch in text for ch in "\x1b\x07\r\x9b\x00"), repr(text)
    assert "^[]52;c;" in shown[0] and "\0" not in result.output  # shown, not sent; no NUL
    assert sb.terminal_safe("a\tb\r\nc") == "a\tb\nc"


# -- 10. bounded memory, processes and disk ---------------------------------------------------------


@needs_sandbox
def test_memory_processes_and_disk_are_bounded_for_the_whole_command(tmp_path, home):
    policy = make_policy(tmp_path, max_memory_bytes=256 << 20, max_processes=100,
                         max_disk_bytes=16 << 20)  # fmt: skip
    py = sys.executable
    spawn = ("import subprocess\nps = []\ntry:\n    [ps.append(subprocess.Popen(['sleep', '987951']))"
             " for _ in range(300)]\nexcept OSError:\n    pass\nprint('spawned', len(ps))")  # fmt: skip
    with toolbox(policy, probed=True) as tools:
        big = bash(tools, f"{py} -c 'b = bytearray(1 << 30); print(\"ALLOC\" + \"-OK\")'; "
                          f"{py} -c \"$(printf '{spawn}')\"")
        disk = bash(tools, "for i in $(seq 300); do head -c 1M /dev/zero > f$i; done; echo finished")
    assert "ALLOC-OK" not in big.output  # killed (cgroup) or refused (RLIMIT_AS)
    if tools.bash._cgroup is not None or os.geteuid() != 0:
        assert int(big.output.split("spawned ")[1].split()[0]) < 100
    assert pids_running("sleep", "987951") == []
    written = sum(f.stat().st_size for f in policy.workdir.glob("f*"))
    assert disk.is_error and "disk budget" in disk.output and "finished" not in disk.output
    assert written < (16 << 20) + (64 << 20)
    names = {c.name: c for c in sb._check_limits(policy)}
    assert {"limit: memory", "limit: processes", "limit: disk"} <= set(names)


def test_without_a_cgroup_an_address_space_limit_stands_in(policy):
    lines = sb._ulimit_lines(policy, 10, in_cgroup=False)
    assert f"ulimit -v {policy.max_memory_bytes // 1024}" in lines
    assert not any(x.startswith("ulimit -v") for x in sb._ulimit_lines(policy, 10, in_cgroup=True))


# -- 11. private state ------------------------------------------------------------------------------


def test_the_state_dir_is_made_private_and_existing_files_tightened(tmp_path):
    state = tmp_path / "state"
    (state / "locks").mkdir(parents=True)
    os.chmod(state, 0o755)
    os.chmod(state / "locks", 0o755)
    (state / "journal.db").write_text("tool output with a secret")
    os.chmod(state / "journal.db", 0o644)
    outside = tmp_path / "elsewhere.txt"
    outside.write_text("")
    os.chmod(outside, 0o644)
    (state / "link").symlink_to(outside)
    sb.secure_state_dir(state)
    modes = {p: stat.S_IMODE(os.lstat(p).st_mode) for p in (state, state / "locks", state / "journal.db")}
    assert modes == {state: 0o700, state / "locks": 0o700, state / "journal.db": 0o600}
    assert stat.S_IMODE(outside.stat().st_mode) == 0o644  # a link is never followed
    if os.geteuid() == 0:  # as another user, the journal cannot be read
        denied = subprocess.run(["cat", str(state / "journal.db")], user=65534, capture_output=True,
                                check=False)  # fmt: skip
        assert denied.returncode != 0 and b"secret" not in denied.stdout
