"""The journal: schema, crash-safety rules and clear messages for a journal we cannot use."""

from __future__ import annotations

import sqlite3
import time

import pytest

import batching_harness as bh


def _request(session: bh.SessionRow, **kw) -> bh.RequestRow:
    base = dict(custom_id=bh.new_custom_id(), session_id=session.id, conversation=0,
                n_messages=1, model="claude-opus-5-5", cache_ttl="1h", max_tokens=100,
                request_hash="h", attempt=1, state="submitting", batch_id=None,
                submitted_at=time.time(), estimate_usd=0.01)
    base.update(kw)
    return bh.RequestRow(**base)


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


def test_user_content_merges_to_keep_roles_alternating(tmp_path):
    journal = bh.Journal(tmp_path / "j.db")
    s = journal.create_session(tmp_path, "m")
    journal.add_user_content(s.id, 0, [{"type": "text", "text": "a"}])
    journal.add_user_content(s.id, 0, [{"type": "text", "text": "b"}])
    (msg,) = journal.messages(s.id, 0)
    assert [b["text"] for b in msg["content"]] == ["a", "b"]


def test_request_lifecycle_and_committed_spend(tmp_path):
    journal = bh.Journal(tmp_path / "j.db")
    s = journal.create_session(tmp_path, "claude-opus-5-5")
    row = _request(s)
    journal.begin_request(row)
    assert journal.pending_request(s.id).state == "submitting"
    assert journal.request(row.custom_id).committed_usd == 0.01  # the estimate counts at once
    journal.set_batch(row.custom_id, "msgbatch_x")
    assert journal.known_batch_ids() == {"msgbatch_x"}
    usage = bh.Usage(input_tokens=10, output_tokens=5)
    cost = bh.cost_breakdown("claude-opus-5-5", usage, batch=True, requested_ttl="1h")
    journal.record_outcome(row.custom_id, bh.Outcome(
        "succeeded", time.time(), 3.0, {"content": [{"type": "text", "text": "x"}],
                                        "stop_reason": "end_turn"}, usage=usage, cost=cost))
    ended = journal.request(row.custom_id)
    assert ended.committed_usd == pytest.approx(cost.paid_usd)  # replaced, never added
    journal.apply_request(ended, [{"type": "text", "text": "x"}])
    assert journal.pending_request(s.id) is None
    assert journal.messages(s.id, 0)[-1]["role"] == "assistant"


def test_session_lookup_by_prefix(tmp_path):
    journal = bh.Journal(tmp_path / "j.db")
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
