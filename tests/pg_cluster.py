"""A throwaway PostgreSQL cluster for the tests and for CI: Debian's server binaries, a
fresh temp dir, an unprivileged user, a loopback port. Never the machine's own cluster.

    python tests/pg_cluster.py start DIR   # prints the cluster's URL (DIR must not exist)
    python tests/pg_cluster.py stop DIR    # stops it and removes DIR

Standard library only: .ci/run calls it before the virtualenv has anything installed.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

SUPERUSER = "bh"
"""The cluster's only role; trust auth on loopback (a throwaway cluster, no secrets)."""


def find_bindir() -> Path | None:
    """Where initdb and pg_ctl live: on PATH, else Debian's /usr/lib/postgresql/N/bin."""
    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb"):
        return Path(on_path).resolve().parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
                   key=lambda p: int(Path(p).parent.parent.name))
    return Path(found[-1]).parent if found else None


def _owner() -> pwd.struct_passwd | None:
    """PostgreSQL refuses to run as root: as root, run it as Debian's `postgres` user (or
    `nobody`); otherwise as ourselves (None)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError("running as root, and neither a 'postgres' nor a 'nobody' user exists")


def _run(argv: list[str], owner: pwd.struct_passwd | None) -> None:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "LANG": "C"}
    kwargs: dict = {}
    if owner is not None:
        kwargs = {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": []}
        env["HOME"] = "/"
    result = subprocess.run(argv, env=env, capture_output=True, text=True, cwd="/", **kwargs)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:2])} failed ({result.returncode}):\n"
                           f"{result.stdout}{result.stderr}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(root: Path) -> str:
    """initdb into ROOT/data and start the server on a free loopback port; return its URL."""
    bindir = find_bindir()
    if bindir is None:
        raise RuntimeError("no initdb/pg_ctl: apt-get install postgresql")
    owner = _owner()
    root.mkdir(mode=0o700)
    if owner is not None:
        os.chown(root, owner.pw_uid, owner.pw_gid)
    data = root / "data"
    _run([str(bindir / "initdb"), "-D", str(data), "-U", SUPERUSER, "-A", "trust",
          "--no-sync", "-E", "UTF8", "--locale=C"], owner)
    for _attempt in range(5):  # a free port can be taken between the probe and the bind
        port = _free_port()
        options = (f"-p {port} -k {root} -c listen_addresses=127.0.0.1 "
                   "-c max_connections=200 -c shared_buffers=32MB")
        try:
            _run([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"),
                  "-w", "-t", "60", "-o", options, "start"], owner)
        except RuntimeError:
            time.sleep(0.2)
            continue
        (root / "url").write_text(f"postgresql://{SUPERUSER}@127.0.0.1:{port}/postgres")
        return (root / "url").read_text()
    raise RuntimeError(f"the server would not start:\n{_tail(root / 'server.log')}")


def halt(root: Path) -> None:
    """Stop the server but keep its data: a database that went away (a network cut)."""
    _run([str(find_bindir() / "pg_ctl"), "-D", str(root / "data"), "-m", "fast", "-w", "stop"],
         _owner())


def resume(root: Path) -> None:
    """Start a halted server again, on its old port: the same URL works again."""
    port = (root / "url").read_text().rsplit(":", 1)[1].split("/")[0]
    _run([str(find_bindir() / "pg_ctl"), "-D", str(root / "data"), "-l", str(root / "server.log"),
          "-w", "-t", "60", "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start"],
         _owner())


def stop(root: Path) -> None:
    bindir = find_bindir()
    if bindir is not None and (root / "data" / "postmaster.pid").exists():
        try:
            _run([str(bindir / "pg_ctl"), "-D", str(root / "data"), "-m", "fast", "-w",
                  "stop"], _owner())
        except RuntimeError:
            pass  # already gone: remove what is left
    shutil.rmtree(root, ignore_errors=True)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text().splitlines()[-lines:])
    except OSError:
        return "(no server log)"


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("start", "stop"):
        sys.exit(__doc__)
    if sys.argv[1] == "start":
        print(start(Path(sys.argv[2])))
    else:
        stop(Path(sys.argv[2]))
