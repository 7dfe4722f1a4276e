"""The REPL in-process: lines fed from a list, output rendered to a string."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

import batching_harness as bh
from tests import fake_api as fa
from tests.support import journal_in_flight, make_rig


@pytest.fixture
def api():
    with fa.FakeAPI() as server:
        yield server


def make_repl(rig, lines, tmp_path):
    out = io.StringIO()
    console = Console(file=out, width=140, highlight=False, color_system=None)
    ui = bh.ConsoleUI(console, interactive=False)
    rig.agent.emit = ui.handle
    feed = iter(lines)

    def read_line():
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    lock = bh.SessionLock(tmp_path / "home")
    lock.acquire(rig.agent.session.id)
    repl = bh.Repl(rig.agent, rig.journal, ui, read_line, lambda sid: f"resume {sid}",
                   lambda exc: bh.log_bug(tmp_path / "home", exc), lock)
    return repl, out


def test_a_bug_in_a_turn_is_logged_and_the_repl_lives_on(api, tmp_path):
    rig = make_rig(api, tmp_path)

    def broken(_text):
        raise RuntimeError("simulated bug")

    rig.agent.prompt = broken
    repl, out = make_repl(rig, ["do it", "/help"], tmp_path)
    assert repl.run() == 0
    text = out.getvalue()
    assert "internal error (RuntimeError: simulated bug)" in text
    assert "/resume" in text  # /help still ran after the bug
    log = (tmp_path / "home" / "errors.log").read_text()
    assert "Traceback" in log and "simulated bug" in log


def test_prompt_answer_stats_and_unknown_command(api, tmp_path):
    api.script.append(fa.text("the **answer**"))
    rig = make_rig(api, tmp_path)
    repl, out = make_repl(rig, ["question", "/stats", "/stast", "/exit"], tmp_path)
    assert repl.run() == 0
    text = out.getvalue()
    assert "the answer" in text
    assert "total: paid $" in text and "batch saved" in text
    assert "did you mean /stats" in text


def test_resume_command_lists_and_picks_a_session(api, tmp_path):
    api.script.extend([fa.text("from the old session")])
    old = make_rig(api, tmp_path)
    old.agent.prompt("first")
    new_session = old.journal.create_session(old.workdir.resolve(), "claude-opus-5-5")
    rig = make_rig(api, tmp_path, session=new_session)
    repl, out = make_repl(rig, ["/resume 1", "/stats"], tmp_path)  # empty sessions are not listed
    assert repl.run() == 0
    assert rig.agent.session.id == old.agent.session.id
    assert f"resumed session {old.agent.session.id}" in out.getvalue()


def test_detach_exits_zero_with_the_resume_command(api, tmp_path):
    api.hold = True
    rig = make_rig(api, tmp_path, interrupts=["detach"])

    def interrupt(_s):
        raise KeyboardInterrupt

    rig.clock.on_wait = interrupt
    repl, out = make_repl(rig, ["long task", "never read"], tmp_path)
    assert repl.run() == 0
    assert f"resume {rig.agent.session.id}" in out.getvalue()
    assert api.count("cancel") == 0


def test_eof_with_a_turn_in_flight_prints_how_to_resume(api, tmp_path):
    rig = make_rig(api, tmp_path)
    journal_in_flight(rig, "msgbatch_gone", submitted_at=0.0)
    repl, out = make_repl(rig, [], tmp_path)
    repl.agent.resume = lambda: None  # not re-attaching here: only the exit path is tested
    assert repl.run() == 0
    assert "still in flight (msgbatch_gone)" in out.getvalue()


def test_resume_refuses_a_session_open_in_another_process(api, tmp_path):
    """Regression: /resume skipped the session lock, so two processes applied one answer."""
    other = make_rig(api, tmp_path)
    held = bh.SessionLock(tmp_path / "home")
    held.acquire(other.agent.session.id)
    rig = make_rig(api, tmp_path, session=other.journal.create_session(
        (tmp_path / "work").resolve(), "claude-opus-5-5"))
    repl, out = make_repl(rig, [f"/resume {other.agent.session.id}", "/help"], tmp_path)
    assert repl.run() == 0
    assert "open in another batching-harness process" in out.getvalue()
    assert rig.agent.session.id != other.agent.session.id
    assert "/resume" in out.getvalue()  # the REPL went on to /help


def test_a_failing_slash_command_does_not_end_the_repl(api, tmp_path):
    """Regression: an ambiguous /resume id escaped the boundary and exited with status 2."""
    rig = make_rig(api, tmp_path)
    for _ in range(2):
        rig.journal.create_session((tmp_path / "work").resolve(), "claude-opus-5-5")
    prefix = rig.agent.session.id[:4]
    repl, out = make_repl(rig, [f"/resume {prefix}", "/help"], tmp_path)
    assert repl.run() == 0
    assert "ambiguous" in out.getvalue() and "/clear" in out.getvalue()


def test_clear_waits_for_a_turn_in_flight(api, tmp_path):
    rig = make_rig(api, tmp_path)
    journal_in_flight(rig, "msgbatch_y", submitted_at=0.0)
    repl, out = make_repl(rig, ["/clear"], tmp_path)
    repl.agent.resume = lambda: None
    repl.run()
    assert "still in flight" in out.getvalue()
    assert rig.agent.session.conversation == 0


def test_headless_prints_the_resume_command_when_faults_outlast_retries(api, tmp_path, capsys):
    """Regression: -p exited 1 with no resume command while a paid batch was in flight."""
    api.inject("list", "503", count=50)
    rig = make_rig(api, tmp_path, retry_attempts=2)
    err = io.StringIO()
    config = bh.parse_config(["-p", "go", "--output-format", "json"], {})
    status = bh.run_headless(rig.agent, config, "go", Console(file=err, width=200))
    assert status == 1
    assert f"--resume {rig.agent.session.id}" in err.getvalue()
    import json

    data = json.loads(capsys.readouterr().out)
    assert data["is_error"] and len(data["batches"]) == 1


def test_a_results_stream_cut_short_counts_as_a_lost_connection():
    import httpx2

    assert bh._is_transport_failure(httpx2.RemoteProtocolError("peer closed connection"))
    assert bh._is_transport_failure(ConnectionResetError())
    assert not bh._is_transport_failure(ValueError("a bug"))


def test_stats_row_of_a_turn_that_never_reached_the_api_costs_nothing(api, tmp_path):
    rig = make_rig(api, tmp_path)
    journal_in_flight(rig, None, custom_id="bh_never")
    rig.journal.fail_request("bh_never", "never reached the API")
    repl, out = make_repl(rig, ["/stats"], tmp_path)
    repl.agent.resume = lambda: None
    repl.run()
    row = next(line for line in out.getvalue().splitlines() if "never reached" in line)
    assert "$0" in row and "est." not in row


def test_stats_row_of_a_billed_turn_whose_result_was_lost_is_not_free(api, tmp_path):
    rig = make_rig(api, tmp_path)
    journal_in_flight(rig, "msgbatch_ran")
    rig.journal.fail_request("bh_msgbatch_ran", "results no longer available")
    repl, out = make_repl(rig, ["/stats"], tmp_path)
    repl.agent.resume = lambda: None
    repl.run()
    row = next(line for line in out.getvalue().splitlines() if "no longer available" in line)
    assert "usage unknown" in row and "$0" not in row
    assert "price unknown" in out.getvalue()
