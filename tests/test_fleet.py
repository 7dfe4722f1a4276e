"""`batching-harness fleet`: many agents, their turns pooled. Each test runs the real
front-end (in-process through main(), or as a process for the crash and the terminal) against
the stand-in, and checks what the user sees and what the API was asked."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time
from pathlib import Path

import pytest

import batching_harness as bh
from tests import fake_api as fa
from tests.zygote import spawn, spawn_in_terminal

ROOT = Path(__file__).resolve().parent.parent
PREAMBLE = "Project conventions, shared by every task.\n" + "Keep changes small. " * 150


def env_for(api, home: Path) -> dict[str, str]:
    return {"ANTHROPIC_API_KEY": "test-key", "ANTHROPIC_BASE_URL": api.base_url,
            "BATCHING_HARNESS_HOME": str(home), "PATH": os.environ.get("PATH", "")}


def write_tasks(tmp_path: Path, lines: list) -> Path:
    path = tmp_path / "tasks.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def fleet(api, tmp_path, capsys, lines, *flags: str) -> tuple[int, dict, str]:
    tasks = write_tasks(tmp_path, lines)
    status = bh.main(["fleet", str(tasks), "--no-sandbox", "--poll-interval", "0.02",
                      "--runs-dir", str(tmp_path / "runs"), "--output-format", "json", "--window", "30",
                      *flags],
                     env_for(api, tmp_path / "home"))
    captured = capsys.readouterr()
    out = captured.out.strip().splitlines()
    return status, json.loads(out[-1]) if out else {}, captured.err


def widths(api) -> list[int]:
    return [len(api._batches[b].requests) for b in api.batch_ids()]


def first_text(params) -> str:
    return json.dumps(params["messages"][0])


def test_a_task_file_with_bad_lines_is_refused_before_anything_is_sent(fake_api, tmp_path,
                                                                        capsys):
    status, _, err = fleet(fake_api, tmp_path, capsys, [
        {"id": "ok", "prompt": "fine"}, '{"id": "x", "prompt": ', {"id": "y"},
        {"id": "ok", "prompt": "twice"}, {"prompt": "p", "colour": "red"}, "a plain prompt"])
    assert status == 2
    for expected in ("line 2: not valid JSON", 'line 3: "prompt"', "line 4: id 'ok' is used on "
                     "line 1", "line 5: unknown key(s) colour"):
        assert expected in err
    assert fake_api.calls == [] and not (tmp_path / "runs").exists()


def test_three_agents_share_each_round_and_each_gets_its_own_work_dir(fake_api, tmp_path, capsys):
    template = tmp_path / "template"
    template.mkdir()
    (template / "README").write_text("seed\n")
    status, out, _ = fleet(fake_api, tmp_path, capsys,
                        [{"id": f"a{i}", "prompt": "run: cat README && pwd"} for i in range(3)],
                        "--template", str(template))
    assert status == 0
    assert widths(fake_api) == [3, 3]  # two rounds, one batch each
    agents = {a["id"]: a for a in out["agents"]}
    assert {a["state"] for a in agents.values()} == {"done"}
    assert {a["workdir"] for a in agents.values()} == {
        str((tmp_path / "runs" / out["run_id"] / f"a{i}").resolve()) for i in range(3)}
    assert all("seed" in a["result"] and a["turns"] == 2 for a in agents.values())
    assert out["totals"]["batches_created"] == 2 and out["totals"]["width"]["max"] == 3
    assert out["totals"]["flush_reasons"] == {"all waiting": 2}
    ids = [r.custom_id for r in fake_api.model_requests]
    assert all(bh.parse_custom_id(c) for c in ids) and len(set(ids)) == 6


def test_the_primer_goes_first_and_the_shared_prefix_is_written_once(fake_api, tmp_path, capsys):
    preamble = tmp_path / "preamble.md"
    preamble.write_text(PREAMBLE)
    tasks = [{"id": f"p{i}", "prompt": f"run: echo {i}"} for i in range(4)]
    status, primed, _ = fleet(fake_api, tmp_path, capsys, tasks, "--preamble", str(preamble))
    assert status == 0 and widths(fake_api)[0] == 1  # the primer's first turn alone
    first = fake_api._batches[fake_api.batch_ids()[0]].requests[0]["custom_id"]
    assert bh.parse_custom_id(first)[1] == 0
    # Without the primer, four first turns in one batch each write the same prefix.
    fake_api.cache.clear()
    (tmp_path / "np").mkdir()
    status, unprimed, _ = fleet(fake_api, tmp_path / "np", capsys, tasks, "--preamble",
                             str(preamble), "--no-prime")
    assert status == 0
    written, unwritten = (primed["totals"]["cache_write_tokens"],
                          unprimed["totals"]["cache_write_tokens"])
    assert written < unwritten
    print(f"cache write tokens: primed {written}, not primed {unwritten}")


def test_a_refused_turn_fails_only_its_agent_and_a_flaky_one_goes_into_the_next_batch(
        fake_api, tmp_path, capsys):
    flaked: list[str] = []

    def model(params):
        text = first_text(params)
        if "BAD" in text:
            return fa.errored("invalid_request_error", "messages.0: this prompt is refused")
        if "FLAKY" in text and not flaked:
            flaked.append("once")
            return fa.errored("overloaded_error", "Overloaded")
        return None  # the demo model

    fake_api.script.extend([model] * 20)
    status, out, _ = fleet(fake_api, tmp_path, capsys, [
        {"id": "bad", "prompt": "BAD run: true"}, {"id": "flaky", "prompt": "FLAKY run: true"},
        {"id": "fine", "prompt": "run: true"}])
    agents = {a["id"]: a for a in out["agents"]}
    assert status == 1
    assert agents["bad"]["state"] == "failed" and "this prompt is refused" in agents["bad"]["error"]
    assert agents["flaky"]["state"] == "done" and agents["fine"]["state"] == "done"
    flaky_batches = agents["flaky"]["batches"]
    assert len(flaky_batches) == 3 and flaky_batches[0] != flaky_batches[1]


def test_sigkill_mid_fleet_then_continue_pays_no_turn_twice_and_loses_none(fake_api, tmp_path):
    fake_api.hold = True
    home = tmp_path / "home"
    tasks = write_tasks(tmp_path, [{"id": f"k{i}", "prompt": f"run: echo {i}"} for i in range(3)])
    command = ["fleet", "--no-sandbox", "--poll-interval", "0.05", "--window", "30",
               "--runs-dir", str(tmp_path / "runs")]
    first = spawn([*command, str(tasks)], env=env_for(fake_api, home), cwd=tmp_path)
    try:
        fake_api.wait_for_batches(1, timeout_s=20)
        wait_until_journaled(home / "journal.db")
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait(10)
    fake_api.hold = False
    fake_api.release()
    stdout, stderr = tmp_path / "continue.out", tmp_path / "continue.err"
    done = spawn([*command, "--continue", "--output-format", "json"], env=env_for(fake_api, home),
                 cwd=tmp_path, stdout=stdout, stderr=stderr)
    assert done.wait(60) == 0, stderr.read_text()
    out = json.loads(stdout.read_text().strip().splitlines()[-1])
    assert {a["state"] for a in out["agents"]} == {"done"}
    assert widths(fake_api) == [3, 3]  # the first round re-attached, not created again
    answered = [r.custom_id for r in fake_api.model_requests]
    assert len(answered) == len(set(answered)) == 6  # each turn answered (paid) once
    assert all(a["turns"] == 2 for a in out["agents"])


def wait_until_journaled(db_path: Path, timeout_s: float = 20) -> None:
    """The pooled create's id is in the journal (a crash before that is recover()'s case,
    tested in test_pooler)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with sqlite3.connect(db_path) as db:
            rows = db.execute("SELECT COUNT(*) FROM pool_batches WHERE state='created'").fetchone()
        if rows[0]:
            return
        time.sleep(0.05)
    raise TimeoutError("the pooled create was never journaled")


UNBUDGETED_MAIN = ("import os, sys\nimport batching_harness as bh\nbh.POLLS_PER_MINUTE = 100_000\n"
                   "sys.exit(bh.main(sys.argv[1:], dict(os.environ)))\n")


def test_the_live_table_in_a_real_terminal(tmp_path):
    pexpect = pytest.importorskip("pexpect")
    with fa.FakeAPI(hold=True) as api:
        tasks = write_tasks(tmp_path, [{"id": f"tty{i}", "prompt": "run: true"} for i in range(2)])
        env = {**env_for(api, tmp_path / "home"), "NO_COLOR": "1", "TERM": "xterm",
               "COLUMNS": "120", "LINES": "40"}
        # The poll budget (28 a minute) is the API's; the held batch here must not use it
        # up and make the test wait seconds for the next tick once it is released.
        child = spawn_in_terminal(["fleet", str(tasks), "--no-sandbox", "--poll-interval",
                                   "0.05", "--runs-dir", str(tmp_path / "runs")], env=env,
                                  cwd=tmp_path, timeout=30, dimensions=(40, 120),
                                  code=UNBUDGETED_MAIN)
        child.logfile_read = (tmp_path / "tty.log").open("w")
        try:
            child.expect("waiting on batch")
            child.expect("pool: 1 batch\\(es\\) in flight \\(widths 2\\)")
            child.sendcontrol("c")  # the menu names its keys; Enter keeps the fleet going
            child.expect_exact("[d] detach")
            child.expect_exact("[c] cancel every batch")
            child.send("\r")
            child.expect("waiting on batch")
            api.hold = False
            api.release()
            child.expect("fleet: 2 agents \\(2 done\\)")
            child.expect(pexpect.EOF)
        finally:
            child.close()
        assert child.exitstatus == 0


def test_a_resumed_fleets_table_goes_on_from_the_journal(tmp_path):
    """fleet --continue: the live table's turn, waited and cost start from what the journal
    holds (the turn number is the /stats row, as for one agent), not from zero."""
    from tests.support import request_row

    store = bh.SqliteStore(tmp_path / "journal.db")
    session = store.create_session(tmp_path, "claude-opus-5-5")
    answered, in_flight = request_row(session, batch_id="b1"), request_row(session, batch_id="b2")
    for row in (answered, in_flight):
        store.begin_request(row)
    store.record_outcome(answered.custom_id, bh.Outcome("succeeded", time.time(), 42.0))
    agent = bh.FleetAgentRow("run", 0, "a0", session.id, "p", str(tmp_path), "claude-opus-5-5",
                             None, "detached")
    board = bh.FleetBoard([agent], time.time, {session.id: store.requests(session.id)})
    view = board.rows()[0]
    assert (view.turn, view.waited_s) == (2, 42.0)
    board.handle(bh.TurnSent("msgbatch_3", "c3", "claude-opus-5-5", 3, time.time() - 5, None,
                             None, session_id=session.id))
    assert board.rows()[0].turn == 3
    board.set_state(session.id, "detached")  # the wait so far stays on the row
    assert board.rows()[0].waited_s >= 47.0


def test_the_printed_resume_command_repeats_the_runs_flags(tmp_path):
    """A detached run's hint must work as printed: it names the pool (without its password)
    and keeps --no-sandbox, or the resumed run looks in the wrong journal or changes how its
    tools run (found by review)."""
    import io

    from rich.console import Console

    fc = bh.parse_fleet_config(
        ["--continue", "--no-sandbox", "--pool", "postgresql://bh:secret@db.example/agents"],
        {"ANTHROPIC_API_KEY": "k", "BATCHING_HARNESS_HOME": str(tmp_path / "home")})
    store = bh.SqliteStore(tmp_path / "journal.db")
    run = store.create_run("tasks.jsonl", {})
    session = store.create_session(tmp_path, "claude-opus-5-5")
    store.add_agent(bh.FleetAgentRow(run.id, 0, "a0", session.id, "p", str(tmp_path),
                                     "claude-opus-5-5", None, "detached"))
    out = io.StringIO()
    assert bh._finish_fleet(fc, store, run, 1.0, 0, Console(file=out, width=300)) == 130
    hint = out.getvalue().split("pick them up with: ", 1)[1]
    assert f"fleet --resume {run.id} --no-sandbox --pool postgresql://bh@db.example/agents" in hint
    assert "secret" not in out.getvalue()
