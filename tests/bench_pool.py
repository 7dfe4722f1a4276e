"""Shared-pool benchmark against the local stand-in (a script that prints, not a test).

    python -m tests.bench_pool [--latency 10] [--hosts 3] [--agents 20] [--turns 3] [--pg URL]

Runs H host processes, each a real `batching-harness fleet` of N agents x T turns (every turn
but the last asks for one bash call; sandbox off; --no-prime, so pooling alone is compared),
all against ONE stand-in, twice: every host on ONE shared PostgreSQL pool (--pool), then each
host on its own SQLite journal (the in-process pooler). It prints, per scenario: batches
created and their widths, batch API requests per minute, the delay from a turn being ready
to its batch being created (first turns apart: they include start-up), and the database's
cost per turn (statements and ms, counted in
each host process around the driver's execute: the pool's connections, its listener and its
roles included).

The PostgreSQL server: --pg, else $BATCHING_HARNESS_TEST_PG, else a throwaway cluster
(tests/pg_cluster.py). Each run gets a schema of its own, dropped afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import batching_harness as bh
from tests import fake_api as fa
from tests import pg_cluster
from tests.bench_fleet import BATCH_ENDPOINTS, scripted

ROOT = Path(__file__).resolve().parent.parent

# One host: the fleet's front-end, with every database statement counted and timed (the
# driver's execute for PostgreSQL, the connection's for SQLite), printed when it exits.
_HOST = """
import atexit, json, os, sqlite3, sys, time
import batching_harness as bh

STATS = [0, 0.0]

def counted(execute):
    def run(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return execute(self, *args, **kwargs)
        finally:
            STATS[0] += 1
            STATS[1] += time.perf_counter() - started
    return run

try:
    import psycopg
    psycopg.Connection.execute = counted(psycopg.Connection.execute)
except ImportError:
    pass

class Counted(sqlite3.Connection):
    execute = counted(sqlite3.Connection.execute)

_connect = sqlite3.connect
sqlite3.connect = lambda *a, **k: _connect(*a, factory=Counted, **k)
atexit.register(lambda: print("BENCH " + json.dumps({"queries": STATS[0], "db_s": STATS[1]}),
                              file=sys.stderr, flush=True))
sys.exit(bh.main(sys.argv[1:], dict(os.environ)))
"""


def start_host(n: int, api: fa.FakeAPI, tmp: Path, agents: int, pool: str | None,
               window_s: float | None) -> tuple[subprocess.Popen, Path]:
    host = tmp / f"host{n}"
    host.mkdir()
    tasks = host / "tasks.jsonl"
    tasks.write_text("".join(json.dumps({"id": f"h{n}a{i}", "prompt": "do the task"}) + "\n"
                             for i in range(agents)))
    env = {"ANTHROPIC_API_KEY": "bench", "ANTHROPIC_BASE_URL": api.base_url,
           "BATCHING_HARNESS_HOME": str(host / "home"), "PATH": os.environ["PATH"],
           "PYTHONPATH": str(ROOT)}
    argv = ["fleet", str(tasks), "--no-sandbox", "--no-prime", "--output-format", "json",
            "--runs-dir", str(host / "runs")]
    argv += ["--pool", pool] if pool else []
    argv += ["--window", str(window_s)] if window_s is not None else []
    err = (host / "stderr.txt").open("w")
    proc = subprocess.Popen([sys.executable, "-c", _HOST, *argv], env=env, cwd=host,
                            stdout=(host / "stdout.txt").open("w"), stderr=err)
    return proc, host


def scenario(name: str, a: argparse.Namespace, pool: str | None) -> dict:
    with fa.FakeAPI(latency_s=a.latency) as api, tempfile.TemporaryDirectory() as tmp:
        api.script.extend([scripted(a.turns)] * (a.hosts * a.agents * a.turns * 2))
        started = time.monotonic()
        hosts = [start_host(n, api, Path(tmp), a.agents, pool, a.window) for n in range(a.hosts)]
        for proc, host in hosts:
            if proc.wait(a.timeout) != 0:
                raise SystemExit(f"{name}: {host.name} failed:\n"
                                 f"{(host / 'stderr.txt').read_text()[-2000:]}\n"
                                 f"{(host / 'stdout.txt').read_text()[-3000:]}")
        wall = time.monotonic() - started
        db = [json.loads(line[6:]) for _, host in hosts
              for line in (host / "stderr.txt").read_text().splitlines()
              if line.startswith("BENCH ")]
        delays = pool_delays(api, pool, [host for _, host in hosts])
        return summarize(name, api, wall, db, delays, a.hosts * a.agents * a.turns)


def pool_delays(api: fa.FakeAPI, pool: str | None,
                hosts: list[Path]) -> dict[str, list[float]]:
    """Ready -> created per turn, the same way for both: from the journal's submitted_at (the
    agent has its turn ready) to the stand-in's creation of the batch carrying it. First
    turns apart: they include each process's start-up (`import anthropic`, seconds here)."""
    created = {r["custom_id"]: api._batches[b].created_wall
               for b in api.batch_ids() for r in api._batches[b].requests}
    stores = [bh.PostgresStore(pool)] if pool else [
        bh.SqliteStore(host / "home" / "journal.db") for host in hosts]
    delays: dict[str, list[float]] = {"first": [], "later": []}
    for store in stores:
        for r in store.requests():
            if r.custom_id in created:
                delays["first" if r.n_messages == 1 else "later"].append(
                    max(0.0, created[r.custom_id] - r.submitted_at))
        store.close()
    return delays


def summarize(name: str, api: fa.FakeAPI, wall: float, db: list[dict],
              delays: dict[str, list[float]], turns: int) -> dict:
    widths = [len(api._batches[b].requests) for b in api.batch_ids()]
    calls = [c for c in api.calls if c.endpoint in BATCH_ENDPOINTS]
    by_kind = {k: sum(1 for c in calls if c.endpoint == k) for k in BATCH_ENDPOINTS}
    queries = sum(d["queries"] for d in db)
    return {"name": name, "wall_s": wall, "widths": widths, "requests": len(calls),
            "by_kind": {k: v for k, v in by_kind.items() if v}, "rpm": len(calls) / (wall / 60),
            "delays": delays, "turns": turns, "answered": len(api.model_requests),
            "queries_per_turn": queries / turns,
            "db_ms_per_turn": 1000 * sum(d["db_s"] for d in db) / turns}


def show(r: dict) -> None:
    w = r["widths"]
    print(f"{r['name']}: wall {r['wall_s']:.1f} s; {r['turns']} turns ({r['answered']} "
          f"answered by the stand-in)")
    print(f"  batches created {len(w)}; width mean {statistics.mean(w):.1f} / median "
          f"{statistics.median(w):g} / max {max(w)}; widths {sorted(w, reverse=True)}")
    print(f"  batch API requests {r['requests']} ({r['rpm']:.1f}/min): {r['by_kind']}")
    for which, d in r["delays"].items():
        d = sorted(d)
        print(f"  ready -> created, {which} turns: median {statistics.median(d):.2f} s, p90 "
              f"{d[int(0.9 * (len(d) - 1))]:.2f} s, max {d[-1]:.2f} s")
    print(f"  database per turn: {r['queries_per_turn']:.1f} statements, "
          f"{r['db_ms_per_turn']:.1f} ms")


def with_server(url: str | None) -> tuple[str, Path | None]:
    url = url or os.environ.get("BATCHING_HARNESS_TEST_PG")
    if url:
        return url, None
    root = Path(tempfile.gettempdir()) / f"bh-bench-pg-{os.getpid()}"
    return pg_cluster.start(root), root


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--latency", type=float, default=10.0, help="seconds each batch takes")
    p.add_argument("--hosts", type=int, default=3)
    p.add_argument("--agents", type=int, default=20, help="agents per host")
    p.add_argument("--turns", type=int, default=3, help="turns per agent")
    p.add_argument("--window", type=float, default=None, help="--window for every fleet")
    p.add_argument("--pg", default=None, help="PostgreSQL server URL")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--only", choices=("postgresql", "sqlite"), help="run one scenario")
    a = p.parse_args()
    server, root = with_server(a.pg)
    schema = "bench_" + secrets.token_hex(4)
    print(f"stand-in batch latency {a.latency:g} s; {a.hosts} processes x {a.agents} agents x "
          f"{a.turns} turns; {os.cpu_count()} CPUs; sandbox off; --no-prime")
    try:
        if a.only != "sqlite":
            show(scenario("one shared PostgreSQL pool", a,
                          f"{server}{'&' if '?' in server else '?'}schema={schema}"))
        if a.only != "postgresql":
            show(scenario(f"{a.hosts} separate SQLite pools", a, None))
    finally:
        import psycopg

        with psycopg.connect(server, autocommit=True) as db:
            db.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        if root is not None:
            pg_cluster.stop(root)


if __name__ == "__main__":
    main()
