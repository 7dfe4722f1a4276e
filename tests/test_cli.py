"""The command line around the loop: --stats history, --doctor, resuming a batch whose
results the API no longer keeps."""

from __future__ import annotations

import time

import pytest

import batching_harness as bh
from tests import fake_api as fa
from tests.support import detach_first_turn, make_rig, run_main


def test_stats_history_per_model_and_day(tmp_path):
    with fa.FakeAPI() as api:
        api.script.extend([fa.text("a"), fa.text("b")])
        fast = ("--no-sandbox", "--poll-interval", "0.1")
        assert run_main(tmp_path, *fast, "-p", "one", api=api).status == 0
        assert run_main(tmp_path, *fast, "--model", "claude-haiku-5-5", "-p", "two",
                        api=api).status == 0
    r = run_main(tmp_path, "--stats")
    assert r.status == 0, r.err
    assert "spend per model" in r.out and "spend per day" in r.out
    assert "claude-opus-5-5" in r.out and "claude-haiku-5-5" in r.out
    assert "How these figures are computed" in r.out


def test_doctor_reports_each_check(tmp_path):
    r = run_main(tmp_path, "--doctor")
    assert r.status in (0, 1)
    for name in ("srt", "bwrap", "socat", "probe"):
        assert name in r.out.lower()
    if r.status == 1:
        assert "fix:" in r.out


@pytest.mark.parametrize("journal_knows_age", [True, False])
def test_resuming_after_results_expired_says_so(tmp_path, journal_knows_age):
    with fa.FakeAPI(hold=True) as api:
        rig = make_rig(api, tmp_path, interrupts=["detach"])

        detach_first_turn(rig, "go")
        api.advance(30 * 86400)
        rig2 = make_rig(api, tmp_path, session=rig.agent.session)
        if journal_knows_age:  # our clock says 30 days passed too
            rig2.journal._db.execute("UPDATE requests SET submitted_at = submitted_at - ?",
                                     (30 * 86400,))
        with pytest.raises(bh.TurnFailed, match=r"29 days|no longer available"):
            rig2.agent.resume()
        assert api.count("create") == 1


def test_unknown_model_price_is_null_not_free(tmp_path):
    """Regression: a model missing from the price table was reported as costing $0."""
    import json

    with fa.FakeAPI() as api:
        api.script.append(fa.text("hi"))
        r = run_main(tmp_path, "--no-sandbox", "--poll-interval", "0.1", "--model",
                     "claude-foo-9", "--output-format", "json", "-p", "x", api=api)
    data = json.loads(r.out)
    assert r.status == 0 and data["cost_usd"] is None and data["sync_cost_usd"] is None
    assert "price unknown" in run_main(tmp_path, "--stats").out


def test_stats_shows_turnaround_by_model_and_batch_width(tmp_path):
    """--stats groups answered batches by model and width: one sample per batch (its entries
    end together), width = how many journaled requests the batch carried."""
    from tests.support import request_row

    store = bh.SqliteStore(tmp_path / "home" / "journal.db")
    session = store.create_session(tmp_path, "claude-opus-5-5")
    rows = [("b1", 30.0), ("w1", 50.0), ("w1", 52.0), ("w1", 51.0), ("w2", 70.0),
            ("w2", 75.0), ("w2", 71.0)]
    for batch_id, wait in rows:
        row = request_row(session, batch_id=batch_id)
        store.begin_request(row)
        store.record_outcome(row.custom_id, bh.Outcome("succeeded", time.time(), wait))
    grouped = bh.turnaround_by_width(store.requests())
    assert grouped == [("claude-opus-5-5", "1", [30.0]), ("claude-opus-5-5", "2-4", [52.0, 75.0])]
    # A shared batch's width is every host's entries (the pool knows it), not only ours.
    shared = bh.turnaround_by_width(store.requests(), {"w1": 7})
    assert ("claude-opus-5-5", "5-16", [52.0]) in shared
    r = run_main(tmp_path, "--stats")
    assert r.status == 0, r.err
    assert "batch turnaround by width" in r.out
    rows_shown = [x.split() for x in r.out.splitlines() if x.split()[:1] == ["claude-opus-5-5"]]
    assert ["claude-opus-5-5", "1", "1", "0:30", "0:30"] in rows_shown
    assert ["claude-opus-5-5", "2-4", "2", "1:04", "1:15"] in rows_shown
