"""The pool in PostgreSQL, against a real server (conftest's pg_server: CI's cluster, or a
throwaway one started from Debian's binaries): migrations under a lock, claims that never
overlap, leases, roles that move when their holder dies, wake-ups, and the harness itself
resuming a turn from the pool. Tests that hold for both back-ends take `any_store`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

import batching_harness as bh
from tests import fake_api as fa
from tests.support import harness_env, request_row, run_main
from tests.test_resume import STARTUP_S, kill, start

ROOT = Path(__file__).resolve().parent.parent


def _python(code: str, *args: str) -> subprocess.Popen:
    """Another process (another host, as far as the pool can tell) running `code`."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _raw(url: str):
    """A plain psycopg connection to the pool's schema: what another tool (psql) would see."""
    import psycopg

    target, schema = bh._split_pool_url(url)
    return psycopg.connect(target, autocommit=True, options=f"-c search_path={schema}"), schema


def _until(predicate, what: str, timeout_s: float = STARTUP_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.02)


_request = request_row


def _queue(store: bh.Store, n: int, pool_key: str = "claude-opus-5-5") -> list[str]:
    session = store.create_session(Path("/work"), "claude-opus-5-5")
    rows = [_request(session, n_messages=i + 1) for i in range(n)]
    for row in rows:
        store.begin_request(row)
        store.queue_turn(row.custom_id, pool_key, {
            "model": "claude-opus-5-5", "max_tokens": 100,
            "messages": [{"role": "user", "content": "hi"}]})
    return [r.custom_id for r in rows]


def _succeeded(text: str = "done") -> bh.Outcome:
    usage = bh.Usage(input_tokens=10, output_tokens=5)
    return bh.Outcome("succeeded", time.time(), 2.0, {"content": [{"type": "text",
                      "text": text}], "stop_reason": "end_turn"}, usage=usage,
                      cost=bh.cost_breakdown("claude-opus-5-5", usage, lane="batch",
                                             requested_ttl="1h"))


# -- schema: numbered migrations, upgraded by the first process under a lock -----------------

def test_an_empty_database_gets_the_whole_schema(pg_url):
    store = bh.PostgresStore(pg_url)
    assert store.schema_version == bh.SCHEMA_VERSION
    db, schema = _raw(pg_url)
    tables = {r[0] for r in db.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_schema=%s", (schema,))}
    assert {"sessions", "messages", "requests", "tool_calls", "batches_tried", "turn_queue",
            "batch_intents", "schema_version"} <= tables
    # timestamps keep their sub-second part (REAL would be 4 bytes in PostgreSQL)
    kinds = dict(db.execute("SELECT column_name, data_type FROM information_schema.columns "
                            "WHERE table_schema=%s AND table_name='requests'", (schema,)))
    assert kinds["submitted_at"] == "double precision" and kinds["lane"] == "text"
    store.close()
    bh.PostgresStore(pg_url).close()  # a second open finds nothing to do
    db.close()


def test_every_migration_has_sql_for_both_back_ends():
    for step in bh.MIGRATIONS.values():
        assert set(step.sql) == {"sqlite", "postgresql"} and step.doc
        assert all(step.statements(d) for d in step.sql)


def test_a_second_process_waits_for_the_upgrade_then_finds_it_done(pg_url):
    """The first process to connect upgrades under an advisory lock; a second one blocks on
    it instead of racing the same DDL, then opens the finished schema."""
    db, schema = _raw(pg_url)
    db.execute("SELECT pg_advisory_lock(%s)", (bh.pg_lock_key(schema, "migrate"),))
    openers = [_python("import sys, batching_harness as bh\n"
                       "s = bh.PostgresStore(sys.argv[1]); print(s.schema_version)", pg_url)
               for _ in range(2)]
    key = bh.pg_lock_key(schema, "migrate") & 0xFFFF_FFFF_FFFF_FFFF  # as pg_locks shows it
    _until(lambda: db.execute("SELECT count(*) FROM pg_locks WHERE locktype='advisory' AND "
                              "NOT granted AND classid=%s AND objid=%s",
                              (key >> 32, key & 0xFFFF_FFFF)).fetchone()[0] == 2,
           "both openers wait on the lock")
    assert all(p.poll() is None for p in openers)
    assert db.execute("SELECT to_regclass(%s)", (f"{schema}.schema_version",)).fetchone()[0] \
        is None
    db.execute("SELECT pg_advisory_unlock_all()")
    for p in openers:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        assert out.strip() == str(bh.SCHEMA_VERSION)
    assert db.execute(f"SELECT count(*) FROM {schema}.schema_version").fetchone()[0] == 1
    db.close()


def test_a_schema_from_a_newer_version_is_refused_clearly(pg_url):
    bh.PostgresStore(pg_url).close()
    db, _schema = _raw(pg_url)
    db.execute("UPDATE schema_version SET version = 99")
    with pytest.raises(bh.JournalError, match=r"newer batching-harness \(schema 99"):
        bh.PostgresStore(pg_url)
    db.close()


def test_two_pools_share_one_database_without_seeing_each_other(pg_server, pg_url):
    other_url = pg_url.replace("schema=", "schema=other_")
    a, b = bh.PostgresStore(pg_url), bh.PostgresStore(other_url)
    try:
        a.create_session(Path("/a"), "m")
        assert b.latest_session() is None
        assert a.hold_role("poller", "k") is not None and b.hold_role("poller", "k") is not None
    finally:
        a.close()
        b.close()
        db, schema = _raw(other_url)
        db.execute(f"DROP SCHEMA {schema} CASCADE")
        db.close()


# -- the queue: claims in one transaction, never one row twice; leases ----------------------

_CLAIMER = """
import json, sys, batching_harness as bh
store = bh.PostgresStore(sys.argv[1])
got = []
while True:
    claim = store.claim_turns("claude-opus-5-5", sys.argv[2], limit=5, lease_s=60)
    if claim is None:
        break
    got += claim.custom_ids
print(json.dumps(got))
"""


def test_claimers_in_threads_and_processes_never_take_one_turn_twice(pg_url):
    store = bh.PostgresStore(pg_url)
    queued = _queue(store, 150)
    procs = [_python(_CLAIMER, pg_url, f"proc-{i}") for i in range(2)]
    claimed: list[str] = []

    def claim_all(holder: str) -> None:
        while (claim := store.claim_turns("claude-opus-5-5", holder, limit=5, lease_s=60)):
            claimed.extend(claim.custom_ids)

    threads = [threading.Thread(target=claim_all, args=(f"thread-{i}",)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        claimed += json.loads(out)
    assert sorted(claimed) == sorted(queued)  # every turn claimed once: none twice, none lost
    assert store.queued_turns("claude-opus-5-5") == 0
    store.close()


def test_claims_are_one_transaction_per_batch(any_store):
    queued = _queue(any_store, 7)
    first = any_store.claim_turns("claude-opus-5-5", "host-a", limit=5, lease_s=60)
    second = any_store.claim_turns("claude-opus-5-5", "host-b", limit=5, lease_s=60)
    assert first.custom_ids == queued[:5] and second.custom_ids == queued[5:]  # oldest first
    assert first.turns[0][1]["max_tokens"] == 100  # the body travels with the turn
    assert any_store.claim_turns("claude-opus-5-5", "host-c", limit=5, lease_s=60) is None
    assert any_store.claim_turns("other-model", "host-c", limit=5, lease_s=60) is None


def test_a_batch_id_is_recorded_for_every_turn_of_its_claim(any_store):
    queued = _queue(any_store, 3)
    claim = any_store.claim_turns("claude-opus-5-5", "host-a", limit=5, lease_s=60)
    assert any_store.record_claim_batch(claim.intent_id, "msgbatch_pool")
    for custom_id in queued:
        row = any_store.request(custom_id)
        assert (row.state, row.batch_id) == ("submitted", "msgbatch_pool")
        assert any_store.batches_tried(custom_id) == 1
    assert "msgbatch_pool" in any_store.known_batch_ids()
    assert not any_store.record_claim_batch(claim.intent_id, "msgbatch_again")


def test_an_expired_lease_is_taken_over_and_its_turns_can_go_back(any_store):
    """A host that claimed turns and died: another takes the intent over when the lease
    runs out; a create that never happened puts the turns back in the queue."""
    queued = _queue(any_store, 4)
    dead = any_store.claim_turns("claude-opus-5-5", "host-dead", limit=10, lease_s=30)
    assert any_store.take_over_expired_claims("host-b", 30) == []  # not yet
    assert any_store.renew_claim(dead, -1)  # as if the host had stopped renewing long ago
    (taken,) = any_store.take_over_expired_claims("host-b", 30)
    assert taken.intent_id == dead.intent_id and taken.custom_ids == queued
    assert not any_store.renew_claim(dead, 30)  # the dead host's lease is gone
    assert any_store.renew_claim(taken, 30)
    assert any_store.release_claim(taken.intent_id) == 4  # reconciled by list: no batch
    assert any_store.queued_turns("claude-opus-5-5") == 4
    assert not any_store.record_claim_batch(dead.intent_id, "msgbatch_late")  # a duplicate
    again = any_store.claim_turns("claude-opus-5-5", "host-b", limit=10, lease_s=30)
    assert again.custom_ids == queued


def test_a_hosts_own_clock_decides_no_lease_member_or_window(pg_url, monkeypatch):
    """Regression (review of issue 12): leases, member rows and the queue's age were written
    and compared by each host's clock. A host 60 s ahead took over a claim whose holder was
    alive (a second create: a batch paid twice, then cancelled) and counted a live member
    as gone (a flush before everyone waited); a host 60 s behind never saw a dead holder's
    lease run out. The server's clock decides, whatever a host's says."""
    real_time = time.time
    key = "acct/claude-opus-5-5/0"
    host_a, host_b = bh.PostgresStore(pg_url), bh.PostgresStore(pg_url)
    try:
        _queue(host_a, 3, pool_key=key)
        host_a.claim_turns(key, "host-a", limit=1, lease_s=30)  # alive: renewing
        dead = host_a.claim_turns(key, "host-dead", limit=1, lease_s=30)
        assert host_a.renew_claim(dead, -1)  # its holder stopped renewing: ran out 1 s ago
        host_a.set_member("host-a", "acct", 2, 1, 30)

        monkeypatch.setattr(time, "time", lambda: real_time() - 60)  # host B, behind
        (taken,) = host_b.take_over_expired_claims("host-b", 30, key)
        assert taken.intent_id == dead.intent_id and 0 <= taken.age_s < 10
        count, due_in_s = host_b.queue_head(key, 30)
        assert count == 1 and 20 < due_in_s <= 30  # not a minute younger than it is

        monkeypatch.setattr(time, "time", lambda: real_time() + 60)  # host B, ahead
        assert host_b.take_over_expired_claims("host-b", 30, key) == []  # both leases live
        assert host_b.pool_census("acct") == (2, 3)  # host-a's agents still count
        count, due_in_s = host_b.queue_head(key, 30)
        assert count == 1 and 20 < due_in_s <= 30  # not a minute older: its window not due
    finally:
        host_a.close()
        host_b.close()


def test_a_turn_is_finished_once_even_when_two_hosts_see_its_batch_end(any_store):
    (custom_id,) = _queue(any_store, 1)
    claim = any_store.claim_turns("claude-opus-5-5", "host-a", limit=1, lease_s=60)
    any_store.record_claim_batch(claim.intent_id, "msgbatch_1")
    listener = any_store.listen("turns")
    assert any_store.finish_turn(custom_id, _succeeded("first"))
    assert not any_store.finish_turn(custom_id, _succeeded("second"))
    row = any_store.request(custom_id)
    assert row.state == "ended" and json.loads(row.message)["content"][0]["text"] == "first"
    assert row.cost_usd and row.wait_s == 2.0  # the ledger and turnaround, same transaction
    assert ("turns", custom_id) in listener.wait(2.0)
    listener.close()


def test_an_end_written_by_another_hosts_poller_survives_its_agent_recording_the_batch(
        any_store):
    """The poller (any host) may write a turn's end before its agent, woken on another host,
    records the batch id it was told: that end must stay, or the answer is lost."""
    (custom_id,) = _queue(any_store, 1)
    claim = any_store.claim_turns("claude-opus-5-5", "host-a", limit=1, lease_s=60)
    any_store.record_claim_batch(claim.intent_id, "msgbatch_fast")
    assert any_store.finish_turns({custom_id: _succeeded()}) == [custom_id]
    any_store.set_batch(custom_id, "msgbatch_fast")  # the agent, a moment late
    assert any_store.request(custom_id).state == "ended"
    any_store.set_batch(custom_id, "msgbatch_other")  # a re-attach to another batch still moves
    assert any_store.request(custom_id).state == "submitted"


def test_the_queue_counts_waiting_turns_and_members_their_active_agents(any_store):
    """What "every agent is waiting" is computed from, across hosts: live members' active
    agents, and the account's turns queued, claimed or in a batch (not those ended)."""
    any_store.set_member("host-a", "acct", 3, 0, 60)
    any_store.set_member("host-b", "acct", 2, 0, 60)
    any_store.set_member("host-dead", "acct", 4, 0, -1)  # its lease ran out
    queued = _queue(any_store, 3, pool_key="acct/claude-opus-5-5/0")
    _queue(any_store, 2, pool_key="other/claude-opus-5-5/0")
    assert any_store.pool_census("acct") == (5, 3)
    claim = any_store.claim_turns("acct/claude-opus-5-5/0", "host-a", limit=2, lease_s=60)
    any_store.record_claim_batch(claim.intent_id, "msgbatch_1")
    assert any_store.pool_census("acct") == (5, 3)
    any_store.finish_turns({c: _succeeded() for c in claim.custom_ids})
    assert any_store.pool_census("acct") == (5, 1)
    assert any_store.withdraw_turns(queued) == [queued[2]]  # only the unclaimed one
    assert any_store.pool_census("acct") == (5, 0)
    any_store.drop_member("host-b")
    assert any_store.pool_census("acct") == (3, 0)


def test_a_refused_create_fails_its_turns_with_the_reason(any_store):
    queued = _queue(any_store, 2)
    claim = any_store.claim_turns("claude-opus-5-5", "host-a", limit=5, lease_s=60)
    listener = any_store.listen("turns")
    assert any_store.fail_claim(claim.intent_id, "AccountRefused: billing") == queued
    states = any_store.turn_states(queued)
    assert {q for _row, q in states.values()} == {"failed"}
    assert states[queued[0]][0].error_message == "AccountRefused: billing"
    assert isinstance(bh._shared_error("AccountRefused: billing"), bh.AccountRefused)
    assert {p for _c, p in listener.wait(2.0)} == set(queued)
    listener.close()


# -- roles: advisory locks that die with their session ---------------------------------------

_HOLDER = """
import sys, time, batching_harness as bh
store = bh.PostgresStore(sys.argv[1])
role = store.hold_role("poller", "claude-opus-5-5")
print("held" if role else "refused", flush=True)
time.sleep(120)
"""


def test_a_killed_holders_role_moves_to_another_process(pg_url):
    store = bh.PostgresStore(pg_url)
    holder = _python(_HOLDER, pg_url)
    assert holder.stdout.readline().strip() == "held"
    assert store.hold_role("poller", "claude-opus-5-5") is None
    assert store.hold_role("poller", "other-model") is not None  # one poller per pool key
    started = time.monotonic()
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=10)
    role = None
    while role is None and time.monotonic() - started < 10:
        role = store.hold_role("poller", "claude-opus-5-5")
        time.sleep(0.05)
    assert role is not None and role.alive()
    assert time.monotonic() - started < 5  # seconds, not a lease's minutes
    store.close()


def test_a_role_whose_session_is_cut_is_known_lost_and_moves(pg_url, pg_server):
    import psycopg

    mine, other = bh.PostgresStore(pg_url), bh.PostgresStore(pg_url)
    role = mine.hold_role("flusher", "k")
    assert role.alive() and other.hold_role("flusher", "k") is None
    with psycopg.connect(pg_server, autocommit=True) as admin:  # only ours: tests share it
        admin.execute("SELECT pg_terminate_backend(%s)", (mine._roles_db.info.backend_pid,))
    assert not role.alive()  # the holder learns it, and stops acting in the role
    assert other.hold_role("flusher", "k") is not None
    mine.close()
    other.close()


def test_a_session_is_open_in_one_process_of_the_pool_at_a_time(pg_url, tmp_path):
    a, b = bh.PostgresStore(pg_url), bh.PostgresStore(pg_url)
    session = a.create_session(tmp_path, "m")
    lock_a, lock_b = a.session_lock(tmp_path / "host-a"), b.session_lock(tmp_path / "host-b")
    lock_a.acquire(session.id)
    with pytest.raises(bh.JournalError, match="another batching-harness process"):
        lock_b.acquire(session.id)
    with pytest.raises(bh.JournalError):  # nor twice in one process
        a.session_lock(tmp_path).acquire(session.id)
    lock_a.release()
    lock_b.acquire(session.id)
    lock_b.release()
    a.close()
    b.close()


def _cut_roles_connection(store: bh.PostgresStore, pg_server: str) -> None:
    import psycopg

    with psycopg.connect(pg_server, autocommit=True) as admin:  # only ours: tests share it
        admin.execute("SELECT pg_terminate_backend(%s)", (store._roles_db.info.backend_pid,))


def test_a_session_lock_cut_with_its_connection_is_taken_back_before_the_next_step(
        pg_url, pg_server, tmp_path):
    """A restarted server or a network cut ends the connection that holds the lock, and the
    server lets go of it without a word: confirm() takes it back, so a second process is
    still refused (found by review: two processes drove one fleet run and applied an
    answer twice)."""
    a, b = bh.PostgresStore(pg_url), bh.PostgresStore(pg_url)
    lock_a, lock_b = a.session_lock(tmp_path / "host-a"), b.session_lock(tmp_path / "host-b")
    lock_a.acquire("fleet-run-1")
    _cut_roles_connection(a, pg_server)
    lock_a.confirm()
    with pytest.raises(bh.JournalError, match="another batching-harness process"):
        lock_b.acquire("fleet-run-1")
    a.close()
    b.close()


def test_a_session_taken_during_the_cut_stops_the_process_that_lost_it(
        pg_url, pg_server, tmp_path):
    a, b = bh.PostgresStore(pg_url), bh.PostgresStore(pg_url)
    lock_a, lock_b = a.session_lock(tmp_path / "host-a"), b.session_lock(tmp_path / "host-b")
    lock_a.acquire("fleet-run-1")
    _cut_roles_connection(a, pg_server)
    lock_b.acquire("fleet-run-1")  # the other process got it while A was cut off
    with pytest.raises(bh.SessionTaken, match="fleet run run-1 was taken over"):
        lock_a.confirm()
    a.close()
    b.close()


def test_recording_an_end_again_never_reopens_an_applied_turn(any_store):
    """Two collectors of one end (two processes, or a retry): the second record_outcome must
    not turn 'applied' back into 'ended', or its apply_request appends the paid answer
    again. A hurried turn's late answer can only become waste."""
    session = any_store.create_session(Path("/w"), "claude-opus-5-5")
    row = request_row(session)
    any_store.begin_request(row)
    any_store.set_batch(row.custom_id, "msgbatch_x")
    content = [{"type": "text", "text": "answer"}]
    for _collector in range(2):
        any_store.record_outcome(row.custom_id, _succeeded("answer"))
        any_store.apply_request(any_store.request(row.custom_id), content)
    assert [m["role"] for m in any_store.messages(session.id, 0)] == ["assistant"]
    hurried = request_row(session)
    any_store.begin_request(hurried)
    any_store.set_batch(hurried.custom_id, "msgbatch_y")
    any_store.hurry_request(hurried.custom_id)
    any_store.record_outcome(hurried.custom_id, _succeeded("late"))
    assert any_store.request(hurried.custom_id).state == "hurried"
    any_store.record_outcome(hurried.custom_id, _succeeded("late"), state="wasted")
    assert any_store.request(hurried.custom_id).state == "wasted"


def test_queueing_a_turn_again_after_a_lost_commit_reply_queues_it_once(any_store):
    """A commit that reached the server but whose reply was lost is retried: the retry must
    not fail the agent on a duplicate key, nor queue the turn twice."""
    (custom_id,) = _queue(any_store, 1)
    any_store.queue_turn(custom_id, "claude-opus-5-5", {"model": "claude-opus-5-5"})
    assert any_store.queued_turns("claude-opus-5-5") == 1


def test_continue_picks_the_newest_run_started_on_this_host(any_store, tmp_path):
    """A pool holds every host's runs; a run's work dirs are on the host that started it, so
    `fleet --continue` picks this host's newest (found by review: it took another host's)."""
    mine = any_store.create_run("a.jsonl", {"origin": bh.run_origin(tmp_path / "a")})
    theirs = any_store.create_run("b.jsonl", {"origin": "elsewhere:/home/b"})
    assert any_store.latest_fleet_run().id == theirs.id
    assert any_store.latest_fleet_run(bh.run_origin(tmp_path / "a")).id == mine.id


def test_resuming_a_run_the_pool_does_not_have_says_so(pg_url, tmp_path, capsys):
    env = {**harness_env(tmp_path), "ANTHROPIC_API_KEY": "k"}
    assert bh.main(["fleet", "--resume", "nosuchrun", "--pool", pg_url], env) == 2
    err = capsys.readouterr().err
    assert "internal error" not in err and "no fleet run nosuchrun in" in err


# -- wake-ups: LISTEN/NOTIFY, not polling the database ---------------------------------------

def test_a_waiting_process_is_woken_by_notify_from_another(pg_url):
    waiter, writer = bh.PostgresStore(pg_url), bh.PostgresStore(pg_url)
    listener = waiter.listen("queue")
    started = time.monotonic()
    assert listener.wait(0.2) == []  # nothing published: the wait times out
    assert time.monotonic() - started >= 0.2
    heard: list = []
    thread = threading.Thread(target=lambda: heard.extend(listener.wait(30)))
    thread.start()
    woke_from = time.monotonic()
    _queue(writer, 1, pool_key="claude-haiku-5-5")
    thread.join(timeout=30)
    assert heard == [("queue", "claude-haiku-5-5")]
    assert time.monotonic() - woke_from < 5  # woken by the notify, not by the 30 s timeout
    listener.close()
    waiter.close()
    writer.close()


# -- a server that goes away -------------------------------------------------------------------

def test_a_dropped_connection_is_one_clear_error_then_reconnects(pg_url, pg_server):
    import psycopg

    store = bh.PostgresStore(pg_url)
    session = store.create_session(Path("/w"), "m")
    pid = store._one("SELECT pg_backend_pid() AS pid")["pid"]
    with psycopg.connect(pg_server, autocommit=True) as admin:  # only ours: tests share it
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    with pytest.raises(bh.PoolUnreachable, match=r"the pool .* cannot be used .*; "):
        store.session(session.id)
    assert store.session(session.id) == session  # the next call has a new connection
    store.close()


# -- the harness with --pool ---------------------------------------------------------------------

def test_the_agent_resumes_an_in_flight_turn_from_the_pool(pg_url, tmp_path):
    """SIGKILL while the batch is being polled, then --continue with --pool from a fresh
    state dir (nothing of the session is on this host's disk): the batch is collected, not
    sent again, and the pool holds the whole conversation."""
    with fa.FakeAPI(hold=True) as api:
        api.script.extend([fa.text("slow answer"), fa.text("next answer")])
        proc = start(api, tmp_path, "--no-sandbox", "--pool", pg_url, "-p", "first")
        api.wait_for("list", 1, timeout_s=STARTUP_S)  # created, and being polled
        kill(proc)
        (tmp_path / "home").rename(tmp_path / "home-of-the-dead-host")
        api.hold = False
        api.release()
        run = run_main(tmp_path, "--no-sandbox", "--pool", pg_url, "--continue",
                       "--poll-interval", "0.1", "--output-format", "json", "-p", "next",
                       api=api)
        assert run.status == 0, run.err
        assert json.loads(run.out)["result"] == "slow answer\n\nnext answer"
        assert len(api.batch_ids()) == 2  # one per turn: the first was never sent again
    store = bh.PostgresStore(pg_url)
    assert [r.state for r in store.requests()] == ["applied", "applied"]
    session = store.latest_session()
    assert [m["role"] for m in store.messages(session.id, 0)] == \
        ["user", "assistant", "user", "assistant"]
    assert not (tmp_path / "home" / "journal.db").exists()  # it all went to the pool
    store.close()


def test_stats_report_across_every_host_of_the_pool(pg_url, tmp_path):
    """Two hosts (two state dirs) write to one pool; a third one's --stats sees both."""
    with fa.FakeAPI() as api:
        api.script.extend([fa.text("a"), fa.text("b")])
        for host, model in (("host-a", "claude-opus-5-5"), ("host-b", "claude-haiku-5-5")):
            (tmp_path / host).mkdir()
            run = run_main(tmp_path / host, "--no-sandbox", "--pool", pg_url, "--model", model,
                           "--poll-interval", "0.1", "-p", "hi", api=api)
            assert run.status == 0, run.err
    (tmp_path / "host-c").mkdir()
    run = run_main(tmp_path / "host-c", "--stats", "--pool", pg_url)
    assert run.status == 0, run.err
    assert "claude-opus-5-5" in run.out and "claude-haiku-5-5" in run.out


def test_doctor_checks_the_pool_and_names_each_fix(pg_url, tmp_path):
    out = run_main(tmp_path, "--doctor", "--pool", pg_url).out
    for name in ("pool driver", "pool connection", "pool server", "pool schema",
                 "pool durability", "pool connections"):
        assert f"ok   {name}" in out, out
    assert "empty; the first process to connect creates" in out
    bh.PostgresStore(pg_url).close()
    assert "(current)" in run_main(tmp_path, "--doctor", "--pool", pg_url).out
    db, _schema = _raw(pg_url)
    db.execute("UPDATE schema_version SET version = 99")
    db.close()
    run = run_main(tmp_path, "--doctor", "--pool", pg_url)
    assert "FAIL pool schema" in run.out and "pip install -U batching-harness" in run.out
    assert run.status == 1


def test_doctor_names_the_fix_when_the_server_is_not_there(tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = run_main(tmp_path, "--doctor", "--pool", f"postgresql://bh@127.0.0.1:{port}/x").out
    assert "FAIL pool connection" in out and "fix: start the server" in out
    with fa.FakeAPI() as api:
        run = run_main(tmp_path, "--pool", f"postgresql://bh:secret@127.0.0.1:{port}/x",
                       "-p", "hi", api=api)
    assert run.status == 2 and "cannot be used" in run.err
    assert "secret" not in run.err  # the password never reaches the screen


def test_without_the_driver_a_pool_url_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "psycopg", None)  # `import psycopg` now fails
    with fa.FakeAPI() as api:
        run = run_main(tmp_path, "--pool", "postgresql://bh@127.0.0.1/x", "-p", "hi", api=api)
    assert run.status == 2
    assert run.err.strip().splitlines() == [
        "batching-harness: --pool postgresql://… needs the PostgreSQL driver: "
        "pip install 'batching-harness[postgres]'"]
    out = run_main(tmp_path, "--doctor", "--pool", "postgresql://bh@127.0.0.1/x").out
    assert "FAIL pool driver" in out and "fix: pip install 'batching-harness[postgres]'" in out


def test_pool_urls_are_shown_without_their_password_and_carried_into_resume():
    url = "postgresql://alice:s3cret@db.internal:5433/agents?schema=team"
    assert bh._pool_shown(url) == "postgresql://alice@db.internal:5433/agents?schema=team"
    config = bh.parse_config([], {"BATCHING_HARNESS_POOL": url})
    assert config.pool == url
    assert bh.carried_flags(config) == ["--pool", bh._pool_shown(url)]
    assert bh.parse_config(["--pool", "postgresql:///x"], {"BATCHING_HARNESS_POOL": url}).pool \
        == "postgresql:///x"
    with pytest.raises(bh.ConfigError, match="unknown kind of pool 'mysql'"):
        bh.open_store("mysql://u@h/db", Path("/tmp"))
    with pytest.raises(bh.ConfigError, match="schema"):
        bh._split_pool_url("postgresql://u@h/db?schema=Robert');DROP")


def test_a_fleet_keeps_its_run_in_the_pool(fake_api, pg_url, tmp_path, capsys):
    """`fleet --pool`: one host's agents pooled into shared batches through the pool's queue,
    the run, its agents, its shared batches and every turn journaled in PostgreSQL (the fleet's tables migrate there
    too), so --stats from another host sees them."""
    from tests.test_fleet import fleet, widths

    status, out, err = fleet(fake_api, tmp_path, capsys,
                             [{"id": f"a{i}", "prompt": "run: pwd"} for i in range(3)],
                             "--pool", pg_url)
    assert status == 0, err
    assert widths(fake_api) == [3, 3]  # two rounds, one batch each
    store = bh.PostgresStore(pg_url)
    run = store.fleet_run(out["run_id"])
    assert [a.state for a in store.fleet_agents(run.id)] == ["done"] * 3
    # Pooled through the store's shared queue (one process here), not the in-process pooler
    assert [b.width for b in store.shared_batches(f"{run.token}-")] == [3, 3]
    assert out["totals"]["batches_created"] == 2
    assert out["totals"]["flush_reasons"] == {"all waiting": 2}
    assert {r.state for r in store.requests()} == {"applied"} and len(store.requests()) == 6
    assert not (tmp_path / "home" / "journal.db").exists()
    store.close()


def test_a_server_that_goes_away_is_one_clear_error_and_the_store_comes_back(tmp_path):
    """Stop the database under a live store (a network cut), then start it again: each call
    in between fails at once with PoolUnreachable and the fix, none hangs; once the server
    is back the same store carries on, with nothing reopened."""
    from tests import pg_cluster

    if pg_cluster.find_bindir() is None:
        pytest.skip("needs initdb/pg_ctl to stop and start a server of its own")
    root = Path(tempfile.gettempdir()) / f"bh-pg-cut-{os.getpid()}-{time.monotonic_ns()}"
    try:
        store = bh.PostgresStore(pg_cluster.start(root) + "?schema=cut")
        session = store.create_session(tmp_path, "m")
        pg_cluster.halt(root)
        for _ in range(2):  # the broken connection, then a connect to nobody
            with pytest.raises(bh.PoolUnreachable, match="start the server"):
                store.add_user_content(session.id, 0, [{"type": "text", "text": "lost"}])
        pg_cluster.resume(root)
        store.add_user_content(session.id, 0, [{"type": "text", "text": "kept"}])
        assert store.messages(session.id, 0)[0]["content"] == [{"type": "text", "text": "kept"}]
        store.close()
    finally:
        pg_cluster.stop(root)


def test_each_queued_turn_is_due_by_its_own_window(any_store):
    """Processes that share a pool key may pool on different windows (a proxy's 60 s, a
    fleet's 0.5 s). The flusher held every turn to its OWN window: a fleet's turns waited
    the proxy's minute whenever the proxy held the role. Each turn now carries its deadline."""
    key = "acct/claude-opus-5-5/0"
    _queue(any_store, 1, pool_key=key)  # queued with no deadline of its own
    assert any_store.queue_head(key, 60)[1] > 50  # due at the flusher's window
    session = any_store.create_session(Path("/w"), "claude-opus-5-5")
    hurried = request_row(session, custom_id="hurried")
    any_store.begin_request(hurried)
    any_store.queue_turn(hurried.custom_id, key, {"model": "claude-opus-5-5"}, window_s=0.5)
    count, due_in_s = any_store.queue_head(key, 60)
    assert count == 2 and due_in_s <= 0.5  # the fleet's turn is due at its own window
