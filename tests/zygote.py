"""Real harness processes without paying the SDK's import for each one.

A test that SIGKILLs the harness, or runs three hosts against one pool, needs real processes;
each new interpreter spends about 3 s of CPU importing `anthropic` (more on a busy machine),
which was most of those tests' time. The zygote is one interpreter per test worker that
imports the harness and the SDK once and then forks a child per request: the child is a
fresh process (its own pid, session, files, environment, database connections: nothing is
opened before the fork), it runs `main()` as `python batching_harness.py` would, and it can
be killed like any other. The zygote reaps its children and reports their exit status, so
`ForkedProcess` answers `wait`/`poll`/`returncode` like `subprocess.Popen`.

Only the import is shared; a test that is about the interpreter itself (start-up time, the
script path) still spawns `python batching_harness.py`. A terminal test can have its child
on a pseudo-terminal (`spawn_in_terminal`): the child opens it as its controlling terminal,
and the test reads and types on the other end through pexpect, as with `pexpect.spawn`.
"""

from __future__ import annotations

import atexit
import fcntl
import json
import os
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path
from typing import Any

from pexpect import fdpexpect

ROOT = Path(__file__).resolve().parent.parent

# Runs in the zygote: import once, then fork on each request line; report pids and exits.
_ZYGOTE = r"""
import json, os, select, sys
import anthropic, batching_harness, rich.console, rich.live  # the expensive part, once
anthropic.Anthropic  # resolve the lazy client class before any fork

def child(req):
    os.setsid()  # its own session and process group, as start_new_session=True gives
    if req.get("tty"):  # a session leader's first terminal becomes its controlling one
        tty = os.open(req["tty"], os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(tty, fd)
        os.close(tty)
    else:
        for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            os.dup2(target, fd)
            os.close(target)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    sys.stdin = open(0, closefd=False)
    sys.stdout = open(1, "w", closefd=False, buffering=1)
    sys.stderr = open(2, "w", closefd=False, buffering=1)
    sys.argv = ["batching_harness.py", *req["argv"]]
    # The code runs, then this process exits the way an interpreter does (SystemExit unwinds
    # out of the zygote's loop: atexit handlers and thread joins run as they would).
    exec(compile(req["code"], "<zygote child>", "exec"), {"__name__": "__main__"})
    raise SystemExit(0)

out = sys.stdout
pending = b""
while True:
    ready = select.select([0], [], [], 0.05)[0]
    while True:  # reap every child that ended
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
        out.write(json.dumps({"exit": pid, "code": os.waitstatus_to_exitcode(status)}) + "\n")
        out.flush()
    if not ready:
        continue
    chunk = os.read(0, 65536)
    if not chunk:
        break
    pending += chunk
    while b"\n" in pending:
        line, pending = pending.split(b"\n", 1)
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            child(req)
        out.write(json.dumps({"pid": pid, "token": req["token"]}) + "\n")
        out.flush()
"""

# What a child runs by default: the harness's command line, exactly as the script does.
MAIN = "import os, sys\nimport batching_harness as bh\nsys.exit(bh.main(sys.argv[1:], dict(os.environ)))\n"


class ForkedProcess:
    """A zygote's child, answering like subprocess.Popen for what the tests use."""

    def __init__(self, zygote: Zygote, pid: int) -> None:
        self._zygote, self.pid = zygote, pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        self.returncode = self._zygote.exit_code(self.pid)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        code = self._zygote.wait_exit(self.pid, timeout)
        if code is None:
            raise subprocess.TimeoutExpired(f"zygote child {self.pid}", timeout or 0)
        self.returncode = code
        return code

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Zygote:
    def __init__(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self._proc = subprocess.Popen([sys.executable, "-c", _ZYGOTE], cwd=ROOT, env=env,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._changed = threading.Condition()
        self._pids: dict[str, int] = {}
        self._exits: dict[int, int] = {}
        self._next = 0
        self._send_lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True, name="zygote-reader").start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            msg = json.loads(line)
            with self._changed:
                if "exit" in msg:
                    self._exits[msg["exit"]] = msg["code"]
                else:
                    self._pids[msg["token"]] = msg["pid"]
                self._changed.notify_all()

    def spawn(self, argv: list[str], *, env: dict[str, str], cwd: Path, stdout: Path | str =
              os.devnull, stderr: Path | str = os.devnull, code: str = MAIN,
              tty: str | None = None) -> ForkedProcess:
        """`batching-harness ARGV` in a forked child (or `code`, which sees sys.argv); with
        `tty` (a terminal's path), on that terminal instead of stdout and stderr."""
        with self._send_lock:
            self._next += 1
            token = str(self._next)
            assert self._proc.stdin is not None
            self._proc.stdin.write(json.dumps({
                "token": token, "argv": argv, "env": env, "cwd": str(cwd),
                "stdout": str(stdout), "stderr": str(stderr), "code": code,
                "tty": tty}).encode() + b"\n")
            self._proc.stdin.flush()
        with self._changed:
            if not self._changed.wait_for(lambda: token in self._pids, timeout=60):
                raise RuntimeError("the zygote did not fork (is it still importing?)")
            return ForkedProcess(self, self._pids.pop(token))

    def exit_code(self, pid: int) -> int | None:
        with self._changed:
            return self._exits.get(pid)

    def wait_exit(self, pid: int, timeout: float | None) -> int | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            while pid not in self._exits:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._changed.wait(left)
            return self._exits[pid]

    def close(self) -> None:
        if self._proc.poll() is None:
            assert self._proc.stdin is not None
            self._proc.stdin.close()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()


_shared: Zygote | None = None
_shared_lock = threading.Lock()


def zygote() -> Zygote:
    """This test worker's zygote, started on first use (its import overlaps nothing, but is
    paid once instead of once per process)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = Zygote()
            atexit.register(_shared.close)
        return _shared


def spawn(argv: list[str], **kwargs: Any) -> ForkedProcess:
    return zygote().spawn(argv, **kwargs)


class TerminalChild(fdpexpect.fdspawn):
    """A zygote's child on a pseudo-terminal, answering like `pexpect.spawn` for what the
    terminal tests use (expect, send, sendintr, sendeof, wait, isalive, exitstatus)."""

    def __init__(self, master: int, proc: ForkedProcess, *, timeout: float,
                 encoding: str = "utf-8") -> None:
        super().__init__(master, timeout=timeout, encoding=encoding)
        self.proc, self.pid = proc, proc.pid
        self.exitstatus: int | None = None

    def sendintr(self) -> None:
        self.send("\x03")  # what a terminal sends for Ctrl-C (the REPL reads it raw)

    def sendeof(self) -> None:
        self.send("\x04")

    def sendcontrol(self, char: str) -> None:
        self.send(chr(ord(char.lower()) & 0x1F))

    def isalive(self) -> bool:
        return self.proc.poll() is None

    def wait(self) -> int:
        self.exitstatus = self.proc.wait(60)
        return self.exitstatus

    def close(self, force: bool = True) -> None:
        """Our end of the terminal closed, then the child's exit waited for (as
        pexpect.spawn's close does; a child that outlives it is killed)."""
        super().close()
        try:
            self.wait()
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.wait()


def spawn_in_terminal(argv: list[str], *, env: dict[str, str], cwd: Path, timeout: float,
                      dimensions: tuple[int, int] = (24, 80), code: str = MAIN
                      ) -> TerminalChild:
    """`batching-harness ARGV` (or `code`) forked from the zygote onto a new pseudo-terminal
    of `dimensions` (rows, columns)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", *dimensions, 0, 0))
    tty = os.ttyname(slave)
    try:
        proc = spawn(argv, env=env, cwd=cwd, tty=tty, code=code)
        # Ours closes once the child holds the terminal (with no end open, reading ours
        # would be an EOF), so that its exit is an EOF here.
        deadline = time.monotonic() + 30
        while _stdin_of(proc.pid) != tty and proc.poll() is None:
            assert time.monotonic() < deadline, "the child never opened its terminal"
            time.sleep(0.005)
    finally:
        os.close(slave)
    return TerminalChild(master, proc, timeout=timeout)


def _stdin_of(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/fd/0")
    except OSError:
        return None
