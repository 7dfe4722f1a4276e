"""Fleets on several hosts pooled through ONE PostgreSQL pool (SharedPoolChannel): each test
starts three real processes (three hosts, as far as the pool and the API can tell), each
running `batching-harness fleet --pool postgresql://…` against ONE stand-in. Skipped with the
reason when no PostgreSQL server can be had (conftest's pg_server).

Timing comes from the test, never from sleeps: the test itself holds the flusher role until
every host's first turns are queued, the stand-in's held batches end on release(), and a
create is slowed by the stand-in while the test SIGKILLs the process making it."""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
from pathlib import Path

import pytest

import batching_harness as bh
from tests.test_fleet import write_tasks
from tests.zygote import spawn

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 60

# Each host: the fleet's front-end through main(), with the pool's timings shortened so that
# a lease runs out and a role moves within the test's seconds (the same code, faster).
_HOST = """
import os, sys
import batching_harness as bh
bh.POOL_LEASE_S = 3.0
bh.ROLE_RETRY_S = 0.2
bh.ROLE_CHECK_S = 0.5
bh.POOL_RETRY_S = 0.3
bh.UNKNOWN_CREATE_WAIT_S = 0.5
sys.exit(bh.main(sys.argv[1:], dict(os.environ)))
"""


class Host:
    """One process of the pool: its own state dir, task file and output files."""

    def __init__(self, n: int, api, pool_url: str, tmp_path: Path, agents: int,
                 window_s: float, *, resume: str | None = None) -> None:
        self.n, self.dir = n, tmp_path / f"host{n}"
        self.dir.mkdir(exist_ok=True)
        tasks = write_tasks(self.dir, [{"id": f"h{n}a{i}", "prompt": f"run: echo host{n}-{i}"}
                                       for i in range(agents)])
        env = {"ANTHROPIC_API_KEY": "test-key", "ANTHROPIC_BASE_URL": api.base_url,
               "BATCHING_HARNESS_HOME": str(self.dir / "home"), "PYTHONPATH": str(ROOT),
               "PATH": os.environ.get("PATH", "")}
        self.out, self.err = self.dir / "out.txt", self.dir / "err.txt"
        which = ["--resume", resume] if resume else [str(tasks)]
        self.proc = spawn(  # a forked child of the zygote: the SDK is imported already
            ["fleet", *which, "--no-sandbox", "--no-prime", "--poll-interval", "0.05",
             "--window", str(window_s), "--runs-dir", str(self.dir / "runs"),
             "--output-format", "json", "--pool", pool_url],
            code=_HOST, cwd=ROOT, env=env, stdout=self.out, stderr=self.err)

    def finish(self) -> dict:
        try:
            self.proc.wait(TIMEOUT_S)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        lines = self.out.read_text().strip().splitlines()
        assert self.proc.returncode == 0, self.stderr()
        return json.loads(lines[-1])

    def stderr(self) -> str:
        return self.err.read_text()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


def _until(predicate, what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.02)


def _flusher_key(api) -> str:
    """The pool key every host's turns go to (the fleet's defaults: one model, one size)."""
    account = bh.pool_account("test-key", api.base_url)
    return bh.shared_pool_key(account, {"model": bh.DEFAULT_MODEL,
                                        "max_tokens": bh.DEFAULT_MAX_TOKENS})


def _start_gated(api, pool_url: str, tmp_path: Path, *, agents: int = 2,
                 window_s: float = 30) -> tuple[list[Host], bh.PostgresStore, object]:
    """Three hosts whose first turns all wait in the queue: the test holds the flusher role
    until every one is queued (hosts start seconds apart; a real fleet would flush the first
    host's turns by itself at "all waiting", before the others had joined)."""
    store = bh.PostgresStore(pool_url)
    gate = store.hold_role("flusher", _flusher_key(api))
    assert gate is not None
    hosts = [Host(n, api, pool_url, tmp_path, agents, window_s) for n in range(3)]
    key = _flusher_key(api)
    _until(lambda: store.queued_turns(key) == 3 * agents, "every host's first turns are queued")
    return hosts, store, gate


def _host_of(custom_id: str, outs: dict[str, int]) -> int:
    return outs[custom_id.split("-", 1)[0]]


def _answered_once(api) -> list[str]:
    """Every batch entry the stand-in answered; asserts none was sent (paid) twice."""
    entries = [r["custom_id"] for b in api.batch_ids() for r in api._batches[b].requests]
    assert len(entries) == len(set(entries)), "a turn went into two batches (paid twice)"
    return entries


def test_three_hosts_pool_their_turns_into_shared_batches(fake_api, pg_url, tmp_path):
    """The point of the shared pool: turns of agents in different processes ride in the same
    batch, polled by ONE process (one list call per tick for the whole account)."""
    hosts, store, gate = _start_gated(fake_api, pg_url, tmp_path)
    gate.release()
    outs = [h.finish() for h in hosts]
    token_of = {o["run_id"].rsplit("-", 1)[1]: h.n for h, o in zip(hosts, outs, strict=True)}
    assert all(a["state"] == "done" and a["turns"] == 2 for o in outs for a in o["agents"])
    first = [r["custom_id"] for r in fake_api._batches[fake_api.batch_ids()[0]].requests]
    assert len(first) == 6 and {_host_of(c, token_of) for c in first} == {0, 1, 2}
    assert len(_answered_once(fake_api)) == 12
    # Each host's summary counts the shared batches its turns rode in, at their full width.
    assert all(o["totals"]["width"]["max"] >= 2 for o in outs)
    assert outs[0]["totals"]["flush_reasons"].get("all waiting")
    rows = store.requests()
    assert len(rows) == 12 and {r.state for r in rows} == {"applied"}
    store.close()


def test_sigkill_of_the_flusher_mid_create_another_host_takes_over(fake_api, pg_url, tmp_path):
    """The process making the first shared batch dies with its create under way: another
    takes the flusher role, waits out the claim's lease, finds the batch by list and records
    it. Every turn is answered exactly once (the dead host's too, written by the poller), the
    stand-in holds no duplicate entry, and the survivors finish."""
    hosts, store, gate = _start_gated(fake_api, pg_url, tmp_path, window_s=1)
    # The holder dies while the stand-in is making its batch: the batch exists, its id was
    # never recorded (the intent, committed before the call, says which turns it carries).
    fake_api.inject("create", "slow", delay_s=1.5)
    gate.release()
    db = store._db
    _until(lambda: not fake_api._faults["create"], "the create reached the stand-in")
    holder = db.execute("SELECT holder FROM batch_intents WHERE state='creating'").fetchone()
    pid = int(holder["holder"].rsplit(":", 2)[1])  # host:pid:token
    (victim,) = [h for h in hosts if h.proc.pid == pid]
    victim.kill()
    survivors = [h for h in hosts if h is not victim]
    outs = [h.finish() for h in survivors]
    assert all(a["state"] == "done" and a["turns"] == 2 for o in outs for a in o["agents"])
    answered = _answered_once(fake_api)
    assert fake_api.count("create") == len(fake_api.batch_ids())  # no create made two batches
    assert len(fake_api._batches[fake_api.batch_ids()[0]].requests) == 6
    assert len(answered) == 6 + 4  # round 1 for all six agents, round 2 for the survivors
    dead = [r for r in store.requests() if r.custom_id in answered[:6]
            and r.state not in ("applied",)]
    assert len(dead) == 2 and {(r.state, r.result_type) for r in dead} == {("ended",
                                                                             "succeeded")}
    assert any("re-attached to" in h.stderr() for h in survivors)
    assert "Traceback" not in "".join(h.stderr() for h in survivors)
    # The dead host comes back and resumes its run: its agents take their answered first
    # turn from the pool (not sent again) and finish.
    (run,) = [r for r in db.execute("SELECT id FROM fleet_runs WHERE state='running'")]
    again = Host(victim.n, fake_api, pg_url, tmp_path, 2, 1, resume=run["id"]).finish()
    assert [a["state"] for a in again["agents"]] == ["done", "done"]
    assert len(_answered_once(fake_api)) == 12
    store.close()


def test_the_database_stopped_mid_run_hosts_wait_and_finish(fake_api, tmp_path):
    """A network cut to the pool while every turn is in a held batch: each host says once
    that the pool is unreachable and that it waits, then carries on when the server is back;
    nothing is lost and nothing is paid twice."""
    from tests import pg_cluster

    pytest.importorskip("psycopg")
    if pg_cluster.find_bindir() is None:
        pytest.skip("needs initdb/pg_ctl to stop and start a server of its own")
    root = Path(tempfile.gettempdir()) / f"bh-pg-shared-{os.getpid()}-{time.monotonic_ns()}"
    try:
        url = pg_cluster.start(root) + "?schema=shared"
        fake_api.hold = True
        store = bh.PostgresStore(url)
        hosts = [Host(n, fake_api, url, tmp_path, 1, 30) for n in range(3)]
        _until(lambda: sum(1 for r in store.requests() if r.state == "submitted") == 3,
               "every host's first turn is in a batch")
        store.close()
        pg_cluster.halt(root)
        _until(lambda: all("Waiting for it" in " ".join(h.stderr().split()) for h in hosts),
               "every host says it waits for the pool")
        pg_cluster.resume(root)
        fake_api.hold = False
        fake_api.release()
        outs = [h.finish() for h in hosts]
        assert all(a["state"] == "done" and a["turns"] == 2 for o in outs for a in o["agents"])
        assert len(_answered_once(fake_api)) == 6
        for h in hosts:
            err = " ".join(h.stderr().split())  # the console wraps long lines
            assert err.count("Waiting for it") == 1 and "start the server" in err
            assert "reachable again" in err and "Traceback" not in err
    finally:
        pg_cluster.stop(root)


def test_a_turn_its_dead_process_had_queued_is_reconciled_not_sent_again(fake_api, pg_url):
    """A process died after queueing a turn but before it was in a batch (its row still
    'submitting'): the resumed agent's reconcile finds the turn in the shared queue, this
    process's flusher sends it, and the agent gets its batch id and then its answer from the
    store; the turn is sent once."""
    from tests.support import make_channel, request_row

    store = bh.PostgresStore(pg_url)
    account = bh.pool_account("test-key", fake_api.base_url)
    params = {"model": bh.DEFAULT_MODEL, "max_tokens": 100,
              "messages": [{"role": "user", "content": "hi"}]}
    row = request_row(store.create_session(Path("/work"), bh.DEFAULT_MODEL), max_tokens=100)
    store.begin_request(row)
    store.queue_turn(row.custom_id, bh.shared_pool_key(account, params), params)
    channel = bh.SharedPoolChannel(store, make_channel(fake_api), account=account,
                                   window_s=lambda _model: 0.0)
    try:
        handle = channel.reconcile(row.submitted_at, exclude=set(), notify=print,
                                   custom_id=row.custom_id)
        assert handle == fake_api.batch_ids()[0]
        ticket = channel.watch(row.custom_id, handle, sent_at=row.submitted_at,
                               expected_s=None, on_status=lambda _s: None, notify=print)
        assert ticket.event.wait(10), "the poller never wrote the turn's end"
        assert ticket.result().entry.type == "succeeded"
        assert store.request(row.custom_id).state == "ended"
        assert _answered_once(fake_api) == [row.custom_id]
        # a turn never queued (its process died before that) is for the agent to send afresh
        assert channel.reconcile(0.0, exclude=set(), notify=print, custom_id="nope") is None
    finally:
        channel.close()
        store.close()


def _role_holder_pid(db, schema: str, role: str, name: str) -> int | None:
    """The OS pid of the process holding `role` (its advisory lock, as pg_locks shows it;
    every connection of the harness names its process's pid)."""
    key = bh.pg_lock_key(schema, role, name)
    row = db.execute(
        "SELECT a.application_name AS app FROM pg_locks l JOIN pg_stat_activity a ON "
        "a.pid=l.pid WHERE l.locktype='advisory' AND l.granted AND l.classid=%s AND "
        "l.objid=%s AND l.objsubid=1", ((key >> 32) & 0xFFFFFFFF, key & 0xFFFFFFFF)).fetchone()
    return int(row["app"].rsplit(" ", 1)[1]) if row else None


def test_sigkill_of_the_poller_another_host_polls_and_writes_every_end(fake_api, pg_url,
                                                                       tmp_path):
    """The process polling every shared batch dies while they are in flight: another takes
    the poller role, polls the batches it did not make, and writes every turn's end once
    (the dead host's too); the survivors finish."""
    fake_api.hold = True
    store = bh.PostgresStore(pg_url)
    hosts = [Host(n, fake_api, pg_url, tmp_path, 1, 1) for n in range(3)]
    _until(lambda: sum(1 for r in store.requests() if r.state == "submitted") == 3,
           "every host's first turn is in a batch")
    account = bh.pool_account("test-key", fake_api.base_url)
    pids: list[int | None] = []
    _until(lambda: pids.append(_role_holder_pid(store._db, store.schema, "poller", account))
           or pids[-1] is not None, "a host polls")
    (victim,) = [h for h in hosts if h.proc.pid == pids[-1]]
    victim.kill()
    fake_api.hold = False
    fake_api.release()
    survivors = [h for h in hosts if h is not victim]
    outs = [h.finish() for h in survivors]
    assert all(a["state"] == "done" and a["turns"] == 2 for o in outs for a in o["agents"])
    assert len(_answered_once(fake_api)) == 3 + 2
    first = [r for r in store.requests() if r.n_messages == 1]
    assert {r.result_type for r in first} == {"succeeded"} and len(first) == 3
    store.close()
