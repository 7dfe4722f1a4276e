"""The security boundary of batching-harness, reviewable on its own.

Everything a tool call can touch is decided here: bash runs under Anthropic's
sandbox-runtime (srt, pinned beside this file in package.json; on Linux a long-lived srt
helper per BashTool, srt_server.mjs, wraps each command, else one srt CLI run), the file editor
gives the same answers srt would, and the doctor says exactly what is missing
when the sandbox cannot run. Nothing here knows about models, batches or the
journal; the harness (batching_harness.py) imports this module.

Installed, this directory is the package `batching_harness_sandbox` (never a
generic top-level `sandbox`); from a clone, batching_harness.py loads it by path.

Sections, in dependency order (grep '^#####'):
    errors and results, sandbox (policy, processes, leftovers, git guard),
    tools (editor, toolbox), doctor
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import fcntl
import fnmatch
import hashlib
import json
import math
import os
import re
import resource
import selectors
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

##############################################################################
# Errors and results (what crosses into the harness)
##############################################################################


class SandboxError(Exception):
    """Root of this module's expected failures; the harness reports them in one line."""


class SandboxUnavailable(SandboxError):
    """The sandbox cannot run here; carries the first line of the real error and the fix."""

    def __init__(self, detail: str, fix: str) -> None:
        super().__init__(f"{detail}\nfix: {fix}")
        self.detail = detail
        self.fix = fix


class WorkdirRefused(SandboxError):
    """The work dir would let a sandboxed command plant code the host runs later (the home
    dir, a system dir, the harness's own install); --dangerously-allow-workdir overrides."""


class ToolFailure(SandboxError):
    """A tool call the model got wrong (bad input, a refused path): Toolbox.run turns it into
    an is_error result, so it never reaches the REPL."""


@dataclass(frozen=True)
class ToolResult:
    """What one tool call produced; `output` is what the model sees."""

    output: str
    is_error: bool = False
    exit_code: int | None = None
    # Things the user must hear about that the model need not (e.g. an undone git redirect).
    warnings: tuple[str, ...] = ()


# C0 controls but newline and tab, DEL, C1 controls, and the bidi overrides that reorder what a
# line seems to say. ESC and CSI start the sequences that write the clipboard (OSC 52), set
# the title, move the cursor or erase a line (a file could print a fake success line).
_CONTROL_RE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _visible(match: re.Match[str]) -> str:
    code = ord(match[0])
    if code < 0x20 or code == 0x7F:
        return "^" + chr(code ^ 0x40)  # caret notation, as `cat -v` prints: ESC is ^[
    return f"<U+{code:04X}>"


def terminal_safe(text: str) -> str:
    """Text from outside (tool output, file contents, the model's words, a command line) made
    safe to print: every control character that could drive the terminal is shown instead of
    sent; newline and tab stay, and CRLF becomes a newline."""
    return _CONTROL_RE.sub(_visible, text.replace("\r\n", "\n"))


def model_safe(text: str) -> str:
    """Text for the model: NUL bytes shown as ^@ (the API takes text, not binary)."""
    return text.replace("\0", "^@")


##############################################################################
# Sandbox (bash under sandbox-runtime: policy, processes, leftovers, git redirects)
##############################################################################


# -- policy ------------------------------------------------------------------------

DEFAULT_DENY_READ: tuple[str, ...] = (
    # Keys and sign-ins an agent never needs: srt leaves everything readable unless denied.
    "~/.ssh", "~/.gnupg", "~/.aws", "~/.azure", "~/.config/gcloud", "~/.config/gh", "~/.kube",
    "~/.docker", "~/.netrc", "~/.git-credentials", "~/.npmrc", "~/.pypirc", "~/.vault-token",
    "~/.cargo/credentials.toml", "~/.password-store", "~/.claude", "~/.config/anthropic",
    # Readable by a root caller unless named.
    "/etc/shadow", "/etc/shadow-", "/etc/gshadow", "/etc/gshadow-", "/etc/sudoers",
    "/etc/sudoers.d", "/etc/ssh",
)  # fmt: skip


@dataclass(frozen=True)
class SandboxPolicy:
    """What tools may touch. srt enforces it for bash; EditorTool gives the same answers."""

    workdir: Path
    """The one tree commands and the editor may write; made absolute and resolved here."""
    state_dir: Path
    """The harness's home (journal, history, locks): unreadable inside the sandbox too."""
    allow_domains: tuple[str, ...] = ()
    """Domains bash may reach through srt's proxy; empty means no network at all."""
    deny_read: tuple[str, ...] = DEFAULT_DENY_READ
    """Paths no tool may read (`~` is expanded; entries with * ? [ are globs for srt)."""
    enabled: bool = True
    """False only with --no-sandbox: bash then runs on the host with the user's rights."""
    srt_path: Path | None = None
    """The srt binary; None means sandbox/node_modules/.bin/srt beside this file."""
    max_file_bytes: int = 1 << 30
    """Largest single file one command may write (RLIMIT_FSIZE)."""
    max_disk_bytes: int = 4 << 30
    """Disk space one command may use in all (watched while it runs): many files, each under
    max_file_bytes, would otherwise still fill the disk."""
    max_memory_bytes: int = 4 << 30
    """Memory for one command and everything it starts (a cgroup where one can be made, else
    an address-space limit per process)."""
    max_processes: int = 1024
    """Processes and threads one command may have at once (cgroup pids.max; RLIMIT_NPROC for
    a non-root caller)."""
    git_scan_max_dirs: int = 200_000
    """Directories the git guard walks; past this, bash and editor writes are refused: what
    is not checked could hold a git config that runs code on the host."""
    allow_dangerous_workdir: bool = False
    """True only with --dangerously-allow-workdir: tools then run in a work dir that holds
    the home dir, a system dir or the harness itself (see check_workdir)."""
    srt_server: bool = dataclasses.field(default_factory=lambda: _srt_server_default(os.environ))
    """How srt runs, not what it allows: True (the default on Linux) keeps one long-lived srt
    helper per BashTool that only wraps each command (~0.4 s less per call); False runs one
    srt CLI process per call. BATCHING_HARNESS_SRT_SERVER=0 makes False the default."""

    def __post_init__(self) -> None:
        # Every decision compares real paths: a symlinked work dir must not give two answers.
        object.__setattr__(self, "workdir", Path(os.path.realpath(self.workdir)))
        state_dir = os.path.realpath(os.path.expanduser(self.state_dir))
        object.__setattr__(self, "state_dir", Path(state_dir))
        object.__setattr__(self, "allow_domains", tuple(self.allow_domains))
        object.__setattr__(self, "deny_read", tuple(self.deny_read))

    @property
    def srt(self) -> Path:
        return self.srt_path if self.srt_path is not None else _default_srt_path()


def _srt_server_default(environ: Mapping[str, str]) -> bool:
    return environ.get("BATCHING_HARNESS_SRT_SERVER", "1").strip() != "0"


# -- the work dir and the state dir --------------------------------------------------

DANGEROUS_WORKDIR_FLAG = "--dangerously-allow-workdir"
# A work dir equal to one of these, or inside one of the trees, gives commands the machine.
_SYSTEM_DIRS = ("/", "/home", "/var", "/opt", "/srv", "/mnt", "/media", "/tmp", "/root",
                "/Users", "/Volumes", "/private", "/Applications", "/Library")  # fmt: skip
_SYSTEM_TREES = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32",
                 "/proc", "/run", "/sbin", "/sys", "/usr", "/System", "/private/etc",
                 "/private/var/db")  # fmt: skip


def _harness_install() -> list[tuple[str, Path]]:
    """Where the harness's own code lives: a file planted there (a .pth, a module) runs at its
    next start, with the API key in its environment."""
    import site

    found = [("the Python environment", Path(sys.prefix)),
             ("the harness's own code", Path(__file__).resolve().parent.parent)]  # fmt: skip
    with contextlib.suppress(AttributeError):
        found += [("site-packages", Path(p)) for p in site.getsitepackages()]
    with contextlib.suppress(AttributeError):
        found.append(("your site-packages", Path(site.getusersitepackages())))
    found += [("a directory Python imports from", Path(p))
              for p in sys.path if os.path.isabs(p) and os.path.isdir(p)]  # fmt: skip
    return found


def workdir_refusal(
    workdir: Path | str, *, state_dir: Path | str, protected: Sequence[Path | str] = ()
) -> str | None:
    """Why tools must not run in this work dir, or None. `protected` adds paths (the harness's
    own file) that must stay outside it."""
    real = Path(os.path.realpath(workdir))
    home = Path(os.path.realpath(Path.home()))
    home_note = "whose start-up files (~/.bashrc, ~/.config, ~/.local/bin) run on the host"
    if real == home:
        return f"it is your home directory, {home_note}"
    if str(real) in _SYSTEM_DIRS or any(_is_within(real, Path(t)) for t in _SYSTEM_TREES):
        return "it is a system directory"
    if _is_within(home, real):
        return f"it holds your home directory, {home_note}"
    below = real.relative_to(home).parts if _is_within(real, home) else ()
    if below and below[0].startswith("."):
        return f"it is inside ~/{below[0]}, where tools keep configuration they run"
    inside = [("the harness's state directory", Path(state_dir)),
              ("the temp directory", Path(tempfile.gettempdir())), *_harness_install(),
              *(("a protected path", Path(p)) for p in protected)]  # fmt: skip
    # Inside the install or the state dir is as bad as holding it; inside /tmp is fine.
    no_inside = ("the temp directory", "a directory Python imports from")
    for what, path in inside:
        where = Path(os.path.realpath(os.path.expanduser(path)))
        if _is_within(where, real):
            return f"it contains {what} ({where})"
        if what not in no_inside and _is_within(real, where):
            return f"it is inside {what} ({where})"
    return None


def check_workdir(
    workdir: Path | str, *, state_dir: Path | str, allow_dangerous: bool = False,
    protected: Sequence[Path | str] = (),
) -> None:
    """Refuse (WorkdirRefused, one line) a work dir from which a sandboxed command could plant
    code the host runs later, unless the user passed --dangerously-allow-workdir."""
    if allow_dangerous:
        return
    if reason := workdir_refusal(workdir, state_dir=state_dir, protected=protected):
        raise WorkdirRefused(
            f"refused work directory {os.path.realpath(workdir)}: {reason}. Choose a project "
            f"directory, or pass {DANGEROUS_WORKDIR_FLAG} to use it anyway"
        )


def secure_state_dir(path: Path | str) -> None:
    """The state dir private to the user: 0700, every file in it 0600, existing ones tightened.
    The journal holds tool output, and a command may have printed a secret. Links are left
    alone (never followed)."""
    root = Path(os.path.expanduser(path))
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(root, 0o700)
    for parent, dirs, files in os.walk(root):
        for name in dirs:
            with contextlib.suppress(OSError):
                if not os.path.islink(os.path.join(parent, name)):
                    os.chmod(os.path.join(parent, name), 0o700)
        for name in files:
            with contextlib.suppress(OSError):
                full = os.path.join(parent, name)
                if stat.S_ISREG(os.lstat(full).st_mode):
                    os.chmod(full, 0o600)


_SRT_MIN_VERSION = (0, 0, 83)  # older releases have a reproducible escape (shared directory)
_NODE_MIN_VERSION = (20, 11)
_TOOL_DEFINITIONS = (
    {"type": "bash_20250124", "name": "bash"},
    {"type": "text_editor_20250728", "name": "str_replace_based_edit_tool"},
)
# Empty read-only files (and an empty .claude/) srt mounts over these names in the work dir
# while a command runs. A killed run leaves them behind, and they break `git add -A`.
# Children come before their parent so that removal can empty the parent first.
_SRT_PLACEHOLDERS = (
    ".bashrc", ".bash_profile", ".zshrc", ".zprofile", ".profile", ".gitconfig", ".gitmodules",
    ".ripgreprc", ".mcp.json", ".vscode", ".idea", ".claude/commands", ".claude/agents", ".claude",
)  # fmt: skip
_PROTECTED_NAMES = frozenset(_SRT_PLACEHOLDERS[:9])  # srt's mandatory write denies, by name
_PROTECTED_DIRS = frozenset({".git", ".vscode", ".idea"})
_GIT_EXCLUDE_HEADER = "# batching-harness: sandbox-runtime placeholders (empty, read-only)"
_SECRET_NAME_RE = re.compile(r"KEY|TOKEN|SECRET|PASSW|CREDENTIAL|AUTH|COOKIE", re.IGNORECASE)
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_OUTPUT_HEAD_BYTES = 10_000
_OUTPUT_TAIL_BYTES = 10_000
_KILL_GRACE_S = 2.0  # srt unmounts and removes its placeholders on SIGTERM; SIGKILL skips that
_DISK_CHECK_S = 0.05
_DRAIN_GRACE_S = 0.5  # a process that outlived its shell may hold the pipe; stop waiting for it
_CPU_SLACK_S = 5
_NPROC_LIMIT = 4096  # binds only non-root callers: root is exempt from RLIMIT_NPROC
_PROBE_TIMEOUT_S = 60.0  # a cold Node start on a loaded CI machine takes seconds
_GIT_SCAN_MAX_DIRS = 50_000
_GIT_FILE_MAX_BYTES = 1 << 20
_EDITOR_COMMANDS = ("view", "create", "str_replace", "insert")
_EDITOR_MAX_CHARS = 20_000
_EDITOR_MAX_LINE_CHARS = 2_000
_EDITOR_LOCK_WAIT_S = 60.0
_MATCH_LINES_SHOWN = 20
_TOOL_MAX_CHARS = 40_000
_EDITOR_MAX_FILE_BYTES = 16 << 20
_LISTING_MAX_ENTRIES = 1_000
_MISSING: Any = object()


def _default_srt_path() -> Path:
    return Path(__file__).resolve().parent / "node_modules" / ".bin" / "srt"


def _is_within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _has_glob(entry: str) -> bool:
    return any(ch in entry for ch in "*?[")


def _read_denials(policy: SandboxPolicy) -> list[str]:
    """Every read-denied location, `~` expanded: the deny list plus the harness's home."""
    return [os.path.expanduser(e) for e in policy.deny_read] + [str(policy.state_dir)]


def _literal(path: Path | str) -> dict[str, Any]:
    # srt reads * ? [ as glob characters; a work dir may legitimately hold them in its name.
    return {"path": str(path), "literal": True}


def _secret_env_names(environ: Mapping[str, str]) -> list[str]:
    """Names srt must withhold should one reach it. Proxy variables are left out: srt sets its
    own, and a deny would strip those too."""
    return sorted(
        n for n in environ
        if _ENV_NAME_RE.match(n) and _SECRET_NAME_RE.search(n) and "PROXY" not in n.upper()
    )  # fmt: skip


def _srt_settings(policy: SandboxPolicy, command_tmp: Path) -> dict[str, Any]:
    """The whole config, written per BashTool into the state dir (which the sandbox can neither
    read nor write): srt refuses a missing or partial file rather than fall back to its
    defaults, which is what we want."""
    deny_read = [e if _has_glob(e) else _literal(e) for e in _read_denials(policy)]
    home = Path.home()
    secrets_ = _secret_env_names(os.environ)
    return {
        "network": {"allowedDomains": list(policy.allow_domains), "deniedDomains": []},
        "filesystem": {
            "denyRead": deny_read,
            "allowWrite": [_literal(policy.workdir), _literal(command_tmp)],
            # srt leaves the first two writable for convenience; the rest is ours: srt's
            # sockets, and the state dir, should a dangerous work dir hold them.
            "denyWrite": [
                _literal(home / ".npm" / "_logs"), _literal(home / ".claude" / "debug"),
                _literal(command_tmp.parent / "srt"), _literal(command_tmp.parent / "srt-server"),
                _literal(policy.state_dir),
            ],
        },
        "credentials": {"envVars": [{"name": n, "mode": "deny"} for n in secrets_]},
    }


def _search_path(path_env: str, writable: Sequence[Path]) -> str:
    """PATH without entries a sandboxed command could write: srt looks up node, bwrap, socat
    and rg on PATH and runs them on the host, outside the sandbox."""
    keep = [
        d for d in path_env.split(os.pathsep)
        if os.path.isabs(d) and not any(_is_within(Path(os.path.realpath(d)), w) for w in writable)
    ]  # fmt: skip
    return os.pathsep.join(keep) or os.defpath


def _child_env(policy: SandboxPolicy, command_tmp: Path, srt_tmp: Path) -> dict[str, str]:
    """A minimal explicit environment: srt passes its whole environment on to the command, so
    anything here (an API key, a token) would be readable inside."""
    return {
        "PATH": _search_path(os.environ.get("PATH", os.defpath), [policy.workdir, command_tmp]),
        "HOME": str(Path.home()),
        "LANG": os.environ.get("LANG", "C.UTF-8"),
        "TERM": os.environ.get("TERM", "dumb"),
        # srt keeps its sockets in TMPDIR and gives the command CLAUDE_CODE_TMPDIR as TMPDIR:
        # two directories, so a command cannot touch srt's sockets.
        "TMPDIR": str(srt_tmp if policy.enabled else command_tmp),
        "CLAUDE_CODE_TMPDIR": str(command_tmp),
    }


def _capped(kind: int, wanted: int) -> int:
    hard = resource.getrlimit(kind)[1]
    return wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)


def _ulimit_lines(policy: SandboxPolicy, timeout_s: float, in_cgroup: bool) -> list[str]:
    """Limits for the command's shell, set hard so the command cannot raise them: srt sets
    none. Without a cgroup, an address-space limit per process stands in for memory.max."""
    file_blocks = max(1, _capped(resource.RLIMIT_FSIZE, policy.max_file_bytes) // 1024)  # KiB
    cpu_s = _capped(resource.RLIMIT_CPU, math.ceil(timeout_s) + _CPU_SLACK_S)
    lines = ["ulimit -c 0", f"ulimit -f {file_blocks}", f"ulimit -t {cpu_s}"]
    if not in_cgroup:
        lines.append(f"ulimit -v {max(1, _capped(resource.RLIMIT_AS, policy.max_memory_bytes) // 1024)}")
    if os.geteuid() != 0:
        lines.append(f"ulimit -u {_capped(resource.RLIMIT_NPROC, _NPROC_LIMIT)}")
    return lines


def _shell_script(command: str, cwd: Path, workdir: Path, cwd_file: Path, limits: list[str]) -> str:
    """Each call is a fresh shell (as in Claude Code): the working directory is carried over
    through a file written on exit; environment changes are not."""
    q = shlex.quote
    lost = "echo '[harness] the previous directory is gone; back in the work directory' >&2"
    return "\n".join([
        *limits,
        f"cd -- {q(str(cwd))} 2>/dev/null || {{ {lost}; cd -- {q(str(workdir))}; }}",
        f"trap {q(f'pwd -P >| {q(str(cwd_file))} 2>/dev/null')} EXIT",
        command,
    ])  # fmt: skip


# -- resource limits: memory, processes, disk -------------------------------------------------
#
# srt sets none. rlimits in the command's shell bind each process, not the command as a whole
# (and RLIMIT_NPROC does not bind root), so where the machine lets us make a cgroup, the
# command and everything it starts run in one with memory and process caps; the disk is
# watched while the command runs.

_CGROUP_DRAIN_S = 0.25  # for what is left of a command in a v1 cgroup (no cgroup.kill) to go
_CGROUP_POLL_S = 0.0003  # every 2 ms cost a call 1 ms on average (half the calls wait)
_CGROUP_JOIN = 'while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; shift; exec "$@"'


def _mounts() -> list[tuple[str, str, set[str]]]:
    """(mount point, file system type, options) of each cgroup file system."""
    found = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            left, _, right = line.partition(" - ")
            fields, tail = left.split(), right.split()
            if len(fields) > 4 and len(tail) > 2 and tail[0] in ("cgroup", "cgroup2"):
                found.append((fields[4], tail[0], set(tail[2].split(","))))
    return found


def _own_cgroups() -> dict[str, str]:
    """Our cgroup per v1 controller ('memory', 'pids') and for v2 (key '')."""
    own = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            for name in controllers.split(",") if controllers else [""]:
                own[name] = path
    return own


class _Cgroup:
    """One cgroup (v2) or one per controller (v1) for one BashTool's commands."""

    def __init__(self, version: int, dirs: dict[str, Path]) -> None:
        self.version = version
        self.dirs = dirs  # 'memory'/'pids' -> its directory (the same one under v2)
        self._counts = self._events()

    @classmethod
    def create(cls, name: str, memory_bytes: int, processes: int) -> _Cgroup | None:
        for make in (cls._make_v2, cls._make_v1):
            with contextlib.suppress(OSError, ValueError):
                if (made := make(name, memory_bytes, processes)) is not None:
                    return made
        return None

    @classmethod
    def _make_v2(cls, name: str, memory_bytes: int, processes: int) -> _Cgroup | None:
        mount = next((m for m, kind, _ in _mounts() if kind == "cgroup2"), None)
        own = _own_cgroups().get("")
        if mount is None or own is None:
            return None
        base = Path(mount) / own.lstrip("/")
        # Ours, if it may have children with these controllers; else a sibling of ours.
        for parent in (base, base.parent):
            wanted = {"memory", "pids"}
            enabled = set((parent / "cgroup.subtree_control").read_text().split())
            if not wanted <= enabled:
                with contextlib.suppress(OSError):
                    (parent / "cgroup.subtree_control").write_text("+memory +pids")
                enabled = set((parent / "cgroup.subtree_control").read_text().split())
            if wanted <= enabled:
                path = parent / name
                path.mkdir()
                try:
                    (path / "memory.max").write_text(str(memory_bytes))
                    with contextlib.suppress(OSError):
                        (path / "memory.swap.max").write_text("0")  # no escape into swap
                    (path / "pids.max").write_text(str(processes))
                except OSError:
                    path.rmdir()
                    raise
                return cls(2, {"memory": path, "pids": path})
        return None

    @classmethod
    def _make_v1(cls, name: str, memory_bytes: int, processes: int) -> _Cgroup | None:
        own, dirs = _own_cgroups(), {}
        for controller, limits in (
            ("memory", {"memory.limit_in_bytes": memory_bytes,
                        "memory.memsw.limit_in_bytes": memory_bytes}),
            ("pids", {"pids.max": processes}),
        ):  # fmt: skip
            mount = next((m for m, kind, opts in _mounts()
                          if kind == "cgroup" and controller in opts), None)  # fmt: skip
            if mount is None or controller not in own:
                break
            path = Path(mount) / own[controller].lstrip("/") / name
            path.mkdir()
            dirs[controller] = path
            try:
                for file, value in limits.items():
                    if (path / file).exists() or file == next(iter(limits)):
                        (path / file).write_text(str(value))
            except OSError:
                break
        else:
            return cls(1, dirs)
        for path in dirs.values():
            with contextlib.suppress(OSError):
                path.rmdir()
        return None

    def procs_files(self) -> list[str]:
        """The files a process writes its pid to, to join (one per hierarchy)."""
        return sorted({str(d / "cgroup.procs") for d in self.dirs.values()})

    def join_argv(self, argv: list[str]) -> list[str]:
        """argv, started inside the cgroup: the shell joins it, then execs (same pid)."""
        return ["/bin/sh", "-c", _CGROUP_JOIN, "sh", *self.procs_files(), "--", *argv]

    def kill_all(self) -> None:
        """Whatever of the command is left, at once (srt's namespace usually took it already)."""
        for directory in set(self.dirs.values()):
            if self.version == 2 and (directory / "cgroup.kill").exists():
                with contextlib.suppress(OSError):
                    (directory / "cgroup.kill").write_text("1")
                continue
            # Usually srt's socat bridges, killed as the sandbox ends, gone within 1-8 ms
            # (measured): polled finely, since every call waits for this.
            deadline = time.monotonic() + _CGROUP_DRAIN_S
            while (pids := _read_ints(directory / "cgroup.procs")) and time.monotonic() < deadline:
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGKILL)
                time.sleep(_CGROUP_POLL_S)

    def _events(self) -> tuple[int, int]:
        memory, pids = self.dirs["memory"], self.dirs["pids"]
        oom = _event_count(memory / ("memory.events" if self.version == 2
                                     else "memory.oom_control"), "oom_kill")  # fmt: skip
        return oom, _event_count(pids / "pids.events", "max")

    def limit_hit(self) -> str | None:
        """A note if the last command ran into the memory or process cap."""
        before, self._counts = self._counts, self._events()
        hit = []
        if self._counts[0] > before[0]:
            hit.append("its memory limit (the kernel killed a process in it)")
        if self._counts[1] > before[1]:
            hit.append("its process limit (starting a process or thread failed)")
        return f"the command ran into {' and '.join(hit)}" if hit else None

    def remove(self) -> None:
        self.kill_all()
        for directory in set(self.dirs.values()):
            with contextlib.suppress(OSError):
                directory.rmdir()


def _read_ints(path: Path) -> list[int]:
    with contextlib.suppress(OSError, ValueError):
        return [int(x) for x in path.read_text().split()]
    return []


def _event_count(path: Path, name: str) -> int:
    with contextlib.suppress(OSError, ValueError):
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == name:
                return int(value)
    return 0


@dataclass
class _DiskBudget:
    """Disk space one command may use, watched on the file systems it can write (the work dir
    and its temp dir): the file-size limit alone lets many files fill the disk."""

    budget_bytes: int
    roots: tuple[str, ...]
    free_at_start: dict[int, int] = dataclasses.field(default_factory=dict)
    checked_at: float = 0.0

    @classmethod
    def for_policy(cls, policy: SandboxPolicy, command_tmp: Path) -> _DiskBudget:
        budget = cls(policy.max_disk_bytes, (str(policy.workdir), str(command_tmp)))
        budget.free_at_start = budget._free()
        return budget

    def _free(self) -> dict[int, int]:
        free = {}
        for root in self.roots:
            with contextlib.suppress(OSError):
                st = os.statvfs(root)
                free[os.stat(root).st_dev] = st.f_bavail * st.f_frsize
        return free

    def exceeded(self, now: float) -> bool:
        """True once the free space has dropped by more than the budget (checked every
        _DISK_CHECK_S: a statvfs is cheap, but not free)."""
        if now - self.checked_at < _DISK_CHECK_S:
            return False
        self.checked_at = now
        free = self._free()
        used = sum(max(self.free_at_start.get(dev, 0) - left, 0) for dev, left in free.items())
        return used > self.budget_bytes


def _gib(n: int) -> str:
    return f"{n / (1 << 30):g} GiB" if n >= 1 << 30 else f"{n / (1 << 20):g} MiB"


def active_limits(policy: SandboxPolicy) -> list[tuple[str, str, bool]]:
    """(what, how it is enforced here, bounded?) for --doctor and the README's promise."""
    cgroup = _Cgroup.create(f"{_PRIVATE_PREFIX}doctor-{os.getpid()}", policy.max_memory_bytes,
                            policy.max_processes)  # fmt: skip
    if cgroup is not None:
        cgroup.remove()
        kind = f"cgroup v{cgroup.version}"
        memory = (f"{_gib(policy.max_memory_bytes)} for a command and all it starts ({kind})", True)
        procs = (f"{policy.max_processes} processes and threads ({kind} pids.max)", True)
    else:
        memory = (f"{_gib(policy.max_memory_bytes)} per process (RLIMIT_AS; no cgroup can be "
                  "made here, so many processes together can use more)", True)  # fmt: skip
        procs = ((f"{_NPROC_LIMIT} processes for your user (RLIMIT_NPROC)", True)
                 if os.geteuid() != 0 else
                 ("NOT bounded: no cgroup here and RLIMIT_NPROC does not bind root; only the "
                  "CPU limit and --tool-timeout stop a fork bomb", False))  # fmt: skip
    disk = (f"{_gib(policy.max_file_bytes)} per file (RLIMIT_FSIZE), {_gib(policy.max_disk_bytes)} "
            "per command in all (watched every 50 ms; a fast write can pass it by a little)", True)
    cpu = ("--tool-timeout plus a few seconds of CPU (RLIMIT_CPU); the whole tree is killed "
           "at the timeout", True)  # fmt: skip
    return [("memory", *memory), ("processes", *procs), ("disk", *disk), ("time", *cpu)]


# -- running one process -----------------------------------------------------------


class _OutputCapture:
    """The first and last bytes of a stream of any size: memory stays bounded, and the model
    sees how a long output starts and how it ended."""

    def __init__(self) -> None:
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        room = _OUTPUT_HEAD_BYTES - len(self.head)
        self.head += chunk[: max(room, 0)]
        self.tail += chunk[max(room, 0) :]
        del self.tail[: max(len(self.tail) - _OUTPUT_TAIL_BYTES, 0)]

    def text(self) -> str:
        elided = self.total - len(self.head) - len(self.tail)
        if elided <= 0:
            return bytes(self.head + self.tail).decode("utf-8", "replace")
        notice = (
            f"\n\n[... {elided:,} of {self.total:,} bytes elided from the middle. Send long "
            "output to a file and read parts of it: grep -n, head, tail, sed -n '100,200p' ...]\n\n"
        )
        return self.head.decode("utf-8", "replace") + notice + self.tail.decode("utf-8", "replace")


@dataclass(frozen=True)
class _Finished:
    output: str
    exit_code: int | None  # None when the harness killed the command
    outcome: str  # "exited", "timeout", "interrupted", "disk" (over budget) or "refused"


def _launch(
    argv: list[str], env: dict[str, str], cwd: Path, stdin: int = subprocess.DEVNULL
) -> subprocess.Popen[bytes]:
    # A session of its own: Ctrl-C in the terminal does not reach it, and one killpg ends it.
    return subprocess.Popen(
        argv, cwd=cwd, env=env, stdin=stdin, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip


def _pump(
    proc: subprocess.Popen[bytes], capture: _OutputCapture, deadline: float,
    budget: _DiskBudget | None = None,
) -> str:
    """Read the merged output until the process is done: "exited", or "timeout" / "disk" when
    the deadline or the disk budget came first. selectors rather than a blocking read, so a
    full pipe or a silent command never hangs us."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    exited_at: float | None = None
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while (now := time.monotonic()) < deadline:
            if exited_at is None and proc.poll() is not None:
                exited_at = now
            if exited_at is not None and now - exited_at > _DRAIN_GRACE_S:
                return "exited"
            if budget is not None and exited_at is None and budget.exceeded(now):
                return "disk"
            if selector.select(min(_DISK_CHECK_S, deadline - now)):
                chunk = os.read(fd, 65536)
                if not chunk:
                    return _wait_until(proc, deadline, budget)
                capture.add(chunk)
    return "timeout"


def _wait_until(
    proc: subprocess.Popen[bytes], deadline: float, budget: _DiskBudget | None
) -> str:
    while (now := time.monotonic()) < deadline:
        if budget is not None and budget.exceeded(now):
            return "disk"
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(min(_DISK_CHECK_S, max(deadline - now, 0)))
            return "exited"
    return "timeout"


def _stop(proc: subprocess.Popen[bytes], *, term_group: bool) -> None:
    """End the command and everything it started. srt gets SIGTERM alone first so it can clean
    up; then the whole group gets SIGKILL, since SIGKILL to srt alone leaves the sandbox up."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if term_group:
                os.killpg(proc.pid, signal.SIGTERM)
            else:
                proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired, KeyboardInterrupt):
            proc.wait(_KILL_GRACE_S)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # also ends whatever outlived a normal exit
    with contextlib.suppress(subprocess.TimeoutExpired, KeyboardInterrupt):
        proc.wait(5)


def _exit_status(returncode: int | None) -> int | None:
    # Report a signal the way a shell does (128+N), so the model reads one convention.
    return None if returncode is None else (128 - returncode if returncode < 0 else returncode)


def _run_process(
    argv: list[str], env: dict[str, str], cwd: Path, timeout_s: float, *, sandboxed: bool,
    started: Callable[[int], None], budget: _DiskBudget | None = None,
) -> _Finished:
    """Run to completion, timeout or Ctrl-C. Ctrl-C stops this command only: it is reported
    to the model as a result, not re-raised. `started` gets the process group id at once."""
    proc = _launch(argv, env, cwd)
    return _await(proc, timeout_s, sandboxed=sandboxed, started=started, budget=budget)


def _await(
    proc: subprocess.Popen[bytes], timeout_s: float, *, sandboxed: bool,
    started: Callable[[int], None], budget: _DiskBudget | None = None,
    feed: Callable[[], None] | None = None,
) -> _Finished:
    """_run_process for a process already launched. `feed` runs once the group is recorded
    and before the clock starts: it hands a waiting leader its command. Whatever it raises
    (but Ctrl-C) propagates once the process is stopped."""
    capture, outcome = _OutputCapture(), "exited"
    try:
        started(proc.pid)  # its own session: the pid is the group id
        if feed is not None:
            feed()
        outcome = _pump(proc, capture, time.monotonic() + timeout_s, budget)
        if outcome == "disk":  # every moment of grace is more of the disk: no SIGTERM first
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
    except KeyboardInterrupt:
        outcome = "interrupted"
    finally:
        # Without srt, the shell's whole group gets SIGTERM: nothing else would clean up.
        _stop(proc, term_group=not sandboxed)
        assert proc.stdout is not None
        proc.stdout.close()
    code = _exit_status(proc.returncode) if outcome == "exited" else None
    return _Finished(capture.text(), code, outcome)


def _bash_result(run: _Finished, notes: Sequence[str], timeout_s: float) -> ToolResult:
    parts = [run.output.rstrip("\n")] if run.output.strip() else []
    if run.outcome == "timeout":
        parts.append(
            f"[timed out after {timeout_s:g} s: the command and everything it started were "
            "killed; any output so far is above. Split the work into shorter commands.]"
        )
    elif run.outcome == "interrupted":
        parts.append("[interrupted: the user pressed Ctrl-C, so the command was killed]")
    elif run.outcome == "disk":
        parts.append(
            "[stopped: the command used more disk space than one command may "
            "(the per-command disk budget); what it wrote so far is still there (du -sh)]"
        )
    elif run.exit_code:
        parts.append(f"[exit status {run.exit_code}]")
    notes = [terminal_safe(note) for note in notes]  # they name paths a command chose
    parts += [f"[harness] {note}" for note in notes]
    is_error = run.outcome != "exited" or run.exit_code != 0
    output = model_safe("\n".join(parts) or "(no output)")
    return ToolResult(output, is_error, run.exit_code, tuple(notes))


# -- srt as a long-lived helper: one per BashTool, reused across calls -----------------------
#
# One srt CLI run per call is a Node start-up plus srt's proxy and bridges: about 0.4 s, the
# fleet's bottleneck with 20 agents on 2 cores. sandbox/srt_server.mjs is srt used as a library
# (as Claude Code uses it): started once per BashTool with the same settings file, it then only
# wraps each command into its bwrap command line, which the harness runs itself in a shell as
# the CLI would (`/bin/sh -c LINE`; here a leader shell, started while srt wraps, reads LINE
# from its stdin). So the timeout, the kill of the tree, the cgroup, the environment and the
# clean-up around a command are the same code for both. Anything unexpected (it will
# not start, it died, an answer that is not a bwrap line for our settings) ends the helper,
# and the call goes through the CLI instead: a command never runs unsandboxed.

_SRT_SERVER_SCRIPT = Path(__file__).resolve().parent / "srt_server.mjs"
# The shell that leads a wrapped command: it joins the cgroup (its arguments: the cgroup.procs
# files), then runs what its stdin holds, which _feed_leader writes once srt has wrapped the
# command. Nothing on stdin, or a cut-off command, runs nothing: exit 125, or a syntax error.
_LEADER_SCRIPT = 'for f do echo $$ > "$f" || exit 125; done; set --\n. /dev/stdin\nexit 125'

_SERVER_START_S = 30.0  # a cold Node start on a loaded machine takes seconds
_SERVER_REPLY_S = 10.0  # srt's clean-up after a command: file removals
_SERVER_EXIT_S = 2.0  # for srt to stop its bridges and remove its sockets on end of input
_SERVER_MAX_LINE_BYTES = 4 << 20
_SERVER_MAX_FAILURES = 3  # in a row; then the CLI for the rest of the BashTool's life
# One helper per agent: a small young generation keeps each about 62 MiB instead of 74 (20
# agents, 240 MiB less), with no measurable change in the time a wrap takes.
_SERVER_NODE_FLAGS = ("--max-semi-space-size=1",)


class _ServerFailed(SandboxError):
    """The srt helper cannot serve this call; the caller falls back to the srt CLI."""


def _wrapped_re(pid: int) -> re.Pattern[str]:
    """What srt 0.0.83 hands out on Linux: bwrap itself or, for a profile too long for one
    argument, a shell that opens the mounts file this helper holds open, then execs bwrap."""
    via_file = rf"/bin/sh -c 'exec 9<\"\$1\" && shift && exec \"\$@\"' srt-args /proc/{pid}/fd/\d+ "
    return re.compile(rf"(?:{via_file})?bwrap --new-session --die-with-parent ")


def _write_all(fd: int, data: bytes, deadline: float) -> bool:
    """All of `data` into a pipe, or False once the deadline passed: a reader that stopped
    reading must not hang the harness. OSError (EPIPE: the reader is gone) propagates."""
    os.set_blocking(fd, False)
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_WRITE)
        while data:
            if (left := deadline - time.monotonic()) <= 0:
                return False
            if selector.select(left):
                with contextlib.suppress(BlockingIOError):
                    data = data[os.write(fd, data) :]
    return True


def _feed_leader(fd: int, wrapped: str, deadline: float) -> None:
    """The leader's command: srt's line as its CLI runs it (`sh -c LINE`), in braces so that
    a cut-off write is a syntax error, not a shorter command; stdin back to /dev/null
    (read-write, as subprocess.DEVNULL opens it)."""
    payload = f"exec <>/dev/null\n{{\n{wrapped}\n}}\nexit $?\n".encode()
    with contextlib.suppress(BrokenPipeError):  # it is gone (the cgroup join failed): its
        _write_all(fd, payload, deadline)  # exit status says so


class _SrtServer:
    """One running srt_server.mjs and its line protocol (see the script's header). Not
    thread-safe by itself: BashTool calls it only with the work-dir lock held."""

    def __init__(self, proc: subprocess.Popen[bytes], settings_sha256: str) -> None:
        self.proc = proc
        self._settings_sha256 = settings_sha256
        self._buffer = b""
        self._next_id = 0
        self._wrapped = _wrapped_re(proc.pid)
        self._closed = False

    @classmethod
    def start(
        cls, policy: SandboxPolicy, settings: Path, env: dict[str, str], log: Path
    ) -> _SrtServer:
        """Start and wait for its ready line, or raise _ServerFailed saying why."""
        node = shutil.which("node", path=env["PATH"])
        lib = Path(os.path.realpath(policy.srt)).parent  # srt is dist/cli.js; the library too
        for path in (_SRT_SERVER_SCRIPT, lib):
            if _is_within(Path(os.path.realpath(path)), policy.workdir):
                raise _ServerFailed(f"{path} is inside the work directory")
        if node is None or not (lib / "index.js").is_file():
            raise _ServerFailed("node or sandbox-runtime's library (dist/index.js) not found")
        with open(log, "wb") as err:  # this helper's own: a failure names its own error
            proc = subprocess.Popen(
                [node, *_SERVER_NODE_FLAGS, str(_SRT_SERVER_SCRIPT), str(lib), str(settings)],
                cwd=policy.workdir,
                env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                start_new_session=True,  # Ctrl-C in the terminal must not reach it
            )  # fmt: skip
        expected = hashlib.sha256(settings.read_bytes()).hexdigest()
        server = cls(proc, expected)
        try:
            server._check_ready(server._read(time.monotonic() + _SERVER_START_S))
        except _ServerFailed as exc:
            server.close()
            said = _first_error_line((_read_small(log) or b"").decode("utf-8", "replace"))
            raise _ServerFailed(f"{exc} ({said})" if said else str(exc)) from None
        except BaseException:
            server.close()
            raise
        return server

    def _check_ready(self, ready: dict[str, Any]) -> None:
        if ready.get("ready") is not True:
            raise _ServerFailed(f"srt helper did not start: {str(ready.get('error'))[:300]}")
        version = tuple(int(x) for x in re.findall(r"\d+", str(ready.get("version")))[:3])
        if ready.get("pid") != self.proc.pid or version < _SRT_MIN_VERSION:
            raise _ServerFailed(f"srt helper answered as pid {ready.get('pid')}, srt {version}")
        if ready.get("settings_sha256") != self._settings_sha256:
            raise _ServerFailed("srt helper loaded other settings than the harness wrote")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wrap(self, command: str, timeout_s: float) -> str:
        """The bwrap command line that runs `command` under our settings."""
        return self.wrapped(self.ask_wrap(command, timeout_s))

    def ask_wrap(self, command: str, timeout_s: float) -> tuple[int, float]:
        """Send a wrap request and return at once, while srt works on it: the request's id and
        deadline, for wrapped(). Until then, only started() may be sent (it has no reply)."""
        deadline = time.monotonic() + timeout_s
        return self._ask({"op": "wrap", "command": command}, deadline), deadline

    def wrapped(self, request: tuple[int, float]) -> str:
        """The answer to ask_wrap: checked to be a bwrap command line, else the helper ends."""
        reply = self._answer(*request)
        wrapped = reply.get("wrapped")
        if not isinstance(wrapped, str) or not self._wrapped.match(wrapped):
            self.close()
            shown = str(wrapped)[:80]
            raise _ServerFailed(f"srt helper answered with no bwrap command line: {shown!r}")
        return wrapped

    def started(self, pgid: int) -> None:
        """Tell it which group runs the command: should the harness die, it waits for that
        group to end before srt removes the sandbox's mount points. No reply."""
        with contextlib.suppress(_ServerFailed):
            self._send({"op": "started", "pgid": pgid}, time.monotonic() + _SERVER_REPLY_S)

    def cleanup(self) -> None:
        """srt's own clean-up after a command (its mount points in the work dir)."""
        self._request({"op": "cleanup"}, _SERVER_REPLY_S)

    def close(self) -> None:
        """End of input lets srt stop its bridges and remove its sockets; then the group.
        Once only: a second killpg could reach a group that reused the pid."""
        if self._closed:
            return
        self._closed = True
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(_SERVER_EXIT_S)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # socat bridges of a helper killed hard
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def _request(self, message: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        """One request and its reply."""
        deadline = time.monotonic() + timeout_s
        return self._answer(self._ask(message, deadline), deadline)

    def _ask(self, message: dict[str, Any], deadline: float) -> int:
        try:
            return self._send(message, deadline)
        except BaseException:
            self.close()
            raise

    def _answer(self, request_id: int, deadline: float) -> dict[str, Any]:
        """The reply to request_id. Any failure, Ctrl-C included, ends the helper: a reply
        left unread would answer the next request."""
        try:
            reply = self._read(deadline)
            if reply.get("id") != request_id:
                got = reply.get("id")
                raise _ServerFailed(f"srt helper answered request {got!r}, not {request_id}")
            if reply.get("ok") is not True:
                raise _ServerFailed(f"srt helper: {str(reply.get('error'))[:300]}")
            return reply
        except BaseException:
            self.close()
            raise

    def _send(self, message: dict[str, Any], deadline: float) -> int:
        self._next_id += 1
        data = (json.dumps({"id": self._next_id, **message}) + "\n").encode()
        assert self.proc.stdin is not None
        try:
            written = _write_all(self.proc.stdin.fileno(), data, deadline)
        except OSError as exc:  # EPIPE: it died
            raise _ServerFailed(f"srt helper is gone ({exc.strerror})") from None
        if not written:
            raise _ServerFailed("srt helper stopped reading")
        return self._next_id

    def _read(self, deadline: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while b"\n" not in self._buffer:
                if len(self._buffer) > _SERVER_MAX_LINE_BYTES:
                    raise _ServerFailed("srt helper sent an endless line")
                if (left := deadline - time.monotonic()) <= 0:
                    raise _ServerFailed("srt helper did not answer in time")
                if selector.select(left):
                    chunk = os.read(fd, 1 << 16)
                    if not chunk:
                        with contextlib.suppress(subprocess.TimeoutExpired):
                            self.proc.wait(0.5)  # for its status: end of output comes first
                        raise _ServerFailed(f"srt helper exited (status {self.proc.returncode})")
                    self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        try:
            reply = json.loads(line)
        except ValueError:
            reply = None
        if not isinstance(reply, dict):
            raise _ServerFailed(f"srt helper sent no JSON object: {line[:80]!r}")
        return reply


# -- work-dir hygiene: one command at a time, srt's leftovers, git redirects ----------------


def _lock_path(policy: SandboxPolicy) -> Path:
    digest = hashlib.sha256(str(policy.workdir).encode()).hexdigest()[:16]
    return policy.state_dir / "locks" / f"workdir-{digest}.lock"


def _acquire_lock(path: Path, timeout_s: float) -> int | None:
    """Two srt runs in one directory at once remove each other's mount points: wait our turn."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    return None
                time.sleep(0.05)
    except BaseException:
        os.close(fd)
        raise


def _placeholder_candidates(workdir: Path, git_dirs: Sequence[Path]) -> list[Path]:
    # srt also puts an empty file where a repository it found has no hooks directory.
    return [workdir / name for name in _SRT_PLACEHOLDERS] + [g / "hooks" for g in git_dirs]


def _remove_new_placeholders(
    candidates: Sequence[Path], existed: set[Path], *, read_only: bool = False
) -> list[Path]:
    """Remove what srt left: only NEW paths that are an empty file or an empty directory (with
    read_only, only files nobody may write, as srt makes them). Returns what was removed."""
    removed = []
    plain: dict[Path, bool] = {}  # per parent (three for fourteen candidates): realpath is slow
    for path in candidates:
        if path in existed:
            continue
        # A directory on the way may have become a link (a nested .git): never act through it.
        if path.parent not in plain:
            plain[path.parent] = os.path.realpath(path.parent) == str(path.parent)
        if not plain[path.parent]:
            continue
        try:
            st = os.lstat(path)
            writable = bool(st.st_mode & 0o222)
            if stat.S_ISREG(st.st_mode) and st.st_size == 0 and not (read_only and writable):
                os.unlink(path)
            elif stat.S_ISDIR(st.st_mode) and not os.listdir(path):
                os.rmdir(path)
            else:
                continue
        except OSError:
            continue
        removed.append(path)
    return removed


def _ensure_git_excludes(workdir: Path) -> None:
    """List srt's placeholders in .git/info/exclude: while a command runs they exist, and
    `git add -A` inside the sandbox refuses them."""
    info = workdir / ".git" / "info"
    if not _is_plain_dir(workdir / ".git"):
        return
    with contextlib.suppress(FileExistsError):
        os.mkdir(info, 0o755)
    if not _is_plain_dir(info):
        return
    current = _read_small(info / "exclude") or b""
    if current.startswith(b"\0link "):
        current = b""  # planted by a command: replaced below, never written through
    if _GIT_EXCLUDE_HEADER.encode() in current:
        return
    lines = [_GIT_EXCLUDE_HEADER] + ["/" + p for p in _SRT_PLACEHOLDERS if p != ".claude"]
    prefix = "\n" if current and not current.endswith(b"\n") else ""
    _replace_file(info / "exclude", current + (prefix + "\n".join(lines) + "\n").encode(), 0o644)


def _is_plain_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _read_small(path: Path) -> bytes | None:
    """A regular file's bytes (capped), `\\0link target` for a symlink, None when absent.
    Never follows a link and never opens a FIFO a command may have planted."""
    try:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            return b"\0link " + os.fsencode(os.readlink(path))
        if not stat.S_ISREG(st.st_mode):
            return None
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        return f.read(_GIT_FILE_MAX_BYTES)


def _replace_file(path: Path, content: bytes, mode: int) -> None:
    """A fresh file: never follows a link, nor writes through a hard link, that a sandboxed
    command may have planted at this name."""
    _remove(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    with os.fdopen(os.open(path, flags, mode), "wb") as f:
        f.write(content)


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if _is_plain_dir(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)


@dataclass(frozen=True)
class _RepoState:
    """The files of one git directory that decide what git on the host executes."""

    git_file: bytes | None  # a `.git` that is a file ("gitdir: …") or a link; None for a dir
    commondir: bytes | None = None
    configs: tuple[tuple[str, bytes | None], ...] = ()  # config, config.worktree
    hooks: tuple[tuple[str, bytes], ...] = ()  # "" stands for a hooks dir that is a link


@dataclass(frozen=True)
class _Snapshot:
    """What the guard compares after a command: git directories, files host tools run."""

    repos: Mapping[Path, _RepoState]
    host_run: Mapping[Path, bytes]  # content (protected files) or a signature (noticed ones)
    capped: bool  # the walk stopped at its limit: some of the tree was NOT looked at


_GIT_DATA_DIRS = frozenset({"objects", "refs", "logs", "lfs"})  # data, never config: not walked
_CONFIG_FILES = ("config", "config.worktree")
# Host files that run code: Claude Code runs hooks from .claude/settings*.json without the
# user asking (protected: put back), the others run when the user runs a tool (noticed).
_HOST_RUN_NAMES = frozenset({".envrc", "makefile", "gnumakefile", "justfile",
                             ".pre-commit-config.yaml", ".gitmodules", ".gitattributes"})
_HOST_RUN_DIRS = frozenset({".devcontainer", ".vscode", ".idea", ".husky"})


def _git_shaped(entries: Mapping[str, os.DirEntry[str]]) -> bool:
    """A directory git would take for a repository: HEAD, and objects/ + refs/ or commondir.
    Names are compared case-folded: on macOS `.GIT/HEAD` is `.git/HEAD`."""
    head, common = entries.get("head"), entries.get("commondir")
    objects, refs = entries.get("objects"), entries.get("refs")
    if head is None or head.is_dir(follow_symlinks=False):
        return False
    return common is not None or (objects is not None and refs is not None
                                  and objects.is_dir() and refs.is_dir())  # fmt: skip


def _host_run_kind(rel: Path) -> str | None:
    """'protected', 'noticed' or None for a file at `rel` in the work dir."""
    parts = [p.casefold() for p in rel.parts]
    if len(parts) >= 2 and parts[-2] == ".claude" and fnmatch.fnmatchcase(parts[-1], "settings*.json"):
        return "protected"
    if parts[-1] in _HOST_RUN_NAMES or any(p in _HOST_RUN_DIRS for p in parts[:-1]):
        return "noticed"
    return None


def _signature(path: Path) -> bytes:
    with contextlib.suppress(OSError):
        st = os.lstat(path)
        return f"{st.st_mode}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}".encode()
    return b""


def _walk(workdir: Path, max_dirs: int) -> tuple[list[Path], dict[Path, bytes], bool]:
    """Every git directory (by name or by shape, so bare repositories and `.git/modules/*`
    count), every `.git` file or link, and the host-run files. Links are never followed.
    Plain strings on the way: this runs twice per command over the whole tree."""
    git_paths: list[Path] = []
    host_run: dict[Path, bytes] = {}
    root = str(workdir)
    stack: list[tuple[str, bool]] = [(root, False)]  # (directory, inside a host-run dir)
    seen = 0
    while stack:
        here, in_run_dir = stack.pop()
        seen += 1
        if seen > max_dirs:
            return git_paths, host_run, True
        try:
            entries = {e.name.casefold(): e for e in os.scandir(here)}
        except OSError:
            continue
        name = os.path.basename(here).casefold()
        is_git = here != root and name == ".git"
        if is_git or _git_shaped(entries):
            is_git = True
            git_paths.append(Path(here))
        for folded, entry in entries.items():
            if entry.is_dir(follow_symlinks=False):
                if not (is_git and folded in _GIT_DATA_DIRS):
                    stack.append((entry.path, in_run_dir or folded in _HOST_RUN_DIRS))
            elif folded == ".git":
                git_paths.append(Path(entry.path))  # a gitdir file or a link: a redirect
            elif in_run_dir or folded in _HOST_RUN_NAMES or (
                    name == ".claude" and folded.startswith("settings")):  # fmt: skip
                path = Path(entry.path)
                kind = _host_run_kind(path.relative_to(workdir))
                if kind == "protected":
                    host_run[path] = _read_small(path) or b""
                elif kind == "noticed":
                    host_run[path] = _signature(path)
    return git_paths, host_run, False


def _linked_git_dirs(workdir: Path, git_paths: Sequence[Path]) -> list[Path]:
    """Directories a `gitdir:` file or a `commondir` points at inside the tree (in case the
    walk skipped them): their config and hooks are what git on the host would use."""
    found = []
    for path in git_paths:
        link = path / "commondir" if _is_plain_dir(path) else path
        text = (_read_small(link) or b"").decode("utf-8", "replace").strip()
        text = text.removeprefix("gitdir:").strip() if link is path else text
        if not text or text.startswith("\0"):
            continue
        target = Path(os.path.realpath(link.parent / text))
        if _is_within(target, workdir) and _is_plain_dir(target) and target not in git_paths:
            found.append(target)
    return found


def _repo_state(dot_git: Path) -> _RepoState:
    if not _is_plain_dir(dot_git):
        return _RepoState(_read_small(dot_git) or b"")
    configs = tuple((name, _read_small(dot_git / name)) for name in _CONFIG_FILES)
    return _RepoState(None, _read_small(dot_git / "commondir"), configs, _hook_files(dot_git))


def _hook_files(dot_git: Path) -> tuple[tuple[str, bytes], ...]:
    hooks = dot_git / "hooks"
    if os.path.islink(hooks):
        return (("", _read_small(hooks) or b""),)
    if not _is_plain_dir(hooks):
        return ()
    names = sorted(n for n in os.listdir(hooks) if not n.endswith(".sample"))
    return tuple((n, _read_small(hooks / n) or b"") for n in names)


def _snapshot(workdir: Path, max_dirs: int) -> _Snapshot:
    git_paths, host_run, capped = _walk(workdir, max_dirs)
    git_paths += _linked_git_dirs(workdir, git_paths)
    return _Snapshot({p: _repo_state(p) for p in git_paths}, host_run, capped)


def _scan_cap_refusal(policy: SandboxPolicy) -> str:
    return (
        f"not run: the work directory has more than {policy.git_scan_max_dirs:,} directories, "
        "so the harness cannot check all of them for git config and hooks that would run code "
        "on the host (it fails closed). Tell the user: move large trees out of the work "
        "directory, or raise the limit (SandboxPolicy.git_scan_max_dirs)"
    )


# -- config: read the way git reads it, keep only keys that run nothing -----------------------

# Keys git never turns into a command. Everything else a command adds or changes is reverted:
# the keys that run programs (fsmonitor, pager, sshCommand, gpg.*.program, defaultKeyCommand,
# uploadpack, receivepack, remote.*.vcs, url.*.insteadOf, credential helpers, filters, …) keep
# growing with every git release, so naming them cannot be complete.
_SAFE_CONFIG_KEYS = frozenset({
    "core.repositoryformatversion", "core.filemode", "core.bare", "core.logallrefupdates",
    "core.ignorecase", "core.precomposeunicode", "core.symlinks", "core.autocrlf", "core.eol",
    "core.safecrlf", "extensions.objectformat", "extensions.worktreeconfig", "user.name",
    "user.email",
})  # fmt: skip
_SAFE_CONFIG_KEY_RE = re.compile(
    r"branch\..+\.(remote|merge)|remote\..+\.(fetch|push)|submodule\..+\.active", re.DOTALL
)
_URL_CONFIG_KEY_RE = re.compile(r"remote\..+\.(url|pushurl)|submodule\..+\.url", re.DOTALL)
# A URL that names a place, not a program: no `transport::address` helper, no leading `-`.
_PLAIN_URL_RE = re.compile(
    r"(?:https?|ssh|git|file)://(?!-)[^\s]+|[\w.~+-]+@(?!-)[\w.-]+:[^\s]+|\.{0,2}/[^\s]*"
)
_GIT_READ_ENV = {
    "PATH": os.defpath, "HOME": "/nonexistent", "XDG_CONFIG_HOME": "/nonexistent",
    "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_SYSTEM": "/dev/null", "GIT_CONFIG_GLOBAL": "/dev/null",
    "GIT_PAGER": "cat", "PAGER": "cat", "GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C",
}  # fmt: skip
_ConfigEntry = tuple[str, "str | None"]


def _harmless_config(key: str, value: str | None) -> bool:
    if key in _SAFE_CONFIG_KEYS or _SAFE_CONFIG_KEY_RE.fullmatch(key):
        return True
    if not _URL_CONFIG_KEY_RE.fullmatch(key) or value is None:
        return False
    return "::" not in value and "@-" not in value and bool(_PLAIN_URL_RE.fullmatch(value))


def _host_git(workdir: Path) -> str | None:
    return shutil.which("git", path=_search_path(os.environ.get("PATH", os.defpath), [workdir]))


def _git_config_entries(content: bytes, git: str | None) -> list[_ConfigEntry] | None:
    """The entries exactly as git reads them (`git config --list --null --no-includes`, no
    system or global config, no pager), or None when git cannot read them."""
    if git is None or content.startswith(b"\0link ") or len(content) > _GIT_FILE_MAX_BYTES:
        return None
    try:
        done = subprocess.run(
            [git, "config", "--file", "-", "--list", "--null", "--no-includes"], input=content,
            capture_output=True, env=_GIT_READ_ENV, cwd="/", timeout=30, check=False,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    entries: list[_ConfigEntry] = []
    for item in done.stdout.split(b"\0")[:-1]:
        key, newline, value = item.partition(b"\n")
        text = value.decode("utf-8", "surrogateescape") if newline else None
        entries.append((key.decode("utf-8", "surrogateescape"), text))
    return entries


def _config_bytes(entries: Sequence[_ConfigEntry]) -> bytes:
    """A config file holding exactly these entries (the caller checks it with git)."""

    def quoted(text: str) -> str:
        escaped = text.replace("\\", "\\\\").replace('"', '\\"')
        return '"' + escaped.replace("\n", "\\n").replace("\t", "\\t") + '"'

    lines, header = [], None
    for key, value in entries:
        section, _, name = key.rpartition(".")
        top, dot, sub = section.partition(".")
        wanted = f"[{top} {quoted(sub)}]" if dot else f"[{top}]"
        if wanted != header:
            lines.append(wanted)
            header = wanted
        lines.append(f"\t{name}" if value is None else f"\t{name} = {quoted(value)}")
    return ("\n".join(lines) + "\n").encode("utf-8", "surrogateescape") if lines else b""


def _vetted_config(
    content: bytes, before: bytes | None, git: str | None
) -> tuple[bytes | None, str] | None:
    """None if every entry is harmless or was there before; else what to put in the file's
    place (None: remove it) and what was taken out, for the note."""
    entries = _git_config_entries(content, git)
    prior = (_git_config_entries(before, git) or []) if before is not None else []
    if entries is None:
        readable = before is not None and _git_config_entries(before, git) is not None
        return (before if readable else None), "all of it (git could not read it as checked)"
    kept = [entry for entry in entries if _harmless_config(*entry) or entry in prior]
    if len(kept) == len(entries):
        return None
    dropped = ", ".join(sorted({key for key, value in entries if (key, value) not in kept}))
    if before is not None and kept == prior:
        return before, dropped  # only additions: the user's file, comments and all
    rebuilt = _config_bytes(kept)
    if _git_config_entries(rebuilt, git) != kept:
        rebuilt = b""  # it would not read back as meant: an empty config runs nothing
    return rebuilt, dropped


def _undo_git(workdir: Path, before: _Snapshot, after: _Snapshot) -> list[str]:
    """Put back what a command changed that would make git on the host run planted code."""
    notes: list[str] = []
    # Only a repository that changed can have anything to undo; looking git up on PATH costs
    # ~1 ms (a realpath per PATH entry), paid by every call before.
    changed = {path: now for path, now in after.repos.items() if before.repos.get(path) != now}
    git = _host_git(workdir) if changed else None
    for path, now in changed.items():
        where = str(path.relative_to(workdir)) if path != workdir else "."
        notes += _undo_repo(path, where, before.repos.get(path), now, git)
    return notes


def _undo_repo(
    dot_git: Path, where: str, prior: _RepoState | None, now: _RepoState, git: str | None
) -> list[str]:
    if now.git_file is not None:
        if prior is not None and prior.git_file == now.git_file:
            return []
        _restore(dot_git, prior.git_file if prior else None, 0o644)
        shown = now.git_file.replace(b"\0link ", b"a link to ").decode("utf-8", "replace").strip()
        return [f"removed a {where} that redirected git ({shown[:120]})"]
    notes = []
    old_commondir = prior.commondir if prior else None
    if now.commondir is not None and now.commondir != old_commondir:
        _restore(dot_git / "commondir", old_commondir, 0o644)
        notes.append(f"removed a planted {where}/commondir that redirected git")
    notes += _undo_configs(dot_git, where, prior, now, git)
    return notes + _undo_hooks(dot_git, where, prior, now)


def _undo_configs(
    dot_git: Path, where: str, prior: _RepoState | None, now: _RepoState, git: str | None
) -> list[str]:
    notes = []
    old = dict(prior.configs) if prior else {}
    for name, content in now.configs:
        if content is None or content == old.get(name):
            continue
        verdict = _vetted_config(content, old.get(name), git)
        if verdict is None:
            continue
        replacement, dropped = verdict
        _restore(dot_git / name, replacement, 0o644)
        notes.append(
            f"reverted {dropped} in {where}/{name}: only keys that run nothing may be set "
            "from inside the sandbox"
        )
    return notes


def _undo_hooks(dot_git: Path, where: str, prior: _RepoState | None, now: _RepoState) -> list[str]:
    old = dict(prior.hooks) if prior else {}
    changed = [name for name, content in now.hooks if old.get(name) != content]
    for name in changed:
        _restore(dot_git / "hooks" / name if name else dot_git / "hooks", old.get(name), 0o755)
    if not changed:
        return []
    return [f"removed hooks planted in {where}/hooks: {', '.join(n or '(link)' for n in changed)}"]


def _undo_host_run(workdir: Path, before: _Snapshot, after: _Snapshot) -> list[str]:
    """Protected host-run files are put back; the others are named so the user can look."""
    protected, noticed = [], []
    for path, now in after.host_run.items():
        if before.host_run.get(path) == now:
            continue
        rel = str(path.relative_to(workdir))
        if _host_run_kind(path.relative_to(workdir)) == "protected":
            _restore(path, before.host_run.get(path), 0o644)
            protected.append(rel)
        else:
            noticed.append(rel)
    notes = []
    if protected:
        notes.append(f"put back {', '.join(protected)}: Claude Code runs hooks from it "
                     "without asking")  # fmt: skip
    if noticed:
        notes.append(f"created or changed {', '.join(sorted(noticed)[:20])}: tools on the host "
                     "run these (make, direnv, your editor); review them before you do")  # fmt: skip
    return notes


def _guard_notes(policy: SandboxPolicy, before: _Snapshot) -> list[str]:
    """After a command or an editor write: undo what would run on the host, and say so."""
    workdir = policy.workdir
    after = _snapshot(workdir, policy.git_scan_max_dirs)
    notes = _undo_git(workdir, before, after) + _undo_host_run(workdir, before, after)
    if after.capped:
        notes.append(
            f"WARNING: the work directory now has more than {policy.git_scan_max_dirs:,} "
            "directories; git config and hooks past that point were NOT checked. Do not run "
            "git on the host in it until you have looked; further commands are refused"
        )
    return notes


def _restore(path: Path, content: bytes | None, mode: int) -> None:
    if content is None or content.startswith(b"\0link "):
        _remove(path)
    else:
        _replace_file(path, content, mode)


def _empty_dir(path: Path) -> None:
    for entry in os.scandir(path):
        _remove(Path(entry.path))


# -- a command that outlived its harness ------------------------------------------------------
#
# srt runs in a session of its own, so a harness killed by SIGKILL (or the OOM killer) leaves
# the command running, reparented to init, while the work-dir lock dies with the harness: a
# resumed session would run the command again beside it. So each run is recorded beside the
# lock until it ends, and whoever takes the lock next stops what still runs, then cleans up
# after it. The lock is not handed down to srt instead (pass_fds): srt passes inherited
# descriptors on into the sandbox, where the command could release it with `flock -u`.

_ORPHAN_WAIT_S = 5.0  # after SIGKILL, for the sandbox to follow (bwrap --die-with-parent)
_PRIVATE_PREFIX = "batching-harness-bash-"


@dataclass(frozen=True)
class _RunRecord:
    """One running command, as kept in the state dir's locks/ while it runs."""

    pgid: int  # its process group (srt's pid, or bash's with --no-sandbox)
    owner: int  # the harness process that started it
    sandboxed: bool
    private: str  # the BashTool's temp dir: its random name marks the run's processes
    command: str
    candidates: tuple[str, ...]  # srt's placeholder paths in the work dir,
    existed: tuple[str, ...]  # and those of them that were there before the run
    settings: str = ""  # its srt settings file in the state dir


@dataclass(frozen=True)
class _Proc:
    pid: int
    pgid: int
    text: bytes  # the command line and, on Linux, the environment, as the host sees them


def _run_record_path(policy: SandboxPolicy) -> Path:
    return _lock_path(policy).with_suffix(".running")


def _notices_path(policy: SandboxPolicy) -> Path:
    return _lock_path(policy).with_suffix(".notices")


def _write_run_record(path: Path, record: _RunRecord) -> None:
    part = path.with_suffix(".part")  # then renamed: a kill mid-write leaves no half record
    _replace_file(part, json.dumps(dataclasses.asdict(record)).encode(), 0o600)
    os.replace(part, path)


def _read_run_record(path: Path) -> _RunRecord | None:
    """None unless the record is exactly as _write_run_record makes it."""
    raw = _read_small(path)
    try:
        data = json.loads(raw) if raw and not raw.startswith(b"\0link ") else None
        record = _RunRecord(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
    except (ValueError, TypeError, AttributeError):
        return None
    texts = (record.private, record.command, record.settings, *record.candidates, *record.existed)
    if not all(isinstance(t, str) for t in texts) or type(record.owner) is not int:
        return None
    # killpg(0) or killpg(1) would reach far more than one command: never trust such a value.
    ok = type(record.pgid) is int and record.pgid > 1 and record.pgid != os.getpgrp()
    return record if ok else None


def _processes() -> list[_Proc] | None:
    """Every live process (a zombie is dead), or None when they cannot be listed."""
    if not os.path.isdir("/proc/self"):
        return _ps_processes()
    found = (_proc_entry(int(entry)) for entry in os.listdir("/proc") if entry.isdigit())
    return [proc for proc in found if proc is not None]


def _proc_entry(pid: int) -> _Proc | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()
        text = Path(f"/proc/{pid}/cmdline").read_bytes()
        with contextlib.suppress(OSError):
            text += b"\0" + Path(f"/proc/{pid}/environ").read_bytes()
    except (OSError, IndexError):
        return None
    return None if fields[0] == b"Z" else _Proc(pid, int(fields[2]), text)


def _ps_processes() -> list[_Proc] | None:
    """The same from ps, where there is no /proc (macOS): command lines only."""
    try:
        listing = subprocess.run(
            ["ps", "-A", "-ww", "-o", "pid=,pgid=,stat=,command="],
            stdin=subprocess.DEVNULL, capture_output=True, timeout=10, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    rows = [line.split(None, 3) for line in listing.splitlines()]
    return [
        _Proc(int(row[0]), int(row[1]), row[3]) for row in rows
        if len(row) == 4 and row[0].isdigit() and row[1].isdigit() and not row[2].startswith(b"Z")
    ]  # fmt: skip


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError, IndexError):  # init in a container may never reap it
        return Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0] != b"Z"
    return True


def _wait_for(done: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not done() and time.monotonic() < deadline:
        time.sleep(0.05)


def _run_marker(record: _RunRecord) -> bytes:
    return os.fsencode(Path(record.private).name)


def _is_recorded_group(record: _RunRecord, procs: Sequence[_Proc]) -> bool:
    """The recorded group still runs AND is verifiably that run: one of its processes names
    the run's private temp dir (a random name) in its command line or environment. A bare
    pgid may have been recycled since; then nothing matches and nothing is signalled."""
    marker = _run_marker(record)
    return any(p.pgid == record.pgid and marker in p.text for p in procs)


def _stop_recorded_group(record: _RunRecord, procs: Sequence[_Proc]) -> None:
    """As a timeout does (_stop): SIGTERM to srt alone so it unmounts and removes its
    placeholders, a grace period, then SIGKILL to the group, verified again just before."""
    pgid = record.pgid
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if not record.sandboxed:
            os.killpg(pgid, signal.SIGTERM)
        elif any(p.pid == pgid == p.pgid for p in procs):
            os.kill(pgid, signal.SIGTERM)
    _wait_for(lambda: not _alive(pgid), _KILL_GRACE_S)
    if _is_recorded_group(record, _processes() or []):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
    marker = _run_marker(record)  # the sandbox has a session of its own: wait for it too
    _wait_for(lambda: not any(marker in p.text for p in _processes() or []), _ORPHAN_WAIT_S)


def _stop_leftover(record: _RunRecord) -> list[str]:
    shown = " ".join(record.command.split())[:200]
    procs = _processes()
    if procs is None:
        return [
            f"could not check whether a command started by an earlier harness process still "
            f"runs (process group {record.pgid}: {shown}); if it does, it runs alongside"
        ]
    if not _is_recorded_group(record, procs):
        return []
    _stop_recorded_group(record, procs)
    return [f"stopped a command left running by an earlier harness process: {shown}"]


def _remove_private_dir(record: _RunRecord) -> None:
    """The dead run's temp dir, if it is one of ours by name; never while its owner lives."""
    private = Path(record.private)
    ours = private.is_absolute() and private.name.startswith(_PRIVATE_PREFIX)
    if ours and _is_plain_dir(private) and not _alive(record.owner):
        shutil.rmtree(private, ignore_errors=True)
        _remove_stale_cgroups(private.name)
        if record.settings and Path(record.settings).name == f"{private.name}.json":
            with contextlib.suppress(OSError):
                os.unlink(record.settings)


def _remove_stale_cgroups(name: str) -> None:
    """The dead run's cgroups (named after its private dir); rmdir fails while one is in use."""
    own = _own_cgroups()
    for mount, kind, options in _mounts():
        keys = [""] if kind == "cgroup2" else [c for c in ("memory", "pids") if c in options]
        for key in keys:
            base = Path(mount) / own.get(key, "/").lstrip("/")
            for parent in (base, base.parent):
                with contextlib.suppress(OSError):
                    (parent / name).rmdir()


def _reap_leftover_run(policy: SandboxPolicy) -> None:
    """With the work-dir lock held: stop a command whose harness died mid-run, remove the
    placeholders and temp dir it left, and keep a notice for the next command's result."""
    path = _run_record_path(policy)
    record = _read_run_record(path)
    if record is None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # unreadable: nothing in it can be trusted to act on
        return
    notes = _stop_leftover(record)
    candidates = [Path(c) for c in record.candidates if _is_within(Path(c), policy.workdir)]
    existed = {Path(p) for p in record.existed}
    if removed := _remove_new_placeholders(candidates, existed, read_only=True):
        names = ", ".join(str(p.relative_to(policy.workdir)) for p in removed)
        notes.append(f"removed empty placeholders an interrupted sandbox run left: {names}")
    _remove_private_dir(record)
    if notes:
        with open(_notices_path(policy), "a", encoding="utf-8") as f:
            f.writelines(f"{note}\n" for note in notes)
    os.unlink(path)


def _take_notices(policy: SandboxPolicy) -> list[str]:
    path = _notices_path(policy)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    path.unlink()
    return [line for line in text.splitlines() if line]


# -- bash ------------------------------------------------------------------------------


class BashTool:
    """The `bash` tool: every command is a fresh `bash -c` inside srt (bubblewrap on Linux,
    sandbox-exec on macOS), wrapped by this tool's long-lived srt helper where it can be, else
    by one srt CLI run. Fails closed: without a working sandbox nothing runs, unless the user
    chose --no-sandbox."""

    def __init__(self, policy: SandboxPolicy) -> None:
        self.policy = policy
        # Private: srt's sockets (srt/, not writable inside) and the command's TMPDIR (tmp/).
        self._private = Path(tempfile.mkdtemp(prefix=_PRIVATE_PREFIX))
        self._srt_tmp, self._tmp = self._private / "srt", self._private / "tmp"
        self._server_tmp = self._private / "srt-server"  # the helper's sockets, kept across calls
        for directory in (self._srt_tmp, self._tmp, self._server_tmp):
            directory.mkdir()
        # In the state dir, not the temp dir: with TMPDIR inside the work dir, a command
        # rewrote the settings and the next one ran unconfined. Named after the private dir,
        # so a leftover srt is recognised by its command line too (_is_recorded_group).
        self._settings = policy.state_dir / "sandbox" / f"{self._private.name}.json"
        self._settings.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        settings = json.dumps(_srt_settings(policy, self._tmp), indent=1).encode()
        _replace_file(self._settings, settings, 0o600)
        self._env = _child_env(policy, self._tmp, self._srt_tmp)
        self._server_env = _child_env(policy, self._tmp, self._server_tmp)
        self._server: _SrtServer | None = None
        self._server_failures = 0  # in a row
        self._server_notes: list[str] = []  # for the user: why a call fell back to the CLI
        self._cwd_file = self._tmp / ".harness-cwd"
        self._cwd = policy.workdir
        self._sandbox_checked = False
        self._cgroup: _Cgroup | None = None
        self._cgroup_tried = False
        self._refused = _workdir_problem(policy)  # once: it looks at sys.path and site

    def run(self, command: str, timeout_s: float) -> ToolResult:
        try:
            fd = _acquire_lock(_lock_path(self.policy), timeout_s)
        except KeyboardInterrupt:
            return ToolResult("[interrupted: the user pressed Ctrl-C before it started]", True)
        if fd is None:
            return ToolResult(
                f"not run: another command kept {self.policy.workdir} busy for {timeout_s:g} s "
                "(commands in one work directory run one at a time); try again",
                is_error=True,
            )
        try:
            _reap_leftover_run(self.policy)  # before anything else runs in this work dir
            notes = [terminal_safe(note) for note in _take_notices(self.policy)]
            if problem := self._sandbox_problem():
                return ToolResult(problem, is_error=True, warnings=tuple(notes))
            run, undone = self._execute(command, timeout_s)
            result = _bash_result(run, notes + undone, timeout_s)
            server_notes, self._server_notes = self._server_notes, []
            return dataclasses.replace(result, warnings=result.warnings + tuple(server_notes))
        except KeyboardInterrupt:  # while stopping a leftover, or during the first-use probe
            return ToolResult("[interrupted: the user pressed Ctrl-C before it started]", True)
        finally:
            os.close(fd)

    def restart(self) -> ToolResult:
        self._cwd = self.policy.workdir
        return ToolResult(f"bash restarted: the working directory is {self._cwd} again.")

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._cgroup is not None:
            self._cgroup.remove()
            self._cgroup = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._settings)
        shutil.rmtree(self._private, ignore_errors=True)

    def _execute(self, command: str, timeout_s: float) -> tuple[_Finished, list[str]]:
        """Run one command with the work dir's hygiene around it; returns the outcome and the
        notes about what was undone (git redirects, host-run files)."""
        workdir = self.policy.workdir
        if not self._cgroup_tried:
            self._cgroup_tried = True
            self._cgroup = _Cgroup.create(
                self._private.name, self.policy.max_memory_bytes, self.policy.max_processes
            )
        before = _snapshot(workdir, self.policy.git_scan_max_dirs)
        if before.capped:
            return _Finished(_scan_cap_refusal(self.policy), None, "refused"), []
        repos = [p for p, st in before.repos.items() if st.git_file is None and p.name == ".git"]
        candidates = _placeholder_candidates(workdir, repos)
        existed = {p for p in candidates if os.path.lexists(p)}
        _ensure_git_excludes(workdir)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._cwd_file)
        limits = _ulimit_lines(self.policy, timeout_s, self._cgroup is not None)
        script = _shell_script(command, self._cwd, workdir, self._cwd_file, limits)
        record = self._recorder(command, candidates, existed)
        wrapped_by: list[_SrtServer] = []  # the helper whose wrap ran: srt's clean-up is owed
        try:
            run = self._run(script, timeout_s, record, wrapped_by)
        finally:
            if self._cgroup is not None:
                self._cgroup.kill_all()
            for server in wrapped_by:
                self._server_cleanup(server)
            _remove_new_placeholders(candidates, existed)
            _empty_dir(self._srt_tmp)  # srt-mux-*.sock and friends, one set per run
            with contextlib.suppress(FileNotFoundError):
                os.unlink(_run_record_path(self.policy))  # only now: the cleanup is done
        notes = _guard_notes(self.policy, before)
        if self._cgroup is not None and (why := self._cgroup.limit_hit()):
            notes.append(why)
        self._cwd = self._carried_cwd() or self._cwd
        return run, notes

    def _recorder(
        self, command: str, candidates: Sequence[Path], existed: set[Path]
    ) -> Callable[[int], None]:
        """Records the run once its process group exists, for _reap_leftover_run."""

        def record(pgid: int) -> None:
            paths = (tuple(map(str, candidates)), tuple(map(str, existed)))
            run = _RunRecord(pgid, os.getpid(), self.policy.enabled, str(self._private), command,
                             *paths, str(self._settings))
            _write_run_record(_run_record_path(self.policy), run)

        return record

    def _argv(self, script: str) -> list[str]:
        if not self.policy.enabled:
            argv = ["bash", "-c", script]
        else:
            argv = [str(self.policy.srt), "--settings", str(self._settings), "-c", script]
        return self._in_cgroup(argv)

    def _in_cgroup(self, argv: list[str]) -> list[str]:
        return self._cgroup.join_argv(argv) if self._cgroup is not None else argv

    def _leader_argv(self) -> list[str]:
        procs = self._cgroup.procs_files() if self._cgroup is not None else []
        return ["/bin/sh", "-c", _LEADER_SCRIPT, "sh", *procs]

    # -- the srt helper: wrap through it when it can; else the CLI, never unsandboxed --------

    def _run(
        self, script: str, timeout_s: float, record: Callable[[int], None],
        wrapped_by: list[_SrtServer],
    ) -> _Finished:
        """Through the helper where it can; else one srt CLI run (or bash alone under
        --no-sandbox). A helper that wrapped the command is added to `wrapped_by`."""
        budget = _DiskBudget.for_policy(self.policy, self._tmp)
        server = self._ready_server()
        if server is not None:
            try:
                return self._run_wrapped(server, script, timeout_s, record, budget, wrapped_by)
            except _ServerFailed as exc:  # nothing ran: the leader got no command
                self._server_failed(exc, tell_user=True)
        return _run_process(self._argv(script), self._env, self.policy.workdir, timeout_s,
                            sandboxed=self.policy.enabled, started=record, budget=budget)  # fmt: skip

    def _run_wrapped(
        self, server: _SrtServer, script: str, timeout_s: float, record: Callable[[int], None],
        budget: _DiskBudget, wrapped_by: list[_SrtServer],
    ) -> _Finished:
        """The leader shell starts, and joins the cgroup, while srt wraps: a cgroup join (v1,
        measured) slows the forks that follow it by ~10 ms, now spent while srt works. The
        leader runs only the line srt wrapped, from its stdin, once it is checked; given
        nothing it runs nothing. It stays, as srt's node does on the CLI path: it leads the
        group (the run record names it), and bwrap dies with it (--die-with-parent). Left to
        exec bwrap, the leader would be bwrap, child of the harness: were the harness killed,
        it would die and leave the sandbox running, unrecognised."""
        request = server.ask_wrap(script, timeout_s)
        answered = False
        feed_r, feed_w = os.pipe()
        try:
            with open(feed_w, "wb", buffering=0) as feed_file:
                try:
                    proc = _launch(self._leader_argv(), self._server_env, self.policy.workdir,
                                   stdin=feed_r)  # fmt: skip
                finally:
                    os.close(feed_r)

                def feed() -> None:
                    nonlocal answered
                    with feed_file:  # closed, with or without a command: the leader goes on
                        wrapped = server.wrapped(request)
                        answered = True
                        wrapped_by.append(server)
                        _feed_leader(feed_file.fileno(), wrapped, time.monotonic() + timeout_s)

                return _await(proc, timeout_s, sandboxed=True, budget=budget, feed=feed,
                              started=self._started(record, server))  # fmt: skip
        finally:
            if not answered:
                server.close()  # its reply, if any, would answer the next request

    def _ready_server(self) -> _SrtServer | None:
        """The helper, started on first use and again after it died; None for the CLI."""
        wanted = self.policy.enabled and self.policy.srt_server and sys.platform.startswith("linux")
        if not wanted or self._server_failures >= _SERVER_MAX_FAILURES:
            return None
        if self._server is not None and not self._server.alive():
            self._server.close()  # reaps it, and the bridges a hard kill left
            self._server = None
        if self._server is None:
            try:
                self._server = _SrtServer.start(self.policy, self._settings, self._server_env,
                                                self._private / "srt-server.log")  # fmt: skip
            except _ServerFailed as exc:
                self._server_failed(exc, tell_user=True)
        return self._server

    def _server_failed(self, exc: _ServerFailed, *, tell_user: bool) -> None:
        self._server_failures += 1
        if self._server is not None:
            self._server.close()
            self._server = None
        last = self._server_failures >= _SERVER_MAX_FAILURES
        if tell_user or last:  # switching to the CLI for good is always worth a line
            then = "every bash call now runs" if last else "this call ran"
            self._server_notes.append(f"{exc}; {then} through a per-call srt CLI (slower, as safe)")

    def _started(
        self, record: Callable[[int], None], server: _SrtServer | None
    ) -> Callable[[int], None]:
        def started(pgid: int) -> None:
            record(pgid)
            if server is not None:
                server.started(pgid)

        return started

    def _server_cleanup(self, server: _SrtServer) -> None:
        """srt's clean-up after a command; the harness's own follows whatever happens here."""
        try:
            server.cleanup()
            self._server_failures = 0
        except (_ServerFailed, KeyboardInterrupt) as exc:  # it is closed: the next call restarts it
            failure = exc if isinstance(exc, _ServerFailed) else _ServerFailed("interrupted")
            self._server_failed(failure, tell_user=False)

    def _carried_cwd(self) -> Path | None:
        text = (_read_small(self._cwd_file) or b"").decode("utf-8", "replace").strip()
        path = Path(text) if text and "\0" not in text else None
        return path if path is not None and path.is_absolute() and path.is_dir() else None

    def _sandbox_problem(self) -> str | None:
        """Probe once, on first use: a missing bwrap looks like any failing command."""
        if self._refused:
            return self._refused
        if _is_within(self._private, self.policy.workdir):
            return (
                f"not run: the temp directory {self._private.parent} is inside the work "
                "directory, where a command could rewrite what the sandbox relies on. Tell the "
                "user: set TMPDIR to a directory outside the work directory"
            )
        if not self.policy.enabled or self._sandbox_checked:
            return None
        try:
            self._probe_locked()
        except SandboxUnavailable as exc:
            return (
                f"not run: the sandbox is unavailable ({exc.detail}). Tell the user; "
                f"the fix is: {exc.fix}"
            )
        self._sandbox_checked = True
        return None

    def _probe_locked(self) -> None:
        _check_srt_install(self.policy)
        run, _ = self._execute("true", _PROBE_TIMEOUT_S)
        if run.outcome == "interrupted":
            raise KeyboardInterrupt  # the user's Ctrl-C, not a verdict on the sandbox
        if run.outcome == "timeout":
            raise SandboxUnavailable(
                f"srt did not run `true` within {_PROBE_TIMEOUT_S:g} s",
                "run `python batching_harness.py --doctor`",
            )
        if run.exit_code != 0:
            detail = _first_error_line(run.output) or f"srt exited with {run.exit_code}"
            raise SandboxUnavailable(detail, _fix_for(detail))


def _workdir_problem(policy: SandboxPolicy) -> str | None:
    """The refusal of a dangerous work dir, as the model reads it (both tools check)."""
    try:
        check_workdir(policy.workdir, state_dir=policy.state_dir,
                      allow_dangerous=policy.allow_dangerous_workdir)  # fmt: skip
    except WorkdirRefused as exc:
        return f"not run: {exc}. Tell the user; only they can change the work directory."
    return None


def _check_srt_install(policy: SandboxPolicy) -> None:
    srt = policy.srt
    if sys.platform not in ("linux", "darwin"):
        raise SandboxUnavailable(f"no sandbox for {sys.platform}", "run on Linux or macOS")
    if not os.path.exists(srt):
        prefix = srt.parents[2] if srt.parent.name == ".bin" else Path("sandbox")
        raise SandboxUnavailable(
            f"sandbox-runtime is not installed: {srt} does not exist", f"npm ci --prefix {prefix}"
        )
    # Judge the name and its target: a command could swap either one for its own program.
    names = (Path(os.path.abspath(srt)), Path(os.path.realpath(srt)))
    if any(_is_within(name, policy.workdir) for name in names):
        raise SandboxUnavailable(
            f"srt is installed inside the work directory ({srt}), where a sandboxed command "
            "could rewrite it and run unsandboxed next time",
            "run the harness from a checkout outside the work directory",
        )


def _first_error_line(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    markers = ("bwrap:", "apply-seccomp:", "Error", "error", "No such file", "not found")
    flagged = [line for line in lines if any(m in line for m in markers)]
    return (flagged or lines or [""])[0][:300]


def _fix_for(detail: str) -> str:
    """The exact fix for the failures seen in the field (see the doctor for each check)."""
    if "dependencies not available" in detail or "not installed" in detail:
        if sys.platform == "darwin":
            return "brew install ripgrep"
        return "apt-get install bubblewrap socat ripgrep (they must be on PATH)"
    if "node" in detail and ("No such file" in detail or "not found" in detail):
        return "install Node.js 20.11 or newer and put `node` on PATH"
    if "RTM_NEWADDR" in detail or ("bwrap" in detail and _apparmor_restricts_userns()):
        return _APPARMOR_FIX
    if "Can't mount proc" in detail or ("mount" in detail and "not permitted" in detail):
        return _DOCKER_FIX
    if "uid map" in detail or "uid_map" in detail:
        return "give the process CAP_SETFCAP (in Docker's default set) or run as a non-root user"
    if "namespace" in detail:
        return _USERNS_FIX
    return (
        "run `python batching_harness.py --doctor` for a full check; to run bash without "
        "the sandbox anyway, restart with --no-sandbox (at your own risk)"
    )


_APPARMOR_FIX = (
    "sudo sysctl -w kernel.apparmor_restrict_unprivileged_userns=0 (Ubuntu 24.04+), or add an "
    "AppArmor profile that allows userns for /usr/bin/bwrap"
)
_DOCKER_FIX = (
    "run the container with --security-opt seccomp=unconfined --security-opt apparmor=unconfined "
    "(or --privileged); inside a container you trust to isolate the agent, --no-sandbox"
)
_USERNS_FIX = "sudo sysctl -w kernel.unprivileged_userns_clone=1 user.max_user_namespaces=15000"


def _apparmor_restricts_userns() -> bool:
    path = Path("/proc/sys/kernel/apparmor_restrict_unprivileged_userns")
    with contextlib.suppress(OSError):
        return path.read_text().strip() == "1" and os.geteuid() != 0
    return False


def stop_leftovers(policy: SandboxPolicy) -> list[str]:
    """At start-up, before anything is resumed: stop a command that a killed harness left
    running in this work dir (it would otherwise go on, or race a resumed turn) and return
    what was done, for the user."""
    fd = _acquire_lock(_lock_path(policy), 5.0)
    if fd is None:
        return []
    try:
        _reap_leftover_run(policy)
        return [terminal_safe(note) for note in _take_notices(policy)]  # they quote a command
    finally:
        os.close(fd)


def probe_sandbox(policy: SandboxPolicy) -> None:
    """Run a real `srt … -c true` in the work dir; raise SandboxUnavailable with the first line
    of the real error and its fix. srt does not check its dependencies up front."""
    if not policy.enabled:
        return
    tool = BashTool(policy)
    try:
        fd = _acquire_lock(_lock_path(policy), _PROBE_TIMEOUT_S)
        if fd is None:
            raise SandboxUnavailable(
                "could not check: another command kept the work directory busy",
                "wait for it to finish, then run --doctor",
            )
        try:
            _reap_leftover_run(policy)  # its notice waits for the next command's result
            tool._probe_locked()
        finally:
            os.close(fd)
    finally:
        tool.close()


# -- editor ----------------------------------------------------------------------------


##############################################################################
# Tools (the file editor, the toolbox: where a tool error becomes an is_error result)
##############################################################################

def _field(tool_input: Mapping[str, Any], name: str, kind: type, default: Any = _MISSING) -> Any:
    """One input field, type-checked: a wrong type is the model's error to fix, not a crash."""
    value = tool_input.get(name)
    if value is None:
        if default is _MISSING:
            raise ToolFailure(f"missing required field {name!r}")
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ToolFailure(f"field {name!r} must be {kind.__name__}, not {type(value).__name__}")
    return value


def _count_lines(text: str) -> int:
    return text.count("\n") + (0 if text.endswith("\n") or not text else 1)


def _offset_after_line(text: str, line_no: int) -> int:
    pos = 0
    for _ in range(line_no):
        nxt = text.find("\n", pos)
        if nxt == -1:
            return len(text)
        pos = nxt + 1
    return pos


def _numbered(lines: Sequence[str], first: int) -> list[str]:
    return [f"{first + i:6}\t{line}" for i, line in enumerate(lines)]  # as `cat -n` prints


def _view_range(tool_input: Mapping[str, Any], n: int) -> tuple[int, int]:
    view_range = tool_input.get("view_range")
    if view_range is None:
        return 1, n
    if (not isinstance(view_range, list) or len(view_range) != 2
            or not all(type(v) is int for v in view_range)):  # fmt: skip
        raise ToolFailure("view_range must be a list of two integers [start, end]")
    start, end = view_range
    if not 1 <= start <= max(n, 1):
        raise ToolFailure(f"view_range start {start} is out of range: the file has {n} lines")
    if end != -1 and end < start:
        raise ToolFailure(f"view_range end {end} is before start {start} (use -1 for the end)")
    return start, n if end == -1 else min(end, n)


def _cut_line(line: str) -> str:
    """One line at most _EDITOR_MAX_LINE_CHARS: a minified file is one line of megabytes."""
    if len(line) <= _EDITOR_MAX_LINE_CHARS:
        return line
    cut = len(line) - _EDITOR_MAX_LINE_CHARS
    return f"{line[:_EDITOR_MAX_LINE_CHARS]}[... {cut:,} more characters on this line cut]"


def _fit(lines: Sequence[str], first: int) -> tuple[list[str], int]:
    """Numbered lines, each cut to its cap, up to the character budget; returns them and the
    last line shown."""
    out, used = [], 0
    for i, line in enumerate(_numbered([_cut_line(x) for x in lines], first)):
        if used + len(line) + 1 > _EDITOR_MAX_CHARS and out:
            return out, first + i - 1
        out.append(line)
        used += len(line) + 1
    return out, first + len(lines) - 1


def _snippet(text: str, first_line: int, last_line: int) -> str:
    lines = text.split("\n")
    start, end = max(first_line - 3, 1), min(last_line + 3, _count_lines(text))
    shown, last = _fit(lines[start - 1 : end], start)
    more = f"\n[... lines {last + 1}-{end} not shown: view them with view_range]" if last < end else ""
    return "\n".join(shown) + more


def _match_lines(text: str, needle: str) -> tuple[int, list[int]]:
    """How often `needle` occurs, and the line numbers of the first few occurrences (a
    minified file can hold millions: counted once, never numbered one by one)."""
    total, lines, line, last = text.count(needle), [], 1, 0
    pos = text.find(needle)
    while pos != -1 and len(lines) < _MATCH_LINES_SHOWN:
        line += text.count("\n", last, pos)
        lines.append(line)
        last, pos = pos, text.find(needle, pos + len(needle))
    return total, lines


def _line_list(total: int, lines: Sequence[int]) -> str:
    more = f" and {total - len(lines):,} more" if total > len(lines) else ""
    return ", ".join(map(str, lines)) + more


def _protected_reason(rel: Path) -> str | None:
    """srt's mandatory write denies, all of .git, and files host tools run without asking.
    Names are compared case-folded: on macOS `.GIT/config` is `.git/config`."""
    parts = [p.casefold() for p in rel.parts]
    if parts and parts[-1] in _PROTECTED_NAMES:
        return f"{rel.parts[-1]} is a shell or git start-up file"
    for i, part in enumerate(parts):
        if part in _PROTECTED_DIRS:
            return f"{rel.parts[i]} is protected (it can make tools on the host run code)"
        if part == ".claude" and parts[i + 1 : i + 2] in (["commands"], ["agents"]):
            return ".claude/commands and .claude/agents are protected"
    if _host_run_kind(rel) == "protected":
        return f"{rel} is protected: Claude Code runs hooks from it without asking"
    return None


def _inside_git_dir(real: Path, workdir: Path) -> Path | None:
    """The first directory on the way to `real` that git would take for a repository."""
    here = workdir
    for part in real.relative_to(workdir).parts[:-1]:
        here = here / part
        with contextlib.suppress(OSError):
            if _git_shaped({e.name.casefold(): e for e in os.scandir(here)}):
                return here
    return None


# -- opening without following links: no check-then-use race --------------------------------

_SYS_OPENAT2 = 437  # the same number on every Linux architecture (since 5.6)
_RESOLVE_NO_MAGICLINKS, _RESOLVE_NO_SYMLINKS, _RESOLVE_BENEATH = 0x02, 0x04, 0x08
_OPENAT2_MISSING = {errno.ENOSYS, errno.EPERM, errno.E2BIG, errno.EOPNOTSUPP}


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def _openat2(dir_fd: int, rel: str, flags: int, mode: int) -> int | None:
    """openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS): the kernel refuses any link and any
    way out, on every component at once. None where the kernel (or a seccomp filter) has no
    openat2."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    how = _OpenHow(flags, mode if flags & os.O_CREAT else 0,
                   _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS)  # fmt: skip
    fd = libc.syscall(ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(dir_fd),
                      ctypes.c_char_p(os.fsencode(rel)), ctypes.byref(how),
                      ctypes.c_size_t(ctypes.sizeof(how)))  # fmt: skip
    if fd >= 0:
        return int(fd)
    err = ctypes.get_errno()
    if err in _OPENAT2_MISSING:
        return None
    raise OSError(err, os.strerror(err), rel)


def _walk_open(base_fd: int, parts: Sequence[str], flags: int, mode: int, make_parents: bool) -> int:
    """The same without openat2: one directory fd at a time, each opened O_NOFOLLOW, so a
    component swapped for a link fails instead of leading elsewhere."""
    dir_flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.dup(base_fd)
    try:
        for name in parts[:-1]:
            try:
                nxt = os.open(name, dir_flags, dir_fd=fd)
            except FileNotFoundError:
                if not make_parents:
                    raise
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, 0o755, dir_fd=fd)
                nxt = os.open(name, dir_flags, dir_fd=fd)
            os.close(fd)
            fd = nxt
        return os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=fd)
    finally:
        os.close(fd)


def _open_no_links(real: Path, base: Path, flags: int, *, make_parents: bool = False) -> int:
    """Open `real` (a path realpath gave, so it holds no link) below `base` without following
    any link: if a command swapped a directory for a link since the policy looked, this fails
    (ELOOP / ENOTDIR / EXDEV) instead of reaching outside."""
    parts = real.relative_to(base).parts
    if not parts:
        return os.open(base, flags | os.O_CLOEXEC)
    base_fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if not make_parents:
            fd = _openat2(base_fd, os.path.join(*parts), flags | os.O_CLOEXEC, 0o644)
            if fd is not None:
                return fd
        return _walk_open(base_fd, parts, flags, 0o644, make_parents)
    finally:
        os.close(base_fd)


_LINK_ERRNOS = {errno.ELOOP, errno.ENOTDIR, errno.EXDEV}


def _has_link_on_the_way(real: Path, raw: str, workdir: Path) -> bool:
    """Whether the path as given now passes through a link (a swap happened, or is one)."""
    path = Path(raw) if os.path.isabs(raw) else workdir / raw
    return any(os.path.islink(p) for p in [path, *path.parents]) or real != Path(os.path.realpath(path))


class EditorTool:
    """`str_replace_based_edit_tool`. It runs in the harness process, not in srt, so it applies
    the same rules itself: decide on the real path (links resolved), then open that path with
    no link followed anywhere (so a swap in between fails), write only inside the work dir,
    read nothing the sandbox hides, one call at a time with bash (the work-dir lock), and the
    same git and host-run guard around every write."""

    def __init__(self, policy: SandboxPolicy) -> None:
        self.policy = policy
        self._denied: list[Path] = []
        self._denied_globs: list[str] = []
        for entry in _read_denials(policy):
            if _has_glob(entry):
                self._denied_globs.append(entry)
            else:
                self._denied += [Path(os.path.abspath(entry)), Path(os.path.realpath(entry))]
        # /proc/self/environ would show the harness's own environment: the API key.
        self._denied.append(Path("/proc"))
        self._refused = _workdir_problem(policy)  # once: it looks at sys.path and site

    def run(self, tool_input: Mapping[str, Any]) -> ToolResult:
        command = _field(tool_input, "command", str)
        handlers = {"view": self._view, "create": self._create, "insert": self._insert,
                    "str_replace": self._str_replace}  # fmt: skip
        handler = handlers.get(command)
        if handler is None:
            raise ToolFailure(
                f"unknown command {command!r}; valid commands: {', '.join(_EDITOR_COMMANDS)}"
            )
        raw = _field(tool_input, "path", str)
        if not raw.strip() or "\0" in raw:
            raise ToolFailure("path is empty or holds a NUL byte")
        if self._refused:
            raise ToolFailure(self._refused)
        fd = _acquire_lock(_lock_path(self.policy), _EDITOR_LOCK_WAIT_S)
        if fd is None:
            raise ToolFailure(
                f"not run: another command kept {self.policy.workdir} busy for "
                f"{_EDITOR_LOCK_WAIT_S:g} s (one tool at a time per work directory); try again"
            )
        try:
            if command == "view":
                return handler(raw, tool_input)
            return self._guarded(handler, raw, tool_input)
        except OSError as exc:
            if exc.errno in _LINK_ERRNOS and _has_link_on_the_way(self._resolve(raw), raw, self.policy.workdir):
                raise ToolFailure(
                    f"refused: {raw}: a directory on its path is (or just became) a link; "
                    "nothing was read or written"
                ) from None
            raise ToolFailure(f"{raw}: {exc.strerror or exc}") from None
        finally:
            os.close(fd)

    def _guarded(
        self, handler: Callable[[str, Mapping[str, Any]], ToolResult], raw: str,
        tool_input: Mapping[str, Any],
    ) -> ToolResult:
        """A write with the git and host-run guard around it, as bash has: four `create`
        calls can lay out a repository whose config runs a pager."""
        before = _snapshot(self.policy.workdir, self.policy.git_scan_max_dirs)
        if before.capped:
            raise ToolFailure(_scan_cap_refusal(self.policy).replace("not run", "not written"))
        result = handler(raw, tool_input)
        notes = [terminal_safe(n) for n in _guard_notes(self.policy, before)]
        if not notes:
            return result
        output = "\n".join([result.output, *(f"[harness] {n}" for n in notes)])
        return dataclasses.replace(result, output=output, warnings=tuple(notes))

    # -- commands ----------------------------------------------------------------------
    def _view(self, raw: str, tool_input: Mapping[str, Any]) -> ToolResult:
        real = self._readable(raw)
        fd = self._open(real, os.O_RDONLY | os.O_NONBLOCK)
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            os.close(fd)
            if tool_input.get("view_range") is not None:
                raise ToolFailure("view_range applies to files; this is a directory")
            return ToolResult(self._listing(real, raw))
        with os.fdopen(fd, "rb") as f:
            text = self._decode(self._read_fd(f, raw), raw)
        n = _count_lines(text)
        start, end = _view_range(tool_input, n)
        if n == 0:
            return ToolResult(f"{raw} is empty.")
        lines, last = _fit(text.split("\n")[start - 1 : end], start)
        body = f"Here's the result of running `cat -n` on {raw}:\n" + "\n".join(lines)
        if last < end:
            body += (
                f"\n[... truncated at {_EDITOR_MAX_CHARS:,} characters: showing lines "
                f"{start}-{last} of {n}. Use view_range [{last + 1}, {end}] for more ...]"
            )
        return ToolResult(body)

    def _create(self, raw: str, tool_input: Mapping[str, Any]) -> ToolResult:
        text = _field(tool_input, "file_text", str)
        real = self._writable(raw)
        if _is_plain_dir(real):
            raise ToolFailure(f"{raw} is a directory")
        # O_NONBLOCK: a FIFO planted at the name fails at once instead of hanging the harness.
        flags = os.O_WRONLY | os.O_NONBLOCK
        try:
            fd, existed = self._open(real, flags | os.O_CREAT | os.O_EXCL, True), False
        except FileExistsError:
            fd, existed = None, True
        if fd is None:
            try:
                fd = self._open(real, flags)
            except IsADirectoryError:
                raise ToolFailure(f"{raw} is a directory") from None
        with os.fdopen(fd, "wb") as f:
            self._check_target(f, raw)
            _rewrite(f, text)
        verb = "Overwrote" if existed else "Created"
        n = _count_lines(text)
        return ToolResult(f"{verb} {raw} ({n} line{'' if n == 1 else 's'}).")

    def _str_replace(self, raw: str, tool_input: Mapping[str, Any]) -> ToolResult:
        old = _field(tool_input, "old_str", str)
        new = _field(tool_input, "new_str", str, default="")
        if not old:
            raise ToolFailure("old_str is empty: give the exact text to replace (or use insert)")
        with self._open_for_edit(raw) as (f, text):
            total, lines = _match_lines(text, old)
            if not total:
                raise ToolFailure(
                    f"No replacement was performed: old_str did not appear verbatim in "
                    f"{raw}. View the file and copy the text exactly, whitespace too."
                )
            if total > 1:
                raise ToolFailure(
                    f"No replacement was performed: old_str appears {total:,} times "
                    f"in {raw}, on lines {_line_list(total, lines)}. Include more "
                    "surrounding lines so that it matches exactly once."
                )
            pos = text.index(old)
            updated = text[:pos] + new + text[pos + len(old) :]
            _rewrite(f, updated)
        snippet = _snippet(updated, lines[0], lines[0] + new.count("\n"))
        return ToolResult(f"Edited {raw}. A snippet of the result (cat -n):\n{snippet}")

    def _insert(self, raw: str, tool_input: Mapping[str, Any]) -> ToolResult:
        line_no = _field(tool_input, "insert_line", int)
        block = _field(tool_input, "insert_text", str)
        with self._open_for_edit(raw) as (f, text):
            n = _count_lines(text)
            if not 0 <= line_no <= n:
                raise ToolFailure(
                    f"insert_line {line_no} is out of range: {raw} has {n} lines, so "
                    f"use 0 (before the first line) to {n} (after the last)"
                )
            offset = _offset_after_line(text, line_no)
            if offset == len(text) and text and not text.endswith("\n"):
                block = "\n" + block  # the file's last line had no newline: keep it that way
            elif not block.endswith("\n"):
                block += "\n"
            updated = text[:offset] + block + text[offset:]
            _rewrite(f, updated)
        snippet = _snippet(updated, line_no + 1, line_no + block.count("\n"))
        return ToolResult(f"Inserted after line {line_no} of {raw}. Snippet (cat -n):\n{snippet}")

    # -- path policy -------------------------------------------------------------------
    def _resolve(self, raw: str) -> Path:
        path = Path(raw)
        # realpath before any decision: links and `..` are judged by where they land.
        return Path(os.path.realpath(path if path.is_absolute() else self.policy.workdir / path))

    def _open(self, real: Path, flags: int, make_parents: bool = False) -> int:
        """Open the path the policy judged, following no link on the way (see _open_no_links)."""
        workdir = self.policy.workdir
        base = workdir if _is_within(real, workdir) else Path("/")
        return _open_no_links(real, base, flags, make_parents=make_parents)

    def _read_refusal(self, real: Path) -> str | None:
        if any(_is_within(real, denied) for denied in self._denied):
            return "reading it is denied by the sandbox policy"
        candidates = [str(real)] + [str(p) for p in real.parents]
        if any(fnmatch.fnmatchcase(c, g) for g in self._denied_globs for c in candidates):
            return "reading it is denied by the sandbox policy"
        return None

    def _readable(self, raw: str) -> Path:
        real = self._resolve(raw)
        if reason := self._read_refusal(real):
            raise ToolFailure(f"refused: {raw}: {reason}")
        if not os.path.lexists(real):
            raise ToolFailure(f"{raw} does not exist")
        return real

    def _writable(self, raw: str) -> Path:
        real = self._resolve(raw)
        workdir = self.policy.workdir
        if not _is_within(real, workdir) or real == workdir:
            raise ToolFailure(
                f"refused: {raw} resolves to {real}, outside the work directory "
                f"{workdir} (links and .. are followed before deciding)"
            )
        reason = _protected_reason(real.relative_to(workdir)) or self._read_refusal(real)
        if reason is None and (repo := _inside_git_dir(real, workdir)) is not None:
            reason = f"{repo.relative_to(workdir)} is a git directory (protected like .git)"
        if reason:
            raise ToolFailure(f"refused: {raw}: {reason}")
        return real

    def _check_target(self, f: Any, raw: str) -> os.stat_result:
        """On the open file itself, so nothing can change between check and write."""
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ToolFailure(f"{raw} is not a regular file")
        if st.st_nlink > 1:
            raise ToolFailure(
                f"refused: {raw} has {st.st_nlink} hard links; one may be outside the work "
                "directory"
            )
        return st

    @contextlib.contextmanager
    def _open_for_edit(self, raw: str) -> Iterator[tuple[Any, str]]:
        real = self._writable(raw)
        try:
            fd = self._open(real, os.O_RDWR | os.O_NONBLOCK)
        except FileNotFoundError:
            raise ToolFailure(f"{raw} does not exist") from None
        except IsADirectoryError:
            raise ToolFailure(f"{raw} is not a regular file") from None
        with os.fdopen(fd, "r+b") as f:
            self._check_target(f, raw)
            yield f, self._decode(self._read_fd(f, raw), raw)

    def _read_fd(self, f: Any, raw: str) -> bytes:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ToolFailure(f"{raw} is not a regular file")
        if st.st_size > _EDITOR_MAX_FILE_BYTES:
            raise ToolFailure(
                f"{raw} is {st.st_size:,} bytes, too big for the editor: use bash "
                "(grep -n, sed -n '100,200p')"
            )
        return f.read(_EDITOR_MAX_FILE_BYTES + 1)

    @staticmethod
    def _decode(data: bytes, raw: str) -> str:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ToolFailure(
                f"{raw} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
                f"{exc.start}); the editor edits UTF-8 only: use bash (file, iconv, "
                "xxd)"
            ) from None

    def _listing(self, root: Path, raw: str) -> str:
        prefix, entries = raw.rstrip("/"), []
        for child in self._visible_children(root):
            entries.append(_listing_entry(prefix, child))
            if _is_plain_dir(child):  # a link to a directory is listed, not entered
                inner = f"{prefix}/{child.name}"
                entries += [_listing_entry(inner, g) for g in self._visible_children(child)]
        shown = entries[:_LISTING_MAX_ENTRIES]
        head = f"Files and directories up to 2 levels deep in {raw}, hidden items excluded:\n"
        more = len(entries) - len(shown)
        tail = f"\n[... {more} more entries not shown: view a subdirectory ...]" if more else ""
        return head + "\n".join(_cut_line(e) for e in shown) + tail

    def _visible_children(self, directory: Path) -> list[Path]:
        try:
            names = sorted(n for n in os.listdir(directory) if not n.startswith("."))
        except OSError:
            return []
        paths = [directory / n for n in names]
        return [p for p in paths if not self._read_refusal(Path(os.path.realpath(p)))]


def _listing_entry(prefix: str, path: Path) -> str:
    return f"{prefix}/{path.name}" + ("/" if _is_plain_dir(path) else "")


def _rewrite(f: Any, text: str) -> None:
    """Bytes exactly as given (no tab expansion, no newline translation), into the same inode
    so the file keeps its mode, through the descriptor that was checked."""
    data = text.encode("utf-8")
    f.seek(0)
    f.truncate()
    f.write(data)
    f.flush()


def _cap_total(text: str) -> str:
    """The last guard on what one tool call returns: head and tail, the cut stated."""
    if len(text) <= _TOOL_MAX_CHARS:
        return text
    half = _TOOL_MAX_CHARS // 2
    cut = len(text) - 2 * half
    return f"{text[:half]}\n[... {cut:,} characters cut from the middle ...]\n{text[-half:]}"


# -- toolbox: the one place a tool error becomes an is_error result ---------------------


class Toolbox:
    """The tools the model is offered, and the boundary where every tool failure (bad input,
    a refused path, a bug) becomes an is_error result the model can act on."""

    def __init__(self, bash: BashTool, editor: EditorTool, tool_timeout_s: float) -> None:
        self.bash = bash
        self.editor = editor
        self.tool_timeout_s = tool_timeout_s

    def definitions(self) -> list[dict[str, Any]]:
        return [dict(d) for d in _TOOL_DEFINITIONS]

    def run(self, name: str, tool_input: object) -> ToolResult:
        try:
            if name not in ("bash", "str_replace_based_edit_tool"):
                raise ToolFailure(
                    f"unknown tool {name!r}; the tools are bash and str_replace_based_edit_tool"
                )
            if not isinstance(tool_input, Mapping):
                raise ToolFailure(f"the input must be an object, not {type(tool_input).__name__}")
            result = self._bash(tool_input) if name == "bash" else self.editor.run(tool_input)
        except ToolFailure as exc:
            result = ToolResult(str(exc), is_error=True)
        except Exception as exc:  # a tool bug must not end the session: the model sees it
            result = ToolResult(f"{name} failed: {type(exc).__name__}: {exc}", is_error=True)
        return dataclasses.replace(result, output=model_safe(_cap_total(result.output)))

    def _bash(self, tool_input: Mapping[str, Any]) -> ToolResult:
        if _field(tool_input, "restart", bool, default=False):
            return self.bash.restart()
        command = _field(tool_input, "command", str)
        if not command.strip():
            raise ToolFailure("command is empty")
        return self.bash.run(command, self.tool_timeout_s)

    def close(self) -> None:
        self.bash.close()


def describe_tool_call(name: str, tool_input: object) -> str:
    """One compact line for the UI: `bash $ ls -la`, `view src/app.py`."""
    args = tool_input if isinstance(tool_input, Mapping) else {}
    if name == "bash":
        restart = args.get("restart") is True
        text = "bash (restart)" if restart else f"bash $ {args.get('command', '')}"
    elif name == "str_replace_based_edit_tool":
        text = f"{args.get('command')} {args.get('path')}"
        if args.get("view_range") is not None:
            text += f" {args.get('view_range')}"
        if args.get("command") == "insert":
            text += f" at line {args.get('insert_line')}"
    else:
        text = f"{name} {json.dumps(tool_input, default=str)}"
    text = terminal_safe(" ".join(text.split()))  # the command line is the model's text
    return text if len(text) <= 80 else text[:79] + "…"


# -- doctor ----------------------------------------------------------------------------


##############################################################################
# Doctor (can the sandbox run here, and if not, the exact fix)
##############################################################################

@dataclass(frozen=True)
class DoctorCheck:
    name: str
    ok: bool
    detail: str
    fix: str = ""


def doctor_checks(policy: SandboxPolicy) -> list[DoctorCheck]:
    """Everything the sandbox needs, each with the exact fix; the last check runs it for real."""
    checks = [_check_srt(policy), _check_node()]
    if sys.platform == "darwin":
        checks.append(_check_program("sandbox-exec", "built into macOS", "/usr/bin/sandbox-exec"))
        checks.append(_check_program("rg", "brew install ripgrep"))
    else:
        checks += [
            _check_program("bwrap", "apt-get install bubblewrap"),
            _check_program("socat", "apt-get install socat"),
            _check_program("rg", "apt-get install ripgrep"),
            _check_user_namespaces(),
            _check_apparmor(),
            _check_container(),
        ]
    checks += [_check_workdir(policy), *_check_limits(policy), _check_probe(policy)]
    return [*checks, _check_srt_server(policy)]


def _check_workdir(policy: SandboxPolicy) -> DoctorCheck:
    problem = workdir_refusal(policy.workdir, state_dir=policy.state_dir)
    if problem is None:
        return DoctorCheck("work directory", True, str(policy.workdir))
    if policy.allow_dangerous_workdir:
        return DoctorCheck("work directory", True, f"{problem} (allowed by {DANGEROUS_WORKDIR_FLAG})")
    return DoctorCheck("work directory", False, problem, f"choose a project directory, or pass "
                       f"{DANGEROUS_WORKDIR_FLAG}")  # fmt: skip


def _check_limits(policy: SandboxPolicy) -> list[DoctorCheck]:
    """Which resource limits are active here: a missing one is reported, not failed (the
    timeout and the kill of the whole tree still hold)."""
    return [DoctorCheck(f"limit: {what}", True, how if bounded else f"WARNING: {how}")
            for what, how, bounded in active_limits(policy)]  # fmt: skip


def _version_of(argv: list[str]) -> tuple[str, tuple[int, ...]] | None:
    """The first line a program prints for --version, and the number in it."""
    env = {"PATH": _search_path(os.environ.get("PATH", os.defpath), []), "HOME": str(Path.home())}
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=env)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (done.stdout + done.stderr).strip()
    found = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    if done.returncode != 0 or found is None:
        return None
    return text.splitlines()[0], tuple(int(g or 0) for g in found.groups())


def _check_srt(policy: SandboxPolicy) -> DoctorCheck:
    srt = policy.srt
    fix = f"npm ci --prefix {srt.parents[2] if srt.parent.name == '.bin' else 'sandbox'}"
    found = _version_of([str(srt), "--version"]) if srt.exists() else None
    if found is None:
        return DoctorCheck("srt", False, f"sandbox-runtime not found at {srt}", fix)
    wanted = ".".join(map(str, _SRT_MIN_VERSION))
    if found[1] < _SRT_MIN_VERSION:
        return DoctorCheck("srt", False, f"version {found[0]} is older than {wanted}", fix)
    return DoctorCheck("srt", True, f"{srt} (version {found[0]})")


def _check_node() -> DoctorCheck:
    found = _version_of(["node", "--version"])
    fix = "install Node.js 20.11 or newer and put `node` on PATH"
    if found is None:
        return DoctorCheck("node", False, "node not found on PATH", fix)
    if found[1][:2] < _NODE_MIN_VERSION:
        return DoctorCheck("node", False, f"{found[0]} is too old", fix)
    return DoctorCheck("node", True, found[0])


def _check_program(name: str, fix: str, path: str | None = None) -> DoctorCheck:
    where = (
        path
        if path and os.path.exists(path)
        else shutil.which(name, path=_search_path(os.environ.get("PATH", os.defpath), []))
    )
    if where is None:
        return DoctorCheck(name, False, f"{name} not found on PATH", fix)
    return DoctorCheck(name, True, where)


def _proc_value(path: str) -> str | None:
    with contextlib.suppress(OSError):
        return Path(path).read_text().strip()
    return None


def _check_user_namespaces() -> DoctorCheck:
    max_ns = _proc_value("/proc/sys/user/max_user_namespaces")
    clone = _proc_value("/proc/sys/kernel/unprivileged_userns_clone")
    if max_ns == "0":
        return DoctorCheck("user namespaces", False, "user.max_user_namespaces is 0", _USERNS_FIX)
    if clone == "0" and os.geteuid() != 0:
        return DoctorCheck("user namespaces", False, "unprivileged_userns_clone is 0", _USERNS_FIX)
    return DoctorCheck("user namespaces", True, f"max_user_namespaces={max_ns or '?'}")


def _check_apparmor() -> DoctorCheck:
    value = _proc_value("/proc/sys/kernel/apparmor_restrict_unprivileged_userns")
    if value == "1" and os.geteuid() != 0:
        return DoctorCheck(
            "AppArmor userns restriction",
            False,
            "kernel.apparmor_restrict_unprivileged_userns=1",
            _APPARMOR_FIX,
        )
    return DoctorCheck("AppArmor userns restriction", True, "not restricting" if value != "1"
                       else "restricted, but root is exempt")  # fmt: skip


def _check_container() -> DoctorCheck:
    cgroup = _proc_value("/proc/1/cgroup") or ""
    markers = ("docker", "containerd", "kubepods", "lxc", "podman")
    inside = os.path.exists("/.dockerenv") or os.path.exists("/run/.containerenv") or any(
        m in cgroup for m in markers)  # fmt: skip
    if not inside:
        return DoctorCheck("container", True, "not inside a container")
    return DoctorCheck(
        "container",
        True,
        "inside a container: if the probe fails with "
        '"Can\'t mount proc", the container needs more rights',
        _DOCKER_FIX,
    )


def _check_srt_server(policy: SandboxPolicy) -> DoctorCheck:
    """Whether bash calls get the long-lived srt helper or pay an srt CLI start each: both
    are sandboxed, so a failure here is a warning, not a failed check."""
    name = "srt helper"
    if not policy.srt_server or not sys.platform.startswith("linux"):
        why = "BATCHING_HARNESS_SRT_SERVER=0" if not policy.srt_server else "Linux only so far"
        return DoctorCheck(name, True, f"off ({why}): one srt CLI process per bash call")
    tool = BashTool(dataclasses.replace(policy, enabled=True))
    try:
        server = tool._ready_server()
        if server is None:
            note = tool._server_notes[-1] if tool._server_notes else "it did not start"
            return DoctorCheck(name, True, f"WARNING: {note}",
                               "run with BATCHING_HARNESS_SRT_SERVER=0 to skip it")  # fmt: skip
        rss = _rss_mib(server.proc.pid)
        return DoctorCheck(name, True, f"one per session, wraps each command ({rss} MiB)")
    finally:
        tool.close()


def _rss_mib(pid: int) -> str:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for row in Path(f"/proc/{pid}/status").read_text().splitlines():
            if row.startswith("VmRSS:"):
                return f"{int(row.split()[1]) // 1024}"
    return "?"


def _check_probe(policy: SandboxPolicy) -> DoctorCheck:
    try:
        probe_sandbox(dataclasses.replace(policy, enabled=True))
    except SandboxUnavailable as exc:
        return DoctorCheck("sandbox probe", False, exc.detail, exc.fix)
    note = "" if policy.enabled else " (but --no-sandbox is set: bash is NOT sandboxed)"
    return DoctorCheck("sandbox probe", True, f"`true` runs under srt here{note}")
