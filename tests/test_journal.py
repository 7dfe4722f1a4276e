"""The journal: schema, crash-safety rules and clear messages for a journal we cannot use."""

from __future__ import annotations

import shutil
import sqlite3
import stat
import threading
import time
from pathlib import Path

import pytest

import batching_harness as bh
from tests import fake_api as fa
from tests.support import make_channel, make_rig, request_row

_request = request_row


def test_schema_is_versioned_and_wal(tmp_path):
    bh.Journal(tmp_path / "j.db").close()
    db = sqlite3.connect(tmp_path / "j.db")
    assert db.execute("PRAGMA user_version").fetchone()[0] == bh.SCHEMA_VERSION
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_newer_schema_is_refused_with_a_clear_message(tmp_path):
    db = sqlite3.connect(tmp_path / "j.db")
    db.execute("PRAGMA user_version = 99")
    db.commit()
    with pytest.raises(bh.JournalError, match="newer batching-harness"):
        bh.Journal(tmp_path / "j.db")


def test_not_a_database_is_reported(tmp_path):
    (tmp_path / "j.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(bh.JournalError, match=r"damaged|cannot be used"):
        bh.Journal(tmp_path / "j.db")


def test_locked_journal_is_reported_not_lost(tmp_path):
    journal = bh.Journal(tmp_path / "j.db")
    session = journal.create_session(tmp_path, "claude-opus-5-5")
    other = sqlite3.connect(tmp_path / "j.db", timeout=0.1)
    other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    journal._db.execute("PRAGMA busy_timeout = 100")
    with pytest.raises(bh.JournalError, match="locked"):
        journal.add_user_content(session.id, 0, [{"type": "text", "text": "hi"}])
    other.rollback()
    journal.add_user_content(session.id, 0, [{"type": "text", "text": "hi"}])
    assert journal.messages(session.id, 0)[0]["content"][0]["text"] == "hi"


def test_damaged_message_row_is_reported(tmp_path):
    journal = bh.Journal(tmp_path / "j.db")
    session = journal.create_session(tmp_path, "claude-opus-5-5")
    journal.add_user_content(session.id, 0, [{"type": "text", "text": "hi"}])
    journal._db.execute("UPDATE messages SET content = '{half-writ'")
    with pytest.raises(bh.JournalError, match="damaged"):
        journal.messages(session.id, 0)


def test_user_content_merges_to_keep_roles_alternating(any_store, tmp_path):
    journal = any_store
    s = journal.create_session(tmp_path, "m")
    journal.add_user_content(s.id, 0, [{"type": "text", "text": "a"}])
    journal.add_user_content(s.id, 0, [{"type": "text", "text": "b"}])
    (msg,) = journal.messages(s.id, 0)
    assert [b["text"] for b in msg["content"]] == ["a", "b"]


def test_request_lifecycle_and_committed_spend(any_store, tmp_path):
    journal = any_store
    s = journal.create_session(tmp_path, "claude-opus-5-5")
    row = _request(s)
    journal.begin_request(row)
    assert journal.pending_request(s.id).state == "submitting"
    assert journal.request(row.custom_id).committed_usd == 0.01  # the estimate counts at once
    journal.set_batch(row.custom_id, "msgbatch_x")
    assert journal.known_batch_ids() == {"msgbatch_x"}
    usage = bh.Usage(input_tokens=10, output_tokens=5)
    cost = bh.cost_breakdown("claude-opus-5-5", usage, lane="batch", requested_ttl="1h")
    journal.record_outcome(row.custom_id, bh.Outcome(
        "succeeded", time.time(), 3.0, {"content": [{"type": "text", "text": "x"}],
                                        "stop_reason": "end_turn"}, usage=usage, cost=cost))
    ended = journal.request(row.custom_id)
    assert ended.committed_usd == pytest.approx(cost.paid_usd)  # replaced, never added
    journal.apply_request(ended, [{"type": "text", "text": "x"}])
    assert journal.pending_request(s.id) is None
    assert journal.messages(s.id, 0)[-1]["role"] == "assistant"


def test_session_lookup_by_prefix(any_store, tmp_path):
    journal = any_store
    s = journal.create_session(tmp_path, "m")
    assert journal.find_session(s.id[:18]).id == s.id
    assert journal.latest_session(tmp_path).id == s.id
    assert journal.latest_session(tmp_path / "elsewhere") is None


def test_second_process_cannot_open_the_same_session(tmp_path):
    first, second = bh.SessionLock(tmp_path), bh.SessionLock(tmp_path)
    first.acquire("s1")
    with pytest.raises(bh.JournalError, match="another batching-harness"):
        second.acquire("s1")
    first.acquire("s2")  # switching sessions lets go of the old one
    second.acquire("s1")
    second.release()
    first.release()


# -- a store many threads share, and one that can grow ------------------------------------

FIXTURE_V1 = Path(__file__).parent / "fixtures" / "journal_v1.db"


def test_many_threads_share_one_store(any_store, tmp_path):
    """Regression: four threads calling add_user_content on one journal gave three
    'cannot start a transaction within a transaction' failures."""
    store = any_store
    sessions = [store.create_session(tmp_path, "claude-opus-5-5") for _ in range(8)]
    errors: list[BaseException] = []

    def work(session: bh.SessionRow) -> None:
        try:
            for i in range(25):
                store.add_user_content(session.id, 0, [{"type": "text", "text": str(i)}])
                store.begin_request(_request(session))
        except BaseException as exc:  # collected: the assertion below names it
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in sessions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for s in sessions:
        assert len(store.messages(s.id, 0)[0]["content"]) == 25
        assert len(store.requests(s.id)) == 25
    store.close()


def test_migrations_are_numbered_from_one_without_gaps():
    assert sorted(bh.MIGRATIONS) == list(range(1, bh.SCHEMA_VERSION + 1))
    assert bh.SCHEMA_VERSION >= 6


def test_a_journal_from_0_1_upgrades_in_place(tmp_path):
    path = tmp_path / "journal.db"
    shutil.copy(FIXTURE_V1, path)
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == 1
    store = bh.SqliteStore(path)
    assert store.schema_version == bh.SCHEMA_VERSION
    rows = store.requests()
    assert [r.state for r in rows] == ["applied", "applied", "submitted"]
    assert {r.lane for r in rows} == {"batch"}
    assert store.turnaround_samples("claude-opus-5-5")  # the new index answers old rows
    store.close()
    bh.SqliteStore(path).close()  # a second open finds nothing to do


def test_a_journal_from_0_1_resumes_its_in_flight_turn(fake_api, tmp_path):
    """The version before the re-cut left a batch in flight; this one upgrades the file and
    collects that batch without sending it again."""
    home = tmp_path / "home"
    home.mkdir()
    path = home / "journal.db"
    shutil.copy(FIXTURE_V1, path)
    old = sqlite3.connect(path)  # point the fixture's batch at one the stand-in holds
    in_flight = old.execute("SELECT custom_id FROM requests WHERE state='submitted'").fetchone()[0]
    fake_api.script.append(fa.text("answered after the upgrade"))
    batch_id = make_channel(fake_api).send(in_flight, {
        "model": "claude-opus-5-5", "max_tokens": 100,
        "messages": [{"role": "user", "content": "and again"}]}, exclude=set, notify=print)
    old.execute("UPDATE requests SET batch_id=? WHERE custom_id=?", (batch_id, in_flight))
    old.commit()
    old.close()
    session = bh.SqliteStore(path).latest_session()
    rig = make_rig(fake_api, tmp_path, session=session)
    assert rig.agent.resume().text == "answered after the upgrade"
    assert fake_api.count("create") == 1  # only the one this test made
    assert rig.journal.request(in_flight).state == "applied"


def test_state_is_private(tmp_path):
    """Regression (issue 13.11): the state dir was 755 and journal.db 644, while the journal
    holds tool output."""
    home = tmp_path / "home"
    home.mkdir(mode=0o755)
    bh.SqliteStore(home / "journal.db").close()
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert stat.S_IMODE((home / "journal.db").stat().st_mode) == 0o600


def test_a_state_location_that_is_a_file_is_one_clear_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(bh.JournalError, match="not a directory"):
        bh.SqliteStore(tmp_path / "file" / "journal.db")


def test_only_what_comes_before_money_is_spent_waits_for_the_disk(tmp_path):
    """Every commit waited for an fsync (synchronous=FULL): a fleet's 20 agents' writes
    queued behind each other's, about 0.7 s a round. Now a commit waits for the disk only
    when money is about to be spent or a command run on what it records (a request before
    it is sent, a pooled create's intent, a tool call's start); that fsync of the write-ahead log carries every earlier
    commit. Writes after a send stay at NORMAL: a killed process loses none of them, and a
    power loss only ones the API can give back (the batch by list, the answer again)."""
    store = bh.SqliteStore(tmp_path / "journal.db")
    session = store.create_session(tmp_path, bh.DEFAULT_MODEL)
    row = request_row(session)
    statements: list[str] = []
    store._db.set_trace_callback(statements.append)
    store.add_tool_results(session.id, 0, [{"type": "text", "text": "hi"}])
    store.begin_request(row)
    store.set_batch(row.custom_id, "msgbatch_1")
    store.begin_pool_batch("run", bh.DEFAULT_MODEL, "window", 0.0, [row.custom_id], [0.0])
    store.start_tool(row.custom_id, "toolu_1", "bash", {"command": "rm -r build"})
    store.record_tool(row.custom_id, "toolu_1", bh.ToolResult("", False, 0))
    durable = [statements[i + 2] for i, s in enumerate(statements)
               if s == "PRAGMA synchronous=FULL"]
    assert [s.split("(")[0].strip() for s in durable] == [
        "INSERT INTO requests", "INSERT INTO pool_batches", "INSERT INTO tool_calls"]
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL in between
